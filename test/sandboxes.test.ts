import { existsSync, readdirSync, statSync, writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NotFoundError, SandboxNotRunningError, type SandboxHandle, type VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

describe.skipIf(!support.ok)('sandboxes on the container driver (debian image)', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let orgId: string;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Sandbox User', email: uniqueEmail('sb') });
    apiKey = reg.apiKey;
    orgId = reg.orgId;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'main-box', envVars: { GREETING: 'hello from env' } });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('creates over REST, runs echo, and deletes, leaving nothing on the host', async () => {
    const created = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'rest-box', cpu: 1, mem: 1024 } });
    expect(created.status).toBe(201);
    const sb = ((await created.json()) as { data: { id: string; status: string; name: string; orgId: string; imageId: string; envVars: object } }).data;
    expect(sb).toMatchObject({ status: 'running', name: 'rest-box', orgId, envVars: {} });
    const exec = await server.http(`/api/sandboxes/${sb.id}/exec`, { method: 'POST', apiKey, json: { command: 'echo hi' } });
    expect(exec.status).toBe(200);
    expect(await exec.json()).toMatchObject({ status: 'success', data: { stdout: 'hi\n', stderr: '', exitCode: 0 } });
    const instanceDir = join(server.dirs.instancesDir, sb.id);
    expect(existsSync(instanceDir)).toBe(true);
    expect((await server.http(`/api/sandboxes/${sb.id}`, { method: 'DELETE', apiKey })).status).toBe(200);
    expect(existsSync(instanceDir)).toBe(false);
    expect((await server.http(`/api/sandboxes/${sb.id}`, { apiKey })).status).toBe(404);
  });

  it("lists only the caller org's sandboxes with every contract field and page meta", async () => {
    const res = await server.http('/api/sandboxes?page=1&limit=1', { apiKey });
    const body = (await res.json()) as { data: Array<Record<string, unknown>>; meta: Record<string, number> };
    expect(body.meta).toMatchObject({ page: 1, limit: 1 });
    expect(body.data).toHaveLength(1);
    expect(Object.keys(body.data[0]!)).toEqual(expect.arrayContaining(['cpu', 'createdAt', 'createdBy', 'envVars', 'id', 'imageId', 'ip', 'mem', 'name', 'orgId', 'status']));
    expect(body.data[0]).toMatchObject({ status: 'running', phase: 'running', ready: true });
    const other = await server.client().trpc.auth.register.mutate({ name: 'Other Org', email: uniqueEmail('other') });
    const otherList = await server.client(other.apiKey).sandboxes.list();
    expect(otherList.total).toBe(0);
  });

  it("answers 404 for a missing sandbox and for another org's, 400 for a bad timeout or name", async () => {
    expect((await server.http('/api/sandboxes/65ae1234567890abcdef1234', { apiKey })).status).toBe(404);
    const other = await server.client().trpc.auth.register.mutate({ name: 'Intruder', email: uniqueEmail('intruder') });
    for (const [method, path] of [
      ['GET', `/api/sandboxes/${box.id}`],
      ['DELETE', `/api/sandboxes/${box.id}`],
      ['POST', `/api/sandboxes/${box.id}/exec`],
      ['POST', `/api/sandboxes/${box.id}/stop`],
    ] as const) {
      const res = await server.http(path, { method, apiKey: other.apiKey, json: method === 'POST' ? { command: 'id' } : undefined });
      expect(res.status, `${method} ${path}`).toBe(404);
    }
    await expect(server.client(other.apiKey).sandboxes.get(box.id)).rejects.toBeInstanceOf(NotFoundError);
    const tooLong = await server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: 'true', timeout: 301 } });
    expect(tooLong.status).toBe(400);
    expect(((await tooLong.json()) as { error: string }).error).toContain('timeout');
    const badName = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'Not_A_DNS_Name' } });
    expect(badName.status).toBe(400);
    const dup = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'main-box' } });
    expect(dup.status).toBe(409);
  });

  it('gives every command the sandbox envVars, plus per-exec env, cwd and args', async () => {
    expect((await box.exec('echo "$GREETING"')).stdout).toBe('hello from env\n');
    expect((await box.exec('echo "$A-$GREETING"', { env: { A: 'x' } })).stdout).toBe('x-hello from env\n');
    expect((await box.exec('pwd', { cwd: '/tmp' })).stdout).toBe('/tmp\n');
    expect((await box.exec('/bin/echo', { args: ['a b', '$HOME'] })).stdout).toBe('a b $HOME\n');
    const r = await box.exec('echo out; echo err >&2; exit 7');
    expect(r).toMatchObject({ stdout: 'out\n', stderr: 'err\n', exitCode: 7, truncated: false, timedOut: false });
    const missingCwd = await server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: 'true', cwd: '/nope' } });
    expect(missingCwd.status).toBe(400);
  });

  it('caps output and says it was truncated', async () => {
    const r = await box.exec('head -c 6000000 /dev/zero | tr "\\\\0" a');
    expect(r.truncated).toBe(true);
    expect(r.stdout.length).toBe(4 * 1024 * 1024);
    expect(r.exitCode).toBe(0);
  });

  it('isolates: hostname is the name, no host processes, no host files, loopback only, root is not host root', async () => {
    expect((await box.exec('hostname')).stdout).toBe('main-box\n');
    const ps = (await box.exec('ps -eo pid,comm --no-headers')).stdout.trim().split('\n');
    expect(ps.length).toBeLessThan(8);
    expect(ps.join('\n')).not.toMatch(/vitest|runc|sshd|systemd/);
    const secret = `/tmp/voidrun-host-secret-${process.pid}`;
    writeFileSync(secret, 'host only');
    try {
      expect((await box.exec(`cat ${secret}`)).exitCode).not.toBe(0);
      expect((await box.exec(`ls ${process.cwd()}`)).exitCode).not.toBe(0);
    } finally {
      rmSync(secret);
    }
    expect((await box.exec('ls /opt/voidrun')).stdout.split('\n').filter(Boolean).sort()).toEqual(['agent.cjs', 'init', 'lib', 'node', 'node_modules', 'openssl.cnf']);
    expect((await box.exec('touch /opt/voidrun/node_modules/x')).stderr).toContain('Read-only file system');
    expect((await box.exec('echo tampered > /opt/voidrun/agent.cjs')).exitCode).not.toBe(0);
    // No new namespaces from inside (a user namespace would grant a full capability set over them).
    expect((await box.exec('unshare -U true')).exitCode).not.toBe(0);
    // clone(CLONE_NEWUSER | SIGCHLD): -1 (refused) exits 3.
    expect((await box.exec("perl -e 'exit(syscall(56, 0x10000000 | 17, 0, 0, 0, 0) < 0 ? 3 : 0)'")).exitCode).toBe(3);
    expect((await box.exec("perl -e 'exit(syscall(56, 17, 0, 0, 0, 0) < 0 ? 3 : 0)'")).exitCode).toBe(0); // a plain fork still works
    const links = (await box.exec('ls /sys/class/net')).stdout.trim().split('\n');
    expect(links).toEqual(['lo']);
    expect((await box.exec('id -u; touch /root/made-by-root')).stdout).toBe('0\n');
    const upperFile = join(server.dirs.instancesDir, box.id, 'disk', 'upper', 'root', 'made-by-root');
    const st = statSync(upperFile);
    expect(st.uid).toBe(200000);
    expect(st.uid).not.toBe(0);
  });

  it("passes envVars such as NODE_OPTIONS to commands without breaking the sandbox's agent", async () => {
    const sb = await vr.sandboxes.create({ name: 'node-options', envVars: { NODE_OPTIONS: '--require /nonexistent.js', VOIDRUN_AGENT_SOCKET: '/x' } });
    expect((await sb.exec('echo "$NODE_OPTIONS"')).stdout).toBe('--require /nonexistent.js\n');
    await sb.delete();
  });

  it("cannot redirect the server's agent connection to another sandbox (regression: agent socket was sandbox-writable)", async () => {
    const victim = await vr.sandboxes.create({ name: 'victim-box' });
    try {
      await victim.exec('echo victim-secret > /root/secret');
      const victimSocket = join(server.dirs.instancesDir, victim.id, 'agent.sock');
      // Whatever the sandbox writes where an agent socket might be, the server's path stays out of reach.
      await box.exec(`mkdir -p /run/voidrun && ln -sf ${victimSocket} /run/voidrun/agent.sock; ln -sf ${victimSocket} /root/agent.sock`);
      expect((await box.exec('ls /run/voidrun')).stdout).toBe('agent.sock\n');
      expect((await box.exec(`test -e ${victimSocket}`)).exitCode).not.toBe(0);
      const res = await server.http(`/api/sandboxes/${box.id}/files/download?path=/root/secret`, { apiKey });
      expect(res.status).toBe(404);
      expect((await box.exec('hostname')).stdout).toBe('main-box\n');
    } finally {
      await victim.delete();
    }
  });

  it("keeps one sandbox's files invisible to another", async () => {
    const other = await vr.sandboxes.create({ name: 'neighbour' });
    try {
      await box.exec('echo private > /root/mine.txt');
      expect((await other.exec('cat /root/mine.txt')).exitCode).not.toBe(0);
      expect((await box.exec('cat /root/mine.txt')).stdout).toBe('private\n');
    } finally {
      await other.delete();
    }
  });

  it('streams output over SSE and over the tRPC subscription, ending with the exit code', async () => {
    const res = await server.http(`/api/sandboxes/${box.id}/exec-stream`, {
      method: 'POST',
      apiKey,
      json: { command: 'echo one; sleep 0.2; echo two >&2; exit 5' },
    });
    expect(res.headers.get('content-type')).toContain('text/event-stream');
    const text = await res.text();
    expect(text).toContain('event: stdout\ndata: one');
    expect(text).toContain('event: stderr\ndata: two');
    expect(text).toMatch(/event: exit\ndata: \{"exitCode":5/);

    const chunks = [];
    for await (const c of box.execStream('for i in 1 2 3; do echo $i; done')) chunks.push(c);
    expect(chunks[0]).toMatchObject({ type: 'started' });
    expect(chunks.filter((c) => c.type === 'stdout').map((c) => (c as { data: string }).data).join('')).toBe('1\n2\n3\n');
    expect(chunks.at(-1)).toEqual({ type: 'exit', exitCode: 0, timedOut: false });
  });

  it('resumes a tRPC exec stream from its last event id without running the command again', async () => {
    const command = 'echo a; sleep 0.4; echo b; echo c';
    const firstTwo = await new Promise<Array<{ id: string; data: { type: string } }>>((resolve, reject) => {
      const seen: Array<{ id: string; data: { type: string } }> = [];
      const sub = vr.trpc.exec.stream.subscribe(
        { id: box.id, command },
        {
          onData: (e) => {
            seen.push(e);
            if (seen.length === 2) {
              sub.unsubscribe();
              resolve(seen);
            }
          },
          onError: reject,
        },
      );
    });
    expect(firstTwo.map((e) => e.data)).toEqual([{ type: 'started', pid: expect.any(Number) }, { type: 'stdout', data: 'a\n' }]);
    const rest: Array<{ id: string; data: { type: string; data?: string } }> = [];
    await new Promise<void>((resolve, reject) => {
      vr.trpc.exec.stream.subscribe(
        { id: box.id, command, lastEventId: firstTwo[1]!.id },
        { onData: (e) => rest.push(e), onComplete: resolve, onStopped: resolve, onError: reject },
      );
    });
    expect(rest.map((e) => e.data.type)).not.toContain('started');
    expect(rest.at(-1)!.data.type).toBe('exit');
    expect(rest.map((e) => e.data.data ?? '').join('')).toBe('b\nc\n');
    const runs = (await box.commands.list()).filter((p) => p.command === command);
    expect(runs).toHaveLength(1);
  });

  it('answers a sync: false create at once and the sandbox comes up', async () => {
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'async-box', sync: false } });
    expect(res.status).toBe(201);
    const { id, status, phase, ready } = ((await res.json()) as { data: { id: string; status: string; phase: string; ready: boolean } }).data;
    // REST stays inside the contract's enum, as the original reports a booting sandbox; tRPC says creating.
    expect({ status, phase, ready }).toEqual({ status: 'running', phase: 'creating', ready: false });
    const sb = await vr.sandboxes.get(id);
    for (let i = 0; i < 200 && sb.info.status === 'creating'; i++) {
      await new Promise((r) => setTimeout(r, 50));
      await sb.refresh();
    }
    expect(sb.info.status).toBe('running');
    expect((await sb.exec('echo up')).stdout).toBe('up\n');
    await sb.delete();
  });

  it('runs, lists, attaches to, feeds, waits for and kills background commands', async () => {
    const cat = await box.commands.run('cat');
    await cat.write('typed input\n', { eof: true });
    expect(await cat.wait()).toBe(0);
    const out = [];
    for await (const c of cat.output()) out.push(c);
    expect(out.find((c) => c.type === 'stdout')).toEqual({ type: 'stdout', data: 'typed input\n' });

    // Regression: writing to a process that closed its stdin killed the agent (EPIPE).
    const closer = await box.commands.run('exec 0<&-; sleep 1');
    for (let i = 0; i < 3; i++) await closer.write('x'.repeat(70000)).catch(() => {});
    expect((await box.exec('echo agent alive')).stdout).toBe('agent alive\n');

    const sleeper = await box.commands.run('sleep 600');
    const listed = await box.commands.list();
    expect(listed.find((p) => p.pid === sleeper.pid)).toMatchObject({ running: true, exitCode: null, command: 'sleep 600' });
    const kill = await server.http(`/api/sandboxes/${box.id}/commands/kill`, { method: 'POST', apiKey, json: { pid: sleeper.pid } });
    expect(kill.status).toBe(200);
    const wait = await server.http(`/api/sandboxes/${box.id}/commands/wait`, { method: 'POST', apiKey, json: { pid: sleeper.pid } });
    expect(await wait.json()).toMatchObject({ success: true, exitCode: 137 });

    const bg = await server.http(`/api/sandboxes/${box.id}/exec`, { method: 'POST', apiKey, json: { command: 'echo later; sleep 0.3; echo done', background: true } });
    const started = ((await bg.json()) as { data: { success: boolean; pid: number; command: string } }).data;
    expect(started).toMatchObject({ success: true, command: 'echo later; sleep 0.3; echo done' });
    const attach = await server.http(`/api/sandboxes/${box.id}/commands/attach`, { method: 'POST', apiKey, json: { pid: started.pid } });
    const sse = await attach.text();
    expect(sse).toContain('data: later');
    expect(sse).toContain('data: done');
    expect(sse).toContain('event: exit');
    const unknown = await server.http(`/api/sandboxes/${box.id}/commands/kill`, { method: 'POST', apiKey, json: { pid: 999999 } });
    expect(unknown.status).toBe(404);
  });

  it('reports sandboxes by status in /metrics', async () => {
    const text = await (await server.http('/metrics')).text();
    expect(text).toMatch(/voidrun_sandboxes\{status="running"\} [1-9]/);
  });

  it('serves the system image records of the contract', async () => {
    const list = (await (await server.http('/api/images', { apiKey })).json()) as Array<{ _id: string; name: string; system: boolean }>;
    const debian = list.find((i) => i.name === 'debian');
    expect(debian).toMatchObject({ system: true });
    expect((await server.http(`/api/images/${debian!._id}`, { apiKey })).status).toBe(200);
    expect((await server.http('/api/images/name/debian', { apiKey })).status).toBe(200);
    expect((await server.http(`/api/images/${debian!._id}`, { method: 'DELETE', apiKey })).status).toBe(403);
    const bad = await server.http('/api/images', { method: 'POST', apiKey, json: { name: 'custom', path: '/etc' } });
    expect(bad.status).toBe(400);
    const own = await server.http('/api/images', { method: 'POST', apiKey, json: { name: 'my-debian', path: 'debian', version: '1.0' } });
    expect(own.status).toBe(201);
    const ownId = ((await own.json()) as { data: { _id: string } }).data._id;
    expect((await server.http(`/api/images/${ownId}`, { method: 'DELETE', apiKey })).status).toBe(200);
  });

  it('refuses exec in a stopped sandbox with 409, and starts it again with its files', async () => {
    const sb = await vr.sandboxes.create({ name: 'stop-start' });
    await sb.exec('echo kept > /root/kept.txt');
    expect(await sb.stop()).toMatchObject({ status: 'stopped' });
    await expect(sb.exec('true')).rejects.toBeInstanceOf(SandboxNotRunningError);
    expect(await sb.start()).toMatchObject({ status: 'running' });
    expect((await sb.exec('cat /root/kept.txt')).stdout).toBe('kept\n');
    await sb.delete();
    expect(readdirSync(server.dirs.instancesDir)).not.toContain(sb.id);
  });

  it('keeps labels from create, answers them everywhere, and lists by labels (all of them must match) over REST and tRPC', async () => {
    const created = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'labelled', labels: { env: 'prod', team: 'api', long: 'abcdefghijklmnopqrst' } } });
    expect(created.status).toBe(201);
    const sb = ((await created.json()) as { data: { id: string; labels: Record<string, string> } }).data;
    try {
      expect(sb.labels).toEqual({ env: 'prod', team: 'api', long: 'abcdefghijklmnopqrst' });
      const got = await server.http(`/api/sandboxes/${sb.id}`, { apiKey });
      expect(((await got.json()) as { data: { labels: object } }).data.labels).toEqual(sb.labels);
      // A sandbox created without labels has none.
      expect((await vr.sandboxes.get(box.id)).info.labels).toEqual({});
      const names = async (query: string) => {
        const res = await server.http(`/api/sandboxes?${query}`, { apiKey });
        expect(res.status, query).toBe(200);
        const body = (await res.json()) as { data: Array<{ name: string; labels: object }>; meta: { total: number } };
        for (const s of body.data) expect(s.labels).toBeTypeOf('object');
        return { names: body.data.map((s) => s.name).sort(), total: body.meta.total };
      };
      expect(await names('labels=env=prod')).toEqual({ names: ['labelled'], total: 1 });
      expect(await names('labels=env%3Dprod%2Cteam%3Dapi')).toEqual({ names: ['labelled'], total: 1 });
      expect(await names('labels=env=prod,team=web')).toEqual({ names: [], total: 0 });
      expect(await names('labels=team=api&page=1&limit=5')).toEqual({ names: ['labelled'], total: 1 });
      expect(await names('labels=')).toMatchObject({ names: expect.arrayContaining(['labelled', 'main-box']) });
      const viaTrpc = await vr.sandboxes.list({ labels: { team: 'api', env: 'prod' } });
      expect(viaTrpc.sandboxes.map((s) => s.id)).toEqual([sb.id]);
      expect((await vr.sandboxes.list({ labels: { team: 'nobody' } })).total).toBe(0);
    } finally {
      await server.http(`/api/sandboxes/${sb.id}`, { method: 'DELETE', apiKey });
    }
  }, 180_000);

  it('refuses labels out of bounds on create and malformed label filters with a 400 naming labels', async () => {
    for (const labels of [
      { a: '1', b: '2', c: '3', d: '4', e: '5', f: '6' },
      { Env: 'prod' },
      { '-env': 'prod' },
      { env: 'abcdefghijklmnopqrstu' },
      { ['k'.repeat(21)]: 'v' },
      { env: 'a,b' },
      { env: 'a=b' },
      { env: 7 },
      ['env'],
    ]) {
      const res = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'never-made', labels } });
      expect(res.status, JSON.stringify(labels)).toBe(400);
      expect(((await res.json()) as { error: string }).error, JSON.stringify(labels)).toContain('labels');
    }
    for (const query of ['env', 'Env=prod', 'env=prod,', 'a=1,b=2,c=3,d=4,e=5,f=6', 'env=prod=x', `env=${'x'.repeat(21)}`, 'labels=x'.repeat(100)]) {
      const res = await server.http(`/api/sandboxes?labels=${encodeURIComponent(query)}`, { apiKey });
      expect(res.status, query).toBe(400);
      expect(((await res.json()) as { error: string }).error, query).toContain('labels');
    }
    expect((await server.http('/api/sandboxes', { apiKey }).then((r) => r.json())) as { data: Array<{ name: string }> }).not.toMatchObject({ data: [{ name: 'never-made' }] });
  });

  it('sleeps and wakes a sandbox (the client libraries\' names for pause and resume)', async () => {
    const slept = await server.http(`/api/sandboxes/${box.id}/sleep`, { method: 'POST', apiKey });
    expect(slept.status).toBe(200);
    expect(await slept.json()).toMatchObject({ status: 'success', data: { id: box.id, status: 'paused' } });
    expect((await vr.sandboxes.get(box.id)).info.status).toBe('paused');
    const woke = await server.http(`/api/sandboxes/${box.id}/wake`, { method: 'POST', apiKey });
    expect(woke.status).toBe(200);
    expect(await woke.json()).toMatchObject({ status: 'success', data: { id: box.id, status: 'running' } });
    expect((await box.exec('echo awake')).stdout).toBe('awake\n');
    expect((await server.http('/api/sandboxes/65ae1234567890abcdef1234/sleep', { method: 'POST', apiKey })).status).toBe(404);
    const viaTrpc = await vr.trpc.sandbox.sleep.mutate({ id: box.id });
    expect(viaTrpc.status).toBe('paused');
    expect((await vr.trpc.sandbox.wake.mutate({ id: box.id })).status).toBe('running');
  }, 120_000);
});

describe.skipIf(!support.ok)('shell sessions without a terminal (session-exec)', () => {
  it('keeps cwd and variables between exec calls, feeds input, streams NDJSON, and closes', async () => {
    const server = await startTestServer();
    try {
      const reg = await server.client().trpc.auth.register.mutate({ name: 'Shell User', email: uniqueEmail('shell') });
      const sb = await server.client(reg.apiKey).sandboxes.create({ name: 'shell-box' });
      const call = async (body: Record<string, unknown>) => {
        const res = await server.http(`/api/sandboxes/${sb.id}/session-exec`, { method: 'POST', apiKey: reg.apiKey, json: body });
        return { status: res.status, body: (await res.json()) as { success: boolean; sessionId: string; output: string; error: string; exitCode: number } };
      };
      const { body: created } = await call({ action: 'create' });
      const sessionId = created.sessionId;
      expect(sessionId).toMatch(/^shell-/);
      await call({ action: 'exec', sessionId, command: 'mkdir -p /tmp/work && cd /tmp/work && export FOO=bar' });
      const { body: again } = await call({ action: 'exec', sessionId, command: 'pwd; echo $FOO; echo oops >&2; false' });
      expect(again).toMatchObject({ success: false, sessionId, output: '/tmp/work\nbar\n', error: 'oops\n', exitCode: 1 });
      expect((await call({ action: 'resize', sessionId, cols: 100, rows: 40 })).status).toBe(200);
      expect((await call({ action: 'exec', sessionId })).status).toBe(400);

      const stream = await server.http(`/api/sandboxes/${sb.id}/session-exec-stream`, { method: 'POST', apiKey: reg.apiKey, json: { sessionId, command: 'echo $FOO; sleep 0.1; echo two' } });
      expect(stream.headers.get('content-type')).toContain('application/x-ndjson');
      const lines = (await stream.text()).trim().split('\n').map((l) => JSON.parse(l) as { type: string; data?: string; exitCode?: number });
      expect(lines.filter((l) => l.type === 'stdout').map((l) => l.data).join('')).toBe('bar\ntwo\n');
      expect(lines.at(-1)).toEqual({ type: 'exit', exitCode: 0 });

      expect((await call({ action: 'close', sessionId })).status).toBe(200);
      expect((await call({ action: 'exec', sessionId, command: 'true' })).status).toBe(404);

      // A command that exits the shell ends the session with its status.
      const other = (await call({ action: 'create' })).body.sessionId;
      expect((await call({ action: 'exec', sessionId: other, command: 'echo bye; exit 3' })).body).toMatchObject({ output: 'bye\n', exitCode: 3 });
      expect((await call({ action: 'exec', sessionId: other, command: 'true' })).status).toBe(404); // a finished shell leaves the list
    } finally {
      await server.close();
    }
  });
});

describe.skipIf(!support.ok)('shell sessions: bad input', () => {
  /** A server, a registered org and a running sandbox for one test; `call` posts to its session-exec. */
  async function withShellBox(orgName: string, emailTag: string, boxName: string, fn: (box: { server: TestServer; reg: { apiKey: string }; sb: Awaited<ReturnType<ReturnType<TestServer['client']>['sandboxes']['create']>>; call: (body: Record<string, unknown>) => Promise<Response> }) => Promise<void>): Promise<void> {
    const server = await startTestServer();
    try {
      const reg = await server.client().trpc.auth.register.mutate({ name: orgName, email: uniqueEmail(emailTag) });
      const sb = await server.client(reg.apiKey).sandboxes.create({ name: boxName });
      const call = (body: Record<string, unknown>) => server.http(`/api/sandboxes/${sb.id}/session-exec`, { method: 'POST', apiKey: reg.apiKey, json: body });
      await fn({ server, reg, sb, call });
    } finally {
      await server.close();
    }
  }
  it('refuses a shell that is not an executable (regression: it crashed the agent) and interrupts a timed-out command', async () => {
    await withShellBox('Shell Bad', 'shbad', 'shell-bad', async ({ server, reg, sb, call }) => {
    expect((await call({ action: 'create', shell: '/tmp' })).status).toBe(400);
    await sb.exec('echo not a shell > /root/not-a-shell && chmod 644 /root/not-a-shell');
    expect((await call({ action: 'create', shell: '/root/not-a-shell' })).status).toBe(400);
    expect((await sb.exec('echo agent-alive')).stdout).toBe('agent-alive\n');
    const sessionId = ((await (await call({ action: 'create' })).json()) as { sessionId: string }).sessionId;
    expect((await call({ action: 'exec', sessionId, command: 'sleep 100', timeout: 1 })).status).toBe(400);
    const after = (await (await call({ action: 'exec', sessionId, command: 'echo next' })).json()) as { output: string };
    expect(after.output).toBe('next\n');
    });
  });

  it('a command left open (unmatched backtick or quote) is a syntax error of its own and cannot hang the session (regression: every later command waited 60 s for a 502)', async () => {
    await withShellBox('Shell Open', 'shopen', 'shell-open', async ({ server, reg, sb, call }) => {
    const stream = (sessionId: string, command: string) => server.http(`/api/sandboxes/${sb.id}/session-exec-stream`, { method: 'POST', apiKey: reg.apiKey, json: { sessionId, command, timeout: 30 } });
    for (const shell of ['/bin/bash', '/bin/sh']) {
      const sessionId = ((await (await call({ action: 'create', shell })).json()) as { sessionId: string }).sessionId;
      await call({ action: 'exec', sessionId, command: 'cd /tmp && export KEPT=yes' });
      // The fuzzer's command: the shell used to read on, looking for the closing backtick, and
      // swallowed the end marker; the command timed out and the session never answered again.
      const open = await stream(sessionId, 'y`\u00ef\u0019');
      expect(open.status).toBe(200);
      const lines = (await open.text()).trim().split('\n').map((l) => JSON.parse(l) as { type: string; data?: string; exitCode?: number });
      expect(lines.at(-1)).toEqual({ type: 'exit', exitCode: 2 });
      expect(lines.filter((l) => l.type === 'stderr').length).toBeGreaterThan(0);
      for (const command of ['echo "unterminated', "echo 'unterminated"]) {
        const r = (await (await call({ action: 'exec', sessionId, command, timeout: 30 })).json()) as { exitCode: number };
        expect(r.exitCode, `${shell}: ${command}`).toBe(2);
      }
      // A here-document without its end line ends with the command (the shell may warn), not after the markers.
      const doc = (await (await call({ action: 'exec', sessionId, command: 'cat <<END\nno end line', timeout: 30 })).json()) as { output: string };
      expect(doc.output, shell).toMatch(/^no end line\n?$/);
      // Quotes of every kind reach the shell as written; the session's state survived the errors.
      const r = (await (await call({ action: 'exec', sessionId, command: `echo "a'b" 'c"d' it\\'s; pwd; echo $KEPT` })).json()) as { output: string; exitCode: number };
      expect(r, shell).toMatchObject({ output: `a'b c"d it's\n/tmp\nyes\n`, exitCode: 0 });
    }
    });
  });

  it('a command that outlives its timeout and interrupt ends the session with a reason (regression: the session, and every command queued in it, hung)', async () => {
    await withShellBox('Shell Stuck', 'shstuck', 'shell-stuck', async ({ server, reg, sb, call }) => {
    const sessionId = ((await (await call({ action: 'create' })).json()) as { sessionId: string }).sessionId;
    // A command queued behind a longer one has its own timeout counted from its call: a 409
    // saying so, not an answer the server waits for past its deadline (a 502).
    // (The stream answers once its first line is out: the long command is running.)
    const long = await server.http(`/api/sandboxes/${sb.id}/session-exec-stream`, { method: 'POST', apiKey: reg.apiKey, json: { sessionId, command: 'echo started; sleep 2; echo long', timeout: 30 } });
    const queued = await call({ action: 'exec', sessionId, command: 'echo queued', timeout: 1 });
    expect(queued.status).toBe(409);
    expect(((await queued.json()) as { error: string }).error).toMatch(/busy with an earlier command.*did not run/);
    const longLines = (await long.text()).trim().split('\n').map((l) => JSON.parse(l) as { type: string; data?: string });
    expect(longLines.map((l) => l.data ?? '').join('')).toBe('started\nlong\n');
    const stuck = await call({ action: 'exec', sessionId, command: "trap '' INT; while :; do sleep 0.2; done", timeout: 1 });
    expect(stuck.status).toBe(400);
    const next = await call({ action: 'exec', sessionId, command: 'echo next', timeout: 30 });
    expect(next.status).toBe(409);
    expect(((await next.json()) as { error: string }).error).toMatch(/outlived its 1 s timeout.*create/);
    expect((await sb.exec('echo agent-alive')).stdout).toBe('agent-alive\n');
    });
  });
});
