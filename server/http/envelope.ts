import type { ServerResponse } from 'node:http';
import type { ErrorResponse, SuccessEnvelope } from '../../shared/envelope.js';

/**
 * The REST envelopes, built here and nowhere else: the REST facade and the raw routes both answer
 * through these two functions.
 */
export function successBody<T>(data: T, message: string, meta?: Record<string, unknown>): SuccessEnvelope<T> {
  return meta ? { status: 'success', message, data, meta } : { status: 'success', message, data };
}

export function errorBody(error: string, details?: string): ErrorResponse {
  return details ? { error, details } : { error };
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

export function sendError(res: ServerResponse, status: number, error: string, details?: string, headers?: Record<string, string>): void {
  sendJson(res, status, errorBody(error, details), headers);
}
