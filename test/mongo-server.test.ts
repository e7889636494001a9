import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { newId } from '../server/store/ids.js';
import { support } from './helpers/sandbox-support.js';
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

  it('registers, authenticates, revokes at once and answers 400 to a second registration', async () => {
    expect(server.app.store.kind).toBe('mongo');
    const email = uniqueEmail('mongo');
    const reg = await server.http('/api/register', { method: 'POST', json: { name: 'Mongo User', email } });
    expect(reg.status).toBe(200);
    const { orgId, apiKey } = ((await reg.json()) as { data: { orgId: string; apiKey: string } }).data;
    expect((await server.http('/api/register', { method: 'POST', json: { name: 'Again', email } })).status).toBe(400);

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

  it.skipIf(!support.ok)('runs a sandbox end to end: create, exec, files in and out, delete', async () => {
    const reg = await server.http('/api/register', { method: 'POST', json: { name: 'Mongo Sandboxes', email: uniqueEmail('mongo-sbx') } });
    const { apiKey } = ((await reg.json()) as { data: { apiKey: string } }).data;
    const vr = server.client(apiKey);

    const box = await vr.sandboxes.create({ name: 'on-mongo', envVars: { GREETING: 'from mongo' } });
    expect(box.id).toMatch(/^[0-9a-f]{24}$/);
    expect((await box.exec('echo "$GREETING"')).stdout).toBe('from mongo\n');

    await box.files.upload('/root/in.txt', Buffer.from('bytes through the API'));
    const chunks: Buffer[] = [];
    for await (const chunk of await box.files.download('/root/in.txt')) chunks.push(chunk as Buffer);
    expect(Buffer.concat(chunks).toString()).toBe('bytes through the API');

    // The REST face reads the same record from the same database.
    const listed = await server.http('/api/sandboxes', { apiKey });
    expect(((await listed.json()) as { data: { id: string; status: string }[] }).data).toMatchObject([{ id: box.id, status: 'running' }]);

    // A port's access and a lifecycle change written at once both stay written: they take one lock,
    // since the store may write whole documents back (FerretDB does) and one would undo the other.
    for (let round = 0; round < 12; round++) {
      const isPublic = round % 2 === 0;
      const [access, timeout] = await Promise.all([
        server.http(`/api/sandboxes/${box.id}/ports/3000`, { method: 'PUT', apiKey, json: { public: isPublic } }),
        server.http(`/api/sandboxes/${box.id}/timeout`, { method: 'POST', apiKey, json: { timeout: 600 + round } }),
      ]);
      expect([access.status, timeout.status]).toEqual([200, 200]);
      const urls = (await (await server.http(`/api/sandboxes/${box.id}/public-urls`, { apiKey })).json()) as { data: Array<{ port: number }> };
      expect(urls.data.map((u) => u.port)).toEqual(isPublic ? [3000] : []);
      const record = (await (await server.http(`/api/sandboxes/${box.id}`, { apiKey })).json()) as { data: { timeout?: number } };
      expect(record.data.timeout).toBe(600 + round);
    }

    await box.delete();
    expect((await server.http(`/api/sandboxes/${box.id}`, { apiKey })).status).toBe(404);
  }, 180_000);
});
