import type { Logger } from 'pino';
import type { OpenStreams } from '../http/open-streams.js';
import type { Services } from '../services/index.js';

/**
 * What a request carries that the REST layer and logging read back after the procedure ran. One
 * object per HTTP request or WebSocket connection.
 */
export interface RequestRecord {
  /** Set once the caller is authenticated; logged, never the key. */
  orgId?: string;
  /** The REST procedure that answered (dotted tRPC path), for the envelope and metrics. */
  procedurePath?: string;
}

/** The transport a call arrived on: an HTTP response, or a tRPC WebSocket shared by many calls. */
export interface CallConnection {
  /** Runs `fn` once the HTTP response has been written, or the WebSocket closed. */
  onClose(fn: () => void): void;
  /** Whether the response or socket is still open. */
  isOpen(): boolean;
  /** Cuts the response or the WebSocket (its key was revoked). */
  cut(): void;
  /** WebSocket only: bytes sent but not yet taken by the peer. */
  bufferedAmount?(): number;
  /** WebSocket only: counts a call in flight on the socket until the returned function runs. */
  callStarted?(): () => void;
}

export interface Context {
  services: Services;
  log: Logger;
  /** The plain API key as sent, or null. Only the auth middleware reads it. */
  apiKey: string | null;
  record: RequestRecord;
  transport: 'rest' | 'trpc-http' | 'trpc-ws';
  connection: CallConnection;
  /** Per-org caps on held calls, and what to close when a key is revoked. */
  streams: OpenStreams;
}

/** The API key of an HTTP request: the `X-API-Key` header. */
export function apiKeyFromHeaders(headers: Record<string, string | string[] | undefined>): string | null {
  const v = headers['x-api-key'];
  const key = Array.isArray(v) ? v[0] : v;
  return key ? key.trim() : null;
}

/** A WebSocket upgrade may carry the key as `?apiKey=` (browsers cannot set headers on WebSockets). */
export function apiKeyFromUpgrade(url: URL, headers: Record<string, string | string[] | undefined>): string | null {
  return apiKeyFromHeaders(headers) ?? url.searchParams.get('apiKey');
}
