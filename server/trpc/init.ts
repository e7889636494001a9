import { initTRPC } from '@trpc/server';
import superjson from 'superjson';
import type { OpenApiMeta } from 'trpc-to-openapi';
import { errorCodeFromTrpc, type ErrorCode } from '../../shared/errors.js';
import { DomainError } from '../errors.js';
import type { Context } from './context.js';
import { describeIssues, fieldIssues, toTRPCError, type ErrorData } from './errors.js';

/** Procedure metadata: trpc-to-openapi's `openapi` plus what our REST envelope needs. */
export type Meta = OpenApiMeta & {
  /** The envelope's `message` on success. */
  message?: string;
  /** The REST status on success (default 200). */
  successStatus?: number;
  /** The output is `{data, meta}`: REST puts `meta` beside `data` in the envelope (paginated lists). */
  paged?: boolean;
  /**
   * Inputs of a POST route that the contract passes in the query string. The REST layer merges the
   * query into the body for every POST; this only documents them as query parameters.
   */
  queryInputs?: string[];
};

const t = initTRPC
  .context<Context>()
  .meta<Meta>()
  .create({
    transformer: superjson,
    errorFormatter({ shape, error }) {
      const domain = error.cause instanceof DomainError ? error.cause : undefined;
      const issues = domain?.issues ?? fieldIssues(error.cause);
      let message = shape.message;
      let details = domain?.details;
      if (issues?.length) ({ message, details } = describeIssues(issues));
      const errorCode: ErrorCode = domain?.code ?? errorCodeFromTrpc[error.code] ?? 'INTERNAL';
      // Internal errors keep their cause in the server log only.
      if (errorCode === 'INTERNAL') message = 'Internal server error';
      const data: ErrorData & typeof shape.data = { ...shape.data, stack: undefined, errorCode, details, issues };
      return { ...shape, message, data };
    },
  });

export const router = t.router;
export const createCallerFactory = t.createCallerFactory;

/** Turns domain errors thrown below into TRPCErrors with the mapped code; logs unexpected ones. */
const mapDomainErrors = t.middleware(async ({ next, ctx, path }) => {
  const result = await next();
  if (result.ok) return result;
  const cause = result.error.cause;
  if (cause instanceof DomainError) throw toTRPCError(cause);
  if (result.error.code === 'INTERNAL_SERVER_ERROR') ctx.log.error({ err: cause ?? result.error, procedure: path }, 'unexpected error');
  return result;
});

export const publicProcedure = t.procedure.use(mapDomainErrors);

/** Requires a valid, active API key; narrows `ctx` with the caller's `principal`. */
export const authedProcedure = publicProcedure.use(async ({ ctx, next }) => {
  const principal = await ctx.services.auth.authenticate(ctx.apiKey);
  ctx.record.orgId = principal.orgId;
  return next({ ctx: { principal } });
});
