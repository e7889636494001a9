import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/*
 * The original VoidRun's edge behaviours and configuration: CORS as its `CORS_*` variables set
 * it up (gin-contrib/cors), trailing-slash redirects (gin's RedirectTrailingSlash), METRICS_*.
 */

const browser = 'https://app.example.com';

/** A request as a browser on `origin` sends it (no redirect following). */
function fromBrowser(s: TestServer, path: string, init: RequestInit & { origin?: string } = {}): Promise<Response> {
  const { origin = browser, ...rest } = init;
  const headers = new Headers(rest.headers);
  headers.set('origin', origin);
  return fetch(s.url + path, { ...rest, headers, redirect: 'manual' });
}

describe('CORS with the original defaults (any origin, no credentials)', () => {
  let s: TestServer;
  let apiKey: string;
  beforeAll(async () => {
    s = await startTestServer();
    const reg = await s.client().trpc.auth.register.mutate({ name: 'Cors', email: uniqueEmail() });
    apiKey = reg.apiKey;
  });
  afterAll(() => s.close());

  it.each(['/api/sandboxes', '/api/sandboxes/abc/files/upload', '/trpc/sandbox.list', '/metrics', '/api/no-such-route'])('answers an OPTIONS preflight on %s with 204 and the allowed methods and headers', async (path) => {
    const res = await fromBrowser(s, path, { method: 'OPTIONS', headers: { 'access-control-request-method': 'POST', 'access-control-request-headers': 'x-api-key,content-type' } });
    expect(res.status).toBe(204);
    expect(res.headers.get('access-control-allow-origin')).toBe('*');
    expect(res.headers.get('access-control-allow-methods')).toBe('GET,POST,PUT,PATCH,DELETE,OPTIONS');
    // The original's list plus Idempotency-Key and Last-Event-ID, so browsers can use idempotent creates and resume event streams.
    expect(res.headers.get('access-control-allow-headers')).toBe('Authorization,Content-Type,X-Api-Key,X-Org-Id,Idempotency-Key,Last-Event-Id');
    expect(res.headers.get('access-control-max-age')).toBe('600');
    expect(res.headers.get('access-control-allow-credentials')).toBeNull();
    expect(await res.text()).toBe('');
  });

  it('adds Access-Control-Allow-Origin to REST, tRPC and error answers', async () => {
    const rest = await fromBrowser(s, '/api/sandboxes', { headers: { 'x-api-key': apiKey } });
    expect(rest.status).toBe(200);
    expect(rest.headers.get('access-control-allow-origin')).toBe('*');
    const trpc = await fromBrowser(s, '/trpc/system.version');
    expect(trpc.headers.get('access-control-allow-origin')).toBe('*');
    const unauthorized = await fromBrowser(s, '/api/sandboxes');
    expect(unauthorized.status).toBe(401);
    expect(unauthorized.headers.get('access-control-allow-origin')).toBe('*');
  });

  it('leaves requests without Origin, or from its own origin, without CORS headers', async () => {
    const plain = await s.http('/api/version');
    expect(plain.headers.get('access-control-allow-origin')).toBeNull();
    const own = await fromBrowser(s, '/api/version', { origin: s.url });
    expect(own.headers.get('access-control-allow-origin')).toBeNull();
  });
});

describe('CORS configured (CORS_ALLOW_ORIGINS, CORS_ALLOW_CREDENTIALS, CORS_EXPOSE_HEADERS, CORS_ENABLED)', () => {
  const servers: TestServer[] = [];
  afterAll(() => Promise.all(servers.map((s) => s.close())));
  const start = async (env: Record<string, string>) => {
    const s = await startTestServer(env);
    servers.push(s);
    return s;
  };

  it('with a list of origins, echoes a listed origin with Vary: Origin and refuses another with 403 naming the variable', async () => {
    const s = await start({ CORS_ALLOW_ORIGINS: `https://other.example.com, ${browser}`, CORS_EXPOSE_HEADERS: 'content-disposition,x-request-id', CORS_MAX_AGE_SEC: '0' });
    const ok = await fromBrowser(s, '/api/version');
    expect(ok.headers.get('access-control-allow-origin')).toBe(browser);
    expect(ok.headers.get('vary')).toMatch(/Origin/);
    expect(ok.headers.get('access-control-expose-headers')).toBe('Content-Disposition,X-Request-Id');
    const preflight = await fromBrowser(s, '/api/version', { method: 'OPTIONS' });
    expect(preflight.status).toBe(204);
    expect(preflight.headers.get('access-control-allow-origin')).toBe(browser);
    expect(preflight.headers.get('access-control-max-age')).toBeNull();
    const refused = await fromBrowser(s, '/api/version', { origin: 'https://evil.example.net' });
    expect(refused.status).toBe(403);
    expect(await refused.json()).toMatchObject({ error: expect.stringContaining('https://evil.example.net'), details: expect.stringContaining('CORS_ALLOW_ORIGINS') });
  });

  it('with credentials and any origin, echoes the origin, never *', async () => {
    const s = await start({ CORS_ALLOW_CREDENTIALS: 'true' });
    for (const method of ['GET', 'OPTIONS']) {
      const res = await fromBrowser(s, '/api/version', { method });
      expect(res.headers.get('access-control-allow-origin')).toBe(browser);
      expect(res.headers.get('access-control-allow-credentials')).toBe('true');
      expect(res.headers.get('vary')).toMatch(/Origin/);
    }
  });

  it('CORS_ENABLED=false sends no CORS headers and leaves OPTIONS to the routes', async () => {
    const s = await start({ CORS_ENABLED: 'false' });
    const res = await fromBrowser(s, '/api/version');
    expect(res.status).toBe(200);
    expect(res.headers.get('access-control-allow-origin')).toBeNull();
    const options = await fromBrowser(s, '/api/version', { method: 'OPTIONS' });
    expect(options.status).not.toBe(204);
    expect(options.status).toBeLessThan(500);
  });

  it('METRICS_PATH moves /metrics and METRICS_ENABLED=false turns it off', async () => {
    const moved = await start({ METRICS_PATH: '/internal/prom' });
    expect((await moved.http('/internal/prom')).status).toBe(200);
    expect((await moved.http('/metrics')).status).toBe(404);
    expect((await moved.http('/internal/prom', { method: 'PUT' })).status).toBe(404);
    const off = await start({ METRICS_ENABLED: 'false' });
    expect((await off.http('/metrics')).status).toBe(404);
  });
});

describe('trailing-slash paths redirect like the original (gin RedirectTrailingSlash)', () => {
  let s: TestServer;
  let apiKey: string;
  beforeAll(async () => {
    s = await startTestServer();
    apiKey = (await s.client().trpc.auth.register.mutate({ name: 'Slash', email: uniqueEmail() })).apiKey;
  });
  afterAll(() => s.close());

  it('answers GET with 301 to the path without the slash, query kept', async () => {
    const res = await fetch(`${s.url}/api/sandboxes/?page=2`, { headers: { 'x-api-key': apiKey }, redirect: 'manual' });
    expect(res.status).toBe(301);
    expect(res.headers.get('location')).toBe('/api/sandboxes?page=2');
    const followed = await fetch(`${s.url}/api/sandboxes/`, { headers: { 'x-api-key': apiKey } });
    expect(followed.status).toBe(200);
    expect((await fetch(`${s.url}/api/sandboxes/0123456789abcdef01234567/`, { redirect: 'manual' })).headers.get('location')).toBe('/api/sandboxes/0123456789abcdef01234567');
  });

  it('answers other methods with 307, which a client follows with the same method and body', async () => {
    const res = await fetch(`${s.url}/api/register/`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' }, redirect: 'manual' });
    expect(res.status).toBe(307);
    expect(res.headers.get('location')).toBe('/api/register');
    const followed = await fetch(`${s.url}/api/register/`, { method: 'POST', body: JSON.stringify({ name: 'Again', email: uniqueEmail() }), headers: { 'content-type': 'application/json' } });
    expect([200, 201]).toContain(followed.status);
    // Raw routes too (they are operations of openapi.yml).
    const upload = await fetch(`${s.url}/api/sandboxes/0123456789abcdef01234567/files/upload/?path=/tmp/x`, { method: 'POST', body: 'x', redirect: 'manual' });
    expect(upload.status).toBe(307);
    expect(upload.headers.get('location')).toBe('/api/sandboxes/0123456789abcdef01234567/files/upload?path=/tmp/x');
  });

  it('leaves a path that is no route (for its method) to the 404', async () => {
    expect((await fetch(`${s.url}/api/no-such-thing/`, { redirect: 'manual' })).status).toBe(404);
    expect((await fetch(`${s.url}/api/register/`, { redirect: 'manual' })).status).toBe(404);
  });
});

/** The samples of metric `name` in Prometheus text whose labels include every one in `labels`. */
function samples(text: string, name: string, labels: Record<string, string> = {}): { labels: string; value: number }[] {
  const out: { labels: string; value: number }[] = [];
  for (const line of text.split('\n')) {
    const m = /^([a-z_]+)(\{[^}]*\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const l = m[2] ?? '';
    if (Object.entries(labels).every(([k, v]) => l.includes(`${k}="${v}"`))) out.push({ labels: l, value: Number(m[3]) });
  }
  return out;
}

describe.skipIf(!support.ok)("per-sandbox gauges like the original's (voidrun_sbx_*, voidrun_host_allocated_*)", () => {
  let s: TestServer;
  let open: TestServer;
  beforeAll(async () => {
    [s, open] = await Promise.all([startTestServer({ METRICS_TOKEN: 'scraper-secret' }), startTestServer()]);
  });
  afterAll(() => Promise.all([s.close(), open.close()]));

  it('a sandbox has status, CPU, memory and allocation gauges from the host while it exists, and none once deleted', { timeout: 180_000 }, async () => {
    const reg = await s.client().trpc.auth.register.mutate({ name: 'Gauges', email: uniqueEmail() });
    const vr = s.client(reg.apiKey);
    const sb = await vr.sandboxes.create({ name: 'gauged', cpu: 1, mem: 1024 });
    const scrape = async () => (await s.http('/metrics', { headers: { authorization: 'Bearer scraper-secret' } })).text();
    try {
      const first = await scrape();
      const mine = { sbx_id: sb.id, sbx_name: 'gauged', org_id: reg.orgId };
      expect(samples(first, 'voidrun_sbx_status', { ...mine, status: 'running' })).toEqual([expect.objectContaining({ value: 1 })]);
      expect(samples(first, 'voidrun_sbx_metrics_up', mine)).toEqual([expect.objectContaining({ value: 1 })]);
      const [mem] = samples(first, 'voidrun_sbx_mem_used_bytes', mine);
      expect(mem!.value).toBeGreaterThan(0);
      expect(mem!.value).toBeLessThanOrEqual(1024 * 1024 * 1024);
      expect(samples(first, 'voidrun_sbx_cpu_seconds_total', mine)[0]!.value).toBeGreaterThan(0);
      expect(samples(first, 'voidrun_sbx_disk_limit_bytes', mine)[0]!.value).toBeGreaterThan(0);
      expect(samples(first, 'voidrun_host_allocated_vcpus')[0]!.value).toBeGreaterThanOrEqual(1);
      expect(samples(first, 'voidrun_host_allocated_mem_bytes')[0]!.value).toBeGreaterThanOrEqual(1024 * 1024 * 1024);

      // CPU percent is over the time between two scrapes.
      await sb.exec('i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done');
      const [cpu] = samples(await scrape(), 'voidrun_sbx_cpu_usage', mine);
      expect(cpu!.value).toBeGreaterThan(0);
      expect(cpu!.value).toBeLessThanOrEqual(100);
    } finally {
      await sb.delete();
    }
    const after = await scrape();
    expect(after).not.toContain(sb.id);
    expect(samples(after, 'voidrun_host_allocated_vcpus')[0]!.value).toBe(0);
  });
  it('a public /metrics (no METRICS_TOKEN) names no tenant: host totals only, no per-sandbox series', { timeout: 180_000 }, async () => {
    const reg = await open.client().trpc.auth.register.mutate({ name: 'Public gauges', email: uniqueEmail() });
    const sb = await open.client(reg.apiKey).sandboxes.create({ name: 'unnamed-in-metrics', cpu: 1, mem: 1024 });
    try {
      const text = await (await open.http('/metrics')).text();
      expect(samples(text, 'voidrun_host_allocated_vcpus')[0]!.value).toBeGreaterThanOrEqual(1);
      expect(text).not.toContain('voidrun_sbx_');
      expect(text).not.toContain(sb.id);
      expect(text).not.toContain('unnamed-in-metrics');
      expect(text).not.toContain(reg.orgId);
    } finally {
      await sb.delete();
    }
  });
});
