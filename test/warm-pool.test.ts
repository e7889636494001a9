import { hostname } from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../server/config.js';
import { newId } from '../server/store/ids.js';
import { dropMongoDatabase } from './helpers/ferretdb.js';
import { support } from './helpers/sandbox-support.js';
import { newServerDirs, startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const SHAPE = 'debian:1cpu:1024mb';
const DISK_MB = 64;

/** Room for the tests' sandboxes in one org and on the host (64 MB disks, 1 GiB promised each). */
const roomy = {
  SANDBOX_DEFAULT_DISK_MB: String(DISK_MB),
  ORG_MAX_SANDBOXES: '40',
  ORG_MAX_VCPUS: '40',
  ORG_MAX_MEMORY_MB: String(40 * 1024),
  HOST_MEMORY_COMMIT_PERCENT: '10000',
  SANDBOX_PIDS_LIMIT: '256',
  // Ready members are checked against their records often, so a dead one is rebuilt in the test's time.
  HEALTH_INTERVAL_SEC: '1',
};

interface Org {
  apiKey: string;
  orgId: string;
}

async function register(server: TestServer, tag: string): Promise<Org> {
  const reg = await server.client().trpc.auth.register.mutate({ name: 'Pool User', email: uniqueEmail(tag) });
  return { apiKey: reg.apiKey, orgId: reg.orgId };
}

async function post(server: TestServer, org: Org, path: string, json: unknown): Promise<{ status: number; body: { data?: any; error?: string } }> {
  const res = await server.http(path, { method: 'POST', apiKey: org.apiKey, json });
  return { status: res.status, body: (await res.json()) as { data?: any; error?: string } };
}

/** The ids of the pool's running members, from the store (they are records owned by no org). */
async function memberIds(server: TestServer): Promise<string[]> {
  return (await server.app.store.sandboxes.listAll()).filter((r) => r.pool === SHAPE && r.orgId === '').map((r) => r.id);
}

/**
 * Waits (bounded poll) until the pool holds `n` ready members and builds none. Tests also wait for
 * it before closing a server: a member still being built is not among the leftovers it removes.
 */
async function poolFull(server: TestServer, n: number, timeoutMs = 90_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const size = server.app.services.sandboxes.warmPool!.sizes()[SHAPE]!;
    if (size.ready === n && size.building === 0) return;
    if (Date.now() > deadline) throw new Error(`the pool did not reach ${n} ready members: ${JSON.stringify(size)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Every line the server logged with this message fragment. */
function logged(server: TestServer, fragment: string): string[] {
  return server.logLines.filter((l) => l.includes(fragment));
}

describe('WARM_POOL config', () => {
  it('parses entries and refuses a bad one at startup, naming the variable and the entry', () => {
    expect(loadConfig({ WARM_POOL: 'debian:1cpu:1024mb=4, debian:2cpu:2048mb=1' }).WARM_POOL).toEqual([
      { image: 'debian', cpu: 1, memMb: 1024, count: 4, key: 'debian:1cpu:1024mb' },
      { image: 'debian', cpu: 2, memMb: 2048, count: 1, key: 'debian:2cpu:2048mb' },
    ]);
    expect(loadConfig({}).WARM_POOL).toEqual([]);
    expect(() => loadConfig({ WARM_POOL: 'debian:1cpu=4' })).toThrow('Invalid configuration: WARM_POOL="debian:1cpu=4" — expected comma-separated <image>:<n>cpu:<m>mb=<count> entries such as debian:1cpu:1024mb=4 ("debian:1cpu=4" is not <image>:<n>cpu:<m>mb=<count>)');
    expect(() => loadConfig({ WARM_POOL: 'debian:1cpu:1024mb=1,debian:1cpu:1024mb=2' })).toThrow('repeats a shape listed before');
    expect(() => loadConfig({ WARM_POOL: 'debian:99cpu:1024mb=1' })).toThrow('asks for cpu outside 1 to 64');
  });
});

const hostBefore = hostname();

describe.skipIf(!support.ok)('warm pool', () => {
  let server: TestServer;

  beforeAll(async () => {
    server = await startTestServer({ ...roomy, WARM_POOL: `${SHAPE}=2`, METRICS_TOKEN: 'pool-metrics' });
    await poolFull(server, 2);
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('a create of the default shape gets a running member: its env vars reach commands, its labels and name are set, it is in the org and counted', async () => {
    const org = await register(server, 'claim');
    const members = await memberIds(server);
    const created = await post(server, org, '/api/sandboxes', { name: 'from-pool', envVars: { GREETING: 'hello pool', PATH: '/usr/bin:/bin' }, labels: { team: 'warm' } });
    expect(created.status).toBe(201);
    const sb = created.body.data;
    expect(members).toContain(sb.id);
    expect(sb).toMatchObject({ name: 'from-pool', orgId: org.orgId, status: 'running', ready: true, envVars: { GREETING: 'hello pool' }, labels: { team: 'warm' } });
    // The pool's warm-up command left no trace.
    const listed = (await (await server.http(`/api/sandboxes/${sb.id}/commands/list`, { apiKey: org.apiKey })).json()) as { processes: unknown[] };
    expect(listed.processes).toEqual([]);
    const run = await post(server, org, `/api/sandboxes/${sb.id}/exec`, { command: 'echo "$GREETING|$PATH|$VOIDRUN_SANDBOX_ID"' });
    expect(run.body.data.stdout).toBe(`hello pool|/usr/bin:/bin|${sb.id}\n`);
    // Its hostname is its name from the claim on (set host-side in its UTS namespace; the host's own is untouched).
    expect((await post(server, org, `/api/sandboxes/${sb.id}/exec`, { command: 'hostname' })).body.data.stdout).toBe('from-pool\n');
    expect(hostname()).toBe(hostBefore);
    const page = await server.client(org.apiKey).sandboxes.list({ labels: { team: 'warm' } });
    expect(page.sandboxes.map((s) => s.id)).toEqual([sb.id]);
    const limits = await server.http('/api/orgs/me/limits', { apiKey: org.apiKey });
    expect(((await limits.json()) as { data: { usage: { sandboxes: number } } }).data.usage.sandboxes).toBe(1);
    expect(logged(server, `warm pool: from-pool claimed member ${sb.id}`)).toHaveLength(1);
    // The pool builds a member in its place, up to its size and no further.
    await poolFull(server, 2);
    expect((await memberIds(server)).filter((id) => id !== sb.id)).toHaveLength(2);
    await server.http(`/api/sandboxes/${sb.id}`, { method: 'DELETE', apiKey: org.apiKey });
  });

  it("pool members are in no org's listing or quota", async () => {
    const org = await register(server, 'none');
    const page = await server.client(org.apiKey).sandboxes.list();
    expect(page.total).toBe(0);
    const limits = await server.http('/api/orgs/me/limits', { apiKey: org.apiKey });
    expect(((await limits.json()) as { data: { usage: { sandboxes: number; vcpus: number } } }).data.usage).toMatchObject({ sandboxes: 0, vcpus: 0 });
    for (const id of await memberIds(server)) {
      const res = await server.http(`/api/sandboxes/${id}`, { apiKey: org.apiKey });
      expect(res.status).toBe(404);
    }
  });

  it("pool members have no per-sandbox metrics series (they are no org's) and count in the host's allocation", async () => {
    await poolFull(server, 2);
    const members = await memberIds(server);
    const text = await (await server.http('/metrics', { headers: { authorization: 'Bearer pool-metrics' } })).text();
    expect(text).toContain('voidrun_sbx_status');
    for (const id of members) expect(text).not.toContain(`sbx_id="${id}"`);
    expect(text).not.toContain('org_id=""');
    const running = (await server.app.store.sandboxes.listAll()).filter((r) => r.status === 'running');
    expect(/voidrun_host_allocated_vcpus\{[^}]*\} (\d+)/.exec(text)?.[1]).toBe(String(running.length));
    expect(running.length).toBeGreaterThanOrEqual(members.length);
  });

  it('a create of another shape (cpu 2) is created cold, the pool untouched', async () => {
    const org = await register(server, 'shape');
    const members = await memberIds(server);
    const created = await post(server, org, '/api/sandboxes', { name: 'two-cpus', cpu: 2 });
    expect(created.status).toBe(201);
    expect(members).not.toContain(created.body.data.id);
    expect(await memberIds(server)).toEqual(members);
    await server.http(`/api/sandboxes/${created.body.data.id}`, { method: 'DELETE', apiKey: org.apiKey });
  });

  it('a name the org already has is the same 409 as a cold create, and the member stays in the pool', async () => {
    const org = await register(server, 'conflict');
    await poolFull(server, 2);
    const first = await post(server, org, '/api/sandboxes', { name: 'taken' });
    expect(first.status).toBe(201);
    await poolFull(server, 2);
    const members = await memberIds(server);
    const again = await post(server, org, '/api/sandboxes', { name: 'taken' });
    expect(again.status).toBe(409);
    expect(again.body.error).toBe('A sandbox named taken already exists');
    expect(await memberIds(server)).toEqual(members);
    expect(server.app.services.sandboxes.warmPool!.sizes()[SHAPE]).toMatchObject({ ready: 2 });
    // The member given back is claimed by the next create, the same member as before.
    const next = await post(server, org, '/api/sandboxes', { name: 'not-taken' });
    expect(members).toContain(next.body.data.id);
    expect((await post(server, org, `/api/sandboxes/${next.body.data.id}/exec`, { command: 'hostname' })).body.data.stdout).toBe('not-taken\n');
    for (const id of [first.body.data.id, next.body.data.id]) await server.http(`/api/sandboxes/${id}`, { method: 'DELETE', apiKey: org.apiKey });
  });

  it('an empty pool falls back to a cold create and says so in the log', async () => {
    const org = await register(server, 'empty');
    await poolFull(server, 2);
    const ids: string[] = [];
    for (const name of ['drain-1', 'drain-2', 'drain-3']) {
      const created = await post(server, org, '/api/sandboxes', { name });
      expect(created.status).toBe(201);
      ids.push(created.body.data.id);
    }
    // Created back to back: the third (at least) found the pool empty, unless the pool rebuilt one in between.
    const line = logged(server, `warm pool ${SHAPE} is empty: creating drain-3 cold`);
    const members = logged(server, 'claimed member').filter((l) => l.includes('drain-3'));
    expect(line.length + members.length).toBe(1);
    const exec = await post(server, org, `/api/sandboxes/${ids[2]}/exec`, { command: 'echo cold' });
    expect(exec.body.data.stdout).toBe('cold\n');
    for (const id of ids) await server.http(`/api/sandboxes/${id}`, { method: 'DELETE', apiKey: org.apiKey });
  });
});

describe.skipIf(!support.ok)('warm pool under concurrent creates and restarts', () => {
  it('20 concurrent creates against a pool of 5: 20 distinct sandboxes, exactly 5 from the pool (none twice), 15 cold', async () => {
    const server = await startTestServer({ ...roomy, WARM_POOL: `${SHAPE}=5` });
    try {
      await poolFull(server, 5);
      const members = await memberIds(server);
      expect(members).toHaveLength(5);
      const org = await register(server, 'race');
      const results = await Promise.all(Array.from({ length: 20 }, (_, i) => post(server, org, '/api/sandboxes', { name: `race-${i}`, envVars: { N: String(i) } })));
      expect(results.map((r) => r.status)).toEqual(Array(20).fill(201));
      const ids = results.map((r) => r.body.data.id as string);
      expect(new Set(ids).size).toBe(20);
      const fromPool = ids.filter((id) => members.includes(id));
      expect(fromPool.sort()).toEqual([...members].sort());
      // Each claimed member carries its own create's env vars.
      for (const [i, r] of results.entries()) {
        if (!members.includes(r.body.data.id)) continue;
        const run = await post(server, org, `/api/sandboxes/${r.body.data.id}/exec`, { command: 'echo $N' });
        expect(run.body.data.stdout).toBe(`${i}\n`);
      }
      expect((await server.client(org.apiKey).sandboxes.list({ limit: 100 })).total).toBe(20);
      // The pool builds its five again (and no more), one at a time.
      await poolFull(server, 5);
      expect(await memberIds(server)).toHaveLength(5);
    } finally {
      await server.close();
    }
  }, 240_000);

  it('a restart adopts the running members (same ids, never more than the size) and rebuilds dead ones', async () => {
    const dirs = newServerDirs();
    const first = await startTestServer({ ...roomy, WARM_POOL: `${SHAPE}=2` }, dirs);
    let second: TestServer | undefined;
    try {
      await poolFull(first, 2);
      const before = (await memberIds(first)).sort();
      // One member dies while the server is down.
      await first.close({ keepState: true });
      const driver = first.app.services.sandboxes.driverOrNull!;
      await driver.destroy(before[0]!);
      second = await startTestServer({ ...roomy, WARM_POOL: `${SHAPE}=2` }, dirs);
      const after = await memberIds(second);
      expect(after).toContain(before[1]);
      expect(after).not.toContain(before[0]);
      expect(after.length).toBeLessThanOrEqual(2);
      await poolFull(second, 2);
      const rebuilt = await memberIds(second);
      expect(rebuilt).toHaveLength(2);
      expect(rebuilt).toContain(before[1]);
      // An adopted member still serves a claim.
      const org = await register(second, 'adopted');
      const created = await post(second, org, '/api/sandboxes', { name: 'after-restart', envVars: { X: 'y' } });
      expect(rebuilt).toContain(created.body.data.id);
      expect((await post(second, org, `/api/sandboxes/${created.body.data.id}/exec`, { command: 'echo $X' })).body.data.stdout).toBe('y\n');
      await poolFull(second, 2);
    } finally {
      await (second ?? first).close();
    }
  }, 240_000);

  it("a claim is admitted against the org's quota as a cold create is: past it, the same 429, and the member stays in the pool", async () => {
    const server = await startTestServer({ ...roomy, ORG_MAX_SANDBOXES: '1', WARM_POOL: `${SHAPE}=1` });
    try {
      await poolFull(server, 1);
      const [member] = await memberIds(server);
      const org = await register(server, 'quota');
      const first = await post(server, org, '/api/sandboxes', { name: 'only-one' });
      expect(first.body.data.id).toBe(member);
      await poolFull(server, 1);
      const [next] = await memberIds(server);
      const refused = await post(server, org, '/api/sandboxes', { name: 'one-too-many', envVars: { A: 'b' } });
      expect(refused.status).toBe(429);
      expect(refused.body.error).toBe('Org quota exceeded: sandboxes 1 requested, 1 of 1 in use (ORG_MAX_SANDBOXES)');
      expect(await memberIds(server)).toEqual([next]);
      // Given back with the pool's environment: the next org's claim sees only its own env vars.
      const other = await register(server, 'quota-other');
      const taken = await post(server, other, '/api/sandboxes', { name: 'after-refusal' });
      expect(taken.body.data.id).toBe(next);
      expect((await post(server, other, `/api/sandboxes/${next}/exec`, { command: 'echo "[$A]"' })).body.data.stdout).toBe('[]\n');
      await poolFull(server, 1);
    } finally {
      await server.close();
    }
  }, 240_000);

  it('a restart with the shape gone from WARM_POOL removes its members', async () => {
    const dirs = newServerDirs();
    const first = await startTestServer({ ...roomy, WARM_POOL: `${SHAPE}=1` }, dirs);
    await poolFull(first, 1);
    const [member] = await memberIds(first);
    await first.close({ keepState: true });
    const second = await startTestServer({ ...roomy }, dirs);
    try {
      expect(await memberIds(second)).toEqual([]);
      expect(await second.app.services.sandboxes.driverOrNull!.list()).not.toContain(member);
    } finally {
      await second.close();
    }
  }, 240_000);
});

const mongoUri = process.env.MONGO_URI;
if (!mongoUri) console.warn('[warm pool on mongo] SKIPPED: MONGO_URI is not set (.ci/run starts FerretDB and sets it)');

/** The pool's claims and hand-over on the Mongo adapter (FerretDB in CI), through the whole stack and a restart. */
describe.skipIf(!support.ok || !mongoUri)('warm pool on MongoDB (MONGO_URI)', () => {
  it('concurrent creates claim each member once, a taken name gives the member back, and a restart adopts the members', async () => {
    const mongo = { MONGO_URI: mongoUri ?? '', MONGO_DB: `voidrun_pool_${newId()}` };
    const dirs = newServerDirs();
    const first = await startTestServer({ ...roomy, ...mongo, WARM_POOL: `${SHAPE}=2` }, dirs);
    let second: TestServer | undefined;
    try {
      expect(first.app.store.kind).toBe('mongo');
      await poolFull(first, 2);
      const members = await memberIds(first);
      const org = await register(first, 'mongo');
      const results = await Promise.all(Array.from({ length: 5 }, (_, i) => post(first, org, '/api/sandboxes', { name: `m-${i}`, envVars: { N: String(i) } })));
      expect(results.map((r) => r.status)).toEqual([201, 201, 201, 201, 201]);
      const ids = results.map((r) => r.body.data.id as string);
      expect(new Set(ids).size).toBe(5);
      expect(ids.filter((id) => members.includes(id)).sort()).toEqual([...members].sort());
      await poolFull(first, 2);
      const before = await memberIds(first);
      const conflict = await post(first, org, '/api/sandboxes', { name: 'm-0' });
      expect(conflict.status).toBe(409);
      expect(conflict.body.error).toBe('A sandbox named m-0 already exists');
      expect(await memberIds(first)).toEqual(before);
      await first.close({ keepState: true });
      second = await startTestServer({ ...roomy, ...mongo, WARM_POOL: `${SHAPE}=2` }, dirs);
      expect((await memberIds(second)).sort()).toEqual([...before].sort());
      await poolFull(second, 2);
    } finally {
      await (second ?? first).close();
      await dropMongoDatabase(mongo);
    }
  }, 240_000);
});
