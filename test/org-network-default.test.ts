import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { ForbiddenError } from '../client/index.js';
import type { OrgNetworkPolicy } from '../shared/index.js';
import { dropMongoDatabase } from './helpers/ferretdb.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/**
 * An org's default network policy (`GET`/`PUT /orgs/me/network`): what new sandboxes of the org get
 * where their create leaves fields out. Sandboxes are loopback-only here (SANDBOX_NETWORK=none):
 * only the resolved policy they answer with is checked, no traffic is sent.
 */
const SERVER_CAP = 7_000_000;

let server: TestServer;

async function register(name: string) {
  const res = await server.http('/api/register', { method: 'POST', json: { name, email: uniqueEmail('orgnet') } });
  expect(res.status).toBe(200);
  return ((await res.json()) as { data: { apiKey: string; orgId: string; userId: string } }).data;
}

beforeAll(async () => {
  server = await startTestServer({ SANDBOX_DEFAULT_EGRESS: 'allow', SANDBOX_EGRESS_BYTES_MAX: String(SERVER_CAP) });
}, 60_000);

afterAll(async () => {
  await server?.close();
});

describe('the org default network policy (REST and typed client)', () => {
  let a: Awaited<ReturnType<typeof register>>;
  let vr: VoidRunClient;
  const put = (json: unknown, apiKey = a.apiKey, headers: Record<string, string> = {}) => server.http('/api/orgs/me/network', { method: 'PUT', apiKey, headers, json });

  beforeAll(async () => {
    a = await register('Net Owner');
    vr = server.client(a.apiKey);
  });

  it('is the server default until the org sets one', async () => {
    const res = await server.http('/api/orgs/me/network', { apiKey: a.apiKey });
    expect(res.status).toBe(200);
    const body = (await res.json()) as { data: OrgNetworkPolicy };
    expect(body.data).toEqual({ egress: 'allow', allow: [], deny: [], maxEgressBytes: SERVER_CAP, orgSet: [] });
    expect(await vr.org.network()).toEqual(body.data);
  });

  it('is set by the owner, echoed resolved, and replaced whole by the next PUT', async () => {
    const res = await put({ egress: 'deny', allow: ['PyPI.org.', '*.pythonhosted.org', '203.0.113.7'] });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { data: OrgNetworkPolicy }).data).toEqual({
      egress: 'deny',
      allow: ['pypi.org', '*.pythonhosted.org', '203.0.113.7/32'],
      deny: [],
      maxEgressBytes: SERVER_CAP,
      orgSet: ['egress', 'allow'],
    });
    // SANDBOX_EGRESS_BYTES_MAX is a ceiling: "no cap" is the ceiling, a lower cap stays.
    expect(await vr.org.updateNetwork({ maxEgressBytes: 0 })).toEqual({ egress: 'allow', allow: [], deny: [], maxEgressBytes: SERVER_CAP, orgSet: ['maxEgressBytes'] });
    expect(await vr.org.updateNetwork({ maxEgressBytes: 1000 })).toMatchObject({ maxEgressBytes: 1000 });
    expect(await vr.org.updateNetwork({})).toEqual({ egress: 'allow', allow: [], deny: [], maxEgressBytes: SERVER_CAP, orgSet: [] });
  });

  it('refuses bad entries naming them, and mode (the host decides it)', async () => {
    const bad = await put({ egress: 'deny', allow: ['pypi.org', 'no spaces.org'] });
    expect(bad.status).toBe(400);
    expect(JSON.stringify(await bad.json())).toMatch(/allow\.1.*no spaces\.org/);
    const mode = await put({ mode: 'bridge' });
    expect(mode.status).toBe(400);
    expect(JSON.stringify(await mode.json())).toMatch(/mode is not part of an org default/);
    const above = await put({ maxEgressBytes: SERVER_CAP + 1 });
    expect(above.status).toBe(400);
    expect(JSON.stringify(await above.json())).toMatch(/above this server's ceiling SANDBOX_EGRESS_BYTES_MAX=7000000/);
    // Only the operator opens private ranges (SANDBOX_PRIVATE_ALLOW, unset here).
    const lan = await put({ allow: ['pypi.org', '10.0.0.0/8'] });
    expect(lan.status).toBe(400);
    expect(JSON.stringify(await lan.json())).toMatch(/10\.0\.0\.0\/8 is in a private range.*SANDBOX_PRIVATE_ALLOW/);
    const egress = await put({ egress: 'sometimes' });
    expect(egress.status).toBe(400);
    expect(JSON.stringify(await egress.json())).toMatch(/egress/);
    expect((await vr.org.network()).orgSet).toEqual([]);
  });

  it('may be changed by the owner only: a member gets a 403 naming the role', async () => {
    const b = await register('Net Member');
    expect(await server.app.store.orgs.addMember(a.orgId, b.userId)).toBe(true);
    const asMember = { 'x-org-id': a.orgId };
    expect((await server.http('/api/orgs/me/network', { apiKey: b.apiKey, headers: asMember })).status).toBe(200);
    const denied = await put({ egress: 'deny' }, b.apiKey, asMember);
    expect(denied.status).toBe(403);
    expect(JSON.stringify(await denied.json())).toMatch(/owner/);
    await expect(server.client(b.apiKey, { orgId: a.orgId }).org.updateNetwork({ egress: 'deny' })).rejects.toBeInstanceOf(ForbiddenError);
    expect((await vr.org.network()).orgSet).toEqual([]);
    // In their own org the member is the owner.
    expect((await put({ egress: 'deny' }, b.apiKey)).status).toBe(200);
    expect((await put({}, b.apiKey)).status).toBe(200);
  });

  it('needs an API key', async () => {
    expect((await server.http('/api/orgs/me/network')).status).toBe(401);
    expect((await server.http('/api/orgs/me/network', { method: 'PUT', json: {} })).status).toBe(401);
  });
});

describe.skipIf(!support.ok)('new sandboxes get their org default', () => {
  let owner: Awaited<ReturnType<typeof register>>;
  let other: Awaited<ReturnType<typeof register>>;
  const made: SandboxHandle[] = [];
  const create = async (vr: VoidRunClient, name: string, network?: Record<string, unknown>) => {
    const box = await vr.sandboxes.create({ name, ...(network ? { network } : {}) });
    made.push(box);
    return box;
  };

  beforeAll(async () => {
    [owner, other] = await Promise.all([register('Default Org'), register('Other Org')]);
    const res = await server.http('/api/orgs/me/network', { method: 'PUT', apiKey: owner.apiKey, json: { egress: 'deny', allow: ['allowed.test'], deny: ['203.0.113.0/24'], maxEgressBytes: 5000 } });
    expect(res.status).toBe(200);
  }, 60_000);

  afterAll(async () => {
    await Promise.all(made.map((box) => box.delete().catch(() => {})));
  }, 120_000);

  it('applies where the create omits fields; the create\'s own fields win; another org keeps the server default; existing sandboxes keep theirs', async () => {
    const vr = server.client(owner.apiKey);
    const plain = await create(vr, 'org-default');
    expect(plain.info.network).toEqual({ mode: 'none', egress: 'deny', allow: ['allowed.test'], deny: ['203.0.113.0/24'], maxEgressBytes: 5000, egressCut: false });

    const own = await create(vr, 'own-fields', { egress: 'allow', allow: [], maxEgressBytes: 0 });
    expect(own.info.network).toEqual({ mode: 'none', egress: 'allow', allow: [], deny: ['203.0.113.0/24'], maxEgressBytes: SERVER_CAP, egressCut: false });
    // The ceiling holds for a sandbox's own cap too: above it is a 400 naming it; a lower one is kept.
    const above = await server.http(`/api/sandboxes/${own.id}/network`, { method: 'PUT', apiKey: owner.apiKey, json: { maxEgressBytes: SERVER_CAP + 1 } });
    expect(above.status).toBe(400);
    expect(JSON.stringify(await above.json())).toMatch(/maxEgressBytes 7000001 is above this server's ceiling SANDBOX_EGRESS_BYTES_MAX=7000000/);
    const lower = await server.http(`/api/sandboxes/${own.id}/network`, { method: 'PUT', apiKey: owner.apiKey, json: { maxEgressBytes: 1000 } });
    expect(((await lower.json()) as { data: { network: unknown } }).data.network).toMatchObject({ maxEgressBytes: 1000 });

    const elsewhere = await create(server.client(other.apiKey), 'server-default');
    expect(elsewhere.info.network).toEqual({ mode: 'none', egress: 'allow', allow: [], deny: [], maxEgressBytes: SERVER_CAP, egressCut: false });

    // Removing the org default changes no existing sandbox; the next one gets the server's.
    expect(await vr.org.updateNetwork({})).toMatchObject({ orgSet: [] });
    expect((await plain.refresh()).network).toEqual(plain.info.network);
    expect((await server.http(`/api/sandboxes/${plain.id}`, { apiKey: owner.apiKey }).then((r) => r.json()) as { data: { network: unknown } }).data.network).toMatchObject({ egress: 'deny', allow: ['allowed.test'] });
    const after = await create(vr, 'after-removal');
    expect(after.info.network).toEqual({ mode: 'none', egress: 'allow', allow: [], deny: [], maxEgressBytes: SERVER_CAP, egressCut: false });
  }, 240_000);

  it("the typed client changes a sandbox's own policy with updateNetwork, and a bad entry is refused naming it", async () => {
    const box = await create(server.client(other.apiKey), 'client-policy');
    expect(await box.updateNetwork({ egress: 'deny', allow: ['pypi.org', '*.pythonhosted.org'] })).toMatchObject({ egress: 'deny', allow: ['pypi.org', '*.pythonhosted.org'] });
    expect((await box.refresh()).network).toMatchObject({ egress: 'deny', allow: ['pypi.org', '*.pythonhosted.org'] });
    await expect(box.updateNetwork({ allow: ['no spaces.org'] })).rejects.toThrow(/no spaces\.org/);
  }, 120_000);
});

/** The org default through the real server on each store, kept across a restart (a second server on the same data). */
function keptAcrossRestart(kind: string, env: () => Record<string, string> | null) {
  describe.skipIf(env() === null)(`the org default on the ${kind} store`, () => {
    it('is kept on the org record across a restart', async () => {
      let first: TestServer | undefined = await startTestServer(env()!);
      let second: TestServer | undefined;
      try {
        const res = await first.http('/api/register', { method: 'POST', json: { name: 'Restart Owner', email: uniqueEmail('orgnet') } });
        const { apiKey } = ((await res.json()) as { data: { apiKey: string } }).data;
        const set = await first.client(apiKey).org.updateNetwork({ egress: 'deny', allow: ['allowed.test'], maxEgressBytes: 0 });
        expect(set).toEqual({ egress: 'deny', allow: ['allowed.test'], deny: [], maxEgressBytes: null, orgSet: ['egress', 'allow', 'maxEgressBytes'] });
        await first.close({ keepState: true });
        second = await startTestServer(env()!, first.dirs);
        first = undefined;
        expect(await second.client(apiKey).org.network()).toEqual(set);
      } finally {
        await first?.close();
        await second?.close();
        await dropMongoDatabase(env());
      }
    }, 120_000);
  });
}

keptAcrossRestart('sqlite', () => ({}));
const restartDb = `voidrun_orgnet_${process.pid}_${Date.now()}`;
keptAcrossRestart('mongo', () => (process.env.MONGO_URI ? { MONGO_URI: process.env.MONGO_URI, MONGO_DB: restartDb } : null));
