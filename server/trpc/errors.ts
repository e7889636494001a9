import { TRPCError } from '@trpc/server';
import type { FieldIssue } from '../../shared/errors.js';
import { errorCodeTable, type ErrorCode } from '../../shared/errors.js';
import { DomainError } from '../errors.js';

/** A `TRPCError` that remembers the domain error it came from. */
export function toTRPCError(err: DomainError): TRPCError {
  return new TRPCError({ code: errorCodeTable[err.code].trpc, message: err.message, cause: err });
}

interface ZodLikeIssue {
  path: PropertyKey[];
  message: string;
}

/** Field issues of an input validation failure, with dotted field names. */
export function fieldIssues(cause: unknown): FieldIssue[] | undefined {
  if (!(cause instanceof Error) || cause.name !== 'ZodError' || !('issues' in cause)) return undefined;
  return (cause.issues as ZodLikeIssue[]).map((i) => ({ field: i.path.map(String).join('.') || '(body)', message: i.message }));
}

/** What the error formatter adds to `error.data` for every face: our code, a message, details. */
export interface ErrorData {
  errorCode: ErrorCode;
  details?: string;
  issues?: FieldIssue[];
}

export function describeIssues(issues: FieldIssue[]): { message: string; details: string } {
  const first = issues[0]!;
  return {
    message: `Invalid ${first.field}: ${first.message}`,
    details: issues.map((i) => `${i.field}: ${i.message}`).join('; '),
  };
}
