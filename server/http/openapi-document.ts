import { generateOpenApiDocument } from 'trpc-to-openapi';
import { createSchema } from 'zod-openapi';
import { stringify } from 'yaml';
import type { z } from 'zod';
import { ErrorResponse } from '../../shared/envelope.js';
import { errorCodeTable, type ErrorCode } from '../../shared/errors.js';
import type { AppRouter } from '../routers/index.js';
import type { Meta } from '../trpc/init.js';
import { procedureMetaIndex } from './procedure-meta.js';
import { routeTable, type RouteSpec } from './route-table.js';

type Json = Record<string, any>;

const errorDescriptions: Record<string, string> = {
  '400': 'Invalid input: the message names the offending field (or a malformed path, query or body)',
  '401': 'Missing, invalid, revoked or deactivated API key',
  '403': "The API key's organization may not do this",
  '404': 'Not found',
  '409': 'Conflict: the resource exists already, or the sandbox is not in a state that allows this',
  '410': 'Gone: the sandbox was deleted by its timeout (onTimeout: delete); the message and details say when',
  '408': 'The request did not arrive whole within the HTTP timeouts',
  '413': 'Request body too large',
  '415': 'Request body is not JSON',
  '429': "A limit was reached (the org's concurrent calls or streams, a quota, the host's capacity); retry later",
  '431': 'Request headers too large',
  '500': 'Internal server error',
  '502': "The sandbox's agent or driver failed",
  '503': 'The server is busy (connection caps, handshake deadline), its store is unreachable, or no sandbox driver can run',
};

/** What an operation is, as far as the statuses it can answer depend on it. */
export interface OperationFacts {
  method: string;
  /** The path under /api, OpenAPI style. */
  path: string;
  authed: boolean;
  body: 'json' | 'binary' | 'none';
  /** Holds one of the org's ORG_MAX_STREAMS slots. */
  stream?: boolean;
}

/**
 * The error statuses an operation can answer, derived from what it is rather than listed per route:
 * every request can be malformed (400), arrive too slowly (408), have headers too large (431) or
 * meet a busy server or unreachable store (503); a body can be too large (413) or, as JSON, not
 * JSON (415); a write can conflict (409); a key can be missing (401) or not allow the org (403,
 * also X-Org-ID); a path parameter or an authenticated write can name what does not exist (404); an
 * operation on a sandbox, or one that creates one, can meet a stopped sandbox (409), a limit (429)
 * or a failing agent or driver (502); a stream can meet ORG_MAX_STREAMS (429).
 */
export function errorStatuses(f: OperationFacts): number[] {
  const statuses = new Set([400, 408, 431, 503]);
  const method = f.method.toLowerCase();
  if (f.body !== 'none') statuses.add(413);
  if (f.body === 'json') statuses.add(415);
  if (method !== 'get') statuses.add(409);
  if (f.authed) {
    statuses.add(401).add(403);
    if (method !== 'get') statuses.add(404);
  }
  if (/\{\w+\}/.test(f.path)) statuses.add(404);
  const sandboxOp = f.path.startsWith('/sandboxes/{id}') || (f.path.startsWith('/sandboxes') && method !== 'get');
  if (f.authed && sandboxOp) statuses.add(409).add(429).add(502);
  // A sandbox its timeout deleted answers 410 on every later call (README "Lifecycle").
  if (f.authed && f.path.startsWith('/sandboxes/{id}')) statuses.add(410);
  if (f.stream) statuses.add(429);
  return [...statuses].sort((x, y) => x - y);
}

/** An error response of `status`: its description names the codes that come with that status. */
function errorResponse(status: string, fallback?: string): Json {
  const codes = (Object.keys(errorCodeTable) as ErrorCode[]).filter((c) => String(errorCodeTable[c].httpStatus) === status);
  const description = errorDescriptions[status] ?? fallback ?? 'Error';
  return {
    description: codes.length ? `${description}. code: ${codes.join(', ')}` : description,
    content: { 'application/json': { schema: { $ref: '#/components/schemas/ErrorResponse' } } },
  };
}

/** A Zod schema as an OpenAPI schema; the components it names are added to `doc`. */
function schemaOf(doc: Json, schema: z.ZodType): Json {
  const result = createSchema(schema, { io: 'input', openapiVersion: '3.1.0' });
  for (const [name, component] of Object.entries(result.components)) doc.components.schemas[name] ??= component;
  return result.schema;
}

/** The OpenAPI operation of a route-table route: parameters, body and responses from its declaration. */
function routeOperation(doc: Json, spec: RouteSpec): Json {
  const parameters: Json[] = [
    ...Object.entries(spec.params.shape).map(([name, schema]) => ({ name, in: 'path', required: true, schema: schemaOf(doc, schema as z.ZodType) })),
    ...Object.entries(spec.query?.shape ?? {}).map(([name, schema]) => ({
      name,
      in: 'query',
      required: !(schema as z.ZodType).safeParse(undefined).success,
      schema: schemaOf(doc, schema as z.ZodType),
    })),
  ];
  let requestBody: Json | undefined;
  if (spec.body === 'binary' && spec.binaryTypes) {
    requestBody = { required: true, content: Object.fromEntries(spec.binaryTypes.map((type) => [type, { schema: { type: 'string', format: 'binary' } }])) };
  } else if (spec.body === 'binary') {
    requestBody = {
      required: true,
      content: {
        'application/octet-stream': { schema: { type: 'string', format: 'binary' } },
        'multipart/form-data': { schema: { type: 'object', required: ['file'], properties: { file: { type: 'string', format: 'binary' } } } },
      },
    };
  } else if (spec.body) {
    requestBody = { required: true, content: { 'application/json': { schema: schemaOf(doc, spec.body) } } };
  }
  const { success } = spec;
  const responses: Json = {
    [String(success.status)]: {
      description: success.description,
      ...(success.contentType ? { content: { [success.contentType]: { schema: success.schema ? schemaOf(doc, success.schema) : { type: 'string', ...(success.contentType === 'application/octet-stream' ? { format: 'binary' } : {}) } } } } : {}),
    },
  };
  const facts: OperationFacts = { method: spec.method, path: spec.path, authed: true, body: spec.body === 'binary' ? 'binary' : spec.body ? 'json' : 'none', stream: spec.stream };
  for (const status of errorStatuses(facts)) responses[String(status)] = errorResponse(String(status));
  return {
    operationId: spec.operationId,
    summary: spec.summary,
    ...(spec.description ? { description: spec.description } : {}),
    tags: [spec.tag],
    security: (spec.auth === 'apiKeyHeader' ? ['ApiKeyAuth'] : Object.keys(securitySchemes)).map((name) => ({ [name]: [] })),
    parameters,
    ...(requestBody ? { requestBody } : {}),
    responses,
  };
}

/**
 * The API key, as a header or (as the original VoidRun takes it on every route) in the query; the
 * header wins when both are sent. Either way `X-Org-ID` may name another org the key's user belongs to.
 */
const securitySchemes = {
  ApiKeyAuth: { type: 'apiKey', in: 'header', name: 'X-API-Key', description: 'The API key. Send X-Org-ID: <orgId> to act in another org its user owns or is a member of (403 otherwise).' },
  ApiKeyQuery: { type: 'apiKey', in: 'query', name: 'apiKey', description: 'The API key in the query (for clients that cannot set headers, e.g. WebSockets); never logged. The header wins when both are sent.' },
} as const;

/** Routes served outside /api, documented by hand. */
const extraPaths: Json = {
  '/metrics': {
    get: {
      operationId: 'metrics',
      summary: 'Prometheus metrics',
      description: 'Served at /metrics (outside /api). Request counts and latency histograms by route and status.',
      tags: ['System'],
      servers: [{ url: '/' }],
      security: [],
      responses: {
        '200': { description: 'Prometheus text format', content: { 'text/plain': { schema: { type: 'string' } } } },
        // 401 without the bearer token when METRICS_TOKEN is set.
        ...Object.fromEntries([401, ...errorStatuses({ method: 'get', path: '/metrics', authed: false, body: 'none' })].sort((a, b) => a - b).map((s) => [String(s), errorResponse(String(s))])),
      },
    },
  },
};

/**
 * The REST contract, generated from the router: trpc-to-openapi's document with each success
 * response wrapped in the `{status, message, data}` envelope, each error in `ErrorResponse`, and the
 * success status each procedure declares.
 */
export function buildOpenApiDocument(router: AppRouter, version: string): Json {
  const doc = generateOpenApiDocument(router, {
    title: 'VoidRun API',
    description:
      'Sandboxes you can drive: lifecycle, commands, files, terminals, file watch. All endpoints except /register and /version ' +
      'need the X-API-Key header. Success bodies are `{status, message, data, meta?}`; errors are `{error, code, details?}`, where `code` is a stable machine code (see ErrorResponse).',
    version,
    baseUrl: '/api',
    securitySchemes,
  }) as Json;

  // ErrorResponse has an id: createSchema answers a $ref and puts the schema itself in `components`.
  const { components } = createSchema(ErrorResponse, { openapiVersion: '3.1.0' });
  doc.components = { ...doc.components, schemas: { ...doc.components?.schemas, ...components } };
  const metaByRoute = new Map<string, Meta>();
  for (const meta of procedureMetaIndex(router).values()) {
    if (meta.openapi) metaByRoute.set(`${meta.openapi.method.toLowerCase()} ${meta.openapi.path}`, meta);
  }

  for (const [path, item] of Object.entries(doc.paths as Json)) {
    for (const [method, op] of Object.entries(item as Json)) {
      const meta = metaByRoute.get(`${method} ${path}`);
      const responses: Json = {};
      for (const [status, response] of Object.entries(op.responses as Json)) {
        if (status.startsWith('2')) {
          const data = response.content?.['application/json']?.schema ?? {};
          responses[String(meta?.successStatus ?? status)] = {
            description: meta?.message ?? response.description,
            content: { 'application/json': { schema: envelopeSchema(data, meta, doc) } },
          };
        } else {
          responses[status] = errorResponse(status, response.description);
        }
      }
      const facts: OperationFacts = { method, path, authed: (op.security?.length ?? 0) > 0, body: op.requestBody ? 'json' : 'none' };
      for (const status of errorStatuses(facts)) responses[String(status)] ??= errorResponse(String(status));
      op.responses = responses;
      if (meta?.queryInputs?.length) moveBodyToQuery(op, meta.queryInputs);
    }
  }
  for (const spec of Object.values(routeTable) as RouteSpec[]) {
    doc.paths[spec.path] = { ...doc.paths[spec.path], [spec.method.toLowerCase()]: routeOperation(doc, spec) };
  }
  doc.paths = { ...doc.paths, ...extraPaths };
  return doc;
}

/** Documents the named POST inputs as query parameters, as the contract has them. */
function moveBodyToQuery(op: Json, names: string[]): void {
  const schema = op.requestBody?.content?.['application/json']?.schema;
  if (!schema?.properties) return;
  const required = new Set<string>(schema.required ?? []);
  op.parameters = [
    ...(op.parameters ?? []),
    ...names
      .filter((n) => schema.properties[n])
      .map((n) => ({ name: n, in: 'query', required: required.has(n), schema: schema.properties[n], description: 'May also be sent in the JSON body' })),
  ];
  for (const n of names) delete schema.properties[n];
  schema.required = [...required].filter((n) => !names.includes(n));
  if (schema.required.length === 0) delete schema.required;
  if (Object.keys(schema.properties).length === 0) op.requestBody.required = false;
}

/**
 * A success body's schema as REST sends it (see `Meta.envelope`): the output (or its `restView`)
 * bare, inside the `{status, message, data}` envelope, or both at once.
 */
function envelopeSchema(output: Json, meta: Meta | undefined, doc: Json): Json {
  const message = meta?.message;
  let data = output;
  if (meta?.restView) {
    const view = createSchema(meta.restView.schema, { io: 'output', openapiVersion: '3.1.0' });
    doc.components.schemas = { ...doc.components.schemas, ...view.components };
    data = view.schema;
  }
  if (meta?.envelope === 'bare') return data;
  let pageMeta: Json | undefined;
  if (meta?.paged) {
    // A paged procedure returns {data, meta}; REST puts both at the envelope's top level.
    const resolved = data.$ref ? doc.components.schemas[String(data.$ref).split('/').pop()!] : data;
    data = resolved.properties.data;
    pageMeta = resolved.properties.meta;
  }
  const envelope: Json = {
    type: 'object',
    required: [...(meta?.successFlag ? ['success'] : []), 'status', 'message', 'data'],
    properties: {
      ...(meta?.successFlag ? { success: { type: 'boolean', enum: [true] } } : {}),
      status: { type: 'string', enum: ['success'] },
      message: { type: 'string', ...(message ? { example: message } : {}) },
      data,
      ...(pageMeta ? { meta: pageMeta } : {}),
    },
  };
  if (meta?.envelope === 'output-first') {
    // The output's own fields (its `status` among them) with the envelope's message and data.
    return { allOf: [data, { type: 'object', required: ['message', 'data'], properties: { message: envelope.properties.message, data: structuredClone(data) } }] };
  }
  return meta?.envelope === 'both' ? { allOf: [data, envelope] } : envelope;
}

export function openApiYaml(doc: Json): string {
  return stringify(doc, { lineWidth: 0 });
}
