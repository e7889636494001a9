import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createServer as createNetServer } from 'node:net';
import { request, type IncomingHttpHeaders } from 'node:http';
import { once } from 'node:events';
import { join } from 'node:path';
import { Duplex } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { CommandHandle, SandboxHandle, VoidRunClient } from '../client/index.js';
import { containerListeningPorts } from '../server/hypervisor/container/listening-ports.js';
import { listsPorts } from '../server/hypervisor/types.js';
import { TunnelBudget } from '../server/http/port-proxy.js';
import { PreviewTokens } from '../server/services/preview-tokens.js';
import { listeningPorts, MAX_LISTENING_PORTS } from '../shared/listening-ports.js';
import { splice } from '../shared/port-tunnel.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/*
 * Ports of a real sandbox through the agent's socket (the sandbox has loopback only): the API
 * proxy path with a key, preview hosts (`{port}-{id}.preview.test`, plain HTTP on loopback with a
 * Host header) with tokens, cookies and public ports, WebSockets through both, and what the proxy
 * answers for a stopped sandbox, a closed port and servers that do not speak HTTP. The servers in
 * the sandbox are a perl script (the debian image has perl-base, no python).
 */

const DOMAIN = 'preview.test';
const script = readFileSync(join(import.meta.dirname, 'fixtures', 'port-server.pl'), 'utf8');

interface Answer {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

/** One plain HTTP request to the test server with any Host header. */
function raw(server: TestServer, path: string, opts: { method?: string; host?: string; headers?: Record<string, string>; body?: string } = {}): Promise<Answer> {
  const url = new URL(server.url);
  return new Promise((resolve, reject) => {
    const req = request({ host: url.hostname, port: url.port, path, method: opts.method ?? 'GET', headers: { ...(opts.host ? { host: opts.host } : {}), ...opts.headers } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}

/** The `name=value` lines the perl server echoes back, as a map. */
function echoed(body: string): Record<string, string> {
  return Object.fromEntries(body.split('\n').filter(Boolean).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

/** Sends one message over a WebSocket and resolves with the echo. */
function wsEcho(url: string, headers: Record<string, string>, message: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers });
    ws.once('open', () => ws.send(message));
    ws.once('message', (data) => {
      resolve(String(data));
      ws.close();
    });
    ws.once('unexpected-response', (_req, res) => reject(new Error(`upgrade answered ${res.statusCode}`)));
    ws.once('error', reject);
  });
}

describe('listening ports and preview tokens (pure)', () => {
  it('reads LISTEN entries of /proc/net/tcp and tcp6, once each, ascending, bounded; skips other states and garbage', () => {
    const tcp = [
      '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
      '   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0',
      '   1: 0100007F:1F40 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0',
      '   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0',
      'garbage 0A',
      '   3: 0100007F:ZZZZ 00000000:0000 0A',
    ].join('\n');
    const tcp6 = '   0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 0\n   1: 00000000000000000000000000000000:2328 00000000000000000000000000000000:0000 0A 0';
    expect(listeningPorts(tcp, tcp6)).toEqual([80, 8000, 9000]);
    const many = Array.from({ length: 2000 }, (_, i) => `  ${i}: 0100007F:${(i + 1).toString(16).padStart(4, '0').toUpperCase()} 00000000:0000 0A`).join('\n');
    expect(listeningPorts(many)).toHaveLength(MAX_LISTENING_PORTS);
  });

  it("a container's pid file naming a process outside its cgroup (a pid reused after it stopped) lends no ports", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-pidfile-'));
    try {
      writeFileSync(join(dir, 'init.pid'), String(process.pid)); // this process: in no sandbox's cgroup
      expect(await containerListeningPorts(join(dir, 'init.pid'), 'vr-000000000000000000000000')).toBeNull();
      writeFileSync(join(dir, 'init.pid'), 'garbage');
      expect(await containerListeningPorts(join(dir, 'init.pid'), 'vr-000000000000000000000000')).toBeNull();
      expect(await containerListeningPorts(join(dir, 'missing.pid'), 'vr-000000000000000000000000')).toBeNull();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('bounds proxied requests to half of HTTP_MAX_CONNECTIONS in all, half of that per org and a quarter per sandbox (a never-answering port cannot fill the server)', () => {
    const budget = new TunnelBudget(16);
    expect([budget.max, budget.perOrg, budget.perSandbox]).toEqual([8, 4, 2]);
    const releases = ['a', 'a', 'b', 'b'].map((id) => budget.take('org1', id));
    expect(() => budget.take('org2', 'a')).toThrow('the most one sandbox may');
    expect(() => budget.take('org1', 'c')).toThrow('the most one org may');
    const others = ['c', 'c', 'd', 'd'].map((id) => budget.take('org2', id));
    expect(() => budget.take('org3', 'e')).toThrow('half of HTTP_MAX_CONNECTIONS');
    releases[0]!();
    releases[0]!(); // given back once
    const again = budget.take('org3', 'e');
    expect(() => budget.take('org3', 'f')).toThrow('half of HTTP_MAX_CONNECTIONS');
    for (const release of [again, ...releases.slice(1), ...others]) release();
    expect(budget.take('org1', 'c')).toBeTypeOf('function');
    expect([new TunnelBudget(2048).max, new TunnelBudget(2048).perOrg, new TunnelBudget(2048).perSandbox]).toEqual([1024, 512, 256]);
  });

  it('a tunnel side whose peer closed is destroyed even when its server never reads what is left (no agent socket held for good)', async () => {
    const a = new Duplex({ read() {}, write: (_c, _e, cb) => cb() });
    const b = new Duplex({ read() {}, write() {} }); // never flushes a write
    splice(a, b, 10);
    const closed = once(b, 'close');
    a.push('bytes b never writes out');
    await new Promise((resolve) => setImmediate(resolve));
    expect(b.writableLength).toBeGreaterThan(0);
    a.destroy();
    await closed;
    expect(b.destroyed).toBe(true);
  });

  it('opens one port of one sandbox until the token expires', () => {
    const tokens = new PreviewTokens(Buffer.alloc(32, 7));
    const now = Date.UTC(2026, 0, 1);
    const { token, expiresAt } = tokens.mint('abc', 8080, 60, now);
    expect(expiresAt.getTime()).toBe(now + 60_000);
    expect(tokens.verify(token, 'abc', 8080, now)).toEqual(expiresAt);
    expect(tokens.verify(token, 'abc', 8081, now)).toBeNull();
    expect(tokens.verify(token, 'abd', 8080, now)).toBeNull();
    expect(tokens.verify(token, 'abc', 8080, now + 60_000)).toBeNull();
    expect(new PreviewTokens(Buffer.alloc(32, 8)).verify(token, 'abc', 8080, now)).toBeNull();
    expect(tokens.verify(`${Number(token.split('.')[0]) + 1000}.${token.split('.')[1]}`, 'abc', 8080, now)).toBeNull();
    expect(tokens.verify('x'.repeat(10_000), 'abc', 8080, now)).toBeNull();
  });
});

describe.skipIf(!support.ok)('ports and preview URLs', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let box: SandboxHandle;
  const host = (port: number) => `${port}-${box.id}.${DOMAIN}`;

  /** Starts the perl server in `mode` on `port` and resolves once it listens. */
  async function startPerl(mode: string, port: number): Promise<CommandHandle> {
    const handle = await box.commands.run(`perl /root/port-server.pl ${mode} ${port}`);
    for await (const chunk of handle.output()) {
      if (chunk.type === 'stdout' && chunk.data.includes(`listening ${port}`)) break;
      if (chunk.type === 'exit') throw new Error(`the ${mode} server exited`);
    }
    return handle;
  }

  beforeAll(async () => {
    server = await startTestServer({ PREVIEW_DOMAIN: DOMAIN, PREVIEW_URL_SCHEME: 'http' });
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Ports User', email: uniqueEmail('ports') })).apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'ports' });
    await box.files.write('/root/port-server.pl', script);
    await startPerl('http', 8000);
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('lists the listening port with its preview URL and proxy path', async () => {
    const list = await box.ports.list();
    expect(list.ports).toContainEqual({ port: 8000, public: false, previewUrl: `http://${host(8000)}/`, proxyPath: `/api/sandboxes/${box.id}/ports/8000/` });
    // A container's listing is the kernel's, read on the host, never the agent's word.
    const driver = server.app.services.sandboxes.driver;
    expect(listsPorts(driver) ? await driver.listeningPorts(box.id) : null).toContain(8000);
  });

  it('proxies /ports/{port}/ with the key, without our credentials upstream', async () => {
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8000/hello/there?x=1&voidrun_token=t&y=2`, {
      method: 'POST',
      headers: { 'x-api-key': apiKey, cookie: 'app=1', 'content-type': 'text/plain' },
      body: 'posted body',
    });
    expect(res.status).toBe(200);
    const seen = echoed(res.body);
    expect(seen).toMatchObject({ method: 'POST', target: '/hello/there?x=1&y=2', host: 'localhost:8000', cookie: 'app=1', body: 'posted body' });
    expect(seen['x-api-key']).toBeUndefined();
    expect(res.headers['x-upstream']).toBe('perl');
    expect(res.headers['set-cookie']).toEqual([`a=1; Path=/api/sandboxes/${box.id}/ports/8000/`, `b=2; Path=/api/sandboxes/${box.id}/ports/8000/`]);
    // Pages served on the API's origin run as an opaque origin.
    expect(res.headers['content-security-policy']).toContain('sandbox');
  });

  it("refuses ?apiKey= on /ports/{port}/ with a 400 naming the header and preview tokens (the sandbox's page would read the key from its address)", async () => {
    for (const path of [`/api/sandboxes/${box.id}/ports/8000/?apiKey=${apiKey}`, `/api/sandboxes/${box.id}/ports/8000/x?a=1&api%4Bey=${apiKey}`]) {
      for (const headers of [{}, { 'x-api-key': apiKey }] as Record<string, string>[]) {
        const res = await raw(server, path, { headers });
        expect(res.status, path).toBe(400);
        expect(JSON.parse(res.body)).toMatchObject({ code: 'INVALID_INPUT', error: expect.stringContaining('X-API-Key header') });
        expect(JSON.parse(res.body).error).toContain('preview token');
        expect(res.body).not.toContain(apiKey);
      }
    }
    await expect(wsEcho(`${server.url.replace('http:', 'ws:')}/api/sandboxes/${box.id}/ports/8000/ws?apiKey=${apiKey}`, {}, 'x')).rejects.toThrow('upgrade answered 400');
    // The rest of the API still takes the query form, as the original VoidRun does.
    expect((await server.http(`/api/sandboxes/${box.id}/ports?apiKey=${apiKey}`)).status).toBe(200);
  });

  it("keeps our credentials out of a forwarded Referer and a page on the API path from setting its own Referrer-Policy (the key would leave as a Referer)", async () => {
    const referer = `http://api.example/api/sandboxes/${box.id}/ports/8000/page?q=1&apiKey=${apiKey}&voidrun_token=t&r=2`;
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers: { 'x-api-key': apiKey, referer } });
    expect(res.status).toBe(200);
    expect(echoed(res.body).referer).toBe(`http://api.example/api/sandboxes/${box.id}/ports/8000/page?q=1&r=2`);
    // The sandbox's server asks for `unsafe-url`; under the API path the answer says `no-referrer`.
    expect(res.headers['referrer-policy']).toBe('no-referrer');
    const viaHost = await raw(server, '/', { host: host(8000), headers: { 'x-api-key': apiKey, referer: `http://${host(8000)}/?voidrun_token=t` } });
    expect(echoed(viaHost.body).referer).toBe(`http://${host(8000)}/`);
  });

  it("drops a client's Forwarded header like X-Forwarded-* (a spoofed client address for the sandbox's server)", async () => {
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers: { 'x-api-key': apiKey, forwarded: 'for=203.0.113.9', 'x-forwarded-for': '203.0.113.9' } });
    expect(res.status).toBe(200);
    const seen = echoed(res.body);
    expect(seen.forwarded).toBeUndefined();
    expect(seen['x-forwarded-for']).not.toContain('203.0.113.9');
  });

  it('streams a 16 MiB body to the sandbox\'s server and its 16 MiB answer back, byte for byte', async () => {
    const body = createHash('sha256').update('seed').digest('hex').repeat((16 * 1024 * 1024) / 64);
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8000/upload`, { method: 'PUT', headers: { 'x-api-key': apiKey, 'content-type': 'text/plain' }, body });
    expect(res.status).toBe(200);
    const echoedBody = res.body.slice(res.body.indexOf('\nbody=') + '\nbody='.length, -1);
    expect(echoedBody.length).toBe(body.length);
    expect(echoedBody === body).toBe(true);
  }, 120_000);

  it("refuses /ports/{port}/ without a key (401); the bare port path and /token are the API's in every method", async () => {
    expect((await raw(server, `/api/sandboxes/${box.id}/ports/8000/`)).status).toBe(401);
    for (const [method, path] of [['GET', '/ports/8000'], ['TRACE', '/ports/8000/token'], ['GET', '/ports/8000/token']]) {
      const res = await raw(server, `/api/sandboxes/${box.id}${path}`, { method, headers: { 'x-api-key': apiKey } });
      expect(res.status, `${method} ${path}`).toBe(404);
      expect(JSON.parse(res.body).code).toBe('ROUTE_NOT_FOUND');
    }
    const bad = await raw(server, `/api/sandboxes/${box.id}/ports/70000/`, { headers: { 'x-api-key': apiKey } });
    expect(bad.status).toBe(400);
    expect(JSON.parse(bad.body).error).toContain('ports are 1 to 65535');
  });

  it('serves the preview host with a token, not without one (401) nor with a wrong one (403)', async () => {
    expect((await raw(server, '/', { host: host(8000) })).status).toBe(401);
    const token = await box.ports.token(8000, { ttlSeconds: 600 });
    expect(token.url).toBe(`http://${host(8000)}/?voidrun_token=${encodeURIComponent(token.token)}`);
    expect(new Date(token.expiresAt).getTime()).toBeGreaterThan(Date.now());
    const ok = await raw(server, '/page?z=1', { host: host(8000), headers: { 'x-voidrun-preview-token': token.token } });
    expect(ok.status).toBe(200);
    const seen = echoed(ok.body);
    expect(seen).toMatchObject({ target: '/page?z=1', host: host(8000) });
    expect(seen['x-voidrun-preview-token']).toBeUndefined();
    expect(ok.headers['content-security-policy']).toBeUndefined();
    // A token is bound to its port and sandbox.
    expect((await raw(server, '/', { host: host(8001), headers: { 'x-voidrun-preview-token': token.token } })).status).toBe(403);
    expect((await raw(server, '/', { host: host(8000), headers: { 'x-voidrun-preview-token': `${token.token.slice(0, -2)}xx` } })).status).toBe(403);
    // The org's key works on the preview host too.
    expect((await raw(server, '/', { host: host(8000), headers: { 'x-api-key': apiKey } })).status).toBe(200);
  });

  it("keeps a sandbox's cookies to its own host and proxy path (no cookie tossing into other sandboxes' preview hosts)", async () => {
    const tossed = 'evil=1; Domain=preview.test; Path=/x; HttpOnly';
    const viaApi = await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers: { 'x-api-key': apiKey, 'x-set-cookie': tossed } });
    expect(viaApi.headers['set-cookie']).toContain(`evil=1; HttpOnly; Path=/api/sandboxes/${box.id}/ports/8000/x`);
    const viaHost = await raw(server, '/', { host: host(8000), headers: { 'x-api-key': apiKey, 'x-set-cookie': tossed.replace('Domain', 'domain') } });
    expect(viaHost.headers['set-cookie']).toEqual(['a=1', 'b=2', 'evil=1; Path=/x; HttpOnly']);
    // A junk voidrun_preview cookie another preview host set for the whole domain does not shadow this host's own.
    const { token } = await box.ports.token(8000);
    const res = await raw(server, '/x/page', { host: host(8000), headers: { cookie: `voidrun_preview=junk; voidrun_preview=${token}` } });
    expect(res.status).toBe(200);
    expect((await raw(server, '/', { host: host(8000), headers: { cookie: 'voidrun_preview=junk' } })).status).toBe(403);
  });

  it('answers 404 naming the form for a name under PREVIEW_DOMAIN that is no preview host (never the API or the console on a tenants\' domain)', async () => {
    for (const name of [`0-${box.id}.${DOMAIN}`, `65536-${box.id}.${DOMAIN}`, `www.${DOMAIN}`, `a.b.${DOMAIN}:8080`]) {
      for (const path of ['/', '/api/version']) {
        const res = await raw(server, path, { host: name });
        expect(res.status, `${name}${path}`).toBe(404);
        expect(JSON.parse(res.body)).toMatchObject({ code: 'ROUTE_NOT_FOUND', error: expect.stringContaining(`preview hosts are {port}-{sandbox id}.${DOMAIN}`) });
      }
    }
    await expect(wsEcho(`${server.url.replace('http:', 'ws:')}/trpc`, { host: `www.${DOMAIN}` }, 'x')).rejects.toThrow('upgrade answered 404');
    // The domain itself and other hosts are the API's.
    expect((await raw(server, '/api/version', { host: DOMAIN })).status).toBe(200);
    expect((await raw(server, '/api/version', { host: `x.${DOMAIN}.evil` })).status).toBe(200);
  });

  it('moves ?voidrun_token= into a cookie for that host and redirects without it', async () => {
    const { token } = await box.ports.token(8000);
    const first = await raw(server, `/app?keep=1&voidrun_token=${encodeURIComponent(token)}`, { host: host(8000) });
    expect(first.status).toBe(302);
    expect(first.headers.location).toBe('/app?keep=1');
    const cookie = first.headers['set-cookie']![0]!;
    expect(cookie).toMatch(/^voidrun_preview=[^;]+; Path=\/; Max-Age=\d+; HttpOnly; SameSite=Lax$/);
    // The redirect never leaves the preview host (`//host/…` would be another host's URL).
    const sneaky = await raw(server, `//elsewhere.example/x?voidrun_token=${encodeURIComponent(token)}`, { host: host(8000) });
    expect(sneaky.headers.location).toBe('/elsewhere.example/x');
    const next = await raw(server, '/app?keep=1', { host: host(8000), headers: { cookie: `${cookie.split(';')[0]}; mine=2` } });
    expect(next.status).toBe(200);
    // The cookie is ours: the sandbox's server sees only its own.
    expect(echoed(next.body).cookie).toBe('mine=2');
  });

  it('opens a port to everyone and closes it again, kept on the sandbox', async () => {
    expect(await box.ports.setPublic(8000, true)).toEqual({ port: 8000, public: true, previewUrl: `http://${host(8000)}/` });
    expect((await raw(server, '/open', { host: host(8000) })).status).toBe(200);
    expect((await box.ports.list()).ports.find((p) => p.port === 8000)?.public).toBe(true);
    // The original VoidRun's clients read the open ports' URLs here.
    const urls = await server.http(`/api/sandboxes/${box.id}/public-urls`, { apiKey });
    expect(await urls.json()).toEqual({ status: 'success', message: 'Public URLs fetched', data: [{ port: 8000, url: `http://${host(8000)}/` }] });
    // Public on the preview host only: the API path still needs the key.
    expect((await raw(server, `/api/sandboxes/${box.id}/ports/8000/`)).status).toBe(401);
    await box.ports.setPublic(8000, false);
    expect((await raw(server, '/open', { host: host(8000) })).status).toBe(401);
    expect(await box.ports.publicUrls()).toEqual([]);
  });

  it('passes a WebSocket echo through the API path and the preview host', async () => {
    const base = server.url.replace('http:', 'ws:');
    expect(await wsEcho(`${base}/api/sandboxes/${box.id}/ports/8000/ws`, { 'x-api-key': apiKey }, 'via the api')).toBe('via the api');
    const { token } = await box.ports.token(8000);
    const big = 'x'.repeat(200_000);
    expect(await wsEcho(`${base}/ws`, { host: host(8000), 'x-voidrun-preview-token': token }, big)).toBe(big);
    await expect(wsEcho(`${base}/ws`, { host: host(8000) }, 'no token')).rejects.toThrow('upgrade answered 401');
  });

  it("another org's key reaches none of the sandbox's ports, tokens or access (404, as if it did not exist)", async () => {
    const otherKey = (await server.client().trpc.auth.register.mutate({ name: 'Other Org', email: uniqueEmail('ports-other') })).apiKey;
    const headers = { 'x-api-key': otherKey };
    const viaApi = await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers });
    expect(viaApi.status).toBe(404);
    expect(JSON.parse(viaApi.body).code).toBe('SANDBOX_NOT_FOUND');
    expect((await raw(server, '/', { host: host(8000), headers })).status).toBe(404);
    expect((await raw(server, `/api/sandboxes/${box.id}/ports/8000/token`, { method: 'POST', headers })).status).toBe(404);
    expect((await raw(server, `/api/sandboxes/${box.id}/ports/8000`, { method: 'PUT', headers: { ...headers, 'content-type': 'application/json' }, body: '{"public":true}' })).status).toBe(404);
    expect((await raw(server, `/api/sandboxes/${box.id}/ports`, { headers })).status).toBe(404);
    expect((await raw(server, `/api/sandboxes/${box.id}/public-urls`, { headers })).status).toBe(404);
    // A sandbox that does not exist looks the same on a preview host without credentials as a private port.
    expect((await raw(server, '/', { host: `8000-${'0'.repeat(24)}.${DOMAIN}` })).status).toBe(401);
  });

  it('answers 502 saying nothing listens on a closed port', async () => {
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8999/`, { headers: { 'x-api-key': apiKey } });
    expect(res.status).toBe(502);
    expect(JSON.parse(res.body)).toMatchObject({ code: 'UPSTREAM_UNAVAILABLE', error: expect.stringContaining(`Nothing listens on port 8999 in sandbox ${box.id}`) });
  });

  it('answers 502 (not a crash) for an upstream with a malformed status line, and keeps serving', async () => {
    await startPerl('malformed', 8100);
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8100/`, { headers: { 'x-api-key': apiKey } });
    expect(res.status).toBe(502);
    expect(JSON.parse(res.body)).toMatchObject({ code: 'UPSTREAM_UNAVAILABLE', error: expect.stringContaining(`The server on port 8100 in sandbox ${box.id} sent a malformed HTTP answer`) });
    expect((await server.http('/api/version')).status).toBe(200);
    expect((await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers: { 'x-api-key': apiKey } })).status).toBe(200);
  });

  it('answers 502 (not a crash) for an upstream whose headers are huge, and keeps serving', async () => {
    await startPerl('hugeheaders', 8101);
    const res = await raw(server, '/', { host: host(8101), headers: { 'x-api-key': apiKey } });
    expect(res.status).toBe(502);
    expect(JSON.parse(res.body).error).toContain('headers are larger than 16 KiB');
    await expect(wsEcho(`${server.url.replace('http:', 'ws:')}/api/sandboxes/${box.id}/ports/8101/`, { 'x-api-key': apiKey }, 'x')).rejects.toThrow('upgrade answered 502');
    expect((await server.http('/api/version')).status).toBe(200);
  });

  it('answers 502 (not a request left hanging) for an upstream that switches protocols unasked', async () => {
    await startPerl('switch', 8102);
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8102/`, { headers: { 'x-api-key': apiKey } });
    expect(res.status).toBe(502);
    expect(JSON.parse(res.body)).toMatchObject({ code: 'UPSTREAM_UNAVAILABLE', error: expect.stringContaining('malformed HTTP answer') });
    expect((await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers: { 'x-api-key': apiKey } })).status).toBe(200);
  });

  it('a hostile agent answering the tunnel with a forged 101, garbage or a huge error is a 502, never a crash', async () => {
    const victim = await vr.sandboxes.create({ name: 'ports-hostile' });
    const socketPath = join(server.dirs.instancesDir, victim.id, 'agent.sock');
    rmSync(socketPath, { force: true });
    const answers = [
      'HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: voidrun-tcp\r\n\r\nHTTP/1.1 200 OK\r\n\r\n',
      '\u0000\u0001 this is not HTTP\r\n\r\n',
      `HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n\r\n{"code":"PORT_CLOSED","error":"${'x'.repeat(200_000)}"}`,
    ];
    let next = 0;
    const fake = createNetServer((conn) => {
      conn.on('error', () => {});
      conn.once('data', () => conn.end(answers[next++] ?? ''));
    });
    await new Promise<void>((resolve) => fake.listen(socketPath, resolve));
    try {
      const ask = () => raw(server, `/api/sandboxes/${victim.id}/ports/8000/`, { headers: { 'x-api-key': apiKey } });
      const forged = await ask();
      expect(forged.status).toBe(502);
      expect(JSON.parse(forged.body)).toMatchObject({ code: 'AGENT_UNAVAILABLE', error: expect.stringContaining('was not the answer to the request sent') });
      const garbage = await ask();
      expect(garbage.status).toBe(502);
      expect(JSON.parse(garbage.body).code).toBe('AGENT_UNAVAILABLE');
      const huge = await ask();
      expect(huge.status).toBe(502);
      expect(huge.body.length).toBeLessThan(4096);
      expect((await server.http('/api/version')).status).toBe(200);
    } finally {
      fake.close();
    }
  }, 120_000);

  it('answers 409 naming the state for a paused and a stopped sandbox', async () => {
    const { token } = await box.ports.token(8000);
    await box.pause();
    const paused = await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers: { 'x-api-key': apiKey } });
    expect(paused.status).toBe(409);
    expect(JSON.parse(paused.body)).toMatchObject({ code: 'SANDBOX_NOT_RUNNING', error: expect.stringContaining('is paused') });
    await expect(wsEcho(`${server.url.replace('http:', 'ws:')}/ws`, { host: host(8000), 'x-voidrun-preview-token': token }, 'x')).rejects.toThrow('upgrade answered 409');
    await box.resume();
    await box.stop();
    const viaApi = await raw(server, `/api/sandboxes/${box.id}/ports/8000/`, { headers: { 'x-api-key': apiKey } });
    expect(viaApi.status).toBe(409);
    expect(JSON.parse(viaApi.body).error).toContain('is stopped');
    const viaHost = await raw(server, '/', { host: host(8000), headers: { 'x-voidrun-preview-token': token } });
    expect(viaHost.status).toBe(409);
    const list = await server.http(`/api/sandboxes/${box.id}/ports`, { apiKey });
    expect(list.status).toBe(409);
  }, 60_000);
});

/** A new org's sandbox `name` with the perl server `silent` on port 8001 and `http` on 8000. */
async function silentAndHttp(server: TestServer, name: string): Promise<{ key: string; sb: SandboxHandle }> {
  const key = (await server.client().trpc.auth.register.mutate({ name, email: uniqueEmail(name) })).apiKey;
  const sb = await server.client(key).sandboxes.create({ name });
  await sb.files.write('/root/port-server.pl', script);
  for (const [mode, port] of [['silent', 8001], ['http', 8000]] as const) {
    const handle = await sb.commands.run(`perl /root/port-server.pl ${mode} ${port}`);
    for await (const chunk of handle.output()) if (chunk.type === 'stdout' && chunk.data.includes(`listening ${port}`)) break;
  }
  return { key, sb };
}

describe.skipIf(!support.ok)('ports whose server never answers', () => {
  it("one sandbox's never-answering port holds at most its share of the server's connections (503 naming the bound past it; the API answers; slots come back when clients leave)", async () => {
    const maxConnections = 32;
    const perSandbox = new TunnelBudget(maxConnections).perSandbox;
    const server = await startTestServer({ PREVIEW_DOMAIN: DOMAIN, PREVIEW_URL_SCHEME: 'http', HTTP_MAX_CONNECTIONS: String(maxConnections) });
    const pending: ReturnType<typeof request>[] = [];
    try {
      const { key, sb } = await silentAndHttp(server, 'ports-silent');
      await sb.ports.setPublic(8001, true);
      const url = new URL(server.url);
      // One more than the sandbox's share, half of them anonymous visitors of the public port.
      const first = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        for (let i = 0; i <= perSandbox; i++) {
          const viaHost = i % 2 === 1;
          const req = request({ host: url.hostname, port: url.port, path: viaHost ? '/' : `/api/sandboxes/${sb.id}/ports/8001/`, headers: viaHost ? { host: `8001-${sb.id}.${DOMAIN}` } : { 'x-api-key': key } }, (res) => {
            let body = '';
            res.setEncoding('utf8');
            res.on('data', (c: string) => (body += c));
            res.on('end', () => resolve({ status: res.statusCode!, body }));
          });
          req.on('error', (err) => (req.destroyed ? undefined : reject(err)));
          req.end();
          pending.push(req);
        }
      });
      expect(first.status).toBe(503);
      expect(JSON.parse(first.body)).toMatchObject({ code: 'SERVER_BUSY', error: expect.stringContaining(`Sandbox ${sb.id} has ${perSandbox} proxied requests open`) });
      // The API's own routes are not held up.
      expect((await server.http('/api/sandboxes', { apiKey: key })).status).toBe(200);
      for (const req of pending) req.destroy();
      // Each slot is given back when its client leaves: the sandbox's other port answers again.
      let status = 0;
      for (let tries = 0; tries < 200 && status !== 200; tries++) status = (await raw(server, `/api/sandboxes/${sb.id}/ports/8000/`, { headers: { 'x-api-key': key } })).status;
      expect(status).toBe(200);
    } finally {
      for (const req of pending) req.destroy();
      await server.close();
    }
  }, 180_000);
});

describe.skipIf(!support.ok)('ports whose server never starts an answer', () => {
  it('a request or upgrade the sandbox\'s server does not answer within PORT_ANSWER_TIMEOUT_MS is a 502 naming it (no connection held for good); answers in time pass', async () => {
    const server = await startTestServer({ PORT_ANSWER_TIMEOUT_MS: '300' });
    try {
      const { key, sb } = await silentAndHttp(server, 'ports-slow');
      const headers = { 'x-api-key': key };
      for (const method of ['GET', 'POST']) {
        const res = await raw(server, `/api/sandboxes/${sb.id}/ports/8001/`, { method, headers, body: method === 'POST' ? 'a body' : undefined });
        expect(res.status).toBe(502);
        expect(JSON.parse(res.body)).toMatchObject({ code: 'UPSTREAM_UNAVAILABLE', error: expect.stringContaining(`The server on port 8001 in sandbox ${sb.id} did not start an answer within 300 ms of the request (PORT_ANSWER_TIMEOUT_MS)`) });
      }
      await expect(wsEcho(`${server.url.replace('http:', 'ws:')}/api/sandboxes/${sb.id}/ports/8001/ws`, headers, 'x')).rejects.toThrow('upgrade answered 502');
      expect((await raw(server, `/api/sandboxes/${sb.id}/ports/8000/`, { headers })).status).toBe(200);
      expect(await wsEcho(`${server.url.replace('http:', 'ws:')}/api/sandboxes/${sb.id}/ports/8000/ws`, headers, 'in time')).toBe('in time');
    } finally {
      await server.close();
    }
  }, 180_000);
});

describe.skipIf(!support.ok)('ports and preview URLs across a server restart', () => {
  it("keeps public ports and accepts the tokens minted before (the key stays in DATA_DIR); the sandbox's server still answers", async () => {
    const env = { PREVIEW_DOMAIN: DOMAIN, PREVIEW_URL_SCHEME: 'http' };
    const first = await startTestServer(env);
    const key = (await first.client().trpc.auth.register.mutate({ name: 'Restart Ports', email: uniqueEmail('ports-restart') })).apiKey;
    const sb = await first.client(key).sandboxes.create({ name: 'ports-restart' });
    await sb.files.write('/root/port-server.pl', script);
    const handle = await sb.commands.run('perl /root/port-server.pl http 8000');
    for await (const chunk of handle.output()) if (chunk.type === 'stdout' && chunk.data.includes('listening 8000')) break;
    await sb.ports.setPublic(8001, true);
    const { token } = await sb.ports.token(8000);
    await first.close({ keepState: true });
    const second = await startTestServer(env, first.dirs);
    try {
      expect(await second.client(key).sandboxes.get(sb.id).then((b) => b.ports.publicUrls())).toEqual([{ port: 8001, url: `http://8001-${sb.id}.${DOMAIN}/` }]);
      const res = await raw(second, '/after', { host: `8000-${sb.id}.${DOMAIN}`, headers: { 'x-voidrun-preview-token': token } });
      expect(res.status).toBe(200);
      expect(echoed(res.body).target).toBe('/after');
    } finally {
      await second.close();
    }
  }, 180_000);
});

/** QEMU and the VM image are there (as .ci/run provides them). */
function vmSupport(): boolean {
  if (!support.ok || !existsSync(join(process.env.BASE_IMAGES_DIR ?? '/var/lib/hyper-fleet/base-images', 'debian-vm.json'))) return false;
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe.skipIf(!vmSupport())('ports of a microVM (qemu), listed by its agent', () => {
  let server: TestServer;
  let apiKey: string;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DRIVER: 'qemu', PREVIEW_DOMAIN: DOMAIN, PREVIEW_URL_SCHEME: 'http' });
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'VM Ports', email: uniqueEmail('vm-ports') })).apiKey;
    box = await server.client(apiKey).sandboxes.create({ name: 'vm-ports' });
    await box.files.write('/root/port-server.pl', script);
    const handle = await box.commands.run('perl /root/port-server.pl http 8000');
    for await (const chunk of handle.output()) {
      if (chunk.type === 'stdout' && chunk.data.includes('listening 8000')) break;
      if (chunk.type === 'exit') throw new Error('the http server exited');
    }
  }, 300_000);
  afterAll(async () => {
    await server?.close();
  });

  it('lists the port, proxies HTTP under the API and a WebSocket on the preview host', async () => {
    const listed = (await box.ports.list()).ports.map((p) => p.port);
    expect(listed).toContain(8000);
    // The agent's own token-guarded port is no server of the sandbox's.
    expect(listed).not.toContain(1024);
    const res = await raw(server, `/api/sandboxes/${box.id}/ports/8000/in-a-vm`, { headers: { 'x-api-key': apiKey } });
    expect(res.status).toBe(200);
    expect(echoed(res.body)).toMatchObject({ target: '/in-a-vm', host: 'localhost:8000' });
    const { token } = await box.ports.token(8000);
    expect(await wsEcho(`${server.url.replace('http:', 'ws:')}/ws`, { host: `8000-${box.id}.${DOMAIN}`, 'x-voidrun-preview-token': token }, 'from a VM')).toBe('from a VM');
    const closed = await raw(server, `/api/sandboxes/${box.id}/ports/8999/`, { headers: { 'x-api-key': apiKey } });
    expect(closed.status).toBe(502);
    expect(JSON.parse(closed.body).error).toContain('Nothing listens on port 8999');
  }, 120_000);
});
