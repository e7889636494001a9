import type { IncomingMessage, ServerResponse } from 'node:http';
import { TRPCError, type AnyProcedure } from '@trpc/server';
import { getErrorShape } from '@trpc/server/unstable-core-do-not-import';
import type { ZodObject, ZodRawShape, ZodType } from 'zod';
import { ZodArray } from 'zod/v4';
import {
  forEachOpenApiProcedure,
  getInputOutputParsers,
  getPathRegExp,
  instanceofZodTypeLikeVoid,
  instanceofZodTypeObject,
  instanceofZodTypeOptional,
  normalizePath,
  unwrapZodType,
  type OpenApiMethod,
} from 'trpc-to-openapi';
import { decodeOrNull } from '../../shared/uri.js';
import { errorCodeTable } from '../../shared/errors.js';
import { DomainError, InvalidInputError } from '../errors.js';
import type { AppRouter } from '../routers/index.js';
import type { Context } from '../trpc/context.js';
import type { Meta } from '../trpc/init.js';
import { describeIssues, toTRPCError, type ErrorData } from '../trpc/errors.js';
import { errorBody, sendError, successBody } from './envelope.js';
import { readJsonBody, withoutNullFields } from './json-body.js';
import { procedureMetaIndex } from './procedure-meta.js';

/** What trpc-to-openapi writes for a failed call: our error shape plus its own fields. */
interface OpenApiErrorBody {
  message?: string;
  data?: Partial<ErrorData>;
}

export interface RestHandlerOptions {
  router: AppRouter;
  createContext: (req: IncomingMessage, res: ServerResponse) => Context;
  maxJsonBodyBytes: number;
}

/**
 * The REST face: `/api/...` is routed to procedures by their `meta.openapi` (as trpc-to-openapi
 * routes them: same paths, inputs and error shapes), the JSON body is read here (size limit, clear
 * parse errors), and the answer is written in the original VoidRun's envelopes. Resolves `false`
 * when no procedure owns the path.
 *
 * Text inputs (the query string, path parameters) are read as their fields' types (`fromText`);
 * a JSON body is taken as sent, as tRPC takes it: `"false"` is no boolean and `""` no number there
 * (trpc-to-openapi's coercion, `Boolean("false")` being true and `Number("")` 0, is not used).
 *
 * This is trpc-to-openapi's Node adapter without its per-request costs: the procedure is called
 * directly (no caller proxy), no fetch `Request` is built for an abort signal nothing reads (its
 * caller passes procedures none), and a success is serialized once, straight into its envelope.
 */
export function createRestHandler(opts: RestHandlerOptions) {
  const metaByPath = procedureMetaIndex(opts.router);
  const findProcedure = restProcedureTable(opts.router);

  return async function handleRest(req: IncomingMessage & { body?: unknown }, res: ServerResponse, apiPath: string): Promise<boolean> {
    const method = req.method ?? 'GET';
    if (method !== 'GET' && method !== 'HEAD' && method !== 'DELETE') {
      try {
        // Nulls are kept: which fields take null as a value is the procedure's (see `bodyInput`).
        req.body = await readJsonBody(req, opts.maxJsonBodyBytes, { keepNulls: true });
      } catch (err) {
        if (!(err instanceof DomainError)) throw err;
        // The body was not read to its end: close the connection rather than reuse it.
        sendError(res, err, { connection: 'close' });
        return true;
      }
    }
    const url = new URL(`http://127.0.0.1${withDecodedSegments(apiPath)}`);
    const found = findProcedure(method, normalizePath(url.pathname));
    if (!found) return false;
    const { entry, pathInput } = found;
    const ctx = opts.createContext(req, res);
    ctx.record.procedurePath = entry.path;
    let input: Record<string, unknown> | undefined;
    try {
      // A GET or DELETE takes its input from the query string; every other method from the body.
      const useBody = method !== 'GET' && method !== 'DELETE';
      if (!entry.voidInput) input = { ...(useBody ? bodyInput(entry, req.body, apiPath) : fromText(entry, singleValues(queryLists(apiPath)))), ...fromText(entry, pathInput) };
      if (entry.objectInput && input && !useBody) {
        for (const key of entry.arrayKeys) if (input[key] !== undefined && !Array.isArray(input[key])) input[key] = [input[key]];
      }
      const data: unknown = await entry.procedure({ path: entry.path, getRawInput: async () => input, ctx, type: entry.type, signal: undefined });
      const meta = metaByPath.get(entry.path) ?? {};
      // A REST view reads the output as JSON carries it (dates as strings).
      const text = JSON.stringify(successEnvelope(meta.restView ? jsonCopy(data) : data, meta));
      res.statusCode = meta.successStatus ?? 200;
      res.setHeader('content-type', 'application/json; charset=utf-8');
      res.setHeader('content-length', Buffer.byteLength(text));
      res.end(text);
    } catch (cause) {
      const error = cause instanceof Error && cause.name === 'TRPCError' ? (cause as TRPCError) : internalError(cause);
      const shape = getErrorShape({ config: opts.router._def._config, error, type: entry.type, path: entry.path, input, ctx }) as OpenApiErrorBody;
      const isInputValidationError = error.code === 'BAD_REQUEST' && error.cause instanceof Error && error.cause.name === 'ZodError';
      // The failure as trpc-to-openapi wrote it, read back as JSON, then put in our error envelope.
      const written = jsonCopy({
        ...shape,
        message: isInputValidationError ? 'Input validation failed' : (shape?.message ?? error.message ?? 'An error occurred'),
        code: error.code,
        issues: isInputValidationError ? (error.cause as { issues?: unknown }).issues : undefined,
      }) as OpenApiErrorBody;
      const text = JSON.stringify(errorEnvelope(written));
      // Our code's status where tRPC has none of its own (410 SANDBOX_GONE answers NOT_FOUND over tRPC).
      const code = written.data?.errorCode;
      res.statusCode = (code && errorCodeTable[code]?.httpStatus) || (TRPC_ERROR_CODE_HTTP_STATUS[error.code] ?? 500);
      res.setHeader('content-type', 'application/json; charset=utf-8');
      res.setHeader('content-length', Buffer.byteLength(text));
      res.end(text);
    }
    return true;
  };
}

/** A REST-routed procedure, with what its input handling needs worked out once. */
interface RestProcedure {
  path: string;
  type: 'query' | 'mutation';
  procedure: (opts: { path: string; getRawInput: () => Promise<unknown>; ctx: Context; type: 'query' | 'mutation'; signal: undefined }) => Promise<unknown>;
  /** The input is void-like: the procedure gets none. */
  voidInput: boolean;
  /** The input is an object: text values (query, path) are read as its fields' types. */
  objectInput: boolean;
  /** Its array fields: a single query value becomes a one-element array. */
  arrayKeys: string[];
  /** Its number and boolean fields (of arrays too): what a text value of each must read as. */
  textKinds: Map<string, 'number' | 'boolean'>;
  /** Its fields that take `null` as a value of their own (`idle: null`); a null elsewhere reads as absent. */
  takesNull: Set<string>;
}

/**
 * The procedure for a method and normalized path, and the path parameters, by the same rules as
 * trpc-to-openapi: per method, the first route whose pattern matches, case-insensitively, in the
 * router's order.
 */
function restProcedureTable(router: AppRouter): (method: string, path: string) => { entry: RestProcedure; pathInput: Record<string, string> } | undefined {
  const byMethod = new Map<string, Array<{ pattern: RegExp; entry: RestProcedure }>>();
  forEachOpenApiProcedure(router._def.procedures as never, ({ path, procedure, meta: { openapi } }) => {
    const type = (procedure as AnyProcedure)._def.type;
    if (type === 'subscription') return;
    const { inputParser } = getInputOutputParsers(procedure as never);
    const schema = unwrapZodType(inputParser as never, true);
    const objectInput = instanceofZodTypeObject(schema);
    const shape: Record<string, unknown> = objectInput ? (schema as unknown as ZodObject<ZodRawShape>).shape : {};
    const textKinds = new Map<string, 'number' | 'boolean'>();
    for (const [key, field] of Object.entries(shape)) {
      const kind = (unwrapZodType(field as never, true) as { _zod?: { def?: { type?: string } } })?._zod?.def?.type;
      if (kind === 'number' || kind === 'boolean') textKinds.set(key, kind);
    }
    const entry: RestProcedure = {
      path,
      type,
      procedure: procedure as unknown as RestProcedure['procedure'],
      voidInput: instanceofZodTypeLikeVoid(schema),
      objectInput,
      arrayKeys: Object.keys(shape).filter((key) => {
        const field = shape[key];
        return field instanceof ZodArray || (instanceofZodTypeOptional(field as never) && (field as { unwrap(): unknown }).unwrap() instanceof ZodArray);
      }),
      textKinds,
      takesNull: new Set(Object.keys(shape).filter((key) => (shape[key] as ZodType).safeParse(null).success)),
    };
    const method: OpenApiMethod = openapi.method;
    const routes = byMethod.get(method) ?? [];
    byMethod.set(method, routes);
    routes.push({ pattern: getPathRegExp(normalizePath(openapi.path)), entry });
  });
  return (method, path) => {
    for (const { pattern, entry } of byMethod.get(method) ?? []) {
      const match = pattern.exec(path);
      if (match) return { entry, pathInput: { ...match.groups } };
    }
    return undefined;
  };
}

/** HTTP statuses of tRPC error codes, as trpc-to-openapi answers them. */
const TRPC_ERROR_CODE_HTTP_STATUS: Partial<Record<TRPCError['code'], number>> = {
  PARSE_ERROR: 400,
  BAD_REQUEST: 400,
  NOT_FOUND: 404,
  INTERNAL_SERVER_ERROR: 500,
  UNAUTHORIZED: 401,
  FORBIDDEN: 403,
  TIMEOUT: 408,
  CONFLICT: 409,
  CLIENT_CLOSED_REQUEST: 499,
  PRECONDITION_FAILED: 412,
  PAYLOAD_TOO_LARGE: 413,
  METHOD_NOT_SUPPORTED: 405,
  UNSUPPORTED_MEDIA_TYPE: 415,
  TOO_MANY_REQUESTS: 429,
  UNPROCESSABLE_CONTENT: 422,
  NOT_IMPLEMENTED: 501,
  BAD_GATEWAY: 502,
  SERVICE_UNAVAILABLE: 503,
  GATEWAY_TIMEOUT: 504,
  PAYMENT_REQUIRED: 402,
  PRECONDITION_REQUIRED: 428,
};

/** A thrown value that is not a TRPCError, as a 500 that keeps it as the cause. */
function internalError(cause: unknown): TRPCError {
  const error = new TRPCError({ message: 'Internal server error', code: 'INTERNAL_SERVER_ERROR', cause: cause instanceof Error ? cause : undefined });
  if (cause instanceof Error && cause.stack) error.stack = cause.stack;
  return error;
}

/** `value` as it reads after a JSON round trip. */
function jsonCopy(value: unknown): unknown {
  const text = JSON.stringify(value);
  return text === undefined ? undefined : JSON.parse(text);
}

/** A query's values, one-element lists as their single value (as trpc-to-openapi reads the query). */
function singleValues(query: Record<string, unknown[]>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(query)) {
    const value = query[key]!;
    out[key] = value.length === 1 ? value[0] : value;
  }
  return out;
}

/** The query parameters that are procedure inputs: all but `apiKey`, which is a credential (see `apiKeyOf`). */
function inputParams(path: string): URLSearchParams {
  const params = new URL(path, 'http://localhost').searchParams;
  params.delete('apiKey');
  return params;
}

/**
 * The path with each segment percent-decoded, as the original (gin) hands path parameters over:
 * trpc-to-openapi matches and passes them raw (`/images/name/deb%69an` would be name `deb%69an`).
 * A segment whose decoding is malformed or holds `/`, `?`, `#` or `%` stays as sent.
 */
function withDecodedSegments(apiPath: string): string {
  const q = apiPath.indexOf('?');
  const path = q === -1 ? apiPath : apiPath.slice(0, q);
  const decoded = path
    .split('/')
    .map((segment) => {
      if (!segment.includes('%')) return segment;
      const d = decodeOrNull(segment);
      return d === null || /[/?#%]/.test(d) ? segment : d;
    })
    .join('/');
  return q === -1 ? decoded : decoded + apiPath.slice(q);
}

/** The query string's values by name, as sent (text). */
function queryLists(path: string): Record<string, unknown[]> {
  // Null-prototype, so a key like `toString` or `__proto__` is a parameter like any other.
  const query: Record<string, unknown[]> = Object.create(null);
  inputParams(path).forEach((value, key) => {
    (query[key] ??= []).push(value);
  });
  return query;
}

/** A decimal number as text (no blanks, no hex, not empty). */
const NUMBER_TEXT = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

/**
 * Text values (query string, path parameters) read as the input's fields' types: a number field's
 * text must be a decimal number (`""` is a 400, not 0), a boolean's `true`/`t`/`1` or `false`/`f`/`0`
 * in any case (as the original's Go handlers parse them, with strconv.ParseBool; `Boolean("false")` would be true). Other fields stay text.
 */
function fromText(entry: RestProcedure, values: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = Object.create(null);
  for (const key of Object.keys(values)) {
    const kind = entry.textKinds.get(key);
    const value = values[key];
    out[key] = !kind ? value : Array.isArray(value) ? value.map((v) => textAs(key, kind, v)) : textAs(key, kind, value);
  }
  return out;
}

function textAs(key: string, kind: 'number' | 'boolean', value: unknown): unknown {
  if (typeof value !== 'string') return value;
  const shown = JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value);
  if (kind === 'number') {
    if (NUMBER_TEXT.test(value)) return Number(value);
    throw toTRPCError(new InvalidInputError(`Invalid ${key}: ${shown} is not a number`));
  }
  // Go's strconv.ParseBool, which the original's handlers use: 1, t, true and 0, f, false in any case.
  if (/^(true|t|1)$/i.test(value)) return true;
  if (/^(false|f|0)$/i.test(value)) return false;
  throw toTRPCError(new InvalidInputError(`Invalid ${key}: ${shown} is not a boolean; send true or false (or 1 or 0)`));
}

/**
 * A POST/PUT/PATCH input: the JSON body as sent (it must be an object; `null` or none reads as
 * `{}`), its top-level nulls read as absent except where the field takes null, over the query
 * string's values — the contract passes some POST inputs there (files/mkdir?path=…), and the body
 * wins on a conflict.
 */
function bodyInput(entry: RestProcedure, body: unknown, apiPath: string): Record<string, unknown> {
  if (body !== null && body !== undefined && (typeof body !== 'object' || Array.isArray(body))) {
    const what = Array.isArray(body) ? 'an array' : `a ${typeof body}`;
    throw toTRPCError(new InvalidInputError(`The body must be a JSON object ({"field": value, …}), not ${what}`));
  }
  const own = withoutNullFields(body ?? {}, (key) => entry.takesNull.has(key)) as Record<string, unknown>;
  return { ...fromText(entry, queryValues(apiPath)), ...own };
}

/** Single query values, as sent, for merging into a POST body (a `content=true` stays a string). */
function queryValues(path: string): Record<string, unknown> {
  const out: Record<string, unknown> = Object.create(null);
  inputParams(path).forEach((value, key) => {
    const prev = out[key];
    out[key] = prev === undefined ? value : Array.isArray(prev) ? [...prev, value] : [prev, value];
  });
  return out;
}

/** The REST body of a successful call, in the shape its procedure's meta declares (`envelope`, `restView`). */
function successEnvelope(output: unknown, meta: Meta) {
  const data = meta.restView ? (meta.restView.from as (o: unknown) => unknown)(output) : output;
  if (meta.envelope === 'bare') return data ?? null;
  const message = meta.message ?? 'OK';
  let body: Record<string, unknown>;
  if (meta.paged) {
    const page = data as { data: unknown; meta: Record<string, unknown> };
    body = { ...successBody(page.data, message, page.meta) };
  } else body = { ...successBody(data ?? null, message) };
  if (meta.successFlag) body = { success: true, ...body };
  if (meta.envelope === 'both') return { ...(data as Record<string, unknown>), ...body };
  if (meta.envelope === 'output-first') return { ...body, ...(data as Record<string, unknown>) };
  return body;
}

/** The REST error body of a failed call: the error formatter's message and code (see `toWireError`). */
function errorEnvelope(body: OpenApiErrorBody | undefined) {
  const code = body?.data?.errorCode ?? 'INTERNAL';
  // trpc-to-openapi replaces a validation failure's message with a generic one; rebuild ours.
  const issues = body?.data?.issues;
  if (issues?.length) {
    const { message, details } = describeIssues(issues);
    return errorBody(code, message, details);
  }
  return errorBody(code, body?.message ?? 'Request failed', body?.data?.details);
}
