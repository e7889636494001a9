import { availableParallelism, totalmem } from 'node:os';
import { readFileSync, statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TooManyRequestsError, type VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { newServerDirs, startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const DISK_MB = 64;

async function errorOf(res: Response): Promise<string> {
  return ((await res.json()) as { error: string }).error;
}

async function register(server: TestServer, tag: string): Promise<{ apiKey: string; orgId: string; vr: VoidRunClient }> {
  const reg = await server.client().trpc.auth.register.mutate({ name: 'Quota User', email: uniqueEmail(tag) });
  return { apiKey: reg.apiKey, orgId: reg.orgId, vr: server.client(reg.apiKey) };
}

describe.skipIf(!support.ok)('org quotas', () => {
  let server: TestServer;

  beforeAll(async () => {
    server = await startTestServer({
      SANDBOX_DEFAULT_DISK_MB: String(DISK_MB),
      ORG_MAX_SANDBOXES: '3',
      ORG_MAX_VCPUS: '3',
      ORG_MAX_MEMORY_MB: '3072',
      ORG_MAX_DISK_MB: String(3 * DISK_MB),
    });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('an org cannot create sandboxes beyond its memory quota', async () => {
    const { vr, apiKey } = await register(server, 'mem');
    const big = await vr.sandboxes.create({ name: 'big', mem: 2048 });
    const refused = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'too-much', mem: 2048 } });
    expect(refused.status).toBe(429);
    expect(await errorOf(refused)).toBe('Org quota exceeded: memory 2048 MB requested, 2048 of 3072 MB in use (ORG_MAX_MEMORY_MB)');
    await expect(vr.sandboxes.create({ name: 'too-much', mem: 2048 })).rejects.toBeInstanceOf(TooManyRequestsError);
    const fits = await vr.sandboxes.create({ name: 'fits', mem: 1024 });
    await big.delete();
    // Deleting frees the quota at once.
    const again = await vr.sandboxes.create({ name: 'again', mem: 2048 });
    await Promise.all([fits.delete(), again.delete()]);
  });

  it('concurrent creates cannot overcommit an org quota', async () => {
    const { vr, apiKey } = await register(server, 'race');
    const results = await Promise.all(
      Array.from({ length: 6 }, (_, i) => server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: `race-${i}`, sync: false } })),
    );
    const statuses = results.map((r) => r.status).sort();
    expect(statuses).toEqual([201, 201, 201, 429, 429, 429]);
    const page = await vr.sandboxes.list();
    expect(page.total).toBe(3);
    for (const sb of page.sandboxes) await sb.delete();
  });

  it('an org cannot exceed its vCPU, sandbox-count or disk quota, and another org is not held back by it', async () => {
    const a = await register(server, 'count-a');
    const boxes = [await a.vr.sandboxes.create({ name: 'a-1' }), await a.vr.sandboxes.create({ name: 'a-2' }), await a.vr.sandboxes.create({ name: 'a-3' })];
    const refused = await server.http('/api/sandboxes', { method: 'POST', apiKey: a.apiKey, json: { name: 'a-4' } });
    expect(refused.status).toBe(429);
    // All three bind at once here (3 sandboxes, 3 vCPUs, 3 × diskMb); the first checked is named.
    expect(await errorOf(refused)).toBe('Org quota exceeded: sandboxes 1 requested, 3 of 3 in use (ORG_MAX_SANDBOXES)');
    const b = await register(server, 'count-b');
    const other = await b.vr.sandboxes.create({ name: 'b-1' });
    await other.delete();
    await boxes[2]!.delete();
    if (availableParallelism() >= 2) {
      const cpu = await server.http('/api/sandboxes', { method: 'POST', apiKey: a.apiKey, json: { name: 'a-cpu', cpu: 2 } });
      expect(cpu.status).toBe(429);
      expect(await errorOf(cpu)).toBe('Org quota exceeded: vcpus 2 requested, 2 of 3 in use (ORG_MAX_VCPUS)');
    }
    for (const sb of boxes.slice(0, 2)) await sb.delete();
  });

  // The request schema's own maximum is 8 CPUs.
  it.skipIf(availableParallelism() >= 8)('a sandbox asking for more CPUs than the host has is refused with 400 saying so', async () => {
    const cpus = availableParallelism();
    const { apiKey } = await register(server, 'host-cpu');
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'huge', cpu: cpus + 1 } });
    expect(res.status).toBe(400);
    expect(await errorOf(res)).toBe(`cpu ${cpus + 1} is more than this host has: ${cpus} CPUs`);
  });

  it('GET /api/orgs/me/limits shows the org quotas and what its sandboxes use', async () => {
    const { vr, apiKey, orgId } = await register(server, 'limits');
    const sb = await vr.sandboxes.create({ name: 'counted', mem: 1024 });
    const res = await server.http('/api/orgs/me/limits', { apiKey });
    expect(res.status).toBe(200);
    const { data } = (await res.json()) as { data: unknown };
    expect(data).toEqual({
      orgId,
      limits: { sandboxes: 3, vcpus: 3, memoryMb: 3072, diskMb: 3 * DISK_MB, snapshotMaxBytes: 5 * 1024 * 1024 * 1024 },
      usage: { sandboxes: 1, vcpus: 1, memoryMb: 1024, diskMb: DISK_MB, snapshotBytes: 0, imageBytes: 0 },
      perSandbox: { maxCpu: availableParallelism(), maxMemoryMb: expect.any(Number) },
    });
    expect(await vr.trpc.org.limits.query()).toEqual(data);
    // The org record keeps its original shape.
    const me = (await (await server.http('/api/orgs/me', { apiKey })).json()) as { data: unknown };
    expect(me.data).toMatchObject({ id: orgId, usage: 0 });
    await sb.delete();
  });

  it("snapshots count against the org's disk quota", async () => {
    const { vr, apiKey } = await register(server, 'snap-disk');
    const first = await vr.sandboxes.create({ name: 'first' });
    const second = await vr.sandboxes.create({ name: 'second' });
    await first.snapshot();
    const usage = (await vr.trpc.org.limits.query()).usage;
    expect(usage.snapshotBytes).toBeGreaterThan(0);
    expect(usage.diskMb).toBe(2 * DISK_MB + Math.ceil(usage.snapshotBytes / (1024 * 1024)));
    // Two disks and a snapshot leave less than a third disk.
    const refused = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'third' } });
    expect(refused.status).toBe(429);
    expect(await errorOf(refused)).toMatch(/^Org quota exceeded: disk 64 MB requested, 129 of 192 MB in use \(ORG_MAX_DISK_MB\)$/);
    await Promise.all([first.delete(), second.delete()]);
  });
});

describe.skipIf(!support.ok)('host sandbox capacity', () => {
  let server: TestServer;
  // A pids budget so large that the host holds one sandbox.
  const pidMax = Math.min(Number(readFileSync('/proc/sys/kernel/pid_max', 'utf8')), Number(readFileSync('/proc/sys/kernel/threads-max', 'utf8')));
  const pidsLimit = Math.min(1_000_000, pidMax);

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: String(DISK_MB), SANDBOX_PIDS_LIMIT: String(pidsLimit), HOST_RESERVED_PIDS: String(pidMax - pidsLimit) });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it("sandboxes beyond the host's pid capacity are refused with 429, whichever org asks", async () => {
    const a = await register(server, 'host-a');
    const b = await register(server, 'host-b');
    const only = await a.vr.sandboxes.create({ name: 'only' });
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey: b.apiKey, json: { name: 'one-too-many' } });
    expect(res.status).toBe(429);
    expect(await errorOf(res)).toMatch(/^The host is full: it runs at most 1 sandboxes \(1 × SANDBOX_PIDS_LIMIT \d+ \+ HOST_RESERVED_PIDS \d+ ≤ kernel\.pid_max \d+\); try again later$/);
    await only.delete();
    const next = await b.vr.sandboxes.create({ name: 'next' });
    await next.delete();
  });
});

describe.skipIf(!support.ok)('host memory commitment', () => {
  // 10% of this host's RAM may be promised to sandboxes: a few 1 GiB sandboxes, whichever orgs own them.
  const commitMb = Math.floor((Math.floor(totalmem() / (1024 * 1024)) * 10) / 100);
  const fits = Math.floor(commitMb / 1024);
  let server: TestServer;

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: String(DISK_MB), HOST_MEMORY_COMMIT_PERCENT: '10' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('orgs each within their quota cannot together promise the host more memory than HOST_MEMORY_COMMIT_PERCENT allows', async () => {
    const made = [];
    for (let i = 0; i < fits; i++) made.push(await (await register(server, `commit-${i}`)).vr.sandboxes.create({ name: `commit-${i}`, mem: 1024 }));
    const late = await register(server, 'commit-late');
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey: late.apiKey, json: { name: 'one-too-many', mem: 1024 } });
    expect(res.status).toBe(429);
    expect(await errorOf(res)).toBe(
      `The host is full: its sandboxes are promised ${fits * 1024} of ${commitMb} MiB (HOST_MEMORY_COMMIT_PERCENT 10% of ${Math.floor(totalmem() / (1024 * 1024))} MiB); ask for less memory or try again later`,
    );
    await made[0]!.delete();
    await (await late.vr.sandboxes.create({ name: 'now-fits', mem: 1024 })).delete();
  });
});

describe.skipIf(!support.ok)('host disk commitment', () => {
  let server: TestServer;
  let diskMb: number;

  beforeAll(async () => {
    const dirs = newServerDirs();
    // 10% of the free space may be promised: disks sized so that two fit and a third does not.
    const fs = statfsSync(dirname(dirs.instancesDir));
    const commitMb = Math.floor((Math.floor((fs.bavail * fs.bsize) / (1024 * 1024)) * 10) / 100);
    diskMb = Math.floor(commitMb / 2.5);
    server = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: String(diskMb), HOST_DISK_COMMIT_PERCENT: '10', ORG_MAX_DISK_MB: String(10 * diskMb) }, dirs);
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('orgs each within their quota cannot together promise more disk than HOST_DISK_COMMIT_PERCENT of the free space', async () => {
    const made = [];
    for (let i = 0; i < 2; i++) made.push(await (await register(server, `disk-${i}`)).vr.sandboxes.create({ name: `disk-${i}` }));
    const late = await register(server, 'disk-late');
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey: late.apiKey, json: { name: 'one-too-many' } });
    expect(res.status).toBe(429);
    expect(await errorOf(res)).toMatch(new RegExp(`^The host is full: its sandboxes are promised ${2 * diskMb} MB of disk and ${diskMb} more would pass \\d+ MB \\(HOST_DISK_COMMIT_PERCENT 10% of \\d+ MB free\\)`));
    await made[0]!.delete();
    await (await late.vr.sandboxes.create({ name: 'now-fits' })).delete();
  });
});
