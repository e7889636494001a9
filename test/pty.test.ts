import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const received = new WeakMap<WebSocket, { text: string }>();

/** Waits until everything the terminal socket received (from its first byte) matches `pattern`. */
async function until(ws: WebSocket, pattern: RegExp, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  const box = received.get(ws)!;
  while (!pattern.test(box.text)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${pattern}; got ${JSON.stringify(box.text.slice(-300))}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return box.text;
}

function open(url: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const box = { text: '' };
    received.set(ws, box);
    // Collect from the very first message: the scrollback can arrive before a test looks.
    ws.on('message', (m) => (box.text += m.toString()));
    ws.once('open', () => resolve(ws));
    ws.once('unexpected-response', (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
    ws.once('error', reject);
  });
}

describe.skipIf(!support.ok)('terminals', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let box: SandboxHandle;
  let wsBase: string;

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Pty User', email: uniqueEmail('pty') });
    apiKey = reg.apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'pty-box' });
    wsBase = `${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}`;
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('runs an ephemeral terminal over a WebSocket; the shell dies with the socket', async () => {
    const ws = await open(`${wsBase}/pty?apiKey=${apiKey}`);
    ws.send('echo "hello $((6*7))"\n');
    expect(await until(ws, /hello 42/)).toContain('hello 42');
    const before = (await vr.trpc.pty.list.query({ id: box.id })).sessions.length;
    expect(before).toBe(1);
    ws.close();
    for (let i = 0; i < 50 && (await vr.trpc.pty.list.query({ id: box.id })).sessions.length > 0; i++) await new Promise((r) => setTimeout(r, 50));
    expect((await vr.trpc.pty.list.query({ id: box.id })).sessions).toEqual([]);
  });

  it('keeps persistent sessions with their size, scrollback, several clients, execute, resize and delete', async () => {
    const created = await server.http(`/api/sandboxes/${box.id}/pty/sessions`, { method: 'POST', apiKey, json: { cols: 100, rows: 30 } });
    expect(created.status).toBe(200);
    const { sessionId } = ((await created.json()) as { data: { sessionId: string; createdAt: string } }).data;
    const exec = await server.http(`/api/sandboxes/${box.id}/pty/sessions/${sessionId}/execute`, { method: 'POST', apiKey, json: { command: 'stty size' } });
    expect(exec.status).toBe(200);
    let buffer = '';
    for (let i = 0; i < 100 && !buffer.includes('30 100'); i++) {
      await new Promise((r) => setTimeout(r, 50));
      buffer = ((await (await server.http(`/api/sandboxes/${box.id}/pty/sessions/${sessionId}/buffer`, { apiKey })).json()) as { data: { output: string } }).data.output;
    }
    expect(buffer).toContain('30 100');

    // A new client gets the scrollback first; two clients see the same output.
    const a = await open(`${wsBase}/pty/sessions/${sessionId}?apiKey=${apiKey}`);
    expect(await until(a, /30 100/)).toContain('30 100');
    const b = await open(`${wsBase}/pty/sessions/${sessionId}?apiKey=${apiKey}`);
    await until(b, /30 100/);
    a.send('echo marker-$((1+1))\n');
    const bothSee = Promise.all([until(a, /marker-2/), until(b, /marker-2/)]);
    for (const text of await bothSee) expect(text).toContain('marker-2');
    const listed = ((await (await server.http(`/api/sandboxes/${box.id}/pty/sessions`, { apiKey })).json()) as { data: { sessions: Array<{ id: string; clients: number; alive: boolean }> } }).data.sessions;
    expect(listed.find((s) => s.id === sessionId)).toMatchObject({ alive: true, clients: 2 });

    // Detaching every client leaves the session running.
    a.close();
    b.close();
    const resized = await server.http(`/api/sandboxes/${box.id}/pty/sessions/${sessionId}/resize`, { method: 'POST', apiKey, json: { cols: 120, rows: 40 } });
    expect(resized.status).toBe(200);
    await server.http(`/api/sandboxes/${box.id}/pty/sessions/${sessionId}/execute`, { method: 'POST', apiKey, json: { command: 'stty size' } });
    for (let i = 0; i < 100 && !buffer.includes('40 120'); i++) {
      await new Promise((r) => setTimeout(r, 50));
      buffer = ((await (await server.http(`/api/sandboxes/${box.id}/pty/sessions/${sessionId}/buffer`, { apiKey })).json()) as { data: { output: string } }).data.output;
    }
    expect(buffer).toContain('40 120');
    for (const size of [{ cols: 501, rows: 40 }, { cols: 0, rows: 40 }, { cols: 80, rows: 201 }]) {
      const bad = await server.http(`/api/sandboxes/${box.id}/pty/sessions/${sessionId}/resize`, { method: 'POST', apiKey, json: size });
      expect(bad.status, JSON.stringify(size)).toBe(400);
    }

    expect((await server.http(`/api/sandboxes/${box.id}/pty/sessions/${sessionId}`, { method: 'DELETE', apiKey })).status).toBe(200);
    await expect(open(`${wsBase}/pty/sessions/${sessionId}?apiKey=${apiKey}`)).rejects.toThrow('HTTP 404');
  });

  it('interrupts a running command with Ctrl-C', async () => {
    const ws = await open(`${wsBase}/pty?apiKey=${apiKey}`);
    ws.send('sleep 100; echo after-$((40+2))\n');
    await new Promise((r) => setTimeout(r, 300));
    ws.send('\x03');
    ws.send('echo interrupted-$((1+1))\n');
    const text = await until(ws, /interrupted-2/, 5000);
    expect(text).not.toContain('after-42');
    ws.close();
  });

  it('reports a session whose shell exited as alive: false, and tells attached clients', async () => {
    const { sessionId } = await vr.trpc.pty.create.mutate({ id: box.id, cols: 80, rows: 24 });
    const ws = await open(`${wsBase}/pty/sessions/${sessionId}?apiKey=${apiKey}`);
    const closed = new Promise<string>((resolve) => ws.once('close', (_code, reason) => resolve(reason.toString())));
    await vr.trpc.pty.write.mutate({ id: box.id, sessionId, data: 'exit 3\n' });
    expect(await closed).toBe('exit 3');
    const info = (await vr.trpc.pty.list.query({ id: box.id })).sessions.find((s) => s.id === sessionId);
    expect(info).toMatchObject({ alive: false, exitCode: 3 });
    await vr.trpc.pty.kill.mutate({ id: box.id, sessionId });
  });

  it('resumes a tRPC attach from its last id with exactly the output it missed', async () => {
    const { sessionId } = await vr.trpc.pty.create.mutate({ id: box.id, cols: 80, rows: 24 });
    // Outputs that the typed command lines can't contain ("first-2", not "first-$((1+1))"): the
    // terminal echoes a command line more than once (the tty, then readline's redisplay).
    await vr.trpc.pty.write.mutate({ id: box.id, sessionId, data: 'echo first-$((1+1))\n' });
    let lastId = '';
    let seen = '';
    await new Promise<void>((resolve, reject) => {
      const sub = vr.trpc.pty.attach.subscribe(
        { id: box.id, sessionId },
        {
          onData: (e) => {
            lastId = e.id;
            if (e.data.type === 'data') seen += e.data.data;
            if (seen.includes('first-2')) {
              sub.unsubscribe();
              resolve();
            }
          },
          onError: reject,
        },
      );
    });
    await vr.trpc.pty.write.mutate({ id: box.id, sessionId, data: 'echo second-$((2+1))\n' });
    let missed = '';
    await new Promise<void>((resolve, reject) => {
      const sub = vr.trpc.pty.attach.subscribe(
        { id: box.id, sessionId, lastEventId: lastId },
        {
          onData: (e) => {
            if (e.data.type === 'data') missed += e.data.data;
            if (missed.includes('second-3')) {
              sub.unsubscribe();
              resolve();
            }
          },
          onError: reject,
        },
      );
    });
    expect(missed).not.toContain('first-2');
    expect(missed).toContain('second-3');
    await vr.trpc.pty.kill.mutate({ id: box.id, sessionId });
  });

  it('drives a terminal through the typed client handle: write, onData, resize, wait', async () => {
    const term = await box.pty.create({ cols: 90, rows: 20 });
    let out = '';
    const stop = term.onData((d) => (out += d));
    await term.write('stty size\n');
    for (let i = 0; i < 200 && !out.includes('20 90'); i++) await new Promise((r) => setTimeout(r, 20));
    expect(out).toContain('20 90');
    await term.resize(60, 10);
    await term.write('stty size; exit 5\n');
    expect(await term.wait()).toBe(5);
    expect(out).toContain('10 60');
    stop();
    await term.kill();
  });

  it("answers 404 for another org's sandbox on the terminal routes", async () => {
    const other = await server.client().trpc.auth.register.mutate({ name: 'Other Pty', email: uniqueEmail('opty') });
    expect((await server.http(`/api/sandboxes/${box.id}/pty/sessions`, { apiKey: other.apiKey })).status).toBe(404);
    await expect(open(`${wsBase}/pty?apiKey=${other.apiKey}`)).rejects.toThrow('HTTP 404');
  });
});

describe.skipIf(!support.ok)('terminal session lifetime', () => {
  it('ends a persistent session after PTY_IDLE_TIMEOUT_SEC with no client attached', async () => {
    const server = await startTestServer({ PTY_IDLE_TIMEOUT_SEC: '1' });
    try {
      const reg = await server.client().trpc.auth.register.mutate({ name: 'Pty Idle', email: uniqueEmail('pidle') });
      const vr = server.client(reg.apiKey);
      const sb = await vr.sandboxes.create({ name: 'pty-idle' });
      const term = await sb.pty.create();
      const stop = term.onData(() => {});
      await new Promise((r) => setTimeout(r, 1500));
      expect((await sb.pty.list()).map((s) => s.id)).toContain(term.sessionId); // attached: kept
      stop();
      for (let i = 0; i < 60 && (await sb.pty.list()).length > 0; i++) await new Promise((r) => setTimeout(r, 100));
      expect(await sb.pty.list()).toEqual([]);
    } finally {
      await server.close();
    }
  });
});
