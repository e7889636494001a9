import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import WebSocket from 'ws';
import { errorCodes } from '../shared/errors.js';
import { errorStatuses, type OperationFacts } from '../server/http/openapi-document.js';
import { routeTable, type RouteSpec } from '../server/http/route-table.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const referenceContract = join(root, '..', 'shared', 'reference', 'voidrun-openapi.yml');

type Doc = { paths: Record<string, Record<string, { responses: Record<string, unknown> }>> };
const ours = parse(readFileSync(join(root, 'openapi.yml'), 'utf8')) as Doc;

let server: TestServer;
beforeAll(async () => {
  server = await startTestServer();
});
afterAll(async () => {
  await server?.close();
});

describe('openapi.yml', () => {
  it('is up to date with the routers (run `npm run openapi` when this fails)', () => {
    execFileSync(process.execPath, ['--import', 'tsx', join(root, 'scripts', 'generate-openapi.ts'), '--check'], { cwd: root, stdio: 'pipe' });
  });

  it('is what the server serves at /api/openapi.yml and /api/openapi.json', async () => {
    const served = parse(await (await server.http('/api/openapi.yml')).text()) as Doc;
    expect(served.paths).toEqual(ours.paths);
    const json = (await (await server.http('/api/openapi.json')).json()) as Doc;
    expect(json.paths).toEqual(ours.paths);
  });

  it('documents envelopes on success and ErrorResponse on errors', () => {
    const op = ours.paths['/orgs/{orgId}/apikeys/{keyId}']!.delete!;
    expect(JSON.stringify(op.responses['200'])).toContain('"required":["status","message","data"]');
    expect(JSON.stringify(op.responses['401'])).toContain('#/components/schemas/ErrorResponse');
  });

  it('documents the bare and the two-shaped bodies as REST sends them', () => {
    const schema = (path: string, method: string, status = '200') =>
      (ours.paths[path]![method]!.responses[status] as { content: { 'application/json': { schema: Record<string, unknown> } } }).content['application/json'].schema;
    expect(schema('/orgs/{orgId}/apikeys', 'get')).toEqual({ type: 'array', items: { $ref: '#/components/schemas/APIKeyResponse' } });
    expect(schema('/sandboxes/{id}/commands/run', 'post')).toEqual({ $ref: '#/components/schemas/CommandRunResponse' });
    expect(schema('/images', 'get')).toEqual({ type: 'array', items: { $ref: '#/components/schemas/Image' } });
    expect(schema('/orgs/me', 'get')).toMatchObject({ allOf: [{ $ref: '#/components/schemas/Organization' }, { required: ['status', 'message', 'data'] }] });
    expect(schema('/sandboxes/{id}', 'get')).toMatchObject({ required: ['success', 'status', 'message', 'data'] });
    const sandbox = (parse(readFileSync(join(root, 'openapi.yml'), 'utf8')) as { components: { schemas: Record<string, { properties: Record<string, { enum?: string[] }> }> } }).components.schemas.Sandbox!;
    expect(sandbox.properties.status!.enum).toEqual(['running', 'stopped', 'paused', 'error']);
  });

  it("documents every operation of the original VoidRun contract (path and method); skipped, saying so, when the contract is not beside the clone", (ctx) => {
    if (!existsSync(referenceContract)) {
      console.warn(`[openapi test] SKIPPED: the original contract is not at ${referenceContract}`);
      ctx.skip(`the original contract is not at ${referenceContract}`);
    }
    const contract = parse(readFileSync(referenceContract, 'utf8')) as Doc;
    const key = (method: string, path: string) => `${method.toUpperCase()} ${path.replace(/\{[^}]+\}/g, '{}')}`;
    const documented = new Set(Object.entries(ours.paths).flatMap(([path, item]) => Object.keys(item).map((m) => key(m, path))));
    const missing = Object.entries(contract.paths).flatMap(([path, item]) => Object.keys(item).filter((m) => !documented.has(key(m, path))).map((m) => key(m, path)));
    expect(missing, `operations of the original contract missing from openapi.yml:\n${missing.join('\n')}`).toEqual([]);
  });

  it('documents every raw and WebSocket route of the route table, and the server dispatches each from it (401 UNAUTHORIZED without a key)', async () => {
    const ws = server.url.replace('http', 'ws');
    for (const spec of Object.values(routeTable) as RouteSpec[]) {
      const op = ours.paths[spec.path]?.[spec.method.toLowerCase()];
      expect(op, `${spec.method} ${spec.path}`).toBeDefined();
      expect(Object.keys(op!.responses)).toContain(String(spec.success.status));
      const path = spec.path.replace(/\{(\w+)\}/g, 'x');
      if (spec.kind === 'http') {
        const res = await server.http(`/api${path}?path=/x`, { method: spec.method });
        expect(res.status, `${spec.method} ${spec.path}`).toBe(401);
        expect(await res.json()).toMatchObject({ code: 'UNAUTHORIZED' });
      } else {
        const status = await new Promise<number>((resolve) => {
          const socket = new WebSocket(`${ws}/api${path}`);
          socket.on('error', () => {});
          socket.on('open', () => resolve(101));
          socket.on('unexpected-response', (_req, res) => resolve(res.statusCode!));
        });
        expect(status, `${spec.method} ${spec.path}`).toBe(401);
      }
    }
  });

  it('documents, for every operation, each error status its facts allow (input, body, key, sandbox, stream), with ErrorResponse and its code enum', () => {
    for (const [path, item] of Object.entries(ours.paths)) {
      if (path === '/metrics') continue;
      for (const [method, op] of Object.entries(item)) {
        const full = op as { security?: unknown[]; requestBody?: { content: Record<string, unknown> }; responses: Record<string, unknown> };
        const spec = (Object.values(routeTable) as RouteSpec[]).find((r) => r.path === path && r.method.toLowerCase() === method);
        const body = !full.requestBody ? 'none' : full.requestBody.content['application/json'] ? 'json' : 'binary';
        const facts: OperationFacts = { method, path, authed: (full.security?.length ?? 0) > 0, body, stream: spec?.stream };
        const statuses = errorStatuses(facts);
        expect(statuses).toEqual(expect.arrayContaining([400, 431, 503]));
        for (const status of statuses) {
          expect(full.responses[String(status)], `${method.toUpperCase()} ${path} ${status}`).toBeDefined();
          expect(JSON.stringify(full.responses[String(status)])).toContain('#/components/schemas/ErrorResponse');
        }
      }
    }
    const errorResponse = (parse(readFileSync(join(root, 'openapi.yml'), 'utf8')) as { components: { schemas: Record<string, { required: string[]; properties: { code: { enum: string[] } } }> } }).components.schemas.ErrorResponse!;
    expect(errorResponse.required).toEqual(['error', 'code']);
    expect(errorResponse.properties.code.enum).toEqual(errorCodes);
    expect(ours.paths['/sandboxes/{id}/files/upload']!.post!.responses).toHaveProperty('413');
    expect(ours.paths['/sandboxes/{id}/pty']!.get!.responses).toHaveProperty('429');
    expect(ours.paths['/register']!.post!.responses).not.toHaveProperty('401');
  });
});

describe('docs page', () => {
  it('renders swagger-ui from the npm package, no CDN', async () => {
    const page = await server.http('/api/docs');
    expect(page.status).toBe(200);
    const html = await page.text();
    expect(html).toContain('/api/docs/assets/swagger-ui-bundle.js');
    expect(html).not.toMatch(/https?:\/\//);
    const bundle = await server.http('/api/docs/assets/swagger-ui-bundle.js');
    expect(bundle.status).toBe(200);
    expect(bundle.headers.get('content-type')).toContain('javascript');
    expect((await server.http('/api/docs/assets/package.json')).status).toBe(404);
    expect((await server.http('/api/docs/assets/..%2F..%2Fpackage.json')).status).toBe(404);
  });
});
