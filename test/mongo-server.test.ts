import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { newId } from '../server/store/ids.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const mongoUri = process.env.MONGO_URI;
if (!mongoUri) console.warn('[mongo server] SKIPPED: MONGO_URI is not set (.ci/run starts FerretDB and sets it)');

/** The whole stack on the mongo adapter: what the store contract can't show (indexes at startup, 409s, revocation). */
describe.skipIf(!mongoUri)('the server on MongoDB (MONGO_URI)', () => {
  let server: TestServer;
  const dbName = `voidrun_server_${newId()}`;
  beforeAll(async () => {
    server = await startTestServer({ MONGO_URI: mongoUri!, MONGO_DB: dbName });
  });
  afterAll(async () => {
    await server?.close();
    const { MongoClient } = await import('mongodb');
    const client = await MongoClient.connect(mongoUri!);
    await client.db(dbName).dropDatabase();
    await client.close();
  });

  it('registers, authenticates, revokes at once and answers 409 to a second registration', async () => {
    expect(server.app.store.kind).toBe('mongo');
    const email = uniqueEmail('mongo');
    const reg = await server.http('/api/register', { method: 'POST', json: { name: 'Mongo User', email } });
    expect(reg.status).toBe(201);
    const { orgId, apiKey } = ((await reg.json()) as { data: { orgId: string; apiKey: string } }).data;
    expect((await server.http('/api/register', { method: 'POST', json: { name: 'Again', email } })).status).toBe(409);

    const client = server.client(apiKey);
    expect((await client.trpc.org.me.query()).id).toBe(orgId);
    const second = await client.trpc.org.createApiKey.mutate({ orgId, keyName: 'second' });
    expect((await server.http('/api/orgs/me', { apiKey: second.plainKey })).status).toBe(200);
    await client.trpc.org.setApiKeyActive.mutate({ orgId, keyId: second.keyId, isActive: false });
    expect((await server.http('/api/orgs/me', { apiKey: second.plainKey })).status).toBe(401);
    await client.trpc.org.revokeApiKey.mutate({ orgId, keyId: second.keyId });
    expect((await client.trpc.org.listApiKeys.query({ orgId })).map((k) => k.name)).toEqual(['Default Key']);
    expect((await server.http(`/api/orgs/${orgId}/apikeys/not-an-object-id`, { method: 'DELETE', apiKey })).status).toBe(404);
  });
});
