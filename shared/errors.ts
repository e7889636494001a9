/**
 * The error registry shared by server and client. Every failure a caller can see has one of these
 * codes; the server maps each code once to a tRPC code and an HTTP status, and the client maps it
 * back to an error class.
 */
export const ErrorCode = {
  INVALID_INPUT: 'INVALID_INPUT',
  UNAUTHORIZED: 'UNAUTHORIZED',
  FORBIDDEN: 'FORBIDDEN',
  /** Something not found that has no finer code below. */
  NOT_FOUND: 'NOT_FOUND',
  SANDBOX_NOT_FOUND: 'SANDBOX_NOT_FOUND',
  /** A file or directory inside a sandbox. */
  FILE_NOT_FOUND: 'FILE_NOT_FOUND',
  IMAGE_NOT_FOUND: 'IMAGE_NOT_FOUND',
  SNAPSHOT_NOT_FOUND: 'SNAPSHOT_NOT_FOUND',
  API_KEY_NOT_FOUND: 'API_KEY_NOT_FOUND',
  ORG_NOT_FOUND: 'ORG_NOT_FOUND',
  /** A background process (by pid) in a sandbox. */
  PROCESS_NOT_FOUND: 'PROCESS_NOT_FOUND',
  /** A terminal, shell or watch session. */
  SESSION_NOT_FOUND: 'SESSION_NOT_FOUND',
  /** No route has this method and path. */
  ROUTE_NOT_FOUND: 'ROUTE_NOT_FOUND',
  CONFLICT: 'CONFLICT',
  PAYLOAD_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  UNSUPPORTED_MEDIA_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  STORE_UNAVAILABLE: 'STORE_UNAVAILABLE',
  AGENT_UNAVAILABLE: 'AGENT_UNAVAILABLE',
  /** A server inside a sandbox, reached through a port: nothing listens there, or its answer was not HTTP. */
  UPSTREAM_UNAVAILABLE: 'UPSTREAM_UNAVAILABLE',
  DRIVER_FAILURE: 'DRIVER_FAILURE',
  /** No sandbox driver can run on this host (runc missing, not root, …). */
  DRIVER_UNAVAILABLE: 'DRIVER_UNAVAILABLE',
  /** The sandbox is not in a state that allows this (e.g. exec in a stopped sandbox). */
  SANDBOX_NOT_RUNNING: 'SANDBOX_NOT_RUNNING',
  /** The image is still building or its build failed: `details`/the message says which. */
  IMAGE_NOT_READY: 'IMAGE_NOT_READY',
  /** The sandbox was deleted by its timeout (`onTimeout: "delete"`); `details` says when. */
  SANDBOX_GONE: 'SANDBOX_GONE',
  /** A limit on concurrent use was reached (an org's in-flight execs or open streams); retry later. */
  TOO_MANY_REQUESTS: 'TOO_MANY_REQUESTS',
  /** The fleet host that runs the sandbox cannot be reached, or was lost (`host-lost`); retry, or recreate the sandbox. */
  HOST_UNAVAILABLE: 'HOST_UNAVAILABLE',
  /** The server holds as many connections (or WebSocket handshakes) as it allows; retry later. */
  SERVER_BUSY: 'SERVER_BUSY',
  /** The request's headers or body did not arrive within HTTP_HEADERS_TIMEOUT_MS / HTTP_REQUEST_TIMEOUT_MS. */
  REQUEST_TIMEOUT: 'REQUEST_TIMEOUT',
  /** The request's headers are larger than the server reads (16 KiB). */
  HEADERS_TOO_LARGE: 'HEADERS_TOO_LARGE',
  INTERNAL: 'INTERNAL',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** Every code, for enums (the OpenAPI `ErrorResponse.code`). */
export const errorCodes = Object.values(ErrorCode) as [ErrorCode, ...ErrorCode[]];

/** The codes of what was not found (each a 404). */
export type NotFoundCode = Extract<ErrorCode, 'NOT_FOUND' | `${string}_NOT_FOUND`>;

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
  | 'TIMEOUT'
  | 'SERVICE_UNAVAILABLE'
  | 'BAD_GATEWAY'
  | 'INTERNAL_SERVER_ERROR';

/**
 * The one mapping of error codes to transports. A `Record` so a new code cannot be left unmapped.
 * Every face answers the same code: REST and raw routes in the body's `code`, tRPC in `data.errorCode`,
 * stream failures in the `error` event or line, WebSocket refusals in the upgrade answer's body.
 */
export const errorCodeTable: Record<ErrorCode, { trpc: TrpcCodeName; httpStatus: number }> = {
  INVALID_INPUT: { trpc: 'BAD_REQUEST', httpStatus: 400 },
  UNAUTHORIZED: { trpc: 'UNAUTHORIZED', httpStatus: 401 },
  FORBIDDEN: { trpc: 'FORBIDDEN', httpStatus: 403 },
  NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  SANDBOX_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  FILE_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  IMAGE_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  SNAPSHOT_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  API_KEY_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  ORG_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  PROCESS_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  SESSION_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  ROUTE_NOT_FOUND: { trpc: 'NOT_FOUND', httpStatus: 404 },
  CONFLICT: { trpc: 'CONFLICT', httpStatus: 409 },
  PAYLOAD_TOO_LARGE: { trpc: 'PAYLOAD_TOO_LARGE', httpStatus: 413 },
  UNSUPPORTED_MEDIA_TYPE: { trpc: 'UNSUPPORTED_MEDIA_TYPE', httpStatus: 415 },
  STORE_UNAVAILABLE: { trpc: 'SERVICE_UNAVAILABLE', httpStatus: 503 },
  AGENT_UNAVAILABLE: { trpc: 'BAD_GATEWAY', httpStatus: 502 },
  UPSTREAM_UNAVAILABLE: { trpc: 'BAD_GATEWAY', httpStatus: 502 },
  DRIVER_FAILURE: { trpc: 'BAD_GATEWAY', httpStatus: 502 },
  DRIVER_UNAVAILABLE: { trpc: 'SERVICE_UNAVAILABLE', httpStatus: 503 },
  SANDBOX_NOT_RUNNING: { trpc: 'CONFLICT', httpStatus: 409 },
  IMAGE_NOT_READY: { trpc: 'CONFLICT', httpStatus: 409 },
  // tRPC has no 410: its calls answer NOT_FOUND with this errorCode; REST and raw routes answer 410.
  SANDBOX_GONE: { trpc: 'NOT_FOUND', httpStatus: 410 },
  TOO_MANY_REQUESTS: { trpc: 'TOO_MANY_REQUESTS', httpStatus: 429 },
  SERVER_BUSY: { trpc: 'SERVICE_UNAVAILABLE', httpStatus: 503 },
  HOST_UNAVAILABLE: { trpc: 'SERVICE_UNAVAILABLE', httpStatus: 503 },
  REQUEST_TIMEOUT: { trpc: 'TIMEOUT', httpStatus: 408 },
  // Only ever answered by the HTTP edge, before any tRPC call (tRPC has no 431 code).
  HEADERS_TOO_LARGE: { trpc: 'BAD_REQUEST', httpStatus: 431 },
  INTERNAL: { trpc: 'INTERNAL_SERVER_ERROR', httpStatus: 500 },
};

/**
 * The code of an error raised by tRPC itself (a parse error, a batch too large), which carries no
 * `errorCode` of ours; the server puts it in the error's `data.errorCode`, so clients read codes only.
 */
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
  TIMEOUT: 'REQUEST_TIMEOUT',
  SERVICE_UNAVAILABLE: 'STORE_UNAVAILABLE',
  BAD_GATEWAY: 'DRIVER_FAILURE',
};

/** One offending field of an invalid request. */
export interface FieldIssue {
  field: string;
  message: string;
}
