import type { Logger } from 'pino';
import type { OpenStreams } from '../http/open-streams.js';
import type { Services } from '../services/index.js';
import type { Principal } from '../services/auth-service.js';
import type { Forwarder } from '../services/fleet/forwarder.js';
import type { Placement } from '../services/fleet/placement.js';

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
  /** The `X-Org-ID` header: the org to act in instead of the key's own, or null. */
  requestedOrgId: string | null;
  /**
   * On a fleet host, the caller as the API node that forwarded the call authenticated it (read
   * from the internal listener's request, never a client's): taken instead of reading the key again.
   */
  vouched?: Principal | null;
  record: RequestRecord;
  transport: 'rest' | 'trpc-http' | 'trpc-ws';
  connection: CallConnection;
  /** Per-org caps on held calls, and what to close when a key is revoked. */
  streams: OpenStreams;
  /** The `Idempotency-Key` header of an HTTP request (REST; tRPC takes `idempotencyKey` in the input), or null. */
  idempotencyKey?: string | null;
  /** An API node's (VOIDRUN_ROLE=api): sandbox calls go to their host, creates are placed first. */
  fleet?: { forwarder: Forwarder; placement: Placement };
}

type RequestHeaders = Record<string, string | string[] | undefined>;

function headerValue(headers: RequestHeaders, name: string): string | null {
  const v = headers[name];
  return (Array.isArray(v) ? v[0] : v)?.trim() || null;
}

/**
 * The API key of an HTTP request or WebSocket upgrade: the `X-API-Key` header, else the `apiKey`
 * query parameter (the original VoidRun takes it on every route; browsers cannot set headers on a
 * WebSocket). The header wins when both are sent. Query strings never reach the log or metrics.
 */
export function apiKeyOf(req: { url?: string; headers: RequestHeaders }): string | null {
  const url = req.url ?? '';
  const query = url.includes('?') ? new URLSearchParams(url.slice(url.indexOf('?') + 1)).get('apiKey')?.trim() : null;
  return headerValue(req.headers, 'x-api-key') ?? (query || null);
}

/** The `Idempotency-Key` header, or null. */
export function idempotencyKeyOf(req: { headers: RequestHeaders }): string | null {
  return headerValue(req.headers, 'idempotency-key');
}

/** The org a request asks to act in (the `X-Org-ID` header), or null for the API key's own. */
export function requestedOrgOf(req: { headers: RequestHeaders }): string | null {
  return headerValue(req.headers, 'x-org-id');
}
