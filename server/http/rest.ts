import type { IncomingMessage, ServerResponse } from 'node:http';
import { createOpenApiNodeHttpHandler } from 'trpc-to-openapi';
import { decodeOrNull } from '../../shared/uri.js';
import { DomainError } from '../errors.js';
import type { AppRouter } from '../routers/index.js';
import type { Context } from '../trpc/context.js';
import type { Meta } from '../trpc/init.js';
import { describeIssues, type ErrorData } from '../trpc/errors.js';
import { errorBody, sendError, successBody } from './envelope.js';
import { readJsonBody } from './json-body.js';
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
 * The REST face: trpc-to-openapi routes `/api/...` to procedures by their `meta.openapi`; this
 * wrapper reads the JSON body itself (size limit, clear parse errors) and rewrites the answer into
 * the original VoidRun's envelopes. Resolves `false` when no procedure owns the path.
 */
export function createRestHandler(opts: RestHandlerOptions) {
  const metaByPath = procedureMetaIndex(opts.router);
  const contexts = new WeakMap<IncomingMessage, Context>();

  const openApi = createOpenApiNodeHttpHandler({
    router: opts.router,
    createContext: ({ req, res }) => {
      const ctx = contexts.get(req) ?? opts.createContext(req, res as ServerResponse);
      contexts.set(req, ctx);
      return ctx;
    },
    responseMeta: ({ ctx, paths, errors }) => {
      const path = paths?.[0];
      if (ctx && path) (ctx as Context).record.procedurePath = path;
      if (errors.length > 0 || !path) return {};
      return { status: metaByPath.get(path)?.successStatus ?? 200 };
    },
  });

  return async function handleRest(req: IncomingMessage & { body?: unknown; query?: unknown }, res: ServerResponse, apiPath: string): Promise<boolean> {
    let matched = true;
    const method = req.method ?? 'GET';
    if (method !== 'GET' && method !== 'HEAD' && method !== 'DELETE') {
      try {
        // The contract passes some POST inputs in the query string (files/mkdir?path=…): the
        // query is merged under the body, which wins on a conflict.
        const body = await readJsonBody(req, opts.maxJsonBodyBytes);
        req.body = body && typeof body === 'object' && !Array.isArray(body) ? { ...queryValues(apiPath), ...body } : body;
        // trpc-to-openapi insists on a JSON content type even for the empty body we read as {}.
        req.headers['content-type'] = 'application/json';
      } catch (err) {
        if (!(err instanceof DomainError)) throw err;
        // The body was not read to its end: close the connection rather than reuse it.
        sendError(res, err, { connection: 'close' });
        return true;
      }
    }
    const originalUrl = req.url;
    req.url = withDecodedSegments(apiPath);
    req.query = queryWithBooleans(apiPath);
    wrapInEnvelope(res, () => {
      const path = contexts.get(req)?.record.procedurePath;
      return (path && metaByPath.get(path)) || {};
    });
    await openApi(req, res, () => {
      matched = false;
    });
    req.url = originalUrl;
    if (!matched) unwrapEnvelope(res);
    return matched;
  };
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

/**
 * The query string as trpc-to-openapi reads it, with the words `true` and `false` as booleans:
 * it coerces query values with `Boolean()`, which would read "false" as true. (A string parameter
 * coerces `false` back to "false", so no other parameter changes.)
 */
function queryWithBooleans(path: string): Record<string, unknown[]> {
  // Null-prototype, so a key like `toString` or `__proto__` is a parameter like any other.
  const query: Record<string, unknown[]> = Object.create(null);
  inputParams(path).forEach((value, key) => {
    (query[key] ??= []).push(value === 'true' ? true : value === 'false' ? false : value);
  });
  return query;
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

const originalEnds = new WeakMap<ServerResponse, ServerResponse['end']>();

/**
 * trpc-to-openapi writes its body with one `res.end(json)`. This replaces that call, once, with the
 * envelope of the original VoidRun: `{status, message, data}` or `{error, details?}`.
 */
function wrapInEnvelope(res: ServerResponse, procedureMeta: () => Meta): void {
  const end = res.end;
  originalEnds.set(res, end);
  res.end = function endWithEnvelope(this: ServerResponse, chunk?: unknown) {
    res.end = end;
    const raw = typeof chunk === 'string' ? chunk : Buffer.isBuffer(chunk) ? chunk.toString('utf8') : undefined;
    const parsed: unknown = raw ? JSON.parse(raw) : undefined;
    const body = res.statusCode < 400 ? successEnvelope(parsed, procedureMeta()) : errorEnvelope(parsed as OpenApiErrorBody | undefined);
    const text = JSON.stringify(body);
    res.setHeader('content-type', 'application/json; charset=utf-8');
    res.setHeader('content-length', Buffer.byteLength(text));
    return end.call(res, text, 'utf8');
  } as ServerResponse['end'];
}

function unwrapEnvelope(res: ServerResponse): void {
  const end = originalEnds.get(res);
  if (end) res.end = end;
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
