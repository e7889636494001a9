import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ForbiddenError, InvalidInputError, NotFoundError, UnauthorizedError } from '../client/index.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

let server: TestServer;
beforeAll(async () => {
  server = await startTestServer();
});
afterAll(async () => {
  await server?.close();
});

async function register(name = 'Test User') {
  const res = await server.http('/api/register', { method: 'POST', json: { name, email: uniqueEmail() } });
  expect(res.status).toBe(200);
  const body = (await res.json()) as { status: string; message: string; data: { orgId: string; apiKey: string; keyId: string; userId: string } };
  return body;
}

describe('registration over REST', () => {
  it('returns the envelope with orgId and a prefixed key shown once', async () => {
    const body = await register();
    expect(body.status).toBe('success');
    expect(body.message).toBe('User registered successfully');
    expect(body.data.orgId).toMatch(/^[0-9a-f]{24}$/);
    expect(body.data.apiKey).toMatch(/^vr_[A-Za-z0-9_-]{43}$/);
  });

  it("answers 200 with the contract's fields (apiKey the plain key) and the original's user, org and generated key", async () => {
    const email = uniqueEmail('fields');
    const res = await server.http('/api/register', { method: 'POST', json: { name: 'Field User', email } });
    // 200, not the original code's 201: clients generated from the contract read only a 200.
    expect(res.status).toBe(200);
    const { data } = (await res.json()) as { data: Record<string, unknown> & { apiKey: string; orgId: string; userId: string; keyId: string } };
    expect(data).toMatchObject({
      user: { id: data.userId, name: 'Field User', email },
      org: { id: data.orgId, name: expect.any(String) },
      generatedKey: { plainKey: data.apiKey, keyId: data.keyId, orgId: data.orgId, keyName: 'Default Key', createdAt: expect.any(String), expiresIn: expect.any(String) },
    });
    expect((await server.http('/api/orgs/me', { apiKey: data.apiKey })).status).toBe(200);
  });

  it('answers 400 naming the email to a second registration with the same email, in any case (the contract and the original; not 409)', async () => {
    const email = uniqueEmail('dup');
    expect((await server.http('/api/register', { method: 'POST', json: { name: 'First', email } })).status).toBe(200);
    const res = await server.http('/api/register', { method: 'POST', json: { name: 'Second', email: email.toUpperCase() } });
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({ error: expect.stringMatching(/email.*already registered/) });
    // Two at once: the unique index decides, and the loser gets the same 400.
    const racing = uniqueEmail('race');
    const statuses = await Promise.all([1, 2, 3].map(() => server.http('/api/register', { method: 'POST', json: { name: 'Racer', email: racing } }).then((r) => r.status)));
    expect(statuses.sort()).toEqual([200, 400, 400]);
  });

  it('answers 400 naming the offending field', async () => {
    const res = await server.http('/api/register', { method: 'POST', json: { name: 'Valid Name', email: 'not-an-email' } });
    expect(res.status).toBe(400);
    const body = (await res.json()) as { error: string; details?: string };
    expect(body.error).toContain('email');
    expect(body).not.toHaveProperty('stack');
  });

  it('answers 400 to malformed JSON', async () => {
    const res = await server.http('/api/register', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"name": "x",' });
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({ error: 'Malformed JSON body' });
  });

  it('answers 413 to an oversized body', async () => {
    const res = await server.http('/api/register', { method: 'POST', json: { name: 'x'.repeat(2 * 1024 * 1024), email: uniqueEmail() } });
    expect(res.status).toBe(413);
    expect(await res.json()).toMatchObject({ error: expect.stringContaining('larger than') });
  });

  it('answers 415 to a body that is not JSON', async () => {
    const res = await server.http('/api/register', { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'name=x' });
    expect(res.status).toBe(415);
  });
});

describe('routing', () => {
  it('answers unknown routes with a JSON 404', async () => {
    const res = await server.http('/api/definitely/not/here');
    expect(res.status).toBe(404);
    expect(res.headers.get('content-type')).toContain('application/json');
    expect(await res.json()).toMatchObject({ error: 'No route for GET /api/definitely/not/here' });
    expect((await server.http('/elsewhere')).status).toBe(404);
  });

  it('serves /api/version without a key', async () => {
    const res = await server.http('/api/version');
    expect(res.status).toBe(200);
    // Bare, as the original sends it.
    expect(await res.json()).toEqual({
      version: expect.any(String),
      commit: expect.any(String),
      buildTime: expect.any(String),
      // Ours, not the original's: which sandbox driver runs and why (null when none can).
      driver: expect.objectContaining({ reason: expect.any(String) }),
      // Ours too: the node's fleet role (one process: all) and its id (README "Fleet").
      role: 'all',
      nodeId: expect.stringMatching(/^node-[0-9a-f]{12}$/),
    });
  });
});

describe('API keys over REST', () => {
  it('lets a key list, create and revoke keys; a revoked key gets 401 on its very next request', async () => {
    const { data } = await register();
    const { orgId, apiKey } = data;
    const me = await server.http('/api/orgs/me', { apiKey });
    expect(me.status).toBe(200);
    expect(((await me.json()) as { data: { id: string } }).data.id).toBe(orgId);

    const created = await server.http(`/api/orgs/${orgId}/apikeys`, { method: 'POST', apiKey, json: { orgId, keyName: 'CI key' } });
    expect(created.status).toBe(200);
    const second = (await created.json()) as { plainKey: string; keyId: string; keyName: string };
    expect(second.keyName).toBe('CI key');

    const list = await server.http(`/api/orgs/${orgId}/apikeys`, { apiKey: second.plainKey });
    const keys = (await list.json()) as Array<{ id: string; name: string; isActive: boolean }>;
    expect(keys.map((k) => k.name)).toEqual(['CI key', 'Default Key']);
    expect(JSON.stringify(keys)).not.toContain(second.plainKey);
    expect(JSON.stringify(keys)).not.toMatch(/keyHash|[0-9a-f]{64}/);

    const revoked = await server.http(`/api/orgs/${orgId}/apikeys/${second.keyId}`, { method: 'DELETE', apiKey });
    expect(revoked.status).toBe(200);
    expect(await revoked.json()).toMatchObject({ status: 'success', data: { keyId: second.keyId, revoked: true } });

    const after = await server.http('/api/orgs/me', { apiKey: second.plainKey });
    expect(after.status).toBe(401);
    expect(await after.json()).toEqual({ error: expect.stringContaining('Invalid API key'), code: 'UNAUTHORIZED' });
    const again = await server.http(`/api/orgs/${orgId}/apikeys/${second.keyId}`, { method: 'DELETE', apiKey });
    expect(again.status).toBe(404);
  });

  it('deactivates and reactivates a key, effective on the next request', async () => {
    const { data } = await register();
    const { orgId, apiKey } = data;
    const created = await server.http(`/api/orgs/${orgId}/apikeys`, { method: 'POST', apiKey, json: { orgId, keyName: 'toggled' } });
    const key = (await created.json()) as { plainKey: string; keyId: string };
    // Used once first: the server has read (and may hold) the key when it is deactivated.
    expect((await server.http('/api/orgs/me', { apiKey: key.plainKey })).status).toBe(200);

    const off = await server.http(`/api/orgs/${orgId}/apikeys/${key.keyId}/activate`, { method: 'POST', apiKey, json: { isActive: false } });
    expect(off.status).toBe(200);
    expect(((await off.json()) as { data: { isActive: boolean } }).data.isActive).toBe(false);
    const denied = await server.http('/api/orgs/me', { apiKey: key.plainKey });
    expect(denied.status).toBe(401);
    expect(((await denied.json()) as { error: string }).error).toContain('deactivated');

    const on = await server.http(`/api/orgs/${orgId}/apikeys/${key.keyId}/activate`, { method: 'POST', apiKey, json: { isActive: true } });
    expect(on.status).toBe(200);
    expect((await server.http('/api/orgs/me', { apiKey: key.plainKey })).status).toBe(200);
  });

  it('touch records lastUsedAt, and use shows in listings before any flush', async () => {
    const { data } = await register();
    const { orgId, apiKey, keyId } = data;
    const list = await server.http(`/api/orgs/${orgId}/apikeys`, { apiKey });
    const [key] = (await list.json()) as Array<{ lastUsedAt: string | null }>;
    expect(key!.lastUsedAt).not.toBeNull();
    const touched = await server.http(`/api/orgs/${orgId}/apikeys/${keyId}/touch`, { method: 'PATCH', apiKey });
    expect(touched.status).toBe(200);
    const stored = await server.app.store.apiKeys.findById(orgId, keyId);
    expect(stored!.lastUsedAt).toBeInstanceOf(Date);
  });

  it("answers 403 when a key manages another org's keys, and 401 without a key", async () => {
    const a = (await register('Org A')).data;
    const b = (await register('Org B')).data;
    for (const [method, path] of [
      ['GET', `/api/orgs/${b.orgId}/apikeys`],
      ['POST', `/api/orgs/${b.orgId}/apikeys`],
      ['DELETE', `/api/orgs/${b.orgId}/apikeys/${b.keyId}`],
      ['POST', `/api/orgs/${b.orgId}/apikeys/${b.keyId}/activate`],
      ['PATCH', `/api/orgs/${b.orgId}/apikeys/${b.keyId}/touch`],
    ] as const) {
      const json = method === 'POST' ? { orgId: b.orgId, keyName: 'evil', isActive: false } : undefined;
      const res = await server.http(path, { method, apiKey: a.apiKey, json });
      expect(res.status, `${method} ${path}`).toBe(403);
    }
    expect((await server.http('/api/orgs/me', { apiKey: b.apiKey })).status).toBe(200);
    expect((await server.http(`/api/orgs/${b.orgId}/apikeys`)).status).toBe(401);
  });

  it('never writes a key or its hash to the log', async () => {
    const { data } = await register();
    await server.http('/api/orgs/me', { apiKey: data.apiKey });
    await server.http(`/api/orgs/me?apiKey=${data.apiKey}`);
    const stored = await server.app.store.apiKeys.findById(data.orgId, data.keyId);
    const log = server.logLines.join('');
    expect(log).toContain(data.orgId);
    expect(log).not.toContain(data.apiKey);
    expect(log).not.toContain(stored!.keyHash);
  });
});

describe('the typed client', () => {
  it('registers, reads its org and manages keys with typed results', async () => {
    const anon = server.client();
    const reg = await anon.trpc.auth.register.mutate({ name: 'Client User', email: uniqueEmail('client') });
    const client = server.client(reg.apiKey);
    const org = await client.trpc.org.me.query();
    expect(org.id).toBe(reg.orgId);
    const created = await client.trpc.org.createApiKey.mutate({ orgId: reg.orgId, keyName: 'from client' });
    const keys = await client.trpc.org.listApiKeys.query({ orgId: reg.orgId });
    expect(keys.map((k) => k.id)).toContain(created.keyId);
    await client.trpc.org.revokeApiKey.mutate({ orgId: reg.orgId, keyId: created.keyId });
    await expect(server.client(created.plainKey).trpc.org.me.query()).rejects.toBeInstanceOf(UnauthorizedError);
  });

  it('turns errors back into classes carrying the code and the offending fields', async () => {
    const anon = server.client();
    const email = uniqueEmail('cls');
    const reg = await anon.trpc.auth.register.mutate({ name: 'Class User', email });
    const again = await anon.trpc.auth.register.mutate({ name: 'Again', email }).catch((e: unknown) => e);
    expect(again).toBeInstanceOf(InvalidInputError);
    expect((again as InvalidInputError).issues).toEqual([{ field: 'email', message: 'is already registered' }]);
    const invalid = await anon.trpc.auth.register.mutate({ name: 'x', email: 'nope' }).catch((e: unknown) => e);
    expect(invalid).toBeInstanceOf(InvalidInputError);
    expect((invalid as InvalidInputError).issues?.map((i) => i.field)).toEqual(['name', 'email']);
    const client = server.client(reg.apiKey);
    await expect(client.trpc.org.listApiKeys.query({ orgId: '65ae1234567890abcdef1234' })).rejects.toBeInstanceOf(ForbiddenError);
    await expect(client.trpc.org.revokeApiKey.mutate({ orgId: reg.orgId, keyId: '65ae1234567890abcdef1234' })).rejects.toBeInstanceOf(NotFoundError);
    await expect(anon.trpc.org.me.query()).rejects.toMatchObject({ code: 'UNAUTHORIZED', status: 401 });
  });

  it('authenticates WebSocket calls through connectionParams or ?apiKey= and rejects a bad key there', async () => {
    const reg = await server.client().trpc.auth.register.mutate({ name: 'WS User', email: uniqueEmail('ws') });
    const { createTRPCClient, createWSClient, wsLink } = await import('@trpc/client');
    const superjson = (await import('superjson')).default;
    const WebSocket = (await import('ws')).default;
    const open = (apiKey: string) => {
      const ws = createWSClient({ url: server.url.replace('http', 'ws') + '/trpc', WebSocket: WebSocket as never, connectionParams: { apiKey } });
      const c = createTRPCClient<import('../server/routers/index.js').AppRouter>({ links: [wsLink({ client: ws, transformer: superjson })] });
      return { c, ws };
    };
    const good = open(reg.apiKey);
    expect((await good.c.org.me.query()).id).toBe(reg.orgId);
    const viaQuery = createWSClient({ url: `${server.url.replace('http', 'ws')}/trpc?apiKey=${reg.apiKey}`, WebSocket: WebSocket as never });
    const q = createTRPCClient<import('../server/routers/index.js').AppRouter>({ links: [wsLink({ client: viaQuery, transformer: superjson })] });
    expect((await q.org.me.query()).id).toBe(reg.orgId);
    await viaQuery.close();
    const bad = open('vr_wrong');
    await expect(bad.c.org.me.query()).rejects.toMatchObject({ data: { errorCode: 'UNAUTHORIZED' } });
    await Promise.all([good.ws.close(), bad.ws.close()]);
  });
});

describe('metrics', () => {
  it('counts requests by route template and status in Prometheus text', async () => {
    const { data } = await register();
    await server.http(`/api/orgs/${data.orgId}/apikeys`, { apiKey: data.apiKey });
    const res = await server.http('/metrics');
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(text).toMatch(/voidrun_http_requests_total\{method="GET",route="\/api\/orgs\/\{orgId\}\/apikeys",status="200"\} \d+/);
    expect(text).toContain('voidrun_http_request_duration_seconds_bucket');
    expect(text).not.toContain(data.orgId);
  });
});

describe('the API key as ?apiKey= (as the original takes it on every route)', () => {
  const missingSandbox = '65ae1234567890abcdef1234';

  it('authenticates REST, raw routes and tRPC HTTP calls; the header wins when both are sent', async () => {
    const { data } = await register('Query Key');
    const { orgId, apiKey } = data;
    const me = await server.http(`/api/orgs/me?apiKey=${apiKey}`);
    expect(me.status).toBe(200);
    expect(((await me.json()) as { data: { id: string } }).data.id).toBe(orgId);
    // A POST: the key is not mistaken for an input (the query is merged into the body).
    const created = await server.http(`/api/orgs/${orgId}/apikeys?apiKey=${apiKey}`, { method: 'POST', json: { orgId, keyName: 'from the query' } });
    expect(created.status).toBe(200);
    // A raw route: past authentication, the sandbox is what is missing.
    const raw = await server.http(`/api/sandboxes/${missingSandbox}/files/download?path=/etc/hostname&apiKey=${apiKey}`);
    expect(raw.status).toBe(404);
    expect((await server.http(`/api/sandboxes/${missingSandbox}/files/download?path=/etc/hostname`)).status).toBe(401);
    const trpc = await server.http(`/trpc/org.me?apiKey=${apiKey}`);
    expect(trpc.status).toBe(200);
    expect(JSON.stringify(await trpc.json())).toContain(orgId);

    expect((await server.http('/api/orgs/me?apiKey=vr_bogus', { apiKey })).status).toBe(200);
    const headerWins = await server.http(`/api/orgs/me?apiKey=${apiKey}`, { apiKey: 'vr_bogus' });
    expect(headerWins.status).toBe(401);
    // An empty header is no header: the query's key is used.
    expect((await server.http(`/api/orgs/me?apiKey=${apiKey}`, { headers: { 'x-api-key': ' ' } })).status).toBe(200);
  });

  it('never writes a key sent in the query to the log or the metrics, whatever the answer', async () => {
    const { data } = await register('Query Log');
    const { orgId, apiKey } = data;
    const answers = await Promise.all([
      server.http(`/api/orgs/me?apiKey=${apiKey}`),
      server.http(`/api/orgs/${orgId}/apikeys?apiKey=${apiKey}`, { method: 'POST', json: { orgId, keyName: '' } }),
      server.http(`/api/no/such/route?apiKey=${apiKey}`),
      server.http(`/api/sandboxes/${missingSandbox}?apiKey=${apiKey}`),
      server.http(`/api/sandboxes/${missingSandbox}/files/download?path=/x&apiKey=${apiKey}`),
      server.http(`/trpc/org.me?apiKey=${apiKey}`),
      server.http(`/trpc/no.such.procedure?apiKey=${apiKey}`),
      server.http(`/api/orgs/me?apiKey=${apiKey}`, { headers: { 'x-org-id': 'not-an-org' } }),
    ]);
    expect(answers.map((r) => r.status)).toEqual([200, 400, 404, 404, 404, 200, 404, 400]);
    for (const r of answers) expect(await r.text()).not.toContain(apiKey);
    const metrics = await (await server.http('/metrics')).text();
    expect(metrics).not.toContain(apiKey);
    const log = server.logLines.join('');
    expect(log).toContain(orgId);
    expect(log).not.toContain(apiKey);
    expect(log).not.toContain('apiKey=');
  });
});

describe('X-Org-ID: acting in another org the key\'s user belongs to', () => {
  const missingSandbox = '65ae1234567890abcdef1234';

  it('acts in that org on REST, tRPC and raw routes; 403 in an org the user is not a member of; 400 for a malformed id', async () => {
    const a = (await register('Member A')).data;
    const b = (await register('Org B')).data;
    const c = (await register('Org C')).data;
    const asB = { apiKey: a.apiKey, headers: { 'x-org-id': b.orgId } };
    // Refused before the membership, allowed on the very next request after it (B was read before).
    expect((await server.http('/api/orgs/me', asB)).status).toBe(403);
    expect(await server.app.store.orgs.addMember(b.orgId, a.userId)).toBe(true);

    const me = await server.http('/api/orgs/me', asB);
    expect(me.status).toBe(200);
    expect(((await me.json()) as { data: { id: string } }).data.id).toBe(b.orgId);
    expect((await server.http(`/api/orgs/${b.orgId}/apikeys`, asB)).status).toBe(200);
    // Acting in B, the key's own org is another org.
    expect((await server.http(`/api/orgs/${a.orgId}/apikeys`, asB)).status).toBe(403);
    expect((await server.http('/api/sandboxes', asB)).status).toBe(200);
    const trpc = await server.http('/trpc/org.me', asB);
    expect(trpc.status).toBe(200);
    expect(JSON.stringify(await trpc.json())).toContain(b.orgId);
    expect((await server.http(`/api/sandboxes/${missingSandbox}/files/download?path=/x`, asB)).status).toBe(404);

    // The key's own org named in the header is the same as no header.
    const own = await server.http('/api/orgs/me', { apiKey: a.apiKey, headers: { 'x-org-id': a.orgId } });
    expect(((await own.json()) as { data: { id: string } }).data.id).toBe(a.orgId);

    const notMember = { apiKey: a.apiKey, headers: { 'x-org-id': c.orgId } };
    for (const path of ['/api/orgs/me', '/trpc/org.me', `/api/sandboxes/${missingSandbox}/files/download?path=/x`]) {
      const res = await server.http(path, notMember);
      expect(res.status, path).toBe(403);
      expect(await res.text()).toContain('not a member');
    }
    // C's member list does not hold A, whoever asks; nor can B's key reach into A's org.
    expect((await server.http('/api/orgs/me', { apiKey: b.apiKey, headers: { 'x-org-id': a.orgId } })).status).toBe(403);
    for (const bad of ['nope', '65AE1234567890ABCDEF1234', 'x'.repeat(300)]) {
      const res = await server.http('/api/orgs/me', { apiKey: a.apiKey, headers: { 'x-org-id': bad } });
      expect(res.status, bad).toBe(400);
      expect(((await res.json()) as { error: string }).error).toContain('X-Org-ID');
    }
    // The key is checked first: a bad key is 401 whatever the header says.
    expect((await server.http('/api/orgs/me', { apiKey: 'vr_bogus', headers: { 'x-org-id': b.orgId } })).status).toBe(401);
  });

  it('acts in the other org over a tRPC WebSocket opened with the header', async () => {
    const a = (await register('WS Member')).data;
    const b = (await register('WS Org')).data;
    await server.app.store.orgs.addMember(b.orgId, a.userId);
    const { createTRPCClient, createWSClient, wsLink } = await import('@trpc/client');
    const superjson = (await import('superjson')).default;
    const WebSocket = (await import('ws')).default;
    class WithOrgHeader extends WebSocket {
      constructor(url: string) {
        super(url, { headers: { 'x-org-id': b.orgId } });
      }
    }
    const ws = createWSClient({ url: `${server.url.replace('http', 'ws')}/trpc?apiKey=${a.apiKey}`, WebSocket: WithOrgHeader as never });
    const c = createTRPCClient<import('../server/routers/index.js').AppRouter>({ links: [wsLink({ client: ws, transformer: superjson })] });
    expect((await c.org.me.query()).id).toBe(b.orgId);
    await ws.close();
    // Browsers cannot set headers on a WebSocket: connectionParams carry the org, as they carry the key.
    const viaParams = createWSClient({ url: `${server.url.replace('http', 'ws')}/trpc`, WebSocket: WebSocket as never, connectionParams: { apiKey: a.apiKey, orgId: b.orgId } });
    const p = createTRPCClient<import('../server/routers/index.js').AppRouter>({ links: [wsLink({ client: viaParams, transformer: superjson })] });
    expect((await p.org.me.query()).id).toBe(b.orgId);
    await viaParams.close();
  });

  it("the typed client's orgId option sends X-Org-ID on every call", async () => {
    const a = (await register('Client Member')).data;
    const b = (await register('Client Org')).data;
    await server.app.store.orgs.addMember(b.orgId, a.userId);
    const asB = server.client(a.apiKey, { orgId: b.orgId });
    expect((await asB.trpc.org.me.query()).id).toBe(b.orgId);
    expect((await asB.sandboxes.list()).total).toBe(0);
    await expect(server.client(b.apiKey, { orgId: a.orgId }).trpc.org.me.query()).rejects.toBeInstanceOf(ForbiddenError);
  });
});

describe('members and the current user', () => {
  it("lists an org's members at /orgs/{orgId}/users and /orgs/users, and the key's user with their orgs at /users/me", async () => {
    const a = (await register('User Alpha')).data;
    const b = (await register('User Beta')).data;
    await server.app.store.orgs.addMember(b.orgId, a.userId);

    for (const path of [`/api/orgs/${b.orgId}/users`, '/api/orgs/users']) {
      const res = await server.http(path, { apiKey: b.apiKey });
      expect(res.status, path).toBe(200);
      const body = (await res.json()) as { status: string; message: string; data: Array<Record<string, unknown>> };
      expect(body).toMatchObject({ status: 'success', message: 'users' });
      // Oldest account first: A registered before B.
      expect(body.data).toEqual([
        { id: a.userId, name: 'User Alpha', email: expect.stringContaining('@example.com'), imageUrl: '', createdAt: expect.any(String) },
        { id: b.userId, name: 'User Beta', email: expect.stringContaining('@example.com'), imageUrl: '', createdAt: expect.any(String) },
      ]);
    }
    expect((await server.http(`/api/orgs/${a.orgId}/users`, { apiKey: b.apiKey })).status).toBe(403);
    // Acting in B, A's key lists B's members too.
    const viaHeader = await server.http('/api/orgs/users', { apiKey: a.apiKey, headers: { 'x-org-id': b.orgId } });
    expect(((await viaHeader.json()) as { data: Array<{ id: string }> }).data.map((u) => u.id)).toEqual([a.userId, b.userId]);

    // Bare, as the original and its client libraries send and read it.
    const me = await server.http('/api/users/me', { apiKey: a.apiKey });
    expect(me.status).toBe(200);
    expect(await me.json()).toEqual({
      id: a.userId,
      name: 'User Alpha',
      email: expect.stringContaining('@example.com'),
      imageUrl: '',
      createdAt: expect.any(String),
      orgs: [
        { id: a.orgId, name: expect.any(String) },
        { id: b.orgId, name: expect.any(String) },
      ],
    });

    const client = server.client(a.apiKey);
    expect((await client.trpc.users.me.query()).orgs.map((o) => o.id)).toEqual([a.orgId, b.orgId]);
    expect((await server.client(b.apiKey).trpc.org.users.query({ orgId: b.orgId })).map((u) => u.id)).toEqual([a.userId, b.userId]);
  });
});

describe("the calling key's org's keys at /orgs/apikeys (the client libraries' paths)", () => {
  it('lists, generates, deactivates, touches and revokes keys without an org id in the path', async () => {
    const { data } = await register('Own Keys');
    const { orgId, apiKey } = data;
    const created = await server.http('/api/orgs/apikeys', { method: 'POST', apiKey, json: { keyName: 'sdk key' } });
    // 200 as the client libraries' spec says (the original's code sends 201).
    expect(created.status).toBe(200);
    const key = JSON.stringify(await created.json());
    const { plainKey, keyId } = JSON.parse(key).data ?? JSON.parse(key);
    expect(plainKey).toMatch(/^vr_/);
    const listed = await server.http('/api/orgs/apikeys', { apiKey });
    expect(listed.status).toBe(200);
    expect(JSON.stringify(await listed.json())).toContain(keyId);

    expect((await server.http(`/api/orgs/apikeys/${keyId}/activate`, { method: 'POST', apiKey, json: { isActive: false } })).status).toBe(200);
    expect((await server.http('/api/orgs/me', { apiKey: plainKey })).status).toBe(401);
    expect((await server.http(`/api/orgs/apikeys/${keyId}/activate`, { method: 'POST', apiKey, json: { isActive: true } })).status).toBe(200);
    expect((await server.http(`/api/orgs/apikeys/${keyId}/touch`, { method: 'PATCH', apiKey })).status).toBe(200);
    expect((await server.app.store.apiKeys.findById(orgId, keyId))!.lastUsedAt).toBeInstanceOf(Date);

    const other = (await register('Other Keys')).data;
    expect((await server.http(`/api/orgs/apikeys/${other.keyId}`, { method: 'DELETE', apiKey })).status).toBe(404);
    expect((await server.http('/api/orgs/me', { apiKey: other.apiKey })).status).toBe(200);

    const revoked = await server.http(`/api/orgs/apikeys/${keyId}`, { method: 'DELETE', apiKey });
    expect(revoked.status).toBe(200);
    expect((await server.http('/api/orgs/me', { apiKey: plainKey })).status).toBe(401);
    expect((await server.http(`/api/orgs/apikeys/${keyId}`, { method: 'DELETE', apiKey })).status).toBe(404);
  });
});

/** Touch regressions on every store: the Mongo adapter answered 500 to an id that is not an ObjectId. */
function touchRegressions(storeName: string, env: () => Record<string, string> | null) {
  describe.skipIf(env() === null)(`touching keys (${storeName} store)`, () => {
    let s: TestServer;
    beforeAll(async () => {
      s = await startTestServer(env()!);
    });
    afterAll(async () => {
      await s?.close();
      const mongo = env()?.MONGO_URI;
      if (mongo) {
        const { MongoClient } = await import('mongodb');
        const client = await MongoClient.connect(mongo);
        await client.db(env()!.MONGO_DB).dropDatabase();
        await client.close();
      }
    });
    const reg = async (name: string) =>
      ((await (await s.http('/api/register', { method: 'POST', json: { name, email: uniqueEmail('touch') } })).json()) as { data: { orgId: string; apiKey: string; keyId: string } }).data;

    it('answers 404 (not 500) to a key id that is not one of ours', async () => {
      const { orgId, apiKey } = await reg('Touch Bad Id');
      for (const path of [`/api/orgs/${orgId}/apikeys/notanid/touch`, '/api/orgs/apikeys/notanid/touch']) {
        const res = await s.http(path, { method: 'PATCH', apiKey });
        expect(res.status, path).toBe(404);
        expect(((await res.json()) as { error: string }).error).toContain('notanid');
      }
      for (const [method, path, json] of [
        ['DELETE', `/api/orgs/${orgId}/apikeys/notanid`, undefined],
        ['POST', `/api/orgs/${orgId}/apikeys/notanid/activate`, { isActive: false }],
        ['GET', '/api/sandboxes/notanid', undefined],
      ] as const) {
        expect((await s.http(path, { method, apiKey, json })).status, `${method} ${path}`).toBe(404);
      }
    });

    it("answers 404 to another org's key touched through your own org's path, and writes nothing to it", async () => {
      const mine = await reg('Toucher');
      const theirs = await reg('Touched'); // its key is never used, so its lastUsedAt stays null
      for (const path of [`/api/orgs/${mine.orgId}/apikeys/${theirs.keyId}/touch`, `/api/orgs/apikeys/${theirs.keyId}/touch`]) {
        expect((await s.http(path, { method: 'PATCH', apiKey: mine.apiKey })).status, path).toBe(404);
      }
      expect((await s.app.store.apiKeys.findById(theirs.orgId, theirs.keyId))!.lastUsedAt).toBeNull();
    });
  });
}

touchRegressions('sqlite', () => ({}));
const touchDb = `voidrun_touch_${process.pid}_${Date.now()}`;
touchRegressions('mongo', () => (process.env.MONGO_URI ? { MONGO_URI: process.env.MONGO_URI, MONGO_DB: touchDb } : null));
