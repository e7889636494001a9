import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostEventPoller } from '../server/services/host-events.js';
import { SandboxEventService } from '../server/services/sandbox-events.js';
import { newId } from '../server/store/ids.js';
import { openSqliteStore } from '../server/store/sqlite/store.js';
import { SANDBOX_NETWORK_NONE } from '../server/store/types.js';
import type { VoidRunClient } from '../client/index.js';
import type { SandboxEvent, SandboxEventPage } from '../shared/index.js';
import { openSocket, parseSse, type SseMessage } from './helpers/http-streams.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { until } from './helpers/until.js';

/** Reads an SSE response until `enough` holds for the events so far, then closes it. */
async function readSse(res: Response, enough: (events: SseMessage[]) => boolean, timeoutMs = 10_000): Promise<SseMessage[]> {
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  let text = '';
  const timer = setTimeout(() => void reader.cancel(), timeoutMs);
  try {
    for (;;) {
      const events = parseSse(text);
      if (enough(events)) return events;
      const { done, value } = await reader.read();
      if (done) return parseSse(text);
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    clearTimeout(timer);
    await reader.cancel().catch(() => {});
  }
}

describe.skipIf(!support.ok)('sandbox events', () => {
  let server: TestServer;
  let apiKey: string;
  let vr: VoidRunClient;

  const page = async (id: string, query = '', key = apiKey): Promise<SandboxEventPage> => {
    const res = await server.http(`/api/sandboxes/${id}/events${query}`, { apiKey: key });
    expect(res.status).toBe(200);
    return ((await res.json()) as { data: SandboxEventPage }).data;
  };
  const allEvents = async (id: string): Promise<SandboxEvent[]> => (await page(id, '?limit=1000')).events;
  const types = (events: SandboxEvent[]) => events.map((e) => e.type);
  const waitFor = (id: string, done: (events: SandboxEvent[]) => boolean, what: string) => until(() => allEvents(id), done, what);

  beforeAll(async () => {
    // Ports and OOM kills are read every second here (EVENTS_POLL_INTERVAL_SEC), so tests wait little.
    server = await startTestServer({ EVENTS_POLL_INTERVAL_SEC: '1' });
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Events', email: uniqueEmail('events') })).apiKey;
    vr = server.client(apiKey);
  }, 60_000);
  afterAll(async () => {
    await server?.close();
  });

  it('records the lifecycle in order with growing ids, pages with after=, and ends with sandbox.deleted', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-life' });
    await vr.trpc.sandbox.pause.mutate({ id: box.id });
    await vr.trpc.sandbox.resume.mutate({ id: box.id });
    await vr.trpc.sandbox.stop.mutate({ id: box.id });
    await vr.trpc.sandbox.start.mutate({ id: box.id });
    await vr.trpc.sandbox.updateNetwork.mutate({ id: box.id, egress: 'deny' });
    const expected = ['sandbox.created', 'sandbox.started', 'sandbox.paused', 'sandbox.resumed', 'sandbox.stopped', 'sandbox.started', 'network.policy_changed'];
    const events = await waitFor(box.id, (e) => e.length >= expected.length, 'the lifecycle events');
    expect(types(events)).toEqual(expected);
    expect(events.map((e) => e.id)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(events.every((e) => e.sandboxId === box.id && !Number.isNaN(Date.parse(e.createdAt)))).toBe(true);
    expect(events[6]!.data).toMatchObject({ network: { egress: 'deny' } });

    // Paging: after= and limit, with next and hasMore.
    const first = await page(box.id, '?limit=3');
    expect([first.events.map((e) => e.id), first.next, first.hasMore]).toEqual([[1, 2, 3], 3, true]);
    const second = await page(box.id, `?after=${first.next}&limit=3`);
    expect([second.events.map((e) => e.id), second.next, second.hasMore]).toEqual([[4, 5, 6], 6, true]);
    const last = await page(box.id, `?after=${second.next}&limit=3`);
    expect([last.events.map((e) => e.id), last.next, last.hasMore]).toEqual([[7], 7, false]);
    const empty = await page(box.id, '?after=7');
    expect([empty.events, empty.next, empty.hasMore]).toEqual([[], 7, false]);
    // The same page over tRPC.
    expect((await vr.trpc.sandbox.eventsPage.query({ id: box.id, after: 5, limit: 1 })).events.map((e) => e.type)).toEqual(['sandbox.started']);

    // A live SSE stream from the last id sees the deletion as its last event, and ends.
    const stream = await fetch(`${server.url}/api/sandboxes/${box.id}/events/stream`, { headers: { 'x-api-key': apiKey, 'last-event-id': '7' } });
    expect(stream.status).toBe(200);
    expect(stream.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const reading = readSse(stream, (e) => e.some((m) => m.event === 'sandbox.deleted'));
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
    const tail = await reading;
    expect(tail.map((m) => [m.id, m.event])).toEqual([['8', 'sandbox.deleted']]);
    expect(JSON.parse(tail[0]!.data)).toMatchObject({ id: 8, sandboxId: box.id, type: 'sandbox.deleted' });
    // The stream went with the sandbox.
    expect((await server.http(`/api/sandboxes/${box.id}/events`, { apiKey })).status).toBe(404);
  });

  it('resumes an SSE stream from Last-Event-ID with exactly the events it missed', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-sse' });
    await waitFor(box.id, (e) => e.length >= 2, 'created and started');
    const url = `${server.url}/api/sandboxes/${box.id}/events/stream`;
    const firstRead = await readSse(await fetch(url, { headers: { 'x-api-key': apiKey } }), (e) => e.length >= 2);
    expect(firstRead.map((m) => m.event)).toEqual(['sandbox.created', 'sandbox.started']);
    const lastSeen = firstRead.at(-1)!.id!;
    // Missed while disconnected:
    await vr.trpc.sandbox.pause.mutate({ id: box.id });
    await vr.trpc.sandbox.resume.mutate({ id: box.id });
    await waitFor(box.id, (e) => e.length >= 4, 'pause and resume');
    const resumed = await fetch(url, { headers: { 'x-api-key': apiKey, 'last-event-id': lastSeen } });
    const reading = readSse(resumed, (e) => e.some((m) => m.event === 'sandbox.stopped'));
    await vr.trpc.sandbox.stop.mutate({ id: box.id }); // live, after the replay
    const missed = await reading;
    expect(missed.map((m) => [m.id, m.event])).toEqual([['3', 'sandbox.paused'], ['4', 'sandbox.resumed'], ['5', 'sandbox.stopped']]);
    // ?after= is the same for clients that cannot set headers.
    const byQuery = await readSse(await fetch(`${url}?after=4`, { headers: { 'x-api-key': apiKey } }), (e) => e.length >= 1);
    expect(byQuery.map((m) => m.id)).toEqual(['5']);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it('resumes the tRPC subscription sandbox.events from lastEventId (tracked ids)', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-trpc' });
    await waitFor(box.id, (e) => e.length >= 2, 'created and started');
    const collect = (lastEventId: string | null, count: number) =>
      new Promise<Array<{ id: string; data: SandboxEvent }>>((resolve, reject) => {
        const got: Array<{ id: string; data: SandboxEvent }> = [];
        const sub = vr.trpc.sandbox.events.subscribe(
          { id: box.id, lastEventId },
          {
            onData: (e) => {
              got.push(e);
              if (got.length >= count) {
                sub.unsubscribe();
                resolve(got);
              }
            },
            onError: reject,
          },
        );
      });
    const first = await collect(null, 2);
    expect(first.map((e) => [e.id, e.data.type])).toEqual([['1', 'sandbox.created'], ['2', 'sandbox.started']]);
    await vr.trpc.sandbox.pause.mutate({ id: box.id });
    const next = collect(first.at(-1)!.id, 2);
    await vr.trpc.sandbox.resume.mutate({ id: box.id });
    expect((await next).map((e) => [e.id, e.data.type])).toEqual([['3', 'sandbox.paused'], ['4', 'sandbox.resumed']]);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it('reports process start and exit (exit code, signal) for a foreground exec, a streamed one and a background command nobody waits on', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-proc' });
    const ofType = (events: SandboxEvent[], type: string) => events.filter((e) => e.type === type);
    const ran = await vr.trpc.exec.run.mutate({ id: box.id, command: 'sh', args: ['-c', 'exit 3'] });
    expect('exitCode' in ran && ran.exitCode).toBe(3);
    let events = await waitFor(box.id, (e) => ofType(e, 'process.exited').length >= 1, 'the foreground exit');
    expect(ofType(events, 'process.started')[0]!.data).toEqual({ command: 'sh -c exit 3', background: false });
    expect(ofType(events, 'process.exited')[0]!.data).toEqual({ command: 'sh -c exit 3', background: false, exitCode: 3, signal: null, timedOut: false, oom: false });

    // Background: started through the API, never waited for; its exit is reported anyway.
    const { pid } = await vr.trpc.commands.run.mutate({ id: box.id, command: 'sh', args: ['-c', 'sleep 0.2; exit 5'], timeout: 0 });
    events = await waitFor(box.id, (e) => ofType(e, 'process.exited').some((x) => x.data.pid === pid), 'the background exit');
    expect(ofType(events, 'process.started').find((x) => x.data.pid === pid)!.data).toMatchObject({ background: true, command: 'sh -c sleep 0.2; exit 5' });
    expect(ofType(events, 'process.exited').find((x) => x.data.pid === pid)!.data).toMatchObject({ pid, background: true, exitCode: 5, signal: null });

    // Killed: the signal is reported.
    const sleeper = await vr.trpc.commands.run.mutate({ id: box.id, command: 'sleep', args: ['600'], timeout: 0 });
    await vr.trpc.commands.kill.mutate({ id: box.id, pid: sleeper.pid });
    events = await waitFor(box.id, (e) => ofType(e, 'process.exited').some((x) => x.data.pid === sleeper.pid), 'the killed exit');
    expect(ofType(events, 'process.exited').find((x) => x.data.pid === sleeper.pid)!.data).toMatchObject({ exitCode: 137, signal: 'SIGKILL', oom: false });

    // A streamed exec (SSE) reports its pid too.
    const sse = await fetch(`${server.url}/api/sandboxes/${box.id}/exec-stream`, { method: 'POST', headers: { 'x-api-key': apiKey, 'content-type': 'application/json' }, body: JSON.stringify({ command: 'echo hi' }) });
    const streamed = await readSse(sse, (e) => e.some((m) => m.event === 'exit'));
    const streamedPid = JSON.parse(streamed.find((m) => m.event === 'started')!.data).pid as number;
    events = await waitFor(box.id, (e) => ofType(e, 'process.exited').some((x) => x.data.pid === streamedPid), 'the streamed exit');
    expect(ofType(events, 'process.exited').find((x) => x.data.pid === streamedPid)!.data).toMatchObject({ exitCode: 0, background: false, command: 'echo hi' });
    // Ids only grow.
    expect(events.map((e) => e.id)).toEqual(events.map((_, i) => i + 1));
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it('a foreground exec whose call fails (its sandbox stopped under it) reports neither process.started nor process.exited', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-proc-failed' });
    const exec = (command: string) => server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command } });
    const failed = exec('sleep 30').then((res) => res.status);
    // The command runs (the agent started it) before its sandbox is stopped under it.
    await until(() => exec('grep -qx sleep /proc/[0-9]*/comm').then(async (res) => (await res.json()) as { data?: { exitCode?: number } }), (r) => r.data?.exitCode === 0, 'sleep running');
    await vr.trpc.sandbox.stop.mutate({ id: box.id });
    expect(await failed).not.toBe(200);
    // Events are stored in order: anything reported for the command would come before the stop.
    const events = await waitFor(box.id, (e) => e.some((x) => x.type === 'sandbox.stopped'), 'sandbox.stopped');
    expect(events.filter((e) => e.type.startsWith('process.') && e.data.command === 'sleep 30')).toEqual([]);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it('reports terminals opened and closed (a kill, and a shell that exits by itself, once each)', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-pty' });
    const { sessionId } = await vr.trpc.pty.create.mutate({ id: box.id, cols: 100, rows: 30 });
    await vr.trpc.pty.kill.mutate({ id: box.id, sessionId });
    const events = await waitFor(box.id, (e) => e.some((x) => x.type === 'terminal.closed'), 'terminal.closed');
    expect(events.filter((e) => e.type.startsWith('terminal.')).map((e) => [e.type, e.data])).toEqual([
      ['terminal.opened', { sessionId, cols: 100, rows: 30 }],
      ['terminal.closed', { sessionId }],
    ]);
    // A shell that exits while a client is attached: closed once, with its exit code, though two clients saw it.
    const second = await vr.trpc.pty.create.mutate({ id: box.id, cols: 80, rows: 24 });
    const attach = () =>
      new Promise<void>((resolve, reject) => {
        const sub = vr.trpc.pty.attach.subscribe(
          { id: box.id, sessionId: second.sessionId },
          {
            onData: (e) => {
              if (e.data.type === 'exit') {
                sub.unsubscribe();
                resolve();
              }
            },
            onError: reject,
            onComplete: resolve,
          },
        );
      });
    const clients = [attach(), attach()];
    await vr.trpc.pty.write.mutate({ id: box.id, sessionId: second.sessionId, data: 'exit 7\n' });
    await Promise.all(clients);
    const after = await waitFor(box.id, (e) => e.filter((x) => x.type === 'terminal.closed').length >= 2, 'the second terminal.closed');
    expect(after.filter((e) => e.type === 'terminal.closed' && e.data.sessionId === second.sessionId).map((e) => e.data)).toEqual([{ sessionId: second.sessionId, exitCode: 7 }]);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it("background commands past a sandbox's share of exit watchers still get process.exited (from its process list), and another org's commands keep their watchers", async () => {
    const box = await vr.sandboxes.create({ name: 'ev-watchers' });
    // The sandbox's share (100) taken by commands that outlive the test.
    for (let i = 0; i < 100; i += 10) await Promise.all(Array.from({ length: 10 }, () => vr.trpc.commands.run.mutate({ id: box.id, command: 'sleep', args: ['600'], timeout: 0 })));
    const late = await vr.trpc.commands.run.mutate({ id: box.id, command: 'sh', args: ['-c', 'sleep 0.3; exit 3'], timeout: 0 });
    const exited = await waitFor(box.id, (e) => e.some((x) => x.type === 'process.exited' && x.data.pid === late.pid), 'the late command\'s process.exited');
    expect(exited.find((x) => x.type === 'process.exited' && x.data.pid === late.pid)!.data).toMatchObject({ exitCode: 3, background: true });
    expect(server.logLines.some((l) => l.includes("past the exit watchers' shares"))).toBe(true);
    // Another org: its own share, a watcher at once.
    const other = server.client((await server.client().trpc.auth.register.mutate({ name: 'Events B', email: uniqueEmail('events-b') })).apiKey);
    const theirs = await other.sandboxes.create({ name: 'ev-watchers-b' });
    const cmd = await other.trpc.commands.run.mutate({ id: theirs.id, command: 'sh', args: ['-c', 'exit 7'], timeout: 0 });
    const page = async () => (await other.trpc.sandbox.eventsPage.query({ id: theirs.id, limit: 1000 })).events;
    const theirEvents = await until(page, (e) => e.some((x) => x.type === 'process.exited' && x.data.pid === cmd.pid), "the other org's process.exited");
    expect(theirEvents.find((x) => x.type === 'process.exited')!.data).toMatchObject({ exitCode: 7 });
    await other.trpc.sandbox.delete.mutate({ id: theirs.id });
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  }, 120_000);

  it("a sandbox deleted by its timeout takes its stream with it (the tombstone's 410 covers the events; none stay unreadable in the store)", async () => {
    const box = await vr.sandboxes.create({ name: 'ev-timeout-delete', timeout: 1, onTimeout: 'delete' });
    await until(async () => (await server.http(`/api/sandboxes/${box.id}/events`, { apiKey })).status, (s) => s === 410, 'the 410');
    await server.app.services.events.flush();
    expect(await server.app.store.sandboxEvents.lastSeq(box.id)).toBe(0);
  });

  it('reports ports opening and closing, read on the host', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-port' });
    const listener = await vr.trpc.commands.run.mutate({ id: box.id, command: 'perl', args: ['-MIO::Socket::INET', '-e', 'my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 8123, Listen => 5, ReuseAddr => 1) or die; sleep 600'], timeout: 0 });
    await waitFor(box.id, (e) => e.some((x) => x.type === 'port.opened' && x.data.port === 8123), 'port.opened 8123');
    await vr.trpc.commands.kill.mutate({ id: box.id, pid: listener.pid });
    const events = await waitFor(box.id, (e) => e.some((x) => x.type === 'port.closed' && x.data.port === 8123), 'port.closed 8123');
    expect(events.filter((e) => e.type.startsWith('port.')).map((e) => [e.type, e.data.port])).toEqual([
      ['port.opened', 8123],
      ['port.closed', 8123],
    ]);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it("reports an OOM kill: the process's exit says oom, and the sandbox gets sandbox.oom_killed (host cgroup counter)", async () => {
    // 64 MiB at a time: each allocation succeeds (no overcommit refusal on a busy host) until the cgroup's limit kills it.
    const box = await vr.sandboxes.create({ name: 'ev-oom', mem: 1024 });
    const r = await vr.trpc.exec.run.mutate({ id: box.id, command: 'perl', args: ['-e', 'my @hog; push @hog, "a" x (64 * 1024 * 1024) while 1'] });
    // Killed by the cgroup's OOM killer (SIGKILL), not refused memory by the host (perl's "Out of memory!", exit 1).
    expect('exitCode' in r && r.exitCode, JSON.stringify(r).slice(0, 500)).toBe(137);
    // The poller and the exec report independently: either may be stored first.
    const events = await waitFor(box.id, (e) => e.some((x) => x.type === 'sandbox.oom_killed') && e.some((x) => x.type === 'process.exited'), 'sandbox.oom_killed and process.exited');
    expect(events.find((e) => e.type === 'process.exited')!.data).toMatchObject({ exitCode: 137, signal: 'SIGKILL', oom: true });
    expect(events.find((e) => e.type === 'sandbox.oom_killed')!.data).toMatchObject({ kills: 1, total: 1 });
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it("reports a watch session's overflow: a client attaching after more events than the session keeps", async () => {
    const box = await vr.sandboxes.create({ name: 'ev-watch' });
    await vr.trpc.exec.run.mutate({ id: box.id, command: 'mkdir', args: ['-p', '/root/w'] });
    const { sessionId } = await vr.trpc.files.startWatch.mutate({ id: box.id, path: '/root/w' });
    // More files than the session keeps events of (1,000): a client attaching from the start missed some.
    await vr.trpc.exec.run.mutate({ id: box.id, command: 'sh', args: ['-c', 'i=0; while [ $i -lt 1500 ]; do : > /root/w/f$i; i=$((i+1)); done'] });
    const firstMessage = async () => {
      const opened = await openSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch/${sessionId}/stream`, { 'x-api-key': apiKey });
      if (!('socket' in opened)) throw new Error(`watch stream answered ${opened.status}`);
      await opened.socket.until(/\}/);
      const first = JSON.parse(opened.socket.received[0]!) as { type: string };
      await opened.socket.close();
      return first;
    };
    // The agent records the 1,500 events as they come: attach until the session has dropped some.
    await until(firstMessage, (m) => m.type === 'overflow', 'an overflow at attach');
    const events = await waitFor(box.id, (e) => e.some((x) => x.type === 'watch.overflow'), 'watch.overflow');
    expect(events.find((e) => e.type === 'watch.overflow')!.data).toMatchObject({ sessionId });
    expect(events.find((e) => e.type === 'watch.overflow')!.data.dropped).toBeGreaterThan(0);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it("answers 404 for another org's sandbox on every face", async () => {
    const box = await vr.sandboxes.create({ name: 'ev-private' });
    const otherKey = (await server.client().trpc.auth.register.mutate({ name: 'Other', email: uniqueEmail('events-other') })).apiKey;
    const other = server.client(otherKey);
    expect((await server.http(`/api/sandboxes/${box.id}/events`, { apiKey: otherKey })).status).toBe(404);
    expect((await server.http(`/api/sandboxes/${box.id}/events/stream`, { apiKey: otherKey })).status).toBe(404);
    await expect(
      new Promise((resolve, reject) => {
        other.trpc.sandbox.events.subscribe({ id: box.id }, { onData: resolve, onError: reject });
      }),
    ).rejects.toMatchObject({ code: 'SANDBOX_NOT_FOUND' });
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });

  it('refuses hostile and oversized inputs with a 400 saying what to send', async () => {
    const box = await vr.sandboxes.create({ name: 'ev-inputs' });
    for (const query of ['?after=-1', '?after=abc', '?limit=0', '?limit=100000', '?after=1e400', `?after=${'9'.repeat(40)}`]) {
      const res = await server.http(`/api/sandboxes/${box.id}/events${query}`, { apiKey });
      expect(res.status, query).toBe(400);
    }
    for (const lastEventId of ['abc', '-1', '1:2', '9'.repeat(40), '1 OR 1=1']) {
      const res = await server.http(`/api/sandboxes/${box.id}/events/stream`, { apiKey, headers: { 'last-event-id': lastEventId } });
      expect(res.status, lastEventId).toBe(400);
      expect(((await res.json()) as { error: string }).error).toMatch(/^Invalid Last-Event-ID/);
    }
    const res = await server.http(`/api/sandboxes/${box.id}/events/stream?after=x`, { apiKey });
    expect(res.status).toBe(400);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
  });
});

describe.skipIf(!support.ok)('sandbox events across a server restart', () => {
  it('keeps the events and continues their ids after the store’s last one', async () => {
    const first = await startTestServer({ HEALTH_ENABLED: 'false' });
    const apiKey = (await first.client().trpc.auth.register.mutate({ name: 'Restart', email: uniqueEmail('events-restart') })).apiKey;
    const box = await first.client(apiKey).sandboxes.create({ name: 'ev-restart' });
    await first.client(apiKey).trpc.sandbox.stop.mutate({ id: box.id });
    await until(
      async () => ((await (await first.http(`/api/sandboxes/${box.id}/events`, { apiKey })).json()) as { data: SandboxEventPage }).data.events.length,
      (n) => n >= 3,
      'three events',
    );
    await first.close({ keepState: true });
    const second = await startTestServer({ HEALTH_ENABLED: 'false' }, first.dirs);
    try {
      const vr = second.client(apiKey);
      await vr.trpc.sandbox.start.mutate({ id: box.id });
      const events = await until(
        async () => (await vr.trpc.sandbox.eventsPage.query({ id: box.id })).events,
        (e) => e.length >= 4,
        'the event after the restart',
      );
      expect(events.map((e) => [e.id, e.type])).toEqual([
        [1, 'sandbox.created'],
        [2, 'sandbox.started'],
        [3, 'sandbox.stopped'],
        [4, 'sandbox.started'],
      ]);
      await vr.trpc.sandbox.delete.mutate({ id: box.id });
    } finally {
      await second.close();
    }
  }, 120_000);
});

describe.skipIf(!support.ok)('sandbox event retention', () => {
  it('keeps the newest EVENTS_RETENTION events of a sandbox, its lifecycle events longer (pruned in the background); ids go on growing', async () => {
    const server = await startTestServer({ EVENTS_RETENTION: '10', EVENTS_PRUNE_INTERVAL_SEC: '1', HEALTH_ENABLED: 'false' });
    try {
      const apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Retention', email: uniqueEmail('events-retention') })).apiKey;
      const vr = server.client(apiKey);
      const box = await vr.sandboxes.create({ name: 'ev-retention' });
      for (let i = 0; i < 6; i++) await vr.trpc.exec.run.mutate({ id: box.id, command: 'true' });
      // 14 events written (created, started, 6 × process started and exited): ids 5 to 14 stay, and the lifecycle ones (1, 2).
      const kept = await until(
        async () => (await vr.trpc.sandbox.eventsPage.query({ id: box.id, limit: 1000 })).events.map((e) => e.id),
        (ids) => ids[2] === 5,
        'the prune',
      );
      expect(kept).toEqual([1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
      await vr.trpc.sandbox.pause.mutate({ id: box.id });
      const next = await until(
        async () => (await vr.trpc.sandbox.eventsPage.query({ id: box.id, after: 14 })).events,
        (e) => e.length === 1,
        'the next event',
      );
      expect(next.map((e) => [e.id, e.type])).toEqual([[15, 'sandbox.paused']]);
      await vr.trpc.sandbox.delete.mutate({ id: box.id });
    } finally {
      await server.close();
    }
  }, 120_000);
});

describe.skipIf(!support.ok)('sandbox event rate bound', () => {
  it('a sandbox flapping ports cannot flood its stream past EVENTS_SANDBOX_BURST (one events.dropped counts the rest), and its lifecycle events are kept', async () => {
    const server = await startTestServer({ EVENTS_SANDBOX_BURST: '20', EVENTS_SANDBOX_RATE: '1', EVENTS_POLL_INTERVAL_SEC: '1', EVENTS_RETENTION: '10', EVENTS_PRUNE_INTERVAL_SEC: '1', HEALTH_ENABLED: 'false' });
    try {
      const apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Flapper', email: uniqueEmail('events-flap') })).apiKey;
      const vr = server.client(apiKey);
      const box = await vr.sandboxes.create({ name: 'ev-flap' });
      const flap = 'for $r (1..3) { @s=(); for $p (20000..20199) { $x=IO::Socket::INET->new(LocalAddr=>"127.0.0.1", LocalPort=>$p, Listen=>1, ReuseAddr=>1) or next; push @s,$x } select(undef,undef,undef,1.5); close($_) for @s; select(undef,undef,undef,1.5) }';
      await vr.trpc.exec.run.mutate({ id: box.id, command: 'perl', args: ['-MIO::Socket::INET', '-e', flap], timeout: 30 });
      const all = async () => (await vr.trpc.sandbox.eventsPage.query({ id: box.id, limit: 1000 })).events;
      const events = await until(all, (e) => e.some((x) => x.type === 'events.dropped'), 'events.dropped');
      const first = events.find((e) => e.type === 'events.dropped')!;
      // Up to the report: the burst of port events (and the command's process.started), nothing more.
      expect(events.filter((e) => e.id < first.id && e.type !== 'sandbox.created' && e.type !== 'sandbox.started').length).toBeLessThanOrEqual(20);
      const { dropped, types } = first.data as { dropped: number; types: Record<string, number> };
      expect(dropped).toBeGreaterThanOrEqual(100);
      expect(Object.keys(types).every((t) => t === 'port.opened' || t === 'port.closed')).toBe(true);
      expect(Object.values(types).reduce((a, b) => a + b, 0)).toBe(dropped);
      await vr.trpc.sandbox.stop.mutate({ id: box.id });
      // Retention (10) prunes the port events; the lifecycle events stay.
      const kept = await until(all, (e) => e.filter((x) => !x.type.startsWith('sandbox.')).length <= 10 && e.some((x) => x.type === 'sandbox.stopped'), 'the prune');
      expect(kept.filter((e) => e.type.startsWith('sandbox.')).map((e) => e.type)).toEqual(['sandbox.created', 'sandbox.started', 'sandbox.stopped']);
      await vr.trpc.sandbox.delete.mutate({ id: box.id });
    } finally {
      await server.close();
    }
  }, 120_000);
});

describe.skipIf(!support.ok)('sandbox event streams and ORG_MAX_STREAMS', () => {
  it('holds one of the org\'s stream slots per open event stream: past the cap a 429 naming it, and the slot frees when the stream closes', async () => {
    const server = await startTestServer({ ORG_MAX_STREAMS: '1', HEALTH_ENABLED: 'false' });
    try {
      const apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Streams', email: uniqueEmail('events-streams') })).apiKey;
      const box = await server.client(apiKey).sandboxes.create({ name: 'ev-streams' });
      const url = `${server.url}/api/sandboxes/${box.id}/events/stream`;
      const abort = new AbortController();
      const first = await fetch(url, { headers: { 'x-api-key': apiKey }, signal: abort.signal });
      expect(first.status).toBe(200);
      const refused = await fetch(url, { headers: { 'x-api-key': apiKey } });
      expect(refused.status).toBe(429);
      expect(((await refused.json()) as { error: string }).error).toMatch(/ORG_MAX_STREAMS=1/);
      abort.abort();
      const again = await until(
        async () => {
          const res = await fetch(url, { headers: { 'x-api-key': apiKey } });
          if (res.status !== 200) await res.body?.cancel();
          return res;
        },
        (res) => res.status === 200,
        'the slot to free',
      );
      await again.body?.cancel();
      // The JSON page is no stream: it takes no slot.
      expect((await server.http(`/api/sandboxes/${box.id}/events`, { apiKey })).status).toBe(200);
      await server.client(apiKey).trpc.sandbox.delete.mutate({ id: box.id });
    } finally {
      await server.close();
    }
  }, 120_000);
});

describe('HostEventPoller (a driver stub: the host reads cannot fail on demand here)', () => {
  it("stops following a sandbox whose read fails once its record says it no longer runs (a dropped sandbox.deleted), without a warning per poll", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-poller-'));
    const store = openSqliteStore(dir);
    const lines: string[] = [];
    const log = pino({ level: 'info', base: undefined }, { write: (l: string) => void lines.push(l) });
    const orgId = newId();
    const running = await store.sandboxes.create({ name: 'gone', orgId, createdBy: newId(), imageId: newId(), ip: '', cpu: 1, mem: 1024, diskMb: 1, status: 'running', envVars: {}, network: SANDBOX_NETWORK_NONE, labels: {} });
    let reads = 0;
    const driver = { name: 'stub', listeningPorts: async () => (reads++, Promise.reject(new Error('no such process'))) } as never;
    const poller = new HostEventPoller({ driver, sandboxes: store.sandboxes, events: { emit() {} }, onWritten() {}, intervalMs: 3_600_000, concurrency: 1, log });
    try {
      await poller.start();
      await poller.poll();
      // Still running by its record: the failure is the host's, logged.
      expect(lines.filter((l) => l.includes('could not read sandbox ports'))).toHaveLength(1);
      await store.sandboxes.delete(orgId, running.id);
      await poller.poll();
      const before = reads;
      await poller.poll();
      await poller.poll();
      expect(reads).toBe(before);
      expect(lines.filter((l) => l.includes('could not read sandbox ports'))).toHaveLength(1);
    } finally {
      await poller.stop();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('SandboxEventService on a real SQLite store', () => {
  const open = (maxQueued = 10_000, rate = { perSecond: 1_000_000, burst: 1_000_000 }, retention = 10_000) => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-events-'));
    const store = openSqliteStore(dir);
    const lines: string[] = [];
    const log = pino({ level: 'info', base: undefined }, { write: (l: string) => void lines.push(l) });
    const service = new SandboxEventService({ repository: store.sandboxEvents, authorize: async () => {}, log, retention, maxQueued, pruneIntervalMs: 60_000, rate });
    return { dir, store, service, lines, cleanup: async () => (await service.close(), await store.close(), rmSync(dir, { recursive: true, force: true })) };
  };

  it('writes each sandbox\'s events in the order reported, ids 1, 2, 3 … per sandbox, however they interleave', async () => {
    const { store, service, cleanup } = open();
    const ids = [newId(), newId(), newId()];
    for (let i = 0; i < 200; i++) for (const sandboxId of ids) service.emit({ sandboxId, orgId: 'o', type: 'process.started', data: { i } });
    await service.flush();
    for (const id of ids) {
      const rows = await store.sandboxEvents.listAfter(id, 0, 1000);
      expect(rows.map((r) => r.seq)).toEqual(rows.map((_, i) => i + 1));
      expect(rows.map((r) => r.data.i)).toEqual(rows.map((_, i) => i));
    }
    await cleanup();
  });

  it("a sandbox flooding port events cannot push its stream past EVENTS_SANDBOX_BURST (the rest is one events.dropped with counts), another sandbox's stream is untouched, and retention keeps lifecycle events", async () => {
    const { store, service, cleanup } = open(100_000, { perSecond: 1, burst: 50 }, 10);
    const [flood, quiet] = [newId(), newId()];
    service.emit({ sandboxId: flood, orgId: 'o', type: 'sandbox.created' });
    for (let i = 0; i < 5000; i++) service.emit({ sandboxId: flood, orgId: 'o', type: i % 2 ? 'port.closed' : 'port.opened', data: { port: 20_000 + (i >> 1) } });
    service.emit({ sandboxId: flood, orgId: 'o', type: 'sandbox.stopped' });
    for (let i = 0; i < 30; i++) service.emit({ sandboxId: quiet, orgId: 'o', type: 'process.started', data: { i } });
    await service.flush();
    let rows = await store.sandboxEvents.listAfter(flood, 0, 10_000);
    expect(rows.map((r) => r.type)).toEqual(['sandbox.created', ...Array.from({ length: 50 }, (_, i) => (i % 2 ? 'port.closed' : 'port.opened')), 'sandbox.stopped']);
    expect((await store.sandboxEvents.listAfter(quiet, 0, 100)).length).toBe(30);
    // Once a token is back, one event says what was dropped.
    for (let i = 0; i < 100 && !rows.some((r) => r.type === 'events.dropped'); i++) {
      await new Promise((r) => setTimeout(r, 50));
      rows = await store.sandboxEvents.listAfter(flood, 0, 10_000);
    }
    const dropped = rows.filter((r) => r.type === 'events.dropped');
    expect(dropped).toHaveLength(1);
    expect(dropped[0]!.data).toMatchObject({ dropped: 4950, types: { 'port.opened': 2475, 'port.closed': 2475 } });
    // Retention (10 here) prunes the port events first: the lifecycle ones stay.
    for (let i = 0; i < 40; i++) service.emit({ sandboxId: flood, orgId: 'o', type: 'sandbox.paused' });
    await service.flush();
    await service.prune();
    rows = await store.sandboxEvents.listAfter(flood, 0, 10_000);
    expect(rows.filter((r) => r.type.startsWith('port.'))).toHaveLength(0);
    expect(rows.filter((r) => r.type === 'sandbox.created' || r.type === 'sandbox.stopped')).toHaveLength(2);
    await cleanup();
  });

  it('drops a report that arrives after its sandbox\'s stream was deleted (no new stream for a deleted sandbox)', async () => {
    const { store, service, cleanup } = open();
    const id = newId();
    service.emit({ sandboxId: id, orgId: 'o', type: 'sandbox.created' });
    service.emit({ sandboxId: id, orgId: 'o', type: 'sandbox.deleted' });
    service.deleteForSandbox(id);
    service.emit({ sandboxId: id, orgId: 'o', type: 'process.exited', data: { exitCode: 0 } });
    await service.flush();
    expect(await store.sandboxEvents.lastSeq(id)).toBe(0);
    await cleanup();
  });

  it('removes at startup the streams of sandboxes that have no record (a deletion cut short), and only those', async () => {
    const { store, service, cleanup } = open();
    const [kept, orphan] = [newId(), newId()];
    for (const sandboxId of [kept, orphan]) await store.sandboxEvents.append({ sandboxId, seq: 1, orgId: 'o', type: 'sandbox.created', data: {}, createdAt: new Date() });
    expect(await service.removeOrphans(new Set([kept]))).toBe(1);
    expect(await store.sandboxEvents.lastSeq(kept)).toBe(1);
    expect(await store.sandboxEvents.lastSeq(orphan)).toBe(0);
    await cleanup();
  });

  it('keeps at startup the stream of a sandbox created after the record list was read (another fleet node\'s new sandbox is not an orphan)', async () => {
    const { store, service, cleanup } = open();
    const [fresh, orphan] = [newId(), newId()];
    for (const sandboxId of [fresh, orphan]) await store.sandboxEvents.append({ sandboxId, seq: 1, orgId: 'o', type: 'sandbox.created', data: {}, createdAt: new Date() });
    // Neither is in the list read first; only `fresh` exists when read again.
    expect(await service.removeOrphans(new Set(), async (id) => id === fresh)).toBe(1);
    expect(await store.sandboxEvents.lastSeq(fresh)).toBe(1);
    expect(await store.sandboxEvents.lastSeq(orphan)).toBe(0);
    await cleanup();
  });

  it('never throws: past EVENTS_QUEUE_MAX, and while the store refuses writes, events are dropped, counted and logged once', async () => {
    const { dir, store, service, lines } = open(100);
    const id = newId();
    for (let i = 0; i < 150; i++) expect(() => service.emit({ sandboxId: id, orgId: 'o', type: 'process.started', data: { i } })).not.toThrow();
    expect(service.dropped).toBe(50);
    await service.flush();
    expect(await store.sandboxEvents.lastSeq(id)).toBe(100);
    expect(lines.filter((l) => l.includes('dropping sandbox events'))).toHaveLength(1);
    expect(lines.filter((l) => l.includes('being written again'))).toHaveLength(1);
    // Data past the bound is replaced, not stored whole.
    service.emit({ sandboxId: id, orgId: 'o', type: 'process.exited', data: { huge: 'x'.repeat(100_000) } });
    await service.flush();
    expect((await store.sandboxEvents.listAfter(id, 100, 10))[0]!.data).toEqual({ truncated: true });
    // The store goes away: reports still return at once, and are counted and logged once.
    await store.close();
    for (let i = 0; i < 3; i++) expect(() => service.emit({ sandboxId: newId(), orgId: 'o', type: 'sandbox.created' })).not.toThrow();
    await service.flush();
    expect(service.dropped).toBe(53);
    expect(lines.filter((l) => l.includes('dropping sandbox events'))).toHaveLength(2);
    await service.close();
    rmSync(dir, { recursive: true, force: true });
  });
});
