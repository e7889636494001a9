import { TRPCClientError } from '@trpc/client';
import { errorCodeFromTrpc, type ErrorCode, type FieldIssue } from '../shared/errors.js';
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
export class ConflictError extends VoidRunError {}
export class PayloadTooLargeError extends VoidRunError {}
export class UnsupportedMediaTypeError extends VoidRunError {}
export class ServiceUnavailableError extends VoidRunError {}
export class AgentUnavailableError extends VoidRunError {}
export class DriverFailureError extends VoidRunError {}
export class DriverUnavailableError extends ServiceUnavailableError {}
export class SandboxNotRunningError extends ConflictError {}
export class TooManyRequestsError extends VoidRunError {}
export class InternalServerError extends VoidRunError {}

const classes: Record<ErrorCode, new (e: TRPCClientError<AppRouter>, code: ErrorCode) => VoidRunError> = {
  INVALID_INPUT: InvalidInputError,
  UNAUTHORIZED: UnauthorizedError,
  FORBIDDEN: ForbiddenError,
  NOT_FOUND: NotFoundError,
  CONFLICT: ConflictError,
  PAYLOAD_TOO_LARGE: PayloadTooLargeError,
  UNSUPPORTED_MEDIA_TYPE: UnsupportedMediaTypeError,
  STORE_UNAVAILABLE: ServiceUnavailableError,
  AGENT_UNAVAILABLE: AgentUnavailableError,
  DRIVER_FAILURE: DriverFailureError,
  DRIVER_UNAVAILABLE: DriverUnavailableError,
  SANDBOX_NOT_RUNNING: SandboxNotRunningError,
  TOO_MANY_REQUESTS: TooManyRequestsError,
  INTERNAL: InternalServerError,
};

/** The error class for a failed call; errors that never reached the server (network) pass through. */
export function toVoidRunError(err: TRPCClientError<AppRouter>): TRPCClientError<AppRouter> {
  if (err instanceof VoidRunError) return err;
  const data = err.data as ServerErrorData | undefined;
  if (!data) return err;
  const code = data.errorCode ?? (data.code ? errorCodeFromTrpc[data.code] : undefined) ?? 'INTERNAL';
  return new classes[code](err, code);
}

/**
 * The error class for a failed raw-route response (`{error, details?}` envelope), so byte
 * transfers fail with the same classes as tRPC calls.
 */
export async function errorFromResponse(res: Response): Promise<VoidRunError> {
  let body: { error?: string; details?: string } = {};
  try {
    body = (await res.json()) as typeof body;
  } catch {}
  const code: ErrorCode = statusToCode[res.status] ?? 'INTERNAL';
  const original = new TRPCClientError<AppRouter>(body.error ?? `HTTP ${res.status}`, {
    result: { error: { code: -32000, message: body.error ?? `HTTP ${res.status}`, data: { errorCode: code, httpStatus: res.status, details: body.details } } } as never,
  });
  return new classes[code](original, code);
}

const statusToCode: Record<number, ErrorCode> = {
  400: 'INVALID_INPUT',
  401: 'UNAUTHORIZED',
  403: 'FORBIDDEN',
  404: 'NOT_FOUND',
  409: 'CONFLICT',
  413: 'PAYLOAD_TOO_LARGE',
  415: 'UNSUPPORTED_MEDIA_TYPE',
  429: 'TOO_MANY_REQUESTS',
  502: 'AGENT_UNAVAILABLE',
  503: 'DRIVER_UNAVAILABLE',
};
