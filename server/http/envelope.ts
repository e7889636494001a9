import { STATUS_CODES, type ServerResponse } from 'node:http';
import { errorCodeTable, type ErrorCode } from '../../shared/errors.js';
import { DomainError } from '../errors.js';
import { describeIssues, fieldIssues } from '../trpc/errors.js';
import type { ErrorResponse, SuccessEnvelope } from '../../shared/envelope.js';

/**
 * The REST envelopes, built here and nowhere else: the REST facade, the raw routes, the streams and
 * the WebSocket refusals all answer through these functions.
 */
export function successBody<T>(data: T, message: string, meta?: Record<string, unknown>): SuccessEnvelope<T> {
  return meta ? { status: 'success', message, data, meta } : { status: 'success', message, data };
}

/** The REST error body: the original's `{error, details?}` and our stable `code`. */
export function errorBody(code: ErrorCode, error: string, details?: string): ErrorResponse {
  return details ? { error, code, details } : { error, code };
}

/** An error as every face answers it: its HTTP status and body. */
export interface WireError {
  status: number;
  body: ErrorResponse;
}

/**
 * The one rendering of a failure, for REST, raw routes, streams and WebSocket refusals: a domain
 * error by its code's table entry, an input validation failure as INVALID_INPUT naming the field,
 * anything else as INTERNAL with a fixed message (the caller logs the cause; it never reaches the
 * client).
 */
export function toWireError(err: unknown): WireError {
  if (err instanceof DomainError) {
    const { message, details } = err.issues?.length ? describeIssues(err.issues) : { message: err.message, details: err.details };
    return { status: errorCodeTable[err.code].httpStatus, body: errorBody(err.code, message, details) };
  }
  const issues = fieldIssues(err);
  if (issues?.length) {
    const { message, details } = describeIssues(issues);
    return { status: 400, body: errorBody('INVALID_INPUT', message, details) };
  }
  return { status: 500, body: errorBody('INTERNAL', 'Internal server error') };
}

/** Whether `err` is one the client caused or may see as it is (a domain or validation error), not a bug. */
export function isExpectedError(err: unknown): boolean {
  return toWireError(err).status !== 500;
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

/** Answers `err` (see `toWireError`) as a JSON error response. */
export function sendError(res: ServerResponse, err: unknown, headers?: Record<string, string>): void {
  const { status, body } = toWireError(err);
  sendJson(res, status, body, headers);
}

/**
 * `err` as a whole HTTP/1.1 response with `connection: close`, for a socket that has no
 * ServerResponse (a refused WebSocket upgrade, a connection over the cap).
 */
export function rawErrorResponse(err: unknown): string {
  const { status, body } = toWireError(err);
  const text = JSON.stringify(body);
  return `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Error'}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`;
}
