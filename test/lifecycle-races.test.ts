import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import type { WatchMessage } from '../shared/index.js';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

interface ProcessRow {
  pid: number;
  command: string;
  running: boolean;
  exitCode: number | null;
}

interface Answer {
  what: string;
  http: number;
  code?: string;
  error?: string;
  data?: { status?: string };
}

describe.skipIf(!support.ok)('lifecycle, commands and watch under concurrency', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let box: SandboxHandle;

  /** One REST call, answered as status + body (never thrown). */
  const call = async (what: string, path: string, init: { method?: string; json?: unknown } = {}): Promise<Answer> => {
    const res = await server.http(path, { method: init.method ?? 'POST', apiKey, ...(init.json !== undefined ? { json: init.json } : {}) });
    const text = await res.text();
    let body: Omit<Answer, 'what' | 'http'> = {};
    try {
      body = JSON.parse(text) as typeof body;
    } catch {
      // a non-JSON body is reported through the status
    }
    return { ...body, what, http: res.status };
  };
  const act = (verb: 'pause' | 'resume' | 'stop' | 'start', id = box.id) => call(verb, `/api/sandboxes/${id}/${verb}`);
  const statusOf = async (id = box.id) => ((await (await server.http(`/api/sandboxes/${id}`, { apiKey })).json()) as { data: { status: string } }).data.status;
  /** A 409 SANDBOX_NOT_RUNNING whose message matches `pattern`. */
  const expectNotRunning = (a: Answer, pattern: RegExp) => {
    expect(a, a.what).toMatchObject({ http: 409, error: expect.stringMatching(pattern) });
    if (a.code !== undefined) expect(a.code, a.what).toBe('SANDBOX_NOT_RUNNING');
  };
  const no5xx = (answers: Answer[]) => {
    for (const a of answers) expect(a.http, `${a.what}: ${a.http} ${a.error ?? ''}`).toBeLessThan(500);
  };
  /** The background processes, from the contract's bare body (or our envelope around it). */
  const processes = async (): Promise<ProcessRow[]> => {
    const body = (await (await server.http(`/api/sandboxes/${box.id}/commands/list`, { apiKey })).json()) as { processes?: ProcessRow[]; data?: { processes?: ProcessRow[] } };
    return body.processes ?? body.data?.processes ?? [];
  };

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Race User', email: uniqueEmail('race') });
    apiKey = reg.apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'racer' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('answers concurrent pause, resume, stop and start without a 5xx: the loser succeeds when already there, else 409 naming the state (regression: 500 from runc)', async () => {
    // Two pauses: both succeed, the sandbox is paused once.
    const pauses = await Promise.all([act('pause'), act('pause')]);
    no5xx(pauses);
    expect(pauses.map((a) => [a.http, a.data?.status])).toEqual([
      [200, 'paused'],
      [200, 'paused'],
    ]);
    expect(await statusOf()).toBe('paused');

    // Two resumes: both succeed.
    const resumes = await Promise.all([act('resume'), act('resume')]);
    no5xx(resumes);
    expect(resumes.map((a) => [a.http, a.data?.status])).toEqual([
      [200, 'running'],
      [200, 'running'],
    ]);

    // Stop racing pause: the stop always wins in the end; the pause succeeded first or met a stopped sandbox.
    const [stopped, paused] = await Promise.all([act('stop'), act('pause')]);
    no5xx([stopped, paused]);
    expect(stopped).toMatchObject({ http: 200, data: { status: 'stopped' } });
    if (paused.http !== 200) expectNotRunning(paused, /stopped/);
    expect(await statusOf()).toBe('stopped');

    // Pause and resume right after a stop: 409 naming the state.
    for (const verb of ['pause', 'resume'] as const) {
      expectNotRunning(await act(verb), /is stopped/);
    }
    // A second stop of a stopped sandbox succeeds unchanged.
    expect(await act('stop')).toMatchObject({ http: 200, data: { status: 'stopped' } });

    // Two starts: both succeed.
    const starts = await Promise.all([act('start'), act('start')]);
    no5xx(starts);
    expect(starts.map((a) => [a.http, a.data?.status])).toEqual([
      [200, 'running'],
      [200, 'running'],
    ]);

    // Stop racing start, both ways: whichever ran last decides, and GET agrees with it.
    const [stop2, start2] = await Promise.all([act('stop'), act('start')]);
    no5xx([stop2, start2]);
    expect(stop2.http).toBe(200);
    expect(start2.http).toBe(200);
    const final = await statusOf();
    expect(['running', 'stopped']).toContain(final);
    if (final === 'stopped') expect((await act('start')).http).toBe(200);
    expect((await box.exec('echo alive')).stdout).toBe('alive\n');
  }, 300_000);

  it('answers every request racing a delete without a 5xx, and both of two concurrent deletes with success (regression)', async () => {
    const sb = await vr.sandboxes.create({ name: 'doomed' });
    const answers = await Promise.all([
      call('delete', `/api/sandboxes/${sb.id}`, { method: 'DELETE' }),
      act('pause', sb.id),
      act('stop', sb.id),
      act('start', sb.id),
      call('exec', `/api/sandboxes/${sb.id}/exec`, { json: { command: 'echo hi' } }),
      call('snapshot', `/api/sandboxes/${sb.id}/snapshot`),
      call('delete', `/api/sandboxes/${sb.id}`, { method: 'DELETE' }),
    ]);
    no5xx(answers);
    for (const a of answers.filter((x) => x.what === 'delete')) expect(a.http).toBe(200);
    for (const a of answers.filter((x) => x.http >= 400)) expect([404, 409], `${a.what}: ${a.error ?? ''}`).toContain(a.http);
    expect((await server.http(`/api/sandboxes/${sb.id}`, { apiKey })).status).toBe(404);
  }, 300_000);

  it('answers requests racing a stop or start the API is doing with 409 SANDBOX_NOT_RUNNING, never 502 "agent is not responding" (regression)', async () => {
    const base = `/api/sandboxes/${box.id}`;
    // A command in flight when the stop comes: it is visible in the process list once it runs.
    let settled: Answer | null = null;
    const inFlight = call('exec', `${base}/exec`, { json: { command: 'sleep 120' } }).then((a) => (settled = a));
    for (;;) {
      if (settled) throw new Error(`the command ended before the stop: ${JSON.stringify(settled)}`);
      if ((await processes()).some((p) => p.command.includes('sleep 120') && p.running)) break;
    }
    const burst = (): Array<Promise<Answer>> => [
      call('exec', `${base}/exec`, { json: { command: 'echo hi' } }),
      call('files', `${base}/files?path=/root`, { method: 'GET' }),
      call('download', `${base}/files/download?path=/etc/hostname`, { method: 'GET' }),
      call('watch', `${base}/files/watch`, { json: { path: '/root' } }),
    ];
    const stopping = act('stop');
    const during = burst();
    const stop = await stopping;
    const answers = [await inFlight, ...(await Promise.all(during))];
    expect(stop).toMatchObject({ http: 200, data: { status: 'stopped' } });
    for (const a of answers) {
      expect(a.http, `${a.what}: ${a.error ?? ''}`).not.toBe(502);
      if (a.http !== 200) expectNotRunning(a, /stopp/);
    }
    expectNotRunning(answers[0]!, /stopp/);

    // And while it starts again: each request runs or hears that the sandbox is not running yet.
    const starting = act('start');
    const duringStart = burst();
    expect(await starting).toMatchObject({ http: 200, data: { status: 'running' } });
    for (const a of await Promise.all(duringStart)) {
      expect(a.http, `${a.what}: ${a.error ?? ''}`).not.toBe(502);
      if (a.http !== 200) expectNotRunning(a, /stop|start/);
    }
    expect((await box.exec('echo back')).stdout).toBe('back\n');
  }, 300_000);

  it('answers commands/kill once the process is reaped: a list right after shows it finished with its exit code (regression: still running)', async () => {
    const base = `/api/sandboxes/${box.id}/commands`;
    // A plain command, one whose child ignores SIGTERM, and one whose descendant left the process
    // group holding the output pipe (only the process itself can be reaped then).
    const commands = ['sleep 300', "sh -c 'trap \"\" TERM; sleep 300'", 'setsid sleep 300 & sleep 300'];
    for (let round = 0; round < 3; round++) {
      for (const command of commands) {
        const started = await call('run', `${base}/run`, { json: { command } });
        expect(started.http, started.error).toBe(200);
        const pid = (started as unknown as { pid?: number; data?: { pid: number } }).pid ?? (started as unknown as { data: { pid: number } }).data.pid;
        const killed = await call('kill', `${base}/kill`, { json: { pid } });
        expect(killed.http, killed.error).toBe(200);
        expect(JSON.stringify(killed)).toContain(`Process ${pid} killed`);
        const row = (await processes()).find((p) => p.pid === pid);
        expect(row, command).toMatchObject({ running: false, exitCode: 137 });
        // A second kill of the finished process says so.
        expect(JSON.stringify(await call('kill', `${base}/kill`, { json: { pid } }))).toContain('had already exited');
      }
    }
  }, 300_000);

  it('reports a short-lived file among other operations as created then deleted in every repeat: never dropped, never renamed to itself, never deleted without its creation (regression)', async () => {
    // The file lives from no time at all to longer than the rename window, across the repeats.
    const lifetimes = ['0', '0.002', '0.005', '0.01', '0.02', '0.04', '0.08', '0'];
    for (const [round, lifetime] of lifetimes.entries()) {
      const dir = `/root/watch-${round}`;
      await box.files.mkdir(dir);
      const started = await call('watch', `/api/sandboxes/${box.id}/files/watch`, { json: { path: dir, recursive: true } });
      expect(started.http, started.error).toBe(200);
      const { sessionId } = (started as unknown as { data?: { sessionId: string }; sessionId?: string }).data ?? (started as unknown as { sessionId: string });
      // The watch is established once the start answered; the session keeps what happens until a client attaches.
      await box.exec(`cd ${dir} && echo 1 > a && sleep 0.05 && echo x > t && sleep ${lifetime} && rm t && echo 2 > b && sleep 0.05 && mv a c && rm b && touch done`);
      const events: WatchMessage[] = [];
      const ws = new WebSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch/${sessionId}/stream`, { headers: { 'x-api-key': apiKey } });
      await new Promise<void>((resolve, reject) => {
        ws.on('message', (m) => {
          const e = JSON.parse(m.toString()) as WatchMessage;
          events.push(e);
          if ('path' in e && e.path === `${dir}/done`) resolve(); // its creation, however labelled
        });
        ws.on('close', () => reject(new Error(`the watch stream closed before "done": ${JSON.stringify(events)}`)));
        ws.on('error', reject);
      });
      ws.removeAllListeners('close');
      ws.close();

      const name = (p: string) => p.slice(dir.length + 1);
      const summary = events.map((e) => ('path' in e ? `${e.type} ${name(e.path)}${e.type === 'renamed' ? ` from ${name(e.oldPath ?? '')}` : ''}` : e.type));
      const files = new Set<string>();
      for (const e of events) {
        if (e.type === 'renamed') {
          expect(e.oldPath, `round ${round}: ${summary.join(', ')}`).not.toBe(e.path);
          expect(files.has(name(e.oldPath ?? '')), `round ${round}: renamed from a file never reported: ${summary.join(', ')}`).toBe(true);
          files.delete(name(e.oldPath ?? ''));
          files.add(name(e.path));
        } else if (e.type === 'created') files.add(name(e.path));
        else if (e.type === 'deleted') {
          expect(files.has(name(e.path)), `round ${round}: deleted without its creation: ${summary.join(', ')}`).toBe(true);
          files.delete(name(e.path));
        }
      }
      expect([...files].sort(), `round ${round}: ${summary.join(', ')}`).toEqual(['c', 'done']);
      // The short-lived files: both events, in order, once, whatever else happened around them.
      for (const short of ['t', 'b']) {
        const of = summary.filter((line) => line.split(' ')[1] === short);
        expect(of, `round ${round} (t lived ${lifetime} s): ${summary.join(', ')}`).toEqual([`created ${short}`, `deleted ${short}`]);
      }
    }
  }, 300_000);
});
