import { request } from 'node:http';
import { connect, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { TooManyRequestsError, type SandboxHandle, type VoidRunClient } from '../client/index.js';
import { newId } from '../server/store/ids.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;

/** A raw connection to the server; `text` collects what it answered, `closed` resolves at its end. */
function rawConnection(url: string): { socket: Socket; text: () => string; closed: Promise<void>; connected: Promise<void> } {
  const { hostname, port } = new URL(url);
  const socket = connect(Number(port), hostname);
  let text = '';
  socket.on('data', (d) => (text += d.toString('latin1')));
  socket.on('error', () => {});
  return {
    socket,
    text: () => text,
    closed: new Promise((resolve) => socket.once('close', () => resolve())),
    connected: new Promise((resolve) => socket.once('connect', () => resolve())),
  };
}

/** Reads from a raw connection until `pattern` appears in what the server answered. */
function answered(conn: ReturnType<typeof rawConnection>, pattern: RegExp): Promise<string> {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (pattern.test(conn.text())) {
        conn.socket.off('data', check);
        resolve(conn.text());
      }
    };
    conn.socket.on('data', check);
    conn.socket.once('close', () => (pattern.test(conn.text()) ? resolve(conn.text()) : reject(new Error(`closed after: ${conn.text()}`))));
    check();
  });
}

/** Streams a chunked body of up to `total` bytes, stopping at the server's answer; resolves status, body and bytes sent. */
function chunkedPost(url: string, total: number): Promise<{ status: number; body: string; sent: number }> {
  return new Promise((resolve, reject) => {
    let sent = 0;
    let answeredAt: number | null = null;
    const req = request(url, { method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
      answeredAt = sent;
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode!, body, sent: answeredAt! }));
    });
    req.on('error', (err) => (answeredAt === null ? reject(err) : undefined));
    const chunk = Buffer.alloc(64 * 1024, 0x20);
    const pump = () => {
      while (answeredAt === null && sent < total) {
        sent += chunk.length;
        if (!req.write(chunk)) return void req.once('drain', pump);
      }
      if (answeredAt === null) req.end();
    };
    req.write('{"name":"x","email":"');
    pump();
  });
}

describe('the HTTP edge', () => {
  let server: TestServer;

  beforeAll(async () => {
    server = await startTestServer({ HTTP_HEADERS_TIMEOUT_MS: '300', HTTP_REQUEST_TIMEOUT_MS: '600', WS_AUTH_TIMEOUT_MS: '300', METRICS_TOKEN: 'metrics-secret-token' });
  });
  afterAll(async () => {
    await server?.close();
  });

  it('a 60 MB body to the public auth.register is refused with 413 before it is read (tRPC and REST)', async () => {
    for (const path of ['/trpc/auth.register', '/api/register']) {
      const conn = rawConnection(server.url);
      conn.socket.write(`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${60 * 1000 * 1000}\r\n\r\n{"name":"`);
      const text = await answered(conn, /\r\n\r\n[\s\S]*\}/);
      expect(text).toMatch(/^HTTP\/1.1 413 /);
      expect(text).toMatch(/larger than 1048576 bytes/);
      conn.socket.destroy();
    }
    // Without a Content-Length, reading stops at the limit: the server answers long before 60 MB.
    for (const path of ['/trpc/auth.register', '/api/register']) {
      const r = await chunkedPost(server.url + path, 60 * 1000 * 1000);
      expect(r.status).toBe(413);
      expect(r.body).toMatch(/MAX_JSON_BODY_BYTES|larger than 1048576 bytes/);
      expect(r.sent).toBeLessThan(20 * MiB);
    }
  });

  it('a tRPC batch of more calls than TRPC_MAX_BATCH_SIZE is refused with 400 naming the limit', async () => {
    const paths = Array.from({ length: 60 }, () => 'exec.run').join(',');
    const input = JSON.stringify(Object.fromEntries(Array.from({ length: 60 }, (_, i) => [i, { json: { id: 'x', command: 'true' } }])));
    const res = await server.http(`/trpc/${paths}?batch=1`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: input });
    expect(res.status).toBe(400);
    expect(JSON.stringify(await res.json())).toMatch(/at most 10 calls \(TRPC_MAX_BATCH_SIZE\); this one has 60/);
    // Ten calls is within the limit.
    const ten = Array.from({ length: 10 }, () => 'system.version').join(',');
    expect((await server.http(`/trpc/${ten}?batch=1&input=${encodeURIComponent('{}')}`)).status).toBe(200);
  });

  it('a half-sent request cannot hold its connection past the timeouts (headers and body)', async () => {
    const headers = rawConnection(server.url);
    headers.socket.write('GET /api/version HTTP/1.1\r\nHost: x\r\n');
    await headers.closed;
    expect(headers.text()).toMatch(/^(HTTP\/1.1 408 |$)/);
    const body = rawConnection(server.url);
    body.socket.write('POST /api/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"na');
    await body.closed;
    expect(body.text()).not.toMatch(/^HTTP\/1.1 2/);
  });

  it('an unauthenticated tRPC WebSocket is closed after WS_AUTH_TIMEOUT_MS though it answers pings; an authenticated one stays', async () => {
    const reg = await server.client().trpc.auth.register.mutate({ name: 'WS', email: uniqueEmail('ws-window') });
    const wsUrl = `${server.url.replace('http', 'ws')}/trpc`;
    const good = new WebSocket(`${wsUrl}?apiKey=${reg.apiKey}`);
    await new Promise((r) => good.once('open', r));
    for (const url of [`${wsUrl}?connectionParams=1`, wsUrl, `${wsUrl}?apiKey=vr_wrong`]) {
      const idle = new WebSocket(url);
      idle.on('ping', () => idle.pong());
      const [code, reason] = await new Promise<[number, string]>((r) => idle.once('close', (c, why) => r([c, why.toString()])));
      expect(code).toBe(1008);
      expect(reason).toMatch(/no valid API key within 300 ms \(WS_AUTH_TIMEOUT_MS\)/);
    }
    // Opened before the idle ones, which lived a full window each: still open.
    expect(good.readyState).toBe(WebSocket.OPEN);
    good.close();
  });

  it('/metrics is refused without the METRICS_TOKEN bearer token', async () => {
    const refused = await server.http('/metrics');
    expect(refused.status).toBe(401);
    expect(await refused.json()).toMatchObject({ error: 'Metrics need a bearer token' });
    expect((await server.http('/metrics', { headers: { authorization: 'Bearer wrong-token-of-same-len' } })).status).toBe(401);
    const ok = await server.http('/metrics', { headers: { authorization: 'Bearer metrics-secret-token' } });
    expect(ok.status).toBe(200);
    expect(await ok.text()).toContain('voidrun_http_requests_total');
  });

  it("ids cannot be guessed from a neighbour's (random, not counters), and old-format ids still resolve", async () => {
    const ids = Array.from({ length: 200 }, () => newId());
    expect(new Set(ids).size).toBe(ids.length);
    for (const id of ids) expect(id).toMatch(/^[0-9a-f]{24}$/);
    for (let i = 1; i < ids.length; i++) {
      const a = BigInt(`0x${ids[i - 1]!.slice(8)}`);
      const b = BigInt(`0x${ids[i]!.slice(8)}`);
      const gap = a > b ? a - b : b - a;
      expect(gap > 1n << 32n).toBe(true);
    }
    // A record made by the old counter-based generator (same 24-hex form) is found as before.
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Ids', email: uniqueEmail('ids') });
    const oldId = '65ae12340a1b2c3d4e000001';
    await server.app.store.images.create({ id: oldId, name: 'old-image', tag: 'latest', description: '', base: 'debian', orgId: reg.orgId, isSystem: false, createdBy: reg.userId });
    const res = await server.http(`/api/images/${oldId}`, { apiKey: reg.apiKey });
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ data: { id: oldId, name: 'old-image' } });
  });
});

describe('the connection cap', () => {
  let server: TestServer;

  beforeAll(async () => {
    server = await startTestServer({ HTTP_MAX_CONNECTIONS: '4' });
  });
  afterAll(async () => {
    await server?.close();
  });

  it('a connection past HTTP_MAX_CONNECTIONS is refused with 503 naming the limit', async () => {
    const held = Array.from({ length: 4 }, () => rawConnection(server.url));
    // Each is counted once the server has answered a request on it (kept alive).
    for (const c of held) c.socket.write('GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n');
    await Promise.all(held.map((c) => answered(c, /\r\n\r\n[\s\S]*\}/)));
    const extra = rawConnection(server.url);
    const text = await answered(extra, /HTTP_MAX_CONNECTIONS/);
    expect(text).toMatch(/^HTTP\/1.1 503 /);
    await extra.closed;
    for (const c of held) c.socket.destroy();
  });
});

describe.skipIf(!support.ok)('per-org caps on held calls (container sandboxes)', () => {
  let server: TestServer;
  let apiKey: string;
  let vr: VoidRunClient;
  let box: SandboxHandle;
  let other: { vr: VoidRunClient; box: SandboxHandle };

  beforeAll(async () => {
    server = await startTestServer({ ORG_MAX_CONCURRENT_EXECS: '8', ORG_MAX_STREAMS: '2' });
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Flooder', email: uniqueEmail('flood') });
    apiKey = reg.apiKey;
    vr = server.client(apiKey);
    const victim = await server.client().trpc.auth.register.mutate({ name: 'Victim', email: uniqueEmail('victim') });
    const victimClient = server.client(victim.apiKey);
    [box, other] = await Promise.all([vr.sandboxes.create({ name: 'flood' }), victimClient.sandboxes.create({ name: 'victim' }).then((b) => ({ vr: victimClient, box: b }))]);
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('a flood of held execs whose responses are never read cannot inflate server memory; other orgs are still served', async () => {
    // The server's own view of each exec response: ended once the handler has handed over its whole body.
    const statuses: number[] = [];
    const onEnd = new Set<() => void>();
    const serverSideClosed: Promise<void>[] = [];
    const watch = (req: { url?: string }, res: { end: (...a: never[]) => unknown; statusCode: number; once(e: 'close', f: () => void): void }) => {
      if (!req.url?.endsWith('/exec')) return;
      serverSideClosed.push(new Promise((resolve) => res.once('close', resolve)));
      const end = res.end.bind(res);
      res.end = ((...args: never[]) => {
        statuses.push(res.statusCode);
        for (const f of onEnd) f();
        return end(...args);
      }) as typeof res.end;
    };
    server.app.http.server.prependListener('request', watch as never);
    const before = process.memoryUsage().rss;
    let peak = before;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
    // 4 MiB each: EXEC_OUTPUT_LIMIT_BYTES' default.
    const body = JSON.stringify({ command: `head -c ${4 * MiB} /dev/zero | tr '\\0' a` });
    const conns = Array.from({ length: 40 }, () => {
      const c = rawConnection(server.url);
      c.socket.pause(); // never read: the kernel's buffers fill and the server's writes back up
      c.socket.write(`POST /api/sandboxes/${box.id}/exec HTTP/1.1\r\nHost: x\r\nX-API-Key: ${apiKey}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      return c;
    });
    try {
      await new Promise<void>((resolve) => {
        const check = () => statuses.length >= 40 && resolve();
        onEnd.add(check);
        check();
      });
      peak = Math.max(peak, process.memoryUsage().rss);
      // Refused calls were answered 429 naming the cap; another org runs commands meanwhile.
      expect(statuses.filter((s) => s === 429)).toHaveLength(32);
      expect(statuses.filter((s) => s === 200)).toHaveLength(8);
      expect((await other.box.exec('echo still-served')).stdout).toBe('still-served\n');
      expect(peak - before).toBeLessThan(400 * MiB);
    } finally {
      clearInterval(sampler);
      server.app.http.server.off('request', watch as never);
      for (const c of conns) c.socket.destroy();
    }
    // The org's slots are free again once the server has seen each response close.
    await Promise.all(serverSideClosed);
  });

  it('each call of a tRPC batch takes one of the org slots: past ORG_MAX_CONCURRENT_EXECS a call gets 429', async () => {
    const results = await Promise.allSettled(Array.from({ length: 10 }, () => vr.trpc.exec.run.mutate({ id: box.id, command: `head -c ${MiB} /dev/zero` })));
    const refused = results.filter((r) => r.status === 'rejected');
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(8);
    expect(refused).toHaveLength(2);
    const err = (refused[0] as PromiseRejectedResult).reason as TooManyRequestsError;
    expect(err).toBeInstanceOf(TooManyRequestsError);
    expect(err.status).toBe(429);
    expect(err.message).toMatch(/already has 8 concurrent exec calls in progress, the most allowed \(ORG_MAX_CONCURRENT_EXECS=8\)/);
  });

  it('past ORG_MAX_STREAMS an SSE stream or a terminal is refused with 429 naming the limit', async () => {
    const open = () => server.http(`/api/sandboxes/${box.id}/exec-stream`, { method: 'POST', apiKey, json: { command: 'sleep 600' } });
    const held = await Promise.all([open(), open()]);
    expect(held.map((r) => r.status)).toEqual([200, 200]);
    try {
      const third = await open();
      expect(third.status).toBe(429);
      expect(((await third.json()) as { error: string }).error).toMatch(/already has 2 open streams in progress, the most allowed \(ORG_MAX_STREAMS=2\)/);
      const terminal = new WebSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/pty?apiKey=${apiKey}`);
      terminal.on('error', () => {});
      expect(await new Promise<number>((resolve) => terminal.once('unexpected-response', (_req, res) => resolve(res.statusCode!)))).toBe(429);
    } finally {
      for (const r of held) await r.body!.cancel();
    }
  });
});
