import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hashOf, IDEMPOTENCY_PRUNE_GRACE_MS, IdempotencyService } from '../server/services/idempotency.js';
import { newId } from '../server/store/ids.js';
import { openSqliteStore } from '../server/store/sqlite/store.js';
import { dropMongoDatabase } from './helpers/ferretdb.js';
import { support } from './helpers/sandbox-support.js';
import { onSharedStores } from './helpers/shared-store.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { until } from './helpers/until.js';

interface Org {
  apiKey: string;
  orgId: string;
}

type Answer = { status: number; body: { data?: any; error?: string } };

describe.skipIf(!support.ok)('idempotent requests', () => {
  let server: TestServer;

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: '64', ORG_MAX_SANDBOXES: '20', ORG_MAX_VCPUS: '20', ORG_MAX_MEMORY_MB: String(20 * 1024), HOST_MEMORY_COMMIT_PERCENT: '10000' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  async function register(tag: string): Promise<Org> {
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Idem User', email: uniqueEmail(tag) });
    return { apiKey: reg.apiKey, orgId: reg.orgId };
  }

  async function post(org: Org, path: string, json: unknown, key?: string): Promise<Answer> {
    const res = await server.http(path, { method: 'POST', apiKey: org.apiKey, json, headers: key === undefined ? {} : { 'idempotency-key': key } });
    return { status: res.status, body: (await res.json()) as Answer['body'] };
  }

  async function total(org: Org): Promise<number> {
    return (await server.client(org.apiKey).sandboxes.list()).total;
  }

  it('a retried create with the same Idempotency-Key answers the same sandbox (as it is now), never a second one', async () => {
    const org = await register('retry');
    const first = await post(org, '/api/sandboxes', { name: 'once', labels: { a: 'b' } }, 'create-once-1');
    expect(first.status).toBe(201);
    const retry = await post(org, '/api/sandboxes', { labels: { a: 'b' }, name: 'once' }, 'create-once-1');
    expect(retry.status).toBe(201);
    expect(retry.body.data.id).toBe(first.body.data.id);
    expect(await total(org)).toBe(1);
    // The retry's answer is the sandbox's current state: stopped after a stop.
    await post(org, `/api/sandboxes/${first.body.data.id}/stop`, {});
    const later = await post(org, '/api/sandboxes', { name: 'once', labels: { a: 'b' } }, 'create-once-1');
    expect(later.body.data).toMatchObject({ id: first.body.data.id, status: 'stopped' });
    // Without a key, a create is a create (and the name is taken).
    expect((await post(org, '/api/sandboxes', { name: 'once' })).status).toBe(409);
  });

  it('5 concurrent creates with one key make one sandbox, and all 5 answers name it', async () => {
    const org = await register('concurrent');
    const answers = await Promise.all(Array.from({ length: 5 }, () => post(org, '/api/sandboxes', { name: 'together' }, 'together-key')));
    expect(answers.map((a) => a.status)).toEqual([201, 201, 201, 201, 201]);
    expect(new Set(answers.map((a) => a.body.data.id)).size).toBe(1);
    expect(await total(org)).toBe(1);
  });

  it('a different body under a used key is a 409 naming the conflict, and runs nothing', async () => {
    const org = await register('body');
    expect((await post(org, '/api/sandboxes', { name: 'first-body' }, 'body-key')).status).toBe(201);
    const other = await post(org, '/api/sandboxes', { name: 'second-body' }, 'body-key');
    expect(other.status).toBe(409);
    expect(other.body.error).toBe('Idempotency-Key body-key was used for a different sandbox.create request in the last 24 h; send a new key for a new request');
    expect(await total(org)).toBe(1);
  });

  it('a body differing only in an env var named idempotencyKey is another body: 409, not the first sandbox', async () => {
    const org = await register('nested-key');
    expect((await post(org, '/api/sandboxes', { name: 'nested', envVars: { idempotencyKey: 'v1' } }, 'nested-key')).status).toBe(201);
    const other = await post(org, '/api/sandboxes', { name: 'nested', envVars: { idempotencyKey: 'v2' } }, 'nested-key');
    expect(other.status).toBe(409);
    expect(other.body.error).toContain('was used for a different sandbox.create request');
  });

  it('idempotencyKey in the tRPC input works as the header does', async () => {
    const org = await register('trpc');
    const trpc = server.client(org.apiKey).trpc;
    const a = await trpc.sandbox.create.mutate({ name: 'via-trpc', idempotencyKey: 'trpc-key-1' });
    const b = await trpc.sandbox.create.mutate({ name: 'via-trpc', idempotencyKey: 'trpc-key-1' });
    expect(b.id).toBe(a.id);
    // The same key over REST is the same key (the header and the input are one key space).
    const rest = await post(org, '/api/sandboxes', { name: 'via-trpc' }, 'trpc-key-1');
    expect(rest.body.data.id).toBe(a.id);
    await expect(trpc.sandbox.create.mutate({ name: 'other', idempotencyKey: 'trpc-key-1' })).rejects.toThrow(/was used for a different sandbox.create request/);
    expect(await total(org)).toBe(1);
  });

  it("different orgs' same key are independent", async () => {
    const [one, two] = [await register('org-a'), await register('org-b')];
    const a = await post(one, '/api/sandboxes', { name: 'shared-name' }, 'same-key');
    const b = await post(two, '/api/sandboxes', { name: 'shared-name' }, 'same-key');
    expect([a.status, b.status]).toEqual([201, 201]);
    expect(a.body.data.id).not.toBe(b.body.data.id);
    expect(b.body.data.orgId).toBe(two.orgId);
  });

  it('a failed first attempt frees its key: the retry runs', async () => {
    const org = await register('failed');
    const blocker = await post(org, '/api/sandboxes', { name: 'busy-name' });
    const failed = await post(org, '/api/sandboxes', { name: 'busy-name' }, 'retry-after-failure');
    expect(failed.status).toBe(409);
    expect(failed.body.error).toBe('A sandbox named busy-name already exists');
    await server.http(`/api/sandboxes/${blocker.body.data.id}`, { method: 'DELETE', apiKey: org.apiKey });
    const retry = await post(org, '/api/sandboxes', { name: 'busy-name' }, 'retry-after-failure');
    expect(retry.status).toBe(201);
    expect(retry.body.data.id).not.toBe(blocker.body.data.id);
  });

  it('a malformed key is a 400 saying what a key holds, and a header and input that differ are a 400', async () => {
    const org = await register('bad-key');
    for (const key of ['has space', 'x'.repeat(256), 'semi;colon', '"quoted"']) {
      const res = await server.http('/api/sandboxes', { method: 'POST', apiKey: org.apiKey, json: { name: 'never' }, headers: { 'idempotency-key': key } });
      expect(res.status).toBe(400);
      expect(((await res.json()) as { error: string }).error).toContain('1 to 255 characters: letters, digits and . _ : ~ + / = -');
    }
    const both = await post(org, '/api/sandboxes', { name: 'never', idempotencyKey: 'one' }, 'two');
    expect(both.status).toBe(400);
    expect(both.body.error).toBe('the Idempotency-Key header and idempotencyKey differ; send the key once');
    expect(await total(org)).toBe(0);
  });

  it('a retried commands/run answers the same process handle and starts no second process', async () => {
    const org = await register('commands');
    const sb = (await post(org, '/api/sandboxes', { name: 'runner' })).body.data;
    const path = `/api/sandboxes/${sb.id}/commands/run`;
    const first = await server.http(path, { method: 'POST', apiKey: org.apiKey, json: { command: 'sleep 30' }, headers: { 'idempotency-key': 'run-1' } });
    const retry = await server.http(path, { method: 'POST', apiKey: org.apiKey, json: { command: 'sleep 30' }, headers: { 'idempotency-key': 'run-1' } });
    const [a, b] = [(await first.json()) as { pid: number }, (await retry.json()) as { pid: number }];
    expect(a.pid).toBeGreaterThan(0);
    expect(b.pid).toBe(a.pid);
    const list = (await (await server.http(`/api/sandboxes/${sb.id}/commands/list`, { apiKey: org.apiKey })).json()) as { processes: Array<{ pid: number; command: string }> };
    expect(list.processes.filter((p) => p.command.includes('sleep 30'))).toHaveLength(1);
    // The same key on another sandbox is another body: 409.
    const other = (await post(org, '/api/sandboxes', { name: 'runner-2' })).body.data;
    const elsewhere = await post(org, `/api/sandboxes/${other.id}/commands/run`, { command: 'sleep 30' }, 'run-1');
    expect(elsewhere.status).toBe(409);
  });

  it('a replayed commands/run never hands back a pid that no longer names its process: after a restart of the sandbox it is a 409', async () => {
    const org = await register('pid-reuse');
    const sb = (await post(org, '/api/sandboxes', { name: 'reuser' })).body.data;
    const path = `/api/sandboxes/${sb.id}/commands/run`;
    const first = await post(org, path, { command: 'sleep 30' }, 'run-reused');
    expect(first.status).toBe(200);
    // A stop and start: the agent's process table starts empty, and pids start over.
    expect((await post(org, `/api/sandboxes/${sb.id}/stop`, {})).status).toBe(200);
    expect((await post(org, `/api/sandboxes/${sb.id}/start`, {})).status).toBe(200);
    const replay = () => post(org, path, { command: 'sleep 30' }, 'run-reused');
    const pid = (first.body as unknown as { pid: number }).pid;
    const gone = await replay();
    expect(gone.status).toBe(409);
    expect(gone.body.error).toBe(`The process Idempotency-Key run-reused started has exited and pid ${pid} is no longer listed; send a new key to start a new one`);
    // Another command started now: the first pid of the new boot, usually the same number.
    const next = (await post(org, path, { command: 'sleep 31' })).body as unknown as { pid: number };
    const reused = await replay();
    expect(reused.status).toBe(409);
    const now = next.pid === pid ? 'now names another process' : 'is no longer listed';
    expect(reused.body.error).toBe(`The process Idempotency-Key run-reused started has exited and pid ${pid} ${now}; send a new key to start a new one`);
    const list = (await (await server.http(`/api/sandboxes/${sb.id}/commands/list`, { apiKey: org.apiKey })).json()) as { processes: Array<{ command: string }> };
    expect(list.processes.map((p) => p.command)).toEqual(['sleep 31']);
  });

  it('a retried restore answers the same restored sandbox', async () => {
    const org = await register('restore');
    const sb = (await post(org, '/api/sandboxes', { name: 'source' })).body.data;
    const snap = (await post(org, `/api/sandboxes/${sb.id}/snapshot`, {})).body.data as { full_path: string };
    const a = await post(org, '/api/sandboxes/restore', { snapshot_path: snap.full_path, new_id: 'restored' }, 'restore-1');
    const b = await post(org, '/api/sandboxes/restore', { snapshot_path: snap.full_path, new_id: 'restored' }, 'restore-1');
    expect(a.status).toBe(201);
    expect(b.status).toBe(201);
    expect(b.body.data.id).toBe(a.body.data.id);
    expect(await total(org)).toBe(2);
  }, 60_000);
});

describe('idempotency keys expire', () => {
  it('a key past its lifetime runs the request again, and pruning removes it (real SQLite store)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-idem-'));
    const store = openSqliteStore(dir);
    const service = new IdempotencyService({ repository: store.idempotency, log: pino({ level: 'silent' }), ttlMs: 1 });
    try {
      const principal = { orgId: 'a'.repeat(24), keyId: 'k', userId: 'u' };
      let runs = 0;
      const replay = { save: (n: number) => String(n), load: async (s: string) => Number(s) };
      const run = () => service.run(principal, 'sandbox.create', 'expiring', { name: 'x' }, replay, async () => ++runs);
      expect(await run()).toBe(1);
      await new Promise((r) => setTimeout(r, 5));
      // Expired: the retry runs again rather than answering the old result.
      expect(await run()).toBe(2);
      await new Promise((r) => setTimeout(r, 5));
      // Kept a grace period past expiry (the takeover margin), then pruned: both claims of the key.
      expect(await service.prune()).toBe(0);
      expect(await service.prune(new Date(Date.now() + IDEMPOTENCY_PRUNE_GRACE_MS + 1))).toBe(2);
      expect(await store.idempotency.find(principal.orgId, 'sandbox.create', 'expiring')).toBeNull();
    } finally {
      service.close();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('idempotency request hash and bounds', () => {
  it('an env var or label named idempotencyKey is part of the body (only the top-level key is left out)', () => {
    expect(hashOf({ name: 'a', envVars: { idempotencyKey: 'secret-1' } })).not.toBe(hashOf({ name: 'a', envVars: {} }));
    expect(hashOf({ name: 'a', labels: { idempotencyKey: 'v1' } })).not.toBe(hashOf({ name: 'a', labels: { idempotencyKey: 'v2' } }));
    expect(hashOf({ name: 'a', idempotencyKey: 'k' })).toBe(hashOf({ name: 'a' }));
    expect(hashOf({ b: 1, a: { d: 2, c: 3 } })).toBe(hashOf({ a: { c: 3, d: 2 }, b: 1 }));
  });

  it('an org past its bound of live keys gets a 429 naming it for a new key, and still its replays (real SQLite store)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-idem-'));
    const store = openSqliteStore(dir);
    const service = new IdempotencyService({ repository: store.idempotency, log: pino({ level: 'silent' }), maxKeysPerOrg: 2 });
    try {
      const principal = { orgId: 'b'.repeat(24), keyId: 'k', userId: 'u' };
      const other = { ...principal, orgId: 'c'.repeat(24) };
      const replay = { save: (n: number) => String(n), load: async (s: string) => Number(s) };
      let runs = 0;
      const run = (who: typeof principal, key: string) => service.run(who, 'exec.startCommand', key, { command: 'true' }, replay, async () => ++runs);
      expect(await run(principal, 'k1')).toBe(1);
      expect(await run(principal, 'k2')).toBe(2);
      await expect(run(principal, 'k3')).rejects.toMatchObject({ code: 'TOO_MANY_REQUESTS', message: expect.stringContaining('holds 2 idempotency keys from the last 24 h (IDEMPOTENCY_MAX_KEYS_PER_ORG)') });
      // A key already held is answered; another org has its own bound.
      expect(await run(principal, 'k1')).toBe(1);
      expect(await run(other, 'k3')).toBe(3);
      expect(runs).toBe(3);
    } finally {
      service.close();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a failed request ends only its own claim: the retry after it takes the key over and runs once (real SQLite store)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-idem-'));
    const store = openSqliteStore(dir);
    const service = new IdempotencyService({ repository: store.idempotency, log: pino({ level: 'silent' }) });
    try {
      const principal = { orgId: 'd'.repeat(24), keyId: 'k', userId: 'u' };
      const replay = { save: (n: number) => String(n), load: async (s: string) => Number(s) };
      let runs = 0;
      const failing = service.run(principal, 'sandbox.create', 'fails-once', { name: 'x' }, replay, async () => {
        runs++;
        throw new Error('name taken');
      });
      await expect(failing).rejects.toThrow('name taken');
      const retries = await Promise.all([1, 2, 3].map(() => service.run(principal, 'sandbox.create', 'fails-once', { name: 'x' }, replay, async () => ++runs)));
      expect(retries).toEqual([2, 2, 2]);
      expect(await store.idempotency.find(principal.orgId, 'sandbox.create', 'fails-once')).toMatchObject({ gen: 1, result: '2' });
    } finally {
      service.close();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

const mongoUri = process.env.MONGO_URI;
if (!mongoUri) console.warn('[idempotency on mongo] SKIPPED: MONGO_URI is not set (.ci/run starts FerretDB and sets it)');

/** Key claims on the Mongo adapter (FerretDB in CI): inserts against the unique _id, through the whole stack. */
describe.skipIf(!support.ok || !mongoUri)('idempotent requests on MongoDB (MONGO_URI)', () => {
  it('5 concurrent creates with one key make one sandbox; another body is a 409; a failure frees the key', async () => {
    const mongo = { MONGO_URI: mongoUri ?? '', MONGO_DB: `voidrun_idem_${newId()}` };
    const server = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: '64', ...mongo });
    try {
      expect(server.app.store.kind).toBe('mongo');
      const reg = await server.client().trpc.auth.register.mutate({ name: 'Idem User', email: uniqueEmail('mongo') });
      const post = async (json: unknown, key: string): Promise<Answer> => {
        const res = await server.http('/api/sandboxes', { method: 'POST', apiKey: reg.apiKey, json, headers: { 'idempotency-key': key } });
        return { status: res.status, body: (await res.json()) as Answer['body'] };
      };
      const answers = await Promise.all(Array.from({ length: 5 }, () => post({ name: 'on-mongo' }, 'mongo-key')));
      expect(answers.map((a) => a.status)).toEqual([201, 201, 201, 201, 201]);
      expect(new Set(answers.map((a) => a.body.data.id)).size).toBe(1);
      expect((await post({ name: 'other' }, 'mongo-key')).status).toBe(409);
      expect((await post({ name: 'on-mongo' }, 'mongo-taken')).status).toBe(409);
      await server.http(`/api/sandboxes/${answers[0]!.body.data.id}`, { method: 'DELETE', apiKey: reg.apiKey });
      expect((await post({ name: 'on-mongo' }, 'mongo-taken')).status).toBe(201);
      expect((await server.client(reg.apiKey).sandboxes.list()).total).toBe(1);
    } finally {
      await server.close();
      await dropMongoDatabase(mongo);
    }
  }, 120_000);
});

/**
 * Keys shared by fleet nodes (two IdempotencyServices with leases on two connections to one real
 * store): a claim still running on one node is never taken over by a node that started after it,
 * and a claim its node stopped renewing (died) is taken over once its lease runs out.
 */
onSharedStores('idempotency keys across fleet nodes', (kind, open) => {
  describe(`idempotency keys across fleet nodes: ${kind}`, () => {
    const principal = { orgId: newId(), keyId: 'k', userId: 'u' };
    const replay = { save: (n: number) => String(n), load: async (s: string) => Number(s) };
    const log = pino({ level: 'silent' });

    it("a request still running on one node is not run again by a node started after it (409 in progress), and a dead node's claim is taken over after its lease", async () => {
      const { a, b, cleanup } = await open();
      const first = new IdempotencyService({ repository: a.idempotency, log, leaseMs: 300 });
      let release = () => {};
      const running = new Promise<void>((r) => (release = r));
      let runs = 0;
      const slow = first.run(principal, 'sandbox.create', 'slow', { name: 'x' }, replay, async () => {
        runs++;
        await running;
        return 1;
      });
      await until(() => a.idempotency.find(principal.orgId, 'sandbox.create', 'slow'), (c) => c !== null, 'the first claim');
      // Started after the claim, and asked after the lease's first length has passed (it was renewed).
      const second = new IdempotencyService({ repository: b.idempotency, log, leaseMs: 300 });
      try {
        await until(async () => (await b.idempotency.find(principal.orgId, 'sandbox.create', 'slow'))!.expiresAt.getTime() - Date.now(), (ms) => ms > 250, 'a renewal');
        const again = () => second.run(principal, 'sandbox.create', 'slow', { name: 'x' }, replay, async () => ++runs);
        await expect(again()).rejects.toThrow(/still in progress/);
        release();
        expect(await slow).toBe(1);
        expect(await again()).toBe(1);
        expect(runs).toBe(1);
        // Done: the key holds its result for the whole TTL, not the lease.
        expect((await b.idempotency.find(principal.orgId, 'sandbox.create', 'slow'))!.expiresAt.getTime() - Date.now()).toBeGreaterThan(60 * 60 * 1000);

        // A node that died mid-request: its claim, never renewed, holds the key until its lease ends.
        const now = new Date();
        expect(await a.idempotency.claim({ orgId: principal.orgId, operation: 'sandbox.create', key: 'dead', gen: 0, requestHash: hashOf({ name: 'y' }), createdAt: now, expiresAt: new Date(now.getTime() + 300) })).toBe(true);
        const retry = () => second.run(principal, 'sandbox.create', 'dead', { name: 'y' }, replay, async () => 7);
        const answered = await until(() => retry().catch((err: Error) => err.message), (v) => v === 7, 'the takeover after the lease');
        expect(answered).toBe(7);
        expect(await b.idempotency.find(principal.orgId, 'sandbox.create', 'dead')).toMatchObject({ gen: 1, result: '7' });
      } finally {
        release();
        first.close();
        second.close();
        await cleanup();
      }
    });
  });
});
