import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
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

  it.skipIf(!existsSync(referenceContract))("serves the original VoidRun contract's auth and org operations at the same paths and methods", () => {
    const contract = parse(readFileSync(referenceContract, 'utf8')) as Doc;
    const implemented = Object.keys(contract.paths).filter((p) => p === '/register' || p.startsWith('/orgs'));
    expect(implemented.length).toBeGreaterThanOrEqual(4);
    for (const path of implemented) {
      for (const method of Object.keys(contract.paths[path]!)) {
        expect(ours.paths[path]?.[method], `${method.toUpperCase()} ${path}`).toBeDefined();
      }
    }
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
