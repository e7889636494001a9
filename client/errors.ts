import { TRPCClientError } from '@trpc/client';
import type { ErrorCode, FieldIssue } from '../shared/errors.js';
import type { AppRouter } from '../server/routers/index.js';

interface ServerErrorData {
  errorCode?: ErrorCode;
  code?: string;
  httpStatus?: number;
  details?: string;
  issues?: FieldIssue[];
}

/**
 * Base of every error the client throws for a failed call. Still a `TRPCClientError`, so tRPC
 * tooling keeps working; `code` is the server's error code, `issues` the offending fields.
 */
export class VoidRunError extends TRPCClientError<AppRouter> {
  readonly code: ErrorCode;
  readonly status: number | undefined;
  readonly details: string | undefined;
  readonly issues: FieldIssue[] | undefined;

  constructor(original: TRPCClientError<AppRouter>, code: ErrorCode) {
    super(original.message, { result: original.shape ? { error: original.shape } : undefined, cause: original.cause, meta: original.meta });
    // TRPCClientError's constructor pins its own prototype; restore the subclass so `instanceof` works.
    Object.setPrototypeOf(this, new.target.prototype);
    this.name = new.target.name;
    const data = original.data as ServerErrorData | undefined;
    this.code = code;
    this.status = data?.httpStatus;
    this.details = data?.details;
    this.issues = data?.issues;
  }
}

export class InvalidInputError extends VoidRunError {}
export class UnauthorizedError extends VoidRunError {}
export class ForbiddenError extends VoidRunError {}
export class NotFoundError extends VoidRunError {}
export class SandboxNotFoundError extends NotFoundError {}
/** A file or directory inside the sandbox. */
export class FileNotFoundError extends NotFoundError {}
export class ImageNotFoundError extends NotFoundError {}
export class SnapshotNotFoundError extends NotFoundError {}
export class ApiKeyNotFoundError extends NotFoundError {}
export class OrgNotFoundError extends NotFoundError {}
export class ProcessNotFoundError extends NotFoundError {}
/** A terminal, shell or watch session. */
export class SessionNotFoundError extends NotFoundError {}
export class RouteNotFoundError extends NotFoundError {}
export class ConflictError extends VoidRunError {}
export class PayloadTooLargeError extends VoidRunError {}
export class UnsupportedMediaTypeError extends VoidRunError {}
export class ServiceUnavailableError extends VoidRunError {}
export class AgentUnavailableError extends VoidRunError {}
/** A server inside the sandbox, reached through a port, did not answer (nothing listens there) or answered malformed HTTP. */
export class UpstreamUnavailableError extends VoidRunError {}
export class DriverFailureError extends VoidRunError {}
export class DriverUnavailableError extends ServiceUnavailableError {}
export class SandboxNotRunningError extends ConflictError {}
/** The image is building or its build failed. */
export class ImageNotReadyError extends ConflictError {}
/** The sandbox was deleted by its timeout (`onTimeout: "delete"`); REST answers 410. */
export class SandboxGoneError extends VoidRunError {}
export class TooManyRequestsError extends VoidRunError {}
export class ServerBusyError extends ServiceUnavailableError {}
/** The fleet host that runs the sandbox cannot be reached now, or was lost (`host-lost`). */
export class HostUnavailableError extends ServiceUnavailableError {}
export class RequestTimeoutError extends VoidRunError {}
export class HeadersTooLargeError extends VoidRunError {}
export class InternalServerError extends VoidRunError {}

const classes: Record<ErrorCode, new (e: TRPCClientError<AppRouter>, code: ErrorCode) => VoidRunError> = {
  INVALID_INPUT: InvalidInputError,
  UNAUTHORIZED: UnauthorizedError,
  FORBIDDEN: ForbiddenError,
  NOT_FOUND: NotFoundError,
  SANDBOX_NOT_FOUND: SandboxNotFoundError,
  FILE_NOT_FOUND: FileNotFoundError,
  IMAGE_NOT_FOUND: ImageNotFoundError,
  SNAPSHOT_NOT_FOUND: SnapshotNotFoundError,
  API_KEY_NOT_FOUND: ApiKeyNotFoundError,
  ORG_NOT_FOUND: OrgNotFoundError,
  PROCESS_NOT_FOUND: ProcessNotFoundError,
  SESSION_NOT_FOUND: SessionNotFoundError,
  ROUTE_NOT_FOUND: RouteNotFoundError,
  CONFLICT: ConflictError,
  PAYLOAD_TOO_LARGE: PayloadTooLargeError,
  UNSUPPORTED_MEDIA_TYPE: UnsupportedMediaTypeError,
  STORE_UNAVAILABLE: ServiceUnavailableError,
  AGENT_UNAVAILABLE: AgentUnavailableError,
  UPSTREAM_UNAVAILABLE: UpstreamUnavailableError,
  DRIVER_FAILURE: DriverFailureError,
  DRIVER_UNAVAILABLE: DriverUnavailableError,
  SANDBOX_NOT_RUNNING: SandboxNotRunningError,
  IMAGE_NOT_READY: ImageNotReadyError,
  SANDBOX_GONE: SandboxGoneError,
  TOO_MANY_REQUESTS: TooManyRequestsError,
  SERVER_BUSY: ServerBusyError,
  HOST_UNAVAILABLE: HostUnavailableError,
  REQUEST_TIMEOUT: RequestTimeoutError,
  HEADERS_TOO_LARGE: HeadersTooLargeError,
  INTERNAL: InternalServerError,
};

/** Whether `value` is one of the registry's codes (a server newer than this client may send others). */
function knownCode(value: unknown): ErrorCode | undefined {
  return typeof value === 'string' && Object.hasOwn(classes, value) ? (value as ErrorCode) : undefined;
}

/**
 * The error class for a failed call, chosen by the server's `data.errorCode` (never by status);
 * errors that never reached the server (network) pass through.
 */
export function toVoidRunError(err: TRPCClientError<AppRouter>): TRPCClientError<AppRouter> {
  if (err instanceof VoidRunError) return err;
  const data = err.data as ServerErrorData | undefined;
  if (!data) return err;
  const code = knownCode(data.errorCode) ?? 'INTERNAL';
  return new classes[code](err, code);
}

/**
 * The error class for a failed raw-route response (`{error, code, details?}`), chosen by its
 * `code` as for tRPC calls, so byte transfers fail with the same classes.
 */
export async function errorFromResponse(res: Response): Promise<VoidRunError> {
  let body: { error?: string; code?: string; details?: string } = {};
  try {
    body = (await res.json()) as typeof body;
  } catch {}
  const code = knownCode(body.code) ?? 'INTERNAL';
  const message = body.error ?? `HTTP ${res.status}`;
  const original = new TRPCClientError<AppRouter>(message, {
    result: { error: { code: -32000, message, data: { errorCode: code, httpStatus: res.status, details: body.details } } } as never,
  });
  return new classes[code](original, code);
}
