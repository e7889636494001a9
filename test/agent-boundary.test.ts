import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, request as httpRequest, type Server } from 'node:http';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocketServer, type WebSocket } from 'ws';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/**
 * The agent is tenant code: a tenant who takes over its sandbox's agent (in a microVM the tenant
 * is root next to it; in a container, through any hole in the boundary) answers the server's
 * calls with whatever it likes. These tests put a hostile agent on the sandbox's real agent socket
 * — what such a tenant controls — and drive the real server through HTTP.
 */

/** What the hostile agent does with one tRPC request from the server. */
type WsBehaviour = (ws: WebSocket, request: { id: number; method: string; params: { path: string } }) => void;
type HttpBehaviour = Parameters<typeof createServer>[1];

/** Replaces the sandbox's agent socket with a hostile agent (the test runs as host root). */
async function impersonateAgent(server: TestServer, sandboxId: string, ws: WsBehaviour, http?: HttpBehaviour): Promise<Server> {
  const socket = join(server.dirs.instancesDir, sandboxId, 'agent.sock');
  rmSync(socket, { force: true });
  const fake = createServer(http ?? ((_req, res) => res.writeHead(500).end()));
  const wss = new WebSocketServer({ server: fake });
  wss.on('connection', (conn) => {
    conn.on('message', (raw) => ws(conn, JSON.parse(raw.toString()) as never));
    conn.on('error', () => {});
  });
  await new Promise<void>((resolve) => fake.listen(socket, resolve));
  return fake;
}

describe('the server process survives what escapes every handler', () => {
  it('an exception thrown in a listener and an unobserved rejection are logged, not fatal', async () => {
    const child = promisify(execFile)(join(process.cwd(), 'node_modules/.bin/tsx'), [join(import.meta.dirname, 'fixtures/last-resort-child.ts')]);
    const { stdout } = await child;
    expect(stdout).toContain('uncaught exception (contained; the server keeps running)');
    expect(stdout).toContain('unhandled promise rejection (contained; the server keeps running)');
    expect(stdout).toContain('still serving');
  });
});

describe.skipIf(!support.ok)('a hostile agent cannot crash the server or reach the host', () => {
  let server: TestServer;
  let keyA: string;
  let keyB: string;
  let boxB: string;
  const fakes: Server[] = [];

  beforeAll(async () => {
    // The attacker makes a sandbox per attack.
    server = await startTestServer({ ORG_MAX_SANDBOXES: '20', ORG_MAX_VCPUS: '20', ORG_MAX_MEMORY_MB: String(20 * 1024), ORG_MAX_DISK_MB: String(20 * 5120) });
    const a = await server.client().trpc.auth.register.mutate({ name: 'Attacker', email: uniqueEmail('attacker') });
    const b = await server.client().trpc.auth.register.mutate({ name: 'Victim', email: uniqueEmail('victim') });
    keyA = a.apiKey;
    keyB = b.apiKey;
    boxB = (await server.client(keyB).sandboxes.create({ name: 'victim-box' })).id;
  }, 180_000);
  afterAll(async () => {
    for (const f of fakes) f.close();
    await server?.close();
  });

  const attackerBox = async (ws: WsBehaviour, http?: HttpBehaviour) => {
    const id = (await server.client(keyA).sandboxes.create({ name: `hostile-${fakes.length}` })).id;
    fakes.push(await impersonateAgent(server, id, ws, http));
    return id;
  };
  const exec = (id: string, apiKey: string) => server.http(`/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, json: { command: 'echo hi' } });
  const victimStillServed = async () => {
    const res = await exec(boxB, keyB);
    expect(res.status).toBe(200);
    expect(((await res.json()) as { data: { stdout: string } }).data.stdout).toBe('hi\n');
  };
  const expectAgentFailure = async (res: Response, id: string, text: RegExp) => {
    expect(res.status).toBe(502);
    const body = (await res.json()) as { error: string };
    expect(body.error).toContain(id);
    expect(body.error).toMatch(text);
    expect(body.error).not.toContain(server.dirs.instancesDir);
  };

  it('an agent answering the JSON text null fails that call with 502 and the server keeps serving other orgs', async () => {
    const id = await attackerBox((ws) => ws.send('null'));
    await expectAgentFailure(await exec(id, keyA), id, /outside the protocol/);
    await expectAgentFailure(await exec(id, keyA), id, /outside the protocol/);
    await victimStillServed();
  });

  it('an agent sending a frame larger than the message bound fails the call without the server buffering it', async () => {
    const huge = Buffer.alloc(64 * 1024 * 1024, 0x61).toString();
    const id = await attackerBox((ws) => ws.send(huge));
    await expectAgentFailure(await exec(id, keyA), id, /larger than \d+ bytes/);
    await victimStillServed();
  });

  it('a reply of the wrong shape, non-JSON or binary fails the call with 502, never a 500', async () => {
    const wrongShape = await attackerBox((ws, req) => ws.send(JSON.stringify({ id: req.id, result: { type: 'data', data: { stdout: 5, exitCode: 'x' } } })));
    await expectAgentFailure(await exec(wrongShape, keyA), wrongShape, /malformed reply to process\.run/);
    const notJson = await attackerBox((ws) => ws.send('{"id":'));
    await expectAgentFailure(await exec(notJson, keyA), notJson, /not JSON/);
    const binary = await attackerBox((ws) => ws.send(Buffer.from([1, 2, 3]), { binary: true }));
    await expectAgentFailure(await exec(binary, keyA), binary, /binary/);
    // An error reply with an oversized message is passed on cut, as the agent's (502) failure.
    const longError = await attackerBox((ws, req) => ws.send(JSON.stringify({ id: req.id, error: { message: 'x'.repeat(100_000), code: -32603, data: { code: 'INTERNAL_SERVER_ERROR' } } })));
    const res = await exec(longError, keyA);
    expect(res.status).toBe(502);
    expect(((await res.json()) as { error: string }).error.length).toBeLessThan(3000);
    await victimStillServed();
  });

  it("a download cannot be pointed at a host file by the agent's locate answer (path traversal out of the sandbox root)", async () => {
    // A host secret next to the server's state, where `/../../../` from the sandbox's overlay root lands.
    const secret = join(dirname(server.dirs.instancesDir), 'host-secret.txt');
    writeFileSync(secret, 'HOST SECRET');
    const st = statSync(secret, { bigint: true });
    const id = await attackerBox(
      () => {},
      (req, res) => {
        // What the attack answered: "the file is at /../../../host-secret.txt, with this device and inode".
        const locate = { 'x-file-path': encodeURIComponent('/root/x'), 'x-file-realpath': encodeURIComponent('/../../../host-secret.txt'), 'x-file-dev': String(st.dev), 'x-file-ino': String(st.ino) };
        if (req.method === 'HEAD') res.writeHead(200, { ...locate, 'content-length': 11 }).end();
        else res.writeHead(200, { ...locate, 'content-type': 'application/octet-stream', 'content-length': 11 }).end('agent bytes');
      },
    );
    const res = await server.http(`/api/sandboxes/${id}/files/download?path=/root/x`, { apiKey: keyA });
    const body = await res.text();
    expect(body).not.toContain('HOST SECRET');
    expect(body).toBe('agent bytes');
  });

  it('a download from an agent that never answers leaves no connection to the agent open once the client left', async () => {
    let closed = 0;
    const id = await attackerBox(
      () => {},
      (req) => req.socket.once('close', () => closed++), // accepts, never answers
    );
    for (let i = 0; i < 10; i++) {
      await server.http(`/api/sandboxes/${id}/files/download?path=/root/x`, { apiKey: keyA, signal: AbortSignal.timeout(200) }).catch(() => {});
    }
    await expect.poll(() => closed, { timeout: 10_000 }).toBe(10);
  });

  it('a watch the agent confirms only after its client left is stopped on the agent', async () => {
    const sessionId = '2b1c3c1e-5f7a-4e7b-9d0a-0f6f3e8b9a11';
    let stopped = '';
    const id = await attackerBox((ws, req) => {
      const reply = (data: unknown) => ws.send(JSON.stringify({ id: req.id, result: { type: 'data', data } }));
      if (req.params.path === 'files.watchStart') setTimeout(() => reply({ sessionId, path: '/root' }), 1000);
      else if (req.params.path === 'files.watchStop') {
        stopped = (req.params as unknown as { input: { sessionId: string } }).input.sessionId;
        reply({ stopped: true });
      }
    });
    await server.http(`/api/sandboxes/${id}/files/watch`, { method: 'POST', apiKey: keyA, json: { path: '/root' }, signal: AbortSignal.timeout(500) }).catch(() => {});
    await expect.poll(() => stopped, { timeout: 10_000 }).toBe(sessionId);
  });

  it("a lying agent's huge watch-session listing is refused (past ORG_MAX_WATCH_SESSIONS) and an honest-sized one replaces the last, while other orgs are served", async () => {
    // The agent lists fresh ids on every call: 10,000 (more than any org may hold: refused), or 16 (the default cap: taken as the sandbox's sessions, the earlier ones forgotten).
    let size = 10_000;
    const id = await attackerBox((ws, req) => {
      if (req.params.path === 'files.watchStart') return ws.send(JSON.stringify({ id: req.id, result: { type: 'data', data: { sessionId: randomUUID(), path: '/tmp' } } }));
      if (req.params.path !== 'files.watchList') return;
      const sessions = Array.from({ length: size }, () => ({ id: randomUUID(), path: '/tmp', createdAt: new Date().toISOString(), clients: 0 }));
      ws.send(JSON.stringify({ id: req.id, result: { type: 'data', data: sessions } }));
    });
    for (let i = 0; i < 3; i++) {
      const res = await server.http(`/api/sandboxes/${id}/files/watch`, { apiKey: keyA });
      expect(res.status).toBe(502);
      expect(((await res.json()) as { error: string }).error).toMatch(/listed 10000 watch sessions, more than the 16 .*ORG_MAX_WATCH_SESSIONS/);
      await victimStillServed();
    }
    size = 16;
    const seen = new Set<string>();
    for (let i = 0; i < 3; i++) {
      const res = await server.http(`/api/sandboxes/${id}/files/watch`, { apiKey: keyA });
      expect(res.status).toBe(200);
      const { sessions } = ((await res.json()) as { data: { sessions: { id: string }[] } }).data;
      expect(sessions).toHaveLength(16);
      for (const s of sessions) seen.add(s.id);
    }
    expect(seen.size).toBe(48);
    // What the honest-sized listing names counts against the org's cap (16 of 16): a new watch is the 429.
    const start = await server.http(`/api/sandboxes/${id}/files/watch`, { method: 'POST', apiKey: keyA, json: { path: '/tmp' } });
    expect(start.status).toBe(429);
    expect(((await start.json()) as { error: string }).error).toContain('holds 16 of 16');
    await victimStillServed();
  });

  it('a reply far larger than its procedure can need fails that call, and a process output stream with a line past its bound is closed on the agent', async () => {
    let closed = 0;
    const bigPath = `/${'p'.repeat(200_000)}`;
    const id = await attackerBox(
      (ws, req) => {
        if (req.params.path === 'files.stat') ws.send(JSON.stringify({ id: req.id, result: { type: 'data', data: { name: 'x', path: bigPath } } }));
      },
      (req, res) => {
        if (req.url !== '/process/stream') return void res.writeHead(404).end();
        req.socket.once('close', () => closed++);
        res.writeHead(200, { 'content-type': 'application/x-ndjson' });
        res.write('{"type":"started","pid":7}\n');
        res.write(`{"seq":1,"type":"stdout","data":"${'x'.repeat(9 * 1024 * 1024)}`);
      },
    );
    await expectAgentFailure(await server.http(`/api/sandboxes/${id}/files/stat?path=/root`, { apiKey: keyA }), id, /reply of \d+ bytes where at most \d+ are accepted/);
    const stream = await server.http(`/api/sandboxes/${id}/exec-stream`, { method: 'POST', apiKey: keyA, json: { command: 'yes' } });
    const text = await stream.text();
    expect(text).toMatch(/reply of \d+ bytes where at most \d+ are accepted/);
    await expect.poll(() => closed, { timeout: 10_000 }).toBe(1);
    await victimStillServed();
  });

  it("an agent failing every call costs one status refresh a second, not one per call (no host work on the agent's pace)", async () => {
    const id = await attackerBox((ws) => ws.send('null'));
    const refreshes = () => server.logLines.filter((l) => l.includes('sandbox agent call failed') && l.includes(id)).length;
    const started = Date.now();
    for (let round = 0; round < 5; round++) {
      const answers = await Promise.all(Array.from({ length: 10 }, () => exec(id, keyA)));
      for (const a of answers) expect(a.status).toBe(502);
    }
    // At most one refresh per started second of the attack (50 failed calls).
    expect(refreshes()).toBeGreaterThanOrEqual(1);
    expect(refreshes()).toBeLessThanOrEqual(1 + Math.ceil((Date.now() - started) / 1000));
  });

  it('raw requests reuse a kept-alive socket only after an answer echoing their nonce; an unasked answer or one for another request drops the socket', async () => {
    let connections = 0;
    const id = await attackerBox(
      () => {},
      (req, res) => {
        const nonce = String(req.headers['x-voidrun-request']);
        const path = new URL(req.url ?? '/', 'http://agent').searchParams.get('path') ?? '';
        if (path === '/root/wrong') return void res.writeHead(200, { 'x-voidrun-request': 'not-the-nonce', 'content-length': 5 }).end('wrong');
        const body = `file ${path}`;
        res.writeHead(200, { 'x-voidrun-request': nonce, 'content-type': 'application/octet-stream', 'content-length': body.length }).end(body);
        // After the answer, an answer to a request not sent yet (with a nonce it saw, the best guess it has).
        if (path.startsWith('/root/poison')) res.socket?.write(`HTTP/1.1 200 OK\r\nx-voidrun-request: ${nonce}\r\ncontent-length: 6\r\n\r\nPOISON`);
      },
    );
    fakes.at(-1)!.on('connection', () => connections++);
    const download = async (path: string) => (await server.http(`/api/sandboxes/${id}/files/download?path=${path}`, { apiKey: keyA })).text();
    for (const n of [1, 2, 3]) expect(await download(`/root/honest-${n}`)).toBe(`file /root/honest-${n}`);
    expect(connections).toBe(1); // kept alive
    for (const n of [1, 2, 3]) expect(await download(`/root/poison-${n}`)).toBe(`file /root/poison-${n}`);
    expect(await download('/root/after')).toBe('file /root/after');
    expect(connections).toBe(4); // each poisoned socket was dropped, not reused
    await expectAgentFailure(await server.http(`/api/sandboxes/${id}/files/download?path=/root/wrong`, { apiKey: keyA }), id, /not the answer to the request sent/);
    await victimStillServed();
  });

  it("an agent's oversized or malformed upload answer fails the upload with 502", async () => {
    const id = await attackerBox(
      () => {},
      (req, res) => {
        req.resume();
        req.on('end', () => res.writeHead(200, { 'content-type': 'application/json' }).end(`{"path":"/root/f","size":${'9'.repeat(200_000)}}`));
      },
    );
    const res = await server.http(`/api/sandboxes/${id}/files/upload?path=/root/f`, { method: 'POST', apiKey: keyA, body: 'hello', headers: { 'content-type': 'application/octet-stream' } });
    await expectAgentFailure(res, id, /larger than \d+ bytes/);
    await victimStillServed();
  });
});

describe.skipIf(!support.ok)("the agent's own buffers stay bounded", () => {
  let server: TestServer;
  let apiKey: string;

  beforeAll(async () => {
    // Each exec may keep 16 MiB of its output: thirty of them would be 480 MiB held in the agent.
    server = await startTestServer({ ORG_MAX_CONCURRENT_EXECS: '64', EXEC_OUTPUT_LIMIT_BYTES: String(16 * 1024 * 1024) });
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Flooder', email: uniqueEmail('flood') })).apiKey;
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('thirty concurrent execs printing 16 MiB each cannot get the agent of a 1 GiB sandbox OOM-killed', async () => {
    const vr = server.client(apiKey);
    const box = await vr.sandboxes.create({ name: 'flood-box', mem: 1024 });
    // A background command started before the flood: it is gone if the agent (and so the sandbox) died.
    const before = await server.http(`/api/sandboxes/${box.id}/commands/run`, { method: 'POST', apiKey, json: { command: 'sleep 600' } });
    expect(before.status).toBe(200);
    const results = await Promise.all(
      Array.from({ length: 30 }, () => server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: "head -c 16777216 /dev/zero | tr '\\0' a" } })),
    );
    for (const r of results) expect(r.status).toBe(200);
    const bodies = (await Promise.all(results.map((r) => r.json()))) as Array<{ data: { stdout: string; truncated: boolean } }>;
    // Output past the agent's shared budget is dropped and said so, never silently.
    for (const b of bodies) expect(b.data.stdout.length === 16777216 || b.data.truncated).toBe(true);
    const list = await server.http(`/api/sandboxes/${box.id}/commands/list`, { apiKey });
    expect(JSON.stringify(await list.json())).toContain('sleep 600');
    const after = await server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: 'echo alive' } });
    expect(((await after.json()) as { data: { stdout: string } }).data.stdout).toBe('alive\n');
  }, 120_000);

  it('a session-exec-stream whose NDJSON response is never read pauses its command and cannot make the server hold the output', async () => {
    const MiB = 1024 * 1024;
    const box = await server.client(apiKey).sandboxes.create({ name: 'unread-stream-box' });
    const created = await server.http(`/api/sandboxes/${box.id}/session-exec`, { method: 'POST', apiKey, json: { action: 'create' } });
    const sessionId = ((await created.json()) as { sessionId: string }).sessionId;
    const body = JSON.stringify({ sessionId, command: `head -c ${768 * MiB} /dev/zero | tr '\\0' a`, timeout: 300 });
    const before = process.memoryUsage().rss;
    let peak = before;
    const req = httpRequest(`${server.url}/api/sandboxes/${box.id}/session-exec-stream`, {
      method: 'POST',
      headers: { 'x-api-key': apiKey, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    });
    req.on('response', (res) => res.pause()); // never read
    req.on('error', () => {});
    req.end(body);
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
    // Where `tr` waits: once the stream backed up to the agent, in write(2) on the shell's stdout.
    const trWaits = `for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = tr ] && cat $d/wchan && echo; done`;
    try {
      await expect
        .poll(
          async () => {
            const r = await server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: trWaits } });
            return ((await r.json()) as { data?: { stdout?: string } }).data?.stdout?.trim();
          },
          { timeout: 120_000, interval: 200 },
        )
        .toMatch(/^(sock_alloc_send_pskb|pipe_write|unix_stream_sendmsg)$/);
      peak = Math.max(peak, process.memoryUsage().rss);
      // The command is paused, not racing ahead into a buffer: far less than its 768 MiB is held.
      expect(peak - before).toBeLessThan(64 * MiB);
    } finally {
      clearInterval(sampler);
      req.destroy();
    }
  }, 180_000);

  it('killing a terminal with input still queued for it leaves the agent serving, and none of that input reaches the next command\'s output (a reused descriptor)', async () => {
    const vr = server.client(apiKey);
    const box = await vr.sandboxes.create({ name: 'pty-kill-box' });
    const base = `/api/sandboxes/${box.id}/pty/sessions`;
    const keep = await server.http(`/api/sandboxes/${box.id}/commands/run`, { method: 'POST', apiKey, json: { command: 'sleep 600' } });
    expect(keep.status).toBe(200);
    for (let round = 0; round < 3; round++) {
      const created = await server.http(base, { method: 'POST', apiKey, json: {} });
      const sessionId = ((await created.json()) as { data: { sessionId: string } }).data.sessionId;
      // The shell is busy, so what is typed queues in the pty and behind it in the agent.
      await server.http(`${base}/${sessionId}/execute`, { method: 'POST', apiKey, json: { command: 'sleep 600' } });
      await Promise.all(Array.from({ length: 8 }, () => server.http(`${base}/${sessionId}/execute`, { method: 'POST', apiKey, json: { command: 'x'.repeat(256 * 1024) } })));
      expect((await server.http(`${base}/${sessionId}`, { method: 'DELETE', apiKey })).status).toBe(200);
      // At once: a write of the killed terminal's still in flight would land in this command's stdout pipe.
      const next = await server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: `echo round-${round}` } });
      expect(((await next.json()) as { data: { stdout: string } }).data.stdout).toBe(`round-${round}\n`);
    }
    const after = await server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: 'echo alive' } });
    expect(((await after.json()) as { data: { stdout: string } }).data.stdout).toBe('alive\n');
    const list = await server.http(`/api/sandboxes/${box.id}/commands/list`, { apiKey });
    expect(JSON.stringify(await list.json())).toContain('sleep 600');
  }, 120_000);
});
