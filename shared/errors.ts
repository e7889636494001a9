/**
 * The error registry shared by server and client. Every failure a caller can see has one of these
 * codes; the server maps each code once to a tRPC code and an HTTP status, and the client maps it
 * back to an error class.
 */
export const ErrorCode = {
  INVALID_INPUT: 'INVALID_INPUT',
  UNAUTHORIZED: 'UNAUTHORIZED',
  FORBIDDEN: 'FORBIDDEN',
  NOT_FOUND: 'NOT_FOUND',
  CONFLICT: 'CONFLICT',
  PAYLOAD_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  UNSUPPORTED_MEDIA_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  STORE_UNAVAILABLE: 'STORE_UNAVAILABLE',
  AGENT_UNAVAILABLE: 'AGENT_UNAVAILABLE',
  DRIVER_FAILURE: 'DRIVER_FAILURE',
  /** No sandbox driver can run on this host (runc missing, not root, …). */
  DRIVER_UNAVAILABLE: 'DRIVER_UNAVAILABLE',
  /** The sandbox is not in a state that allows this (e.g. exec in a stopped sandbox). */
  SANDBOX_NOT_RUNNING: 'SANDBOX_NOT_RUNNING',
  /** A limit on concurrent use was reached (an org's in-flight execs or open streams); retry later. */
  TOO_MANY_REQUESTS: 'TOO_MANY_REQUESTS',
  INTERNAL: 'INTERNAL',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** tRPC error code names (a subset of `TRPC_ERROR_CODE_KEY`), kept here so `shared/` needs no tRPC import. */
export type TrpcCodeName =
  | 'BAD_REQUEST'
  | 'UNAUTHORIZED'
  | 'FORBIDDEN'
  | 'NOT_FOUND'
  | 'CONFLICT'
  | 'PAYLOAD_TOO_LARGE'
  | 'UNSUPPORTED_MEDIA_TYPE'
  | 'TOO_MANY_REQUESTS'
  | 'SERVICE_UNAVAILABLE'
  | 'BAD_GATEWAY'
  | 'INTERNAL_SERVER_ERROR';

/** The one mapping of error codes to transports. A `Record` so a new code cannot be left unmapped. */
export const errorCodeTable: Record<ErrorCode, { trpc: TrpcCodeName; httpStatus: number }> = {
  INVALID_INPUT: { trpc: 'BAD_REQUEST', httpStatus: 400 },
  UNAUTHORIZED: { trpc: 'UNAUTHORIZED', httpStatus: 401 },
  FORBIDDEN: { trpc: 'FORBIDDEN', httpStatus: 403 },
  NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  CONFLICT: { trpc: 'CONFLICT', httpStatus: 409 },
  PAYLOAD_TOO_LARGE: { trpc: 'PAYLOAD_TOO_LARGE', httpStatus: 413 },
  UNSUPPORTED_MEDIA_TYPE: { trpc: 'UNSUPPORTED_MEDIA_TYPE', httpStatus: 415 },
  STORE_UNAVAILABLE: { trpc: 'SERVICE_UNAVAILABLE', httpStatus: 503 },
  AGENT_UNAVAILABLE: { trpc: 'BAD_GATEWAY', httpStatus: 502 },
  DRIVER_FAILURE: { trpc: 'BAD_GATEWAY', httpStatus: 502 },
  DRIVER_UNAVAILABLE: { trpc: 'SERVICE_UNAVAILABLE', httpStatus: 503 },
  SANDBOX_NOT_RUNNING: { trpc: 'CONFLICT', httpStatus: 409 },
  TOO_MANY_REQUESTS: { trpc: 'TOO_MANY_REQUESTS', httpStatus: 429 },
  INTERNAL: { trpc: 'INTERNAL_SERVER_ERROR', httpStatus: 500 },
};

/** The code to assume for a tRPC error that carries no `errorCode` (e.g. one raised by tRPC itself). */
export const errorCodeFromTrpc: Record<string, ErrorCode> = {
  PARSE_ERROR: 'INVALID_INPUT',
  BAD_REQUEST: 'INVALID_INPUT',
  UNAUTHORIZED: 'UNAUTHORIZED',
  FORBIDDEN: 'FORBIDDEN',
  NOT_FOUND: 'NOT_FOUND',
  CONFLICT: 'CONFLICT',
  PAYLOAD_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  UNSUPPORTED_MEDIA_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  METHOD_NOT_SUPPORTED: 'INVALID_INPUT',
  TOO_MANY_REQUESTS: 'TOO_MANY_REQUESTS',
  SERVICE_UNAVAILABLE: 'STORE_UNAVAILABLE',
  BAD_GATEWAY: 'DRIVER_FAILURE',
};

/** One offending field of an invalid request. */
export interface FieldIssue {
  field: string;
  message: string;
}
