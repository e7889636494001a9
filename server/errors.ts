import { ErrorCode, type FieldIssue, type NotFoundCode } from '../shared/errors.js';

export { ErrorCode };

export interface DomainErrorOptions {
  details?: string;
  issues?: FieldIssue[];
  cause?: unknown;
}

/**
 * Base of every error a service throws on purpose. The transport layers map `code` once
 * (see `shared/errors.ts`); `message` is what the caller reads, so it says what to fix and never
 * contains a host path or a secret.
 */
export class DomainError extends Error {
  readonly code: ErrorCode;
  readonly details?: string;
  readonly issues?: FieldIssue[];

  constructor(code: ErrorCode, message: string, options: DomainErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.details = options.details;
    this.issues = options.issues;
  }
}

export class InvalidInputError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.INVALID_INPUT, message, options);
  }
}
export class UnauthorizedError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.UNAUTHORIZED, message, options);
  }
}
export class ForbiddenError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.FORBIDDEN, message, options);
  }
}
/** What was not found, by its code (`SANDBOX_NOT_FOUND`, `FILE_NOT_FOUND`, …; default `NOT_FOUND`). */
export class NotFoundError extends DomainError {
  constructor(message: string, options: DomainErrorOptions & { code?: NotFoundCode } = {}) {
    super(options.code ?? ErrorCode.NOT_FOUND, message, options);
  }
}
export class ConflictError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.CONFLICT, message, options);
  }
}
export class PayloadTooLargeError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.PAYLOAD_TOO_LARGE, message, options);
  }
}
export class UnsupportedMediaTypeError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.UNSUPPORTED_MEDIA_TYPE, message, options);
  }
}
export class StoreUnavailableError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.STORE_UNAVAILABLE, message, options);
  }
}
export class DriverFailureError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.DRIVER_FAILURE, message, options);
  }
}
export class DriverUnavailableError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.DRIVER_UNAVAILABLE, message, options);
  }
}
/** A server inside a sandbox, reached through a port, is not there or broke HTTP; 502 naming the port. */
export class UpstreamUnavailableError extends DomainError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(ErrorCode.UPSTREAM_UNAVAILABLE, message, options);
  }
}

export class SandboxNotRunningError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.SANDBOX_NOT_RUNNING, message, options);
  }
}
/** An image that is building or failed to build (409): sandboxes and builds need a ready one. */
export class ImageNotReadyError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.IMAGE_NOT_READY, message, options);
  }
}
/** A sandbox its timeout deleted (410): the message says why and when, never a bare 404. */
export class SandboxGoneError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.SANDBOX_GONE, message, options);
  }
}
export class TooManyRequestsError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.TOO_MANY_REQUESTS, message, options);
  }
}

/** The fleet host that runs the sandbox cannot be reached, or was lost (README "Fleet"). */
export class HostUnavailableError extends DomainError {
  constructor(message: string, options?: DomainErrorOptions) {
    super(ErrorCode.HOST_UNAVAILABLE, message, options);
  }
}
