import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConflictError, ForbiddenError, InvalidInputError, NotFoundError, UnauthorizedError } from '../client/index.js';
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
  expect(res.status).toBe(201);
  const body = (await res.json()) as { status: string; message: string; data: { orgId: string; apiKey: string; keyId: string } };
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

  it('answers 409 to a second registration with the same email, in any case', async () => {
    const email = uniqueEmail('dup');
    expect((await server.http('/api/register', { method: 'POST', json: { name: 'First', email } })).status).toBe(201);
    const res = await server.http('/api/register', { method: 'POST', json: { name: 'Second', email: email.toUpperCase() } });
    expect(res.status).toBe(409);
    expect(await res.json()).toEqual({ error: expect.stringContaining('already registered') });
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
    expect(await after.json()).toEqual({ error: expect.stringContaining('Invalid API key') });
    const again = await server.http(`/api/orgs/${orgId}/apikeys/${second.keyId}`, { method: 'DELETE', apiKey });
    expect(again.status).toBe(404);
  });

  it('deactivates and reactivates a key, effective on the next request', async () => {
    const { data } = await register();
    const { orgId, apiKey } = data;
    const created = await server.http(`/api/orgs/${orgId}/apikeys`, { method: 'POST', apiKey, json: { orgId, keyName: 'toggled' } });
    const key = (await created.json()) as { plainKey: string; keyId: string };

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
    await expect(anon.trpc.auth.register.mutate({ name: 'Again', email })).rejects.toBeInstanceOf(ConflictError);
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
