import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { iterateSubscription } from '../shared/subscription-iterator.js';
import { openSocket } from './helpers/http-streams.js';
import { qemuSupport } from './helpers/qemu-support.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type ServerDirs, type TestServer } from './helpers/server.js';
import { until as pollUntil } from './helpers/until.js';

/**
 * Pause/resume and server restarts keep what runs in a sandbox: its files, a process started
 * before (same pid, still counting), a background command's handle (listed, attachable, waitable),
 * a terminal session with its scrollback, and a file-watch session (same id, still reporting).
 */

/** `until` (test/helpers/until.ts) with this file's bound and pace. */
const until = <T>(read: () => Promise<T>, ok: (v: T) => boolean, what: string, timeoutMs = 15_000): Promise<T> => pollUntil(read, ok, what, timeoutMs, 50);

/** Reads a streamed response body until its text matches `pattern`; returns the text. */
async function readUntil(res: Response, pattern: RegExp, timeoutMs = 15_000): Promise<string> {
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  let text = '';
  const timer = setTimeout(() => void reader.cancel(), timeoutMs);
  try {
    while (!pattern.test(text)) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`the stream ended before ${pattern}; got ${JSON.stringify(text.slice(-400))}`);
      text += decoder.decode(value, { stream: true });
    }
    return text;
  } finally {
    clearTimeout(timer);
    await reader.cancel().catch(() => {});
  }
}

/** What one round puts in the sandbox before a pause or restart, to be found intact after it. */
interface Round {
  n: number;
  jobPid: number;
  ptySession: string;
  watchSession: string;
}

describe.skipIf(!support.ok)('pause/resume and restarts keep everything', () => {
  let server: TestServer;
  let dirs: ServerDirs;
  let apiKey: string;
  let vr: VoidRunClient;
  let box: SandboxHandle;
  let counterPid: number;
  let rounds = 0;

  const api = (path: string, init: Parameters<TestServer['http']>[1] = {}) => server.http(`/api/sandboxes/${box.id}${path}`, { apiKey, ...init });
  const json = async <T>(res: Response): Promise<T> => {
    const text = await res.text();
    expect(res.status, text).toBe(200);
    return JSON.parse(text) as T;
  };
  const readCount = async () => Number((await box.exec('cat /tmp/count')).stdout.trim() || 0);

  /** A new server on the same state directories (the first one closed, its sandboxes left running). */
  async function restart(): Promise<void> {
    await server.close({ keepState: true });
    server = await startTestServer({}, dirs);
    vr = server.client(apiKey);
    box = await vr.sandboxes.get(box.id);
  }

  /** Starts a background job, a terminal session and a watch session, each with something to show. */
  async function prepare(): Promise<Round> {
    const n = ++rounds;
    const run = await json<{ pid: number }>(
      await api('/commands/run', { method: 'POST', json: { command: `echo job-start-${n}; while [ ! -f /tmp/go-${n} ]; do sleep 0.05; done; echo job-end-${n}; exit 7` } }),
    );
    const pty = await json<{ data: { sessionId: string } }>(await api('/pty/sessions', { method: 'POST', json: { cols: 80, rows: 24 } }));
    const ptySession = pty.data.sessionId;
    // The command's output (not its echoed input) is what the scrollback must keep: `$((…))` is only expanded by the shell.
    await json(await api(`/pty/sessions/${ptySession}/execute`, { method: 'POST', json: { command: `echo before-$((${n}*1000+1))` } }));
    await until(() => ptyBuffer(ptySession), (b) => b.includes(`before-${n * 1000 + 1}`), 'the terminal output before the pause');
    await box.exec(`mkdir -p /tmp/w${n}`);
    const watch = await json<{ data: { sessionId: string } }>(await api('/files/watch', { method: 'POST', json: { path: `/tmp/w${n}` } }));
    // Created while no client is attached: the session keeps it for the first client.
    await box.exec(`echo early > /tmp/w${n}/early.txt`);
    return { n, jobPid: run.pid, ptySession, watchSession: watch.data.sessionId };
  }

  const ptyBuffer = async (sessionId: string) => (await json<{ data: { output: string } }>(await api(`/pty/sessions/${sessionId}/buffer`))).data.output;

  /** Everything `round` (and the file and counter from the start) left is still there and still works. */
  async function verify(round: Round): Promise<void> {
    const { n } = round;
    // The file written at the start.
    expect((await box.exec('cat /data/kept.txt')).stdout).toBe('kept across pauses');
    // The counter: the same pid, still running, still counting.
    const processes = await box.commands.list();
    expect(processes.find((p) => p.pid === counterPid)).toMatchObject({ running: true });
    const count = await readCount();
    await until(readCount, (c) => c > count, 'the counter to keep counting');

    // The background job: listed with its pid, attach replays and streams, wait gets its exit code.
    const listed = await json<{ processes: Array<{ pid: number; running: boolean }> }>(await api('/commands/list'));
    expect(listed.processes.find((p) => p.pid === round.jobPid)).toMatchObject({ running: true });
    const attach = await api('/commands/attach', { method: 'POST', json: { pid: round.jobPid } });
    expect(attach.status).toBe(200);
    const streamed = readUntil(attach, /event: exit/);
    await box.exec(`touch /tmp/go-${n}`);
    const text = await streamed;
    expect(text).toContain(`job-start-${n}`);
    expect(text).toContain(`job-end-${n}`);
    expect(text).toMatch(/"exitCode":7/);
    expect((await json<{ exitCode: number }>(await api('/commands/wait', { method: 'POST', json: { pid: round.jobPid } }))).exitCode).toBe(7);

    // The terminal: re-listed with the same id, its scrollback kept, still taking input.
    const sessions = await json<{ data: { sessions: Array<{ id: string; alive: boolean }> } }>(await api('/pty/sessions'));
    expect(sessions.data.sessions.find((s) => s.id === round.ptySession)).toMatchObject({ alive: true });
    expect(await ptyBuffer(round.ptySession)).toContain(`before-${n * 1000 + 1}`);
    await json(await api(`/pty/sessions/${round.ptySession}/execute`, { method: 'POST', json: { command: `echo after-$((${n}*1000+2))` } }));
    await until(() => ptyBuffer(round.ptySession), (b) => b.includes(`after-${n * 1000 + 2}`), 'the terminal to answer after the resume');

    // The watch session: re-listed with the same id; it attaches, replays what it kept, and reports a file created now.
    const watches = await vr.trpc.files.watchSessions.query({ id: box.id });
    expect(watches.sessions.find((s) => s.id === round.watchSession)).toMatchObject({ path: `/tmp/w${n}` });
    const opened = await openSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch/${round.watchSession}/stream`, { 'x-api-key': apiKey });
    if (!('socket' in opened)) throw new Error(`the watch stream answered ${opened.status}: ${opened.body}`);
    try {
      await opened.socket.until(/early\.txt/);
      await box.exec(`echo late > /tmp/w${n}/late.txt`);
      const events = await opened.socket.until(/late\.txt/);
      expect(events).toMatch(/"type":"created","path":"\/tmp\/w\d+\/late\.txt"/);
    } finally {
      await opened.socket.close();
    }
  }

  async function pause(): Promise<void> {
    expect((await box.pause()).status).toBe('paused');
  }
  async function resume(): Promise<void> {
    expect((await box.resume()).status).toBe('running');
  }

  beforeAll(async () => {
    server = await startTestServer();
    dirs = server.dirs;
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Pause User', email: uniqueEmail('pause') })).apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'pause-box' });
    await box.exec('mkdir -p /data');
    await box.exec("printf 'kept across pauses' > /data/kept.txt");
    const counter = await box.commands.run('i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done');
    counterPid = counter.pid;
    await until(readCount, (c) => c > 0, 'the counter to start');
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('pause → resume keeps files, processes, command handles, terminals and watch sessions; a stream open across it continues', async () => {
    const round = await prepare();
    const attached = await api('/commands/attach', { method: 'POST', json: { pid: round.jobPid } });
    const across = readUntil(attached, /event: exit/, 30_000);
    await pause();
    expect((await box.refresh()).status).toBe('paused');
    await resume();
    await verify(round);
    expect(await across).toMatch(new RegExp(`job-start-${round.n}[\\s\\S]*job-end-${round.n}[\\s\\S]*"exitCode":7`));
  }, 60_000);

  it('two pauses in a row are one (the second answers paused), and pause/resume twice keeps everything', async () => {
    const round = await prepare();
    await pause();
    await pause();
    await resume();
    await pause();
    await resume();
    await verify(round);
  }, 60_000);

  it('a server restart while the sandbox runs keeps everything (re-listed with the same ids)', async () => {
    const round = await prepare();
    await restart();
    expect(box.info.status).toBe('running');
    await verify(round);
  }, 90_000);

  it('streams cut by a server restart continue after their last event id on the new server (SSE Last-Event-ID, tRPC lastEventId)', async () => {
    const n = ++rounds;
    const run = await json<{ pid: number }>(
      await api('/commands/run', { method: 'POST', json: { command: `echo one-${n}; while [ ! -f /tmp/go-${n} ]; do sleep 0.05; done; echo two-${n}; exit 3` } }),
    );
    const before = await readUntil(await api('/commands/attach', { method: 'POST', json: { pid: run.pid } }), new RegExp(`one-${n}[\\s\\S]*\\n\\n`));
    const lastSseId = [...before.matchAll(/^id: (.+)$/gm)].at(-1)![1]!;
    await box.exec(`mkdir -p /tmp/r${n}`);
    // Started over REST (answered once the watch is set), attached over tRPC from its first event.
    const { sessionId } = (await json<{ data: { sessionId: string } }>(await api('/files/watch', { method: 'POST', json: { path: `/tmp/r${n}` } }))).data;
    const watched = iterateSubscription<{ id: string; data: { type: string; path?: string } }>((h) =>
      vr.trpc.files.watch.subscribe({ id: box.id, path: `/tmp/r${n}`, lastEventId: `${sessionId}:0` }, h),
    );
    await box.exec(`echo a > /tmp/r${n}/a.txt`);
    let lastWatchId = '';
    for await (const e of watched) {
      if (e.data.path?.endsWith('/a.txt')) {
        lastWatchId = e.id;
        break;
      }
    }

    await restart();
    await box.exec(`echo b > /tmp/r${n}/b.txt; touch /tmp/go-${n}`);
    const after = await readUntil(await api('/commands/attach', { method: 'POST', headers: { 'last-event-id': lastSseId }, json: { pid: run.pid } }), /event: exit/);
    expect(after).toContain(`two-${n}`);
    expect(after).not.toContain(`one-${n}`);
    expect(after).toMatch(/"exitCode":3/);
    const resumed = iterateSubscription<{ id: string; data: { type: string; path?: string } }>((h) =>
      vr.trpc.files.watch.subscribe({ id: box.id, path: `/tmp/r${n}`, lastEventId: lastWatchId }, h),
    );
    const next = (await resumed.next()).value!;
    await resumed.return(undefined);
    expect(next.id.split(':')[0]).toBe(sessionId);
    expect(next.data).toMatchObject({ type: 'created', path: `/tmp/r${n}/b.txt` });
  }, 90_000);

  it("a watch session's overflow is one watch.overflow event however many clients replay it (as every client does on re-attaching after a restart)", async () => {
    type Event = { id: number; type: string; data: Record<string, unknown> };
    /** The sandbox's events after `after`, every page. */
    const eventsAfter = async (after: number): Promise<Event[]> => {
      const out: Event[] = [];
      for (;;) {
        const page = (await json<{ data: { events: Event[]; next: number } }>(await api(`/events?after=${after}&limit=1000`))).data;
        out.push(...page.events);
        if (!page.events.length) return out;
        after = page.next;
      }
    };
    const start = (await eventsAfter(0)).at(-1)?.id ?? 0;
    await box.exec('mkdir -p /tmp/ov');
    const { sessionId } = (await json<{ data: { sessionId: string } }>(await api('/files/watch', { method: 'POST', json: { path: '/tmp/ov' } }))).data;
    // More events than the session keeps (1,000): a client attaching from the start is told how many it missed.
    await box.exec('i=0; while [ $i -lt 1500 ]; do : > /tmp/ov/f$i; i=$((i+1)); done');
    const replay = async () => {
      const opened = await openSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch/${sessionId}/stream`, { 'x-api-key': apiKey });
      if (!('socket' in opened)) throw new Error(`the watch stream answered ${opened.status}`);
      await opened.socket.until(/\}/);
      await opened.socket.close();
      return JSON.parse(opened.socket.received[0]!) as { type: string; dropped?: number };
    };
    // Clients attach until two in a row are told the same overflow (the agent may still be recording events).
    const told = [await replay()];
    const sameOverflow = (x: { type: string; dropped?: number }, y: { type: string; dropped?: number }) => x.type === 'overflow' && y.type === 'overflow' && x.dropped === y.dropped;
    for (const deadline = Date.now() + 15_000; !sameOverflow(told.at(-1)!, told.at(-2) ?? { type: '' }); ) {
      if (Date.now() > deadline) throw new Error(`no two clients in a row were told the same overflow: ${JSON.stringify(told)}`);
      told.push(await replay());
    }
    const overflowsTold = new Set(told.filter((m) => m.type === 'overflow').map((m) => m.dropped));
    // A sandbox's events are stored in the order they were reported: once this command's are, the replays' are too.
    await box.exec('echo marker-after-replays');
    const events = await until(
      () => eventsAfter(start),
      (list) => list.some((e) => e.type === 'process.started' && String(e.data.command).includes('marker-after-replays')),
      'the marker command among the events',
    );
    // One event per overflow the clients were told of, not one per client told.
    expect(events.filter((e) => e.type === 'watch.overflow' && e.data.sessionId === sessionId)).toHaveLength(overflowsTold.size);
  }, 60_000);

  it('pause → server restart → resume on the new server keeps everything', async () => {
    const round = await prepare();
    await pause();
    await restart();
    expect(box.info.status).toBe('paused');
    await resume();
    await verify(round);
  }, 90_000);
});

describe.skipIf(!support.ok)('the time a sandbox spends paused does not count as idle or as running time', () => {
  let server: TestServer;
  let apiKey: string;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer({ PTY_IDLE_TIMEOUT_SEC: '3', WATCH_IDLE_TIMEOUT_SEC: '3' });
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Idle User', email: uniqueEmail('idle') })).apiKey;
    box = await server.client(apiKey).sandboxes.create({ name: 'idle-box' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('a terminal and a watch session without clients, and a command with a time limit, outlive a pause longer than their timeouts, then end on the running clock', async () => {
    const api = (path: string, init: Parameters<TestServer['http']>[1] = {}) => server.http(`/api/sandboxes/${box.id}${path}`, { apiKey, ...init });
    const data = async <T>(res: Response): Promise<T> => {
      const text = await res.text();
      expect(res.status, text).toBe(200);
      return JSON.parse(text) as T;
    };
    const watchIds = async () => (await data<{ data: { sessions: Array<{ id: string }> } }>(await api('/files/watch'))).data.sessions.map((s) => s.id);
    const ptyIds = async () => (await data<{ data: { sessions: Array<{ id: string }> } }>(await api('/pty/sessions'))).data.sessions.map((s) => s.id);

    // Each one's timer runs from here: 3 s with no client, 3 s of running time.
    const { sessionId: pty } = (await data<{ data: { sessionId: string } }>(await api('/pty/sessions', { method: 'POST', json: {} }))).data;
    const { sessionId: watch } = (await data<{ data: { sessionId: string } }>(await api('/files/watch', { method: 'POST', json: { path: '/tmp' } }))).data;
    const { pid } = await data<{ pid: number }>(await api('/commands/run', { method: 'POST', json: { command: 'sleep 60', timeout: 3 } }));
    expect((await box.pause()).status).toBe('paused');
    // Frozen for longer than every timeout: there is no event to wait for, only time to let pass.
    await new Promise((r) => setTimeout(r, 4500));
    expect((await box.resume()).status).toBe('running');

    expect(await ptyIds()).toContain(pty);
    expect(await watchIds()).toContain(watch);
    const listed = await data<{ processes: Array<{ pid: number; running: boolean }> }>(await api('/commands/list'));
    expect(listed.processes.find((p) => p.pid === pid)).toMatchObject({ running: true });

    // …and each still ends once its time has run while the sandbox runs.
    expect((await data<{ exitCode: number }>(await api('/commands/wait', { method: 'POST', json: { pid } }))).exitCode).toBe(124);
    await until(ptyIds, (ids) => !ids.includes(pty), 'the idle terminal session to end');
    await until(watchIds, (ids) => !ids.includes(watch), 'the idle watch session to end');
  }, 60_000);
});

const qemu = qemuSupport();

describe.skipIf(!qemu.ok)('a microVM (qemu driver) keeps a running process, its command handle and a file across pause/resume', () => {
  let server: TestServer;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DRIVER: 'qemu' });
    const apiKey = (await server.client().trpc.auth.register.mutate({ name: 'VM Pause', email: uniqueEmail('vmpause') })).apiKey;
    box = await server.client(apiKey).sandboxes.create({ name: 'vm-pause-box' });
  }, 240_000);
  afterAll(async () => {
    await server?.close();
  });

  it('pause → resume: the file is there, the counter has the same pid and keeps counting, wait gets its exit code', async () => {
    const readCount = async () => Number((await box.exec('cat /root/count')).stdout.trim() || 0);
    await box.exec("printf 'kept in the VM' > /root/kept.txt");
    const counter = await box.commands.run('i=0; while [ ! -f /root/stop ]; do i=$((i+1)); echo $i > /root/count.new; mv /root/count.new /root/count; sleep 0.1; done; exit 5');
    const before = await until(readCount, (c) => c > 0, 'the counter to start', 30_000);
    expect((await box.pause()).status).toBe('paused');
    expect((await box.resume()).status).toBe('running');
    expect((await box.exec('cat /root/kept.txt')).stdout).toBe('kept in the VM');
    expect((await box.commands.list()).find((p) => p.pid === counter.pid)).toMatchObject({ running: true });
    await until(readCount, (c) => c > before, 'the counter to keep counting', 30_000);
    await box.exec('touch /root/stop');
    expect(await counter.wait(30)).toBe(5);
  }, 120_000);
});
