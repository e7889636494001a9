import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openSocket, parseSse } from './helpers/http-streams.js';
import { qemuSupport } from './helpers/qemu-support.js';
import { support } from './helpers/sandbox-support.js';
import { newId } from '../server/store/ids.js';
import { newServerDirs, startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { until as pollUntil } from './helpers/until.js';

/**
 * Timeouts, idle policies and auto-resume through the real server (README "Lifecycle: timeouts,
 * idle and auto-resume"). Timeouts and idle periods are 1–2 s; every test waits for the state it
 * expects (polling GET, bounded), never for a time.
 */

interface Answer {
  http: number;
  code?: string;
  error?: string;
  details?: string;
  data?: SandboxBody;
}

interface SandboxBody {
  id: string;
  status: string;
  timeout: number;
  expiresAt: string | null;
  onTimeout: string;
  idle: { after: number; action: string } | null;
  autoResume: boolean;
  endedReason: string | null;
  endedAt: string | null;
  lastActivityAt: string | null;
}

/** `until` (test/helpers/until.ts) with this file's bound and pace. */
const until = <T>(read: () => Promise<T>, ok: (v: T) => boolean, what: string, timeoutMs = 20_000): Promise<T> => pollUntil(read, ok, what, timeoutMs, 100);

/**
 * A test server (started in `beforeAll`, closed in `afterAll`) with a registered user, and REST
 * against it with that user's key, answered as status + body (never thrown).
 */
function lifecycleServer(env: Record<string, string>, dirs = newServerDirs()) {
  const ctx = { server: null as unknown as TestServer, apiKey: '' };
  beforeAll(async () => {
    ctx.server = await startTestServer(env, dirs);
    ctx.apiKey = (await ctx.server.client().trpc.auth.register.mutate({ name: 'Life User', email: uniqueEmail('life') })).apiKey;
  });
  afterAll(async () => {
    // A warm-pool member still being built would not be among the leftovers close removes.
    const pool = ctx.server?.app.services.sandboxes.warmPool;
    if (pool) await until(async () => Object.values(pool.sizes()), (sizes) => sizes.every((s) => s.building === 0), 'the warm pool built', 90_000);
    await ctx.server?.close();
  });
  const server = () => ctx.server;
  const apiKey = () => ctx.apiKey;
  /** A new server on the same state directories (this one closed, its sandboxes left running). */
  const restart = async () => {
    await ctx.server.close({ keepState: true });
    ctx.server = await startTestServer(env, dirs);
  };
  const call = async (path: string, init: { method?: string; json?: unknown } = {}): Promise<Answer> => {
    const res = await server().http(`/api${path}`, { method: init.method ?? (init.json !== undefined ? 'POST' : 'GET'), apiKey: apiKey(), ...(init.json !== undefined ? { json: init.json } : {}) });
    const text = await res.text();
    let body: Omit<Answer, 'http'> = {};
    try {
      body = JSON.parse(text) as typeof body;
    } catch {
      // a non-JSON body is reported through the status
    }
    return { ...body, http: res.status };
  };
  let n = 0;
  const create = async (fields: Record<string, unknown> = {}): Promise<SandboxBody> => {
    const a = await call('/sandboxes', { json: { name: `life-${process.pid}-${n++}`, ...fields } });
    expect(a.http, JSON.stringify(a)).toBe(201);
    return a.data!;
  };
  const get = (id: string) => call(`/sandboxes/${id}`);
  const exec = (id: string, command = 'echo hi') => call(`/sandboxes/${id}/exec`, { json: { command } });
  const statusIs = (id: string, status: string) => until(() => get(id), (a) => a.data?.status === status, `sandbox ${id} ${status}`).then((a) => a.data!);
  /** The types (and data) of the sandbox's events, oldest first (E's event stream). */
  const events = async (id: string) => ((await call(`/sandboxes/${id}/events?limit=100`)).data as unknown as { events: Array<{ type: string; data: Record<string, unknown> }> }).events;
  return { ctx, server, restart, call, create, get, exec, statusIs, events };
}

describe.skipIf(!support.ok)('lifecycle policies: timeouts, idle, auto-resume', () => {
  const rest = lifecycleServer({ LIFECYCLE_TICK_MS: '200', ORG_MAX_SANDBOXES: '30', ORG_MAX_VCPUS: '30', ORG_MAX_MEMORY_MB: String(30 * 1024), ORG_MAX_DISK_MB: String(30 * 5120) });

  it('answers every sandbox with its lifecycle fields; no policy by default (timeout 0, expiresAt null)', async () => {
    const box = await rest.create();
    expect(box).toMatchObject({ timeout: 0, expiresAt: null, onTimeout: 'stop', idle: null, autoResume: false, endedReason: null, endedAt: null });
    const listed = await rest.call('/sandboxes');
    expect((listed.data as unknown as SandboxBody[]).find((s) => s.id === box.id)).toMatchObject({ timeout: 0, expiresAt: null });
    const none = await rest.create({ timeout: 0 });
    expect(none).toMatchObject({ timeout: 0, expiresAt: null });
  });

  it('stops a sandbox at its timeout (default onTimeout); exec then answers 409 naming endedReason timeout and when; start clears it', async () => {
    const box = await rest.create({ timeout: 1 });
    expect(box).toMatchObject({ timeout: 1, onTimeout: 'stop', status: 'running' });
    expect(box.expiresAt).not.toBeNull();
    const stopped = await rest.statusIs(box.id, 'stopped');
    expect(stopped).toMatchObject({ endedReason: 'timeout', expiresAt: null });
    expect(stopped.endedAt).not.toBeNull();
    const refused = await rest.exec(box.id);
    expect(refused).toMatchObject({ http: 409, code: 'SANDBOX_NOT_RUNNING' });
    expect(refused.error).toMatch(/endedReason: timeout/);
    expect(refused.error).toContain(stopped.endedAt!);
    expect(refused.details).toBe(`endedReason: timeout; endedAt: ${stopped.endedAt}`);
    // The event stream says so: sandbox.timeout, then the stop with its reason.
    const types = (await rest.events(box.id)).map((e) => e.type);
    expect(types.slice(types.indexOf('sandbox.timeout'))).toEqual(['sandbox.timeout', 'sandbox.stopped']);
    expect((await rest.events(box.id)).find((e) => e.type === 'sandbox.stopped')!.data).toMatchObject({ reason: 'its timeout ran out' });
    // A start restarts the clock and clears the reason.
    expect((await rest.call(`/sandboxes/${box.id}/start`, { json: {} })).http).toBe(200);
    const again = (await rest.get(box.id)).data!;
    expect(again).toMatchObject({ status: 'running', endedReason: null, endedAt: null });
    expect(again.expiresAt).not.toBeNull();
    await rest.statusIs(box.id, 'stopped');
  });

  it('pauses a sandbox at its timeout with onTimeout pause', async () => {
    const box = await rest.create({ timeout: 1, onTimeout: 'pause' });
    const paused = await rest.statusIs(box.id, 'paused');
    expect(paused).toMatchObject({ endedReason: 'timeout', onTimeout: 'pause' });
    const refused = await rest.exec(box.id);
    expect(refused).toMatchObject({ http: 409, code: 'SANDBOX_NOT_RUNNING' });
    expect(refused.error).toMatch(/paused.*endedReason: timeout/);
  });

  it('deletes a sandbox at its timeout with onTimeout delete, and every later call answers 410 with the reason (never 404)', async () => {
    const box = await rest.create({ timeout: 1, onTimeout: 'delete' });
    const gone = await until(() => rest.get(box.id), (a) => a.http !== 200, 'the sandbox deleted');
    expect(gone).toMatchObject({ http: 410, code: 'SANDBOX_GONE' });
    expect(gone.error).toMatch(/deleted at .* by its timeout/);
    expect(gone.details).toMatch(/^endedReason: timeout; endedAt: /);
    for (const a of [await rest.exec(box.id), await rest.call(`/sandboxes/${box.id}/start`, { json: {} }), await rest.call(`/sandboxes/${box.id}`, { method: 'DELETE' })]) {
      expect(a).toMatchObject({ http: 410, code: 'SANDBOX_GONE' });
    }
    // Another org hears nothing of it: a plain 404, as for any id it does not own.
    const otherKey = (await rest.server().client().trpc.auth.register.mutate({ name: 'Other', email: uniqueEmail('other') })).apiKey;
    const other = await rest.server().http(`/api/sandboxes/${box.id}`, { apiKey: otherKey });
    expect(other.status).toBe(404);
    expect(((await other.json()) as { code: string }).code).toBe('SANDBOX_NOT_FOUND');
    // Not listed: the listing shows sandboxes that exist.
    expect(((await rest.call('/sandboxes?limit=100')).data as unknown as SandboxBody[]).some((s) => s.id === box.id)).toBe(false);
    // tRPC: NOT_FOUND with our code (tRPC has no 410).
    const vr = rest.server().client(rest.ctx.apiKey);
    await expect(vr.trpc.sandbox.get.query({ id: box.id })).rejects.toMatchObject({ code: 'SANDBOX_GONE' });
  });

  it('POST /sandboxes/{id}/timeout extends a sandbox: it still runs after a twin with the original timeout expired; 0 removes the timeout', async () => {
    const [kept, twin] = await Promise.all([rest.create({ timeout: 2 }), rest.create({ timeout: 2 })]);
    const extended = await rest.call(`/sandboxes/${kept.id}/timeout`, { json: { timeout: 600 } });
    expect(extended.http, JSON.stringify(extended)).toBe(200);
    expect(extended.data).toMatchObject({ timeout: 600, status: 'running' });
    expect(Date.parse(extended.data!.expiresAt!)).toBeGreaterThan(Date.parse(kept.expiresAt!));
    await rest.statusIs(twin.id, 'stopped');
    expect((await rest.get(kept.id)).data).toMatchObject({ status: 'running', endedReason: null });
    const removed = await rest.call(`/sandboxes/${kept.id}/timeout`, { json: { timeout: 0 } });
    expect(removed.data).toMatchObject({ timeout: 0, expiresAt: null });
    const changes = (await rest.events(kept.id)).filter((e) => e.type === 'sandbox.timeout_changed').map((e) => e.data);
    expect(changes).toMatchObject([{ timeout: 600, expiresAt: extended.data!.expiresAt }, { timeout: 0, expiresAt: null }]);
  });

  it('idles a quiet sandbox, but not one running `sleep 600` started through the API, one with a terminal held open, nor one busy on CPU', async () => {
    const idle = { after: 2, action: 'pause' };
    const [quiet, busy, attached, spinning] = await Promise.all([rest.create({ idle }), rest.create({ idle }), rest.create({ idle }), rest.create({ idle })]);
    const started = await rest.call(`/sandboxes/${busy.id}/commands/run`, { json: { command: 'sleep', args: ['600'] } });
    expect(started.http, JSON.stringify(started)).toBe(200);
    // A loop detached from the command that started it (no API command runs): only the host's CPU counter sees it.
    const spun = await rest.exec(spinning.id, "setsid -f sh -c 'while :; do :; done' >/dev/null 2>&1");
    expect(spun.http, JSON.stringify(spun)).toBe(200);
    const opened = await openSocket(`${rest.server().url.replace('http', 'ws')}/api/sandboxes/${attached.id}/pty`, { 'x-api-key': rest.ctx.apiKey });
    expect(opened.status).toBe(101);
    try {
      const paused = await rest.statusIs(quiet.id, 'paused');
      expect(paused).toMatchObject({ endedReason: 'idle' });
      expect((await rest.events(quiet.id)).find((e) => e.type === 'sandbox.idle')?.data).toMatchObject({ after: 2, action: 'pause' });
      // The quiet one's idle period has passed for all three (created together): the other two still run.
      expect((await rest.get(busy.id)).data).toMatchObject({ status: 'running', endedReason: null });
      expect((await rest.get(attached.id)).data).toMatchObject({ status: 'running', endedReason: null });
      expect((await rest.get(spinning.id)).data).toMatchObject({ status: 'running', endedReason: null });
      // Without autoResume a call on the idled one is the 409, naming the idle policy.
      const refused = await rest.exec(quiet.id);
      expect(refused).toMatchObject({ http: 409, code: 'SANDBOX_NOT_RUNNING' });
      expect(refused.error).toMatch(/idle.*endedReason: idle/);
      // Stopped by its owner now: the idle policy's reason no longer describes it.
      expect((await rest.call(`/sandboxes/${quiet.id}/stop`, { json: {} })).http).toBe(200);
      expect((await rest.get(quiet.id)).data).toMatchObject({ status: 'stopped', endedReason: null, endedAt: null });
    } finally {
      if ('socket' in opened) await opened.socket.close();
    }
    // Once the terminal closes, nothing keeps that one awake.
    expect(await rest.statusIs(attached.id, 'paused')).toMatchObject({ endedReason: 'idle' });
    expect((await rest.get(busy.id)).data).toMatchObject({ status: 'running' });
    expect((await rest.get(spinning.id)).data).toMatchObject({ status: 'running' });
    expect((await rest.call(`/sandboxes/${spinning.id}`, { method: 'DELETE' })).http).toBe(200);
  });

  it('an event stream open on a sandbox does not keep it awake: the SSE stream and the tRPC sandbox.events subscription both see its sandbox.idle', async () => {
    const box = await rest.create({ idle: { after: 2, action: 'pause' } });
    const sse = await rest.server().http(`/api/sandboxes/${box.id}/events/stream`, { apiKey: rest.ctx.apiKey });
    expect(sse.status).toBe(200);
    const vr = rest.server().client(rest.ctx.apiKey);
    const viaTrpc = new Promise<Record<string, unknown>>((resolve, reject) => {
      const sub = vr.trpc.sandbox.events.subscribe(
        { id: box.id },
        {
          onData: (e) => {
            if (e.data.type !== 'sandbox.idle') return;
            sub.unsubscribe();
            resolve(e.data.data as Record<string, unknown>);
          },
          onError: reject,
        },
      );
    });
    // The SSE stream read until its sandbox.idle (bounded by the test's timeout, never by a sleep).
    const reader = sse.body!.getReader();
    let text = '';
    const complete = () => parseSse(text.slice(0, text.lastIndexOf('\n\n') + 2));
    while (!complete().some((m) => m.event === 'sandbox.idle')) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`the event stream ended before sandbox.idle: ${text}`);
      text += new TextDecoder().decode(value);
    }
    await reader.cancel();
    const idleData = complete().find((m) => m.event === 'sandbox.idle')!.data;
    expect(JSON.parse(idleData)).toMatchObject({ type: 'sandbox.idle', data: { after: 2, action: 'pause' } });
    expect(await viaTrpc).toMatchObject({ after: 2, action: 'pause' });
    expect(await rest.statusIs(box.id, 'paused')).toMatchObject({ endedReason: 'idle' });
  });

  it("another org's requests keep no sandbox awake: raw routes, streams, REST, WebSockets and tRPC subscriptions naming its id, all refused, never move its idle clock", async () => {
    const victim = await rest.create({ idle: { after: 2, action: 'pause' } });
    const other = (await rest.server().client().trpc.auth.register.mutate({ name: 'Other Org', email: uniqueEmail('life-other') })).apiKey;
    const otherClient = rest.server().client(other);
    const http = (path: string, init: { method?: string; json?: unknown } = {}) => rest.server().http(`/api/sandboxes/${victim.id}${path}`, { apiKey: other, ...init }).then(async (res) => (await res.body?.cancel(), res.status));
    const knock = async (): Promise<string[]> => {
      const statuses = await Promise.all([
        http('/files/download?path=/etc/hostname'),
        http('/exec-stream', { method: 'POST', json: { command: 'true' } }),
        http('/events/stream'),
        http('/exec', { method: 'POST', json: { command: 'true' } }),
        openSocket(`${rest.server().url.replace('http', 'ws')}/api/sandboxes/${victim.id}/pty`, { 'x-api-key': other }).then(async (o) => ('socket' in o ? (await o.socket.close(), 101) : o.status)),
        new Promise<number>((resolve) => {
          otherClient.trpc.exec.stream.subscribe({ id: victim.id, command: 'true' }, { onData: () => resolve(200), onError: (err) => resolve((err as { data?: { httpStatus?: number } }).data?.httpStatus ?? 0), onComplete: () => resolve(200) });
        }),
      ]);
      return statuses.map((status, i) => `${['download', 'exec-stream', 'events/stream', 'exec', 'pty', 'trpc exec.stream'][i]} ${status}`);
    };
    // Org B knocks on the victim's id over and over while its idle period runs out.
    let knocking = true;
    const seen = new Set<string>();
    let rounds = 0;
    const knocks = (async () => {
      while (knocking) {
        for (const status of await knock()) seen.add(status);
        rounds++;
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    try {
      expect(await rest.statusIs(victim.id, 'paused')).toMatchObject({ endedReason: 'idle' });
    } finally {
      knocking = false;
      await knocks;
    }
    // Every knock was refused as a sandbox that does not exist for that org, and they kept coming.
    expect([...seen].sort()).toEqual(['download 404', 'events/stream 404', 'exec 404', 'exec-stream 404', 'pty 404', 'trpc exec.stream 404']);
    expect(rounds).toBeGreaterThan(3);
  });

  it('a streamed command over a tRPC WebSocket keeps its sandbox awake only while it runs: once it ends, the socket left open holds nothing', async () => {
    const box = await rest.create({ idle: { after: 2, action: 'pause' } });
    const vr = rest.server().client(rest.ctx.apiKey);
    const chunks: string[] = [];
    await new Promise<void>((resolve, reject) => {
      vr.trpc.exec.stream.subscribe({ id: box.id, command: 'sleep 3; echo done' }, { onData: (e) => void chunks.push(JSON.stringify(e)), onComplete: resolve, onError: reject });
    });
    expect(chunks.join('')).toContain('done');
    // The command ran past the idle period: the sandbox stayed up for it.
    expect((await rest.get(box.id)).data).toMatchObject({ status: 'running' });
    // The WebSocket stays open (the client is not closed); the idle policy pauses the sandbox anyway.
    expect(await rest.statusIs(box.id, 'paused')).toMatchObject({ endedReason: 'idle' });
  });

  it('a port-proxy request held open past the idle period keeps its sandbox awake (the server in it answers after 4 s)', async () => {
    const box = await rest.create({ idle: { after: 2, action: 'pause' } });
    // Detached from the command that starts it, so no API command runs; it waits 4 s before each answer.
    const server = "setsid -f perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8000,Listen=>5,ReuseAddr=>1) or die; print STDERR qq(up); while($c=$s->accept){ sleep 4; print $c qq(HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok); close $c }' >/dev/null 2>&1";
    expect((await rest.exec(box.id, server)).http).toBe(200);
    await until(() => rest.call(`/sandboxes/${box.id}/ports`), (a) => JSON.stringify(a).includes('8000'), 'port 8000 listening');
    const res = await rest.server().http(`/api/sandboxes/${box.id}/ports/8000/`, { apiKey: rest.ctx.apiKey });
    expect([res.status, await res.text()]).toEqual([200, 'ok']);
    expect((await rest.get(box.id)).data).toMatchObject({ status: 'running', endedReason: null });
    expect(await rest.statusIs(box.id, 'paused')).toMatchObject({ endedReason: 'idle' });
  });

  it('autoResume: exec on a paused sandbox resumes it first and succeeds (concurrent calls share one resume)', async () => {
    const box = await rest.create({ autoResume: true });
    expect(box.autoResume).toBe(true);
    expect((await rest.call(`/sandboxes/${box.id}/pause`, { json: {} })).http).toBe(200);
    const answers = await Promise.all([1, 2, 3].map((i) => rest.exec(box.id, `echo resumed-${i}`)));
    for (const [i, a] of answers.entries()) {
      expect(a.http, JSON.stringify(a)).toBe(200);
      expect(JSON.stringify(a)).toContain(`resumed-${i + 1}`);
    }
    expect((await rest.get(box.id)).data).toMatchObject({ status: 'running' });
    // A file read too.
    expect((await rest.call(`/sandboxes/${box.id}/pause`, { json: {} })).http).toBe(200);
    const listed = await rest.call(`/sandboxes/${box.id}/files?path=/`);
    expect(listed.http, JSON.stringify(listed).slice(0, 300)).toBe(200);
    expect((await rest.get(box.id)).data).toMatchObject({ status: 'running' });
    // And a terminal: the WebSocket upgrade resumes it.
    expect((await rest.call(`/sandboxes/${box.id}/pause`, { json: {} })).http).toBe(200);
    const opened = await openSocket(`${rest.server().url.replace('http', 'ws')}/api/sandboxes/${box.id}/pty`, { 'x-api-key': rest.ctx.apiKey });
    expect(opened.status, 'body' in opened ? opened.body : '').toBe(101);
    if ('socket' in opened) await opened.socket.close();
    expect((await rest.get(box.id)).data).toMatchObject({ status: 'running' });
  });

  it('a restore takes the lifecycle fields (its timeout counts from the restore)', async () => {
    const source = await rest.create({ idle: { after: 600, action: 'stop' } });
    const snap = await rest.call(`/sandboxes/${source.id}/snapshot`, { json: {} });
    expect(snap.http, JSON.stringify(snap)).toBe(200);
    const fullPath = (snap.data as unknown as { full_path: string }).full_path;
    const restored = await rest.call('/sandboxes/restore', { json: { snapshot_path: fullPath, timeout: 1, onTimeout: 'pause' } });
    expect(restored.http, JSON.stringify(restored)).toBe(201);
    const id = (restored as unknown as { data?: SandboxBody } & SandboxBody).data?.id ?? (restored as unknown as SandboxBody).id;
    const after = await rest.statusIs(id, 'paused');
    // The source's idle policy came along; the restore's own fields won.
    expect(after).toMatchObject({ timeout: 1, onTimeout: 'pause', idle: { after: 600, action: 'stop' }, endedReason: 'timeout' });
  });

  it('without autoResume a call on a paused sandbox stays 409', async () => {
    const box = await rest.create();
    expect((await rest.call(`/sandboxes/${box.id}/pause`, { json: {} })).http).toBe(200);
    expect(await rest.exec(box.id)).toMatchObject({ http: 409, code: 'SANDBOX_NOT_RUNNING' });
    expect((await rest.get(box.id)).data).toMatchObject({ status: 'paused', endedReason: null });
  });

  it('PATCH /sandboxes/{id} sets autoSleep (seconds, true, false) and the lifecycle fields; autoSleep pauses the sandbox when quiet', async () => {
    const box = await rest.create();
    const on = await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json: { autoSleep: true } });
    expect(on.http, JSON.stringify(on)).toBe(200);
    expect(on.data).toMatchObject({ idle: { after: 300, action: 'pause' } });
    const off = await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json: { autoSleep: false } });
    expect(off.data).toMatchObject({ idle: null });
    const fields = await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json: { onTimeout: 'pause', autoResume: true, timeout: 900 } });
    expect(fields.data).toMatchObject({ onTimeout: 'pause', autoResume: true, timeout: 900, idle: null });
    expect(fields.data!.expiresAt).not.toBeNull();
    // idle: null removes an idle policy over REST too (a null that is a value, not an absent field).
    expect((await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json: { idle: { after: 600, action: 'stop' } } })).data).toMatchObject({ idle: { after: 600, action: 'stop' } });
    const removed = await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json: { idle: null } });
    expect(removed.http, JSON.stringify(removed)).toBe(200);
    expect(removed.data).toMatchObject({ idle: null });
    // Refused, and nothing changed: a string for a boolean, a field the update does not change, a body changing nothing.
    for (const json of [{ autoResume: 'false' }, { name: 'renamed' }, { timeout: null }]) {
      expect((await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json })).http, JSON.stringify(json)).toBe(400);
    }
    expect((await rest.get(box.id)).data).toMatchObject({ autoResume: true, timeout: 900, idle: null });
    const soon = await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json: { autoSleep: 1 } });
    expect(soon.data).toMatchObject({ idle: { after: 1, action: 'pause' } });
    expect(await rest.statusIs(box.id, 'paused')).toMatchObject({ endedReason: 'idle' });
  });

  it('refuses bad lifecycle inputs with a 400 saying what to fix', async () => {
    const box = await rest.create();
    const cases: Array<[string, { method?: string; json: unknown }, RegExp]> = [
      ['/sandboxes', { json: { name: 'bad-timeout', timeout: -1 } }, /timeout must be at least 0 seconds/],
      ['/sandboxes', { json: { name: 'bad-timeout', timeout: 1.5 } }, /timeout must be a whole number of seconds/],
      ['/sandboxes', { json: { name: 'bad-timeout', timeout: 'soon' } }, /timeout must be a whole number of seconds/],
      ['/sandboxes', { json: { name: 'bad-on', onTimeout: 'explode' } }, /onTimeout.*must be pause, stop or delete/],
      ['/sandboxes', { json: { name: 'bad-idle', idle: { after: 0 } } }, /idle.after must be at least 1 seconds/],
      ['/sandboxes', { json: { name: 'bad-idle', idle: { after: 5, action: 'delete' } } }, /must be pause or stop/],
      [`/sandboxes/${box.id}/timeout`, { json: {} }, /timeout/],
      [`/sandboxes/${box.id}`, { method: 'PATCH', json: { autoSleep: 'yes' } }, /autoSleep must be true, false or a whole number of seconds/],
      [`/sandboxes/${box.id}`, { method: 'PATCH', json: { autoSleep: 5, idle: { after: 5 } } }, /send autoSleep or idle, not both/],
      [`/sandboxes/${box.id}`, { method: 'PATCH', json: { autoSleep: true, idle: null } }, /send autoSleep or idle, not both/],
      [`/sandboxes/${box.id}`, { method: 'PATCH', json: { autoResume: 'false' } }, /autoResume/],
      [`/sandboxes/${box.id}`, { method: 'PATCH', json: { name: 'renamed', cpu: 64 } }, /changes only timeout, onTimeout, idle, autoResume and autoSleep; not name, cpu/],
      [`/sandboxes/${box.id}`, { method: 'PATCH', json: [] }, /must be a JSON object/],
      [`/sandboxes/${box.id}/timeout`, { json: { timeout: '' } }, /timeout must be a whole number of seconds/],
      [`/sandboxes/${box.id}/timeout`, { json: { timeout: null } }, /timeout must be a whole number of seconds/],
    ];
    for (const [path, init, message] of cases) {
      const a = await rest.call(path, init);
      expect(a.http, `${path} ${JSON.stringify(init.json)}: ${JSON.stringify(a)}`).toBe(400);
      expect(a.code).toBe('INVALID_INPUT');
      expect(`${a.error} ${a.details ?? ''}`, JSON.stringify(init.json)).toMatch(message);
    }
  });
});

describe.skipIf(!support.ok)('lifecycle policies with SANDBOX_MAX_TIMEOUT_SEC, and across a restart', () => {
  const rest = lifecycleServer({ LIFECYCLE_TICK_MS: '200', SANDBOX_MAX_TIMEOUT_SEC: '3600', WARM_POOL: 'debian:1cpu:1024mb=1' });

  it('refuses a timeout above the maximum (and no timeout at all) with a 400 naming SANDBOX_MAX_TIMEOUT_SEC; a create without one gets the maximum', async () => {
    const over = await rest.call('/sandboxes', { json: { name: 'too-long', timeout: 3601 } });
    expect(over).toMatchObject({ http: 400, code: 'INVALID_INPUT' });
    expect(over.error).toBe("timeout 3601 is above this server's maximum of 3600 seconds (SANDBOX_MAX_TIMEOUT_SEC)");
    const box = await rest.create();
    expect(box).toMatchObject({ timeout: 3600 });
    const none = await rest.call(`/sandboxes/${box.id}/timeout`, { json: { timeout: 0 } });
    expect(none).toMatchObject({ http: 400 });
    expect(none.error).toMatch(/at most 3600 seconds \(SANDBOX_MAX_TIMEOUT_SEC\)/);
    const patched = await rest.call(`/sandboxes/${box.id}`, { method: 'PATCH', json: { timeout: 7200 } });
    expect(patched).toMatchObject({ http: 400 });
    expect(patched.error).toMatch(/SANDBOX_MAX_TIMEOUT_SEC/);
  });

  it('SANDBOX_MAX_TIMEOUT_SEC bounds each timeout from now, not a lifetime: a client may set it again before it runs out', async () => {
    const box = await rest.create({ timeout: 3600 });
    const first = Date.parse(box.expiresAt!);
    const renewed = await until(
      () => rest.call(`/sandboxes/${box.id}/timeout`, { json: { timeout: 3600 } }),
      (a) => a.http !== 200 || Date.parse(a.data!.expiresAt!) > first,
      'a renewal past the first expiry',
    );
    expect(renewed.http, JSON.stringify(renewed)).toBe(200);
    // Still at most the maximum from now, and past what the create allowed.
    expect(renewed.data).toMatchObject({ timeout: 3600, status: 'running' });
    expect(Date.parse(renewed.data!.expiresAt!)).toBeLessThanOrEqual(Date.now() + 3600 * 1000);
  });

  it('a restore without a timeout gets the maximum when its source has none (stored before the maximum was set)', async () => {
    const source = await rest.create({ name: `max-src-${process.pid}` });
    // As a server without SANDBOX_MAX_TIMEOUT_SEC stored it: no timeout.
    const store = rest.server().app.store.sandboxes;
    const record = (await store.findByIdInAnyOrg(source.id))!;
    await store.update(record.orgId, record.id, { lifecycle: { ...record.lifecycle!, timeout: 0, expiresAt: null } });
    const snap = await rest.call(`/sandboxes/${source.id}/snapshot`, { json: {} });
    expect(snap.http, JSON.stringify(snap)).toBe(200);
    const restored = (await rest.call('/sandboxes/restore', { json: { snapshot_path: (snap.data as unknown as { full_path: string }).full_path } })) as unknown as SandboxBody & { data?: SandboxBody };
    expect(restored.data?.timeout ?? restored.timeout).toBe(3600);
  });

  it('a create claimed from the warm pool gets its lifecycle, the clock starting at the claim', async () => {
    const pool = () => rest.server().app.services.sandboxes.warmPool!.sizes()['debian:1cpu:1024mb']!;
    await until(async () => pool(), (size) => size.ready === 1 && size.building === 0, 'a ready warm-pool member', 90_000);
    const members = (await rest.server().app.store.sandboxes.listAll()).filter((r) => r.orgId === '' && r.pool).map((r) => r.id);
    const box = await rest.create({ timeout: 1, idle: { after: 900, action: 'pause' } });
    expect(members).toContain(box.id);
    expect(box).toMatchObject({ timeout: 1, idle: { after: 900, action: 'pause' } });
    expect(box.expiresAt).not.toBeNull();
    expect(await rest.statusIs(box.id, 'stopped')).toMatchObject({ endedReason: 'timeout' });
  });

  it('acts on a timeout after a server restart (the schedule is read from the records)', async () => {
    const box = await rest.create({ timeout: 2 });
    await rest.restart();
    const stopped = await rest.statusIs(box.id, 'stopped');
    expect(stopped).toMatchObject({ endedReason: 'timeout' });
  });
});

const mongoUri = process.env.MONGO_URI;
if (!mongoUri) console.warn('[lifecycle on mongo] SKIPPED: MONGO_URI is not set (.ci/run starts FerretDB and sets it)');

/** The lifecycle field and tombstones on the Mongo adapter, through the whole stack and a restart. */
describe.skipIf(!support.ok || !mongoUri)('lifecycle policies on MongoDB (MONGO_URI)', () => {
  const dbName = `voidrun_lifecycle_${newId()}`;
  const rest = lifecycleServer({ LIFECYCLE_TICK_MS: '200', MONGO_URI: mongoUri ?? '', MONGO_DB: dbName });
  afterAll(async () => {
    const { MongoClient } = await import('mongodb');
    const client = await MongoClient.connect(mongoUri!);
    await client.db(dbName).dropDatabase();
    await client.close();
  });

  it('keeps policies, endedReason and tombstones in the store: a stop and a delete at timeout read the same after a restart', async () => {
    expect(rest.server().app.store.kind).toBe('mongo');
    const [stopping, deleting] = await Promise.all([rest.create({ timeout: 1, idle: { after: 600, action: 'stop' } }), rest.create({ timeout: 1, onTimeout: 'delete' })]);
    const stopped = await rest.statusIs(stopping.id, 'stopped');
    expect(stopped).toMatchObject({ endedReason: 'timeout', idle: { after: 600, action: 'stop' } });
    await until(() => rest.get(deleting.id), (a) => a.http === 410, 'the delete at timeout');
    await rest.restart();
    expect((await rest.get(stopping.id)).data).toMatchObject({ status: 'stopped', endedReason: 'timeout', endedAt: stopped.endedAt, timeout: 1 });
    expect(await rest.get(deleting.id)).toMatchObject({ http: 410, code: 'SANDBOX_GONE' });
  });
});

/** A microVM's idle check reads its VMM process's CPU on the host: a quiet VM is idled at the default threshold. */
describe.skipIf(!qemuSupport().ok)('lifecycle policies on a qemu microVM', () => {
  const rest = lifecycleServer({ SANDBOX_DRIVER: 'qemu', LIFECYCLE_TICK_MS: '500' });

  it('idles a quiet VM (its VMM stays under SANDBOX_IDLE_CPU_PERCENT) and auto-resumes it for an exec', async () => {
    const box = await rest.create({ idle: { after: 3, action: 'pause' }, autoResume: true });
    expect(await rest.statusIs(box.id, 'paused')).toMatchObject({ endedReason: 'idle' });
    const ran = await rest.exec(box.id, 'echo awake');
    expect(ran.http, JSON.stringify(ran)).toBe(200);
    expect(JSON.stringify(ran)).toContain('awake');
    expect((await rest.get(box.id)).data).toMatchObject({ status: 'running', endedReason: null });
  }, 120_000);
});
