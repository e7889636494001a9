import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

describe.skipIf(!support.ok)('sandbox limits and control', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let orgId: string;

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Limits User', email: uniqueEmail('limits') });
    apiKey = reg.apiKey;
    orgId = reg.orgId;
    vr = server.client(apiKey);
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('kills a memory hog at the memory limit and keeps the sandbox usable', async () => {
    const sb = await vr.sandboxes.create({ name: 'hog', mem: 1024 });
    // tail holds its whole input line in memory: 2 GiB of zeros against a 1 GiB limit.
    const r = await sb.exec('head -c 2000m /dev/zero | tail -n 1 > /dev/null; echo "exit=$?"', { timeout: 120 });
    expect(r.stdout).toMatch(/exit=(137|9)/);
    expect((await sb.exec('echo alive')).stdout).toBe('alive\n');
    await sb.delete();
  });

  it('contains a fork bomb with the pids limit while the API keeps answering', async () => {
    const sb = await vr.sandboxes.create({ name: 'forkbomb' });
    const bomb = sb.exec('bomb() { bomb | bomb & }; bomb; sleep 3', { timeout: 5 });
    const started = Date.now();
    let answered = 0;
    while (Date.now() - started < 2000) {
      const res = await server.http('/api/version');
      expect(res.status).toBe(200);
      answered++;
    }
    expect(answered).toBeGreaterThan(5);
    await bomb; // ends by its timeout or when the shell gives up on fork failures; either way it ends
    expect((await sb.exec('echo still usable', { timeout: 10 })).stdout).toBe('still usable\n');
    const pids = Number(readFileSync(`/sys/fs/cgroup/pids/voidrun/vr-${sb.id}/pids.max`, 'utf8'));
    expect(pids).toBe(1024);
    await sb.delete();
  });

  it('kills the whole process tree when a command times out', async () => {
    const sb = await vr.sandboxes.create({ name: 'timeouts' });
    const r = await sb.exec('sleep 100 & sleep 100 & sleep 100', { timeout: 1 });
    expect(r).toMatchObject({ exitCode: 124, timedOut: true });
    const left = await sb.exec('ps -eo comm --no-headers | grep -c "^sleep" || true');
    expect(left.stdout.trim()).toBe('0');
    await sb.delete();
  });

  it('pause stops progress and resume continues it', async () => {
    const sb = await vr.sandboxes.create({ name: 'freezer' });
    await sb.commands.run('while true; do echo tick >> /root/ticks; sleep 0.05; done');
    const ticks = () => readFileSync(join(server.dirs.instancesDir, sb.id, 'disk', 'upper', 'root', 'ticks'), 'utf8').split('\n').length;
    await sb.exec('sleep 0.3');
    expect(await sb.pause()).toMatchObject({ status: 'paused' });
    expect((await sb.refresh()).status).toBe('paused');
    const frozen = ticks();
    await new Promise((r) => setTimeout(r, 500));
    expect(ticks()).toBe(frozen);
    const execWhilePaused = await server.http(`/api/sandboxes/${sb.id}/exec`, { method: 'POST', apiKey, json: { command: 'true' } });
    expect(execWhilePaused.status).toBe(409);
    expect(await sb.resume()).toMatchObject({ status: 'running' });
    await sb.exec('sleep 0.3');
    expect(ticks()).toBeGreaterThan(frozen);
    await sb.delete();
  });

  it('restores a snapshot into a new sandbox with the files from before it and not after', async () => {
    const sb = await vr.sandboxes.create({ name: 'snapper', envVars: { FROM: 'source' } });
    await sb.exec('echo before > /root/before.txt && mkdir -p /root/dir && rm /etc/hostname');
    const snap = await sb.snapshot();
    expect(snap).toMatchObject({ kind: 'filesystem', full_path: `${sb.id}/${snap.id}` });
    await sb.exec('echo after > /root/after.txt');
    expect((await sb.snapshots()).map((s) => s.id)).toEqual([snap.id]);

    const res = await server.http('/api/sandboxes/restore', { method: 'POST', apiKey, json: { snapshot_path: snap.full_path, new_id: 'restored' } });
    expect(res.status).toBe(201);
    const restored = await vr.sandboxes.get(((await res.json()) as { data: { id: string } }).data.id);
    expect(restored.info).toMatchObject({ name: 'restored', status: 'running', envVars: { FROM: 'source' } });
    expect((await restored.exec('cat /root/before.txt')).stdout).toBe('before\n');
    expect((await restored.exec('test -e /root/after.txt')).exitCode).not.toBe(0);
    expect((await restored.exec('test -e /etc/hostname')).exitCode).not.toBe(0);

    const other = await server.client().trpc.auth.register.mutate({ name: 'Thief', email: uniqueEmail('thief') });
    const stolen = await server.http('/api/sandboxes/restore', { method: 'POST', apiKey: other.apiKey, json: { snapshot_path: snap.full_path } });
    expect(stolen.status).toBe(404);
    const traversal = await server.http('/api/sandboxes/restore', { method: 'POST', apiKey, json: { snapshot_path: '../../etc/passwd' } });
    expect(traversal.status).toBe(400);

    await restored.delete();
    await sb.delete();
  });

  it('rolls a failed restore back completely: no record, container, mount, cgroup or directory left', async () => {
    const sb = await vr.sandboxes.create({ name: 'to-corrupt' });
    const snap = await sb.snapshot();
    writeFileSync(join(server.dirs.snapshotsDir, orgId, sb.id, `${snap.id}.tar.gz`), 'not a tarball');
    const cgroups = () => (existsSync('/sys/fs/cgroup/memory/voidrun') ? readdirSync('/sys/fs/cgroup/memory/voidrun') : []);
    const mounts = () => readFileSync('/proc/self/mounts', 'utf8').split('\n').filter((l) => l.includes(server.dirs.instancesDir));
    const before = { dirs: readdirSync(server.dirs.instancesDir), cgroups: cgroups(), mounts: mounts() };
    const res = await server.http('/api/sandboxes/restore', { method: 'POST', apiKey, json: { snapshot_path: snap.full_path, new_id: 'broken' } });
    expect(res.status).toBe(502);
    expect(((await res.json()) as { error: string }).error).toContain('Restoring snapshot');
    expect({ dirs: readdirSync(server.dirs.instancesDir), cgroups: cgroups(), mounts: mounts() }).toEqual(before);
    expect((await vr.sandboxes.list()).sandboxes.map((s) => s.info.name)).not.toContain('broken');
    await sb.delete();
  });

  it('answers file transfers with 502, not 500, when the agent is killed (regression)', async () => {
    const sb = await vr.sandboxes.create({ name: 'fragile-files' });
    await sb.files.write('/root/f.txt', 'x');
    const tini = readFileSync(join(server.dirs.instancesDir, sb.id, 'init.pid'), 'utf8').trim();
    process.kill(Number(readFileSync(`/proc/${tini}/task/${tini}/children`, 'utf8').trim().split(' ')[0]), 'SIGKILL');
    // The sandbox's init ends with its agent; under load that takes a moment, and the status the
    // failed call records is the one the driver sees then.
    for (let i = 0; i < 500 && existsSync(`/proc/${tini}`); i++) await new Promise((r) => setTimeout(r, 10));
    const res = await server.http(`/api/sandboxes/${sb.id}/files/download?path=/root/f.txt`, { apiKey });
    expect(res.status).toBe(502);
    const body = (await res.json()) as { error: string };
    expect(body.error).toMatch(/agent is not responding/);
    expect(body.error).not.toContain(server.dirs.instancesDir);
    expect(['stopped', 'error']).toContain((await sb.refresh()).status);
    await sb.delete();
  });

  it('answers 502 with a clear message when the agent is killed, and the status shows it', async () => {
    const sb = await vr.sandboxes.create({ name: 'fragile' });
    await sb.exec('true'); // the server now holds a connection to the agent
    // Kill the agent from the host, as an OOM kill or a crash would: tini (PID 1 inside) is the
    // container's init; the agent is its only child.
    const tini = readFileSync(join(server.dirs.instancesDir, sb.id, 'init.pid'), 'utf8').trim();
    const agentPid = Number(readFileSync(`/proc/${tini}/task/${tini}/children`, 'utf8').trim().split(' ')[0]);
    process.kill(agentPid, 'SIGKILL');
    const res = await server.http(`/api/sandboxes/${sb.id}/exec`, { method: 'POST', apiKey, json: { command: 'echo hi' } });
    expect(res.status).toBe(502);
    const body = (await res.json()) as { error: string };
    expect(body.error).toMatch(/agent is not responding/);
    expect(body.error).not.toContain(server.dirs.instancesDir);
    const status = (await sb.refresh()).status;
    expect(['stopped', 'error']).toContain(status);
    // Start brings it back.
    expect(await sb.start()).toMatchObject({ status: 'running' });
    expect((await sb.exec('echo back')).stdout).toBe('back\n');
    await sb.delete();
  });
});

describe.skipIf(!support.ok)('server restart', () => {
  it('re-adopts a sandbox that kept running and marks one that died as stopped', async () => {
    const first = await startTestServer();
    const reg = await first.client().trpc.auth.register.mutate({ name: 'Restart User', email: uniqueEmail('restart') });
    const vr = first.client(reg.apiKey);
    const survivor = await vr.sandboxes.create({ name: 'survivor' });
    await survivor.exec('echo still here > /root/mark');
    const victim = await vr.sandboxes.create({ name: 'victim' });
    await first.close({ keepState: true });
    // While the server is down the victim's runtime dies.
    await first.app.services.sandboxes.driver.stop(victim.id);

    const second = await startTestServer({}, first.dirs);
    try {
      const vr2 = second.client(reg.apiKey);
      const back = await vr2.sandboxes.get(survivor.id);
      expect(back.info.status).toBe('running');
      expect((await back.exec('cat /root/mark')).stdout).toBe('still here\n');
      expect((await vr2.sandboxes.get(victim.id)).info.status).toBe('stopped');
    } finally {
      await second.close();
    }
  });
});
