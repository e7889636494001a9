import { generateOpenApiDocument } from 'trpc-to-openapi';
import { createSchema } from 'zod-openapi';
import { stringify } from 'yaml';
import { ErrorResponse } from '../../shared/envelope.js';
import type { AppRouter } from '../routers/index.js';
import type { Meta } from '../trpc/init.js';
import { procedureMetaIndex } from './procedure-meta.js';

type Json = Record<string, any>;

const errorDescriptions: Record<string, string> = {
  '400': 'Invalid input: the message names the offending field',
  '401': 'Missing, invalid, revoked or deactivated API key',
  '403': "The API key's organization may not do this",
  '404': 'Not found',
  '409': 'Conflict with an existing resource',
  '413': 'Request body too large',
  '415': 'Request body is not JSON',
  '500': 'Internal server error',
};

/** Routes served outside the tRPC router, documented by hand. */
const extraPaths: Json = {
  '/sandboxes/{id}/session-exec-stream': {
    post: {
      operationId: 'sessionExecStream',
      summary: 'Run a command in a shell session, streamed as NDJSON',
      tags: ['Execution'],
      security: [{ ApiKeyAuth: [] }],
      parameters: [{ name: 'id', in: 'path', required: true, schema: { type: 'string' } }],
      requestBody: {
        required: true,
        content: {
          'application/json': {
            schema: {
              type: 'object',
              required: ['sessionId', 'command'],
              properties: { sessionId: { type: 'string' }, command: { type: 'string' }, timeout: { type: 'integer', minimum: 1, maximum: 300, default: 30 } },
            },
          },
        },
      },
      responses: {
        '200': {
          description:
            'One JSON object per line: {"type":"stdout"|"stderr","data"} chunks, then {"type":"exit","exitCode"}; a reader that falls more than 4 MiB behind gets {"type":"gap","droppedBytes"} where output was dropped',
          content: { 'application/x-ndjson': { schema: { type: 'string' } } },
        },
        '404': { description: 'Sandbox or session not found', content: { 'application/json': { schema: { $ref: '#/components/schemas/ErrorResponse' } } } },
      },
    },
  },
  '/metrics': {
    get: {
      operationId: 'metrics',
      summary: 'Prometheus metrics',
      description: 'Served at /metrics (outside /api). Request counts and latency histograms by route and status.',
      tags: ['System'],
      servers: [{ url: '/' }],
      security: [],
      responses: { '200': { description: 'Prometheus text format', content: { 'text/plain': { schema: { type: 'string' } } } } },
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
      'need the X-API-Key header. Success bodies are `{status, message, data, meta?}`; errors are `{error, details?}`.',
    version,
    baseUrl: '/api',
    securitySchemes: { ApiKeyAuth: { type: 'apiKey', in: 'header', name: 'X-API-Key' } },
  }) as Json;

  const { schema: errorSchema, components } = createSchema(ErrorResponse);
  doc.components = { ...doc.components, schemas: { ...doc.components?.schemas, ...components, ErrorResponse: errorSchema } };
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
          responses[status] = {
            description: errorDescriptions[status] ?? response.description,
            content: { 'application/json': { schema: { $ref: '#/components/schemas/ErrorResponse' } } },
          };
        }
      }
      op.responses = responses;
      if (meta?.queryInputs?.length) moveBodyToQuery(op, meta.queryInputs);
    }
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
  return meta?.envelope === 'both' ? { allOf: [data, envelope] } : envelope;
}

export function openApiYaml(doc: Json): string {
  return stringify(doc, { lineWidth: 0 });
}
