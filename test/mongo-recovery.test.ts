import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PrivateFerretDb } from './helpers/ferretdb.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

// The Mongo half runs when .ci/run has started FerretDB (it also built and cached the binary this
// test starts a second, private instance from, so it can stop it under a running server).
const mongoHalf = Boolean(process.env.MONGO_URI);
if (!mongoHalf) console.warn('[mongo recovery] SKIPPED: MONGO_URI is not set (.ci/run starts FerretDB and sets it)');

describe.skipIf(!mongoHalf)('the server when MongoDB goes away and comes back', () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'voidrun-ferret-recovery-'));
  let ferret: PrivateFerretDb;
  let server: TestServer;

  beforeAll(async () => {
    ferret = await PrivateFerretDb.start(dataDir);
    // A short wait for the database so an outage answers quickly.
    server = await startTestServer({ MONGO_URI: ferret.uri, MONGO_DB: 'voidrun_recovery', MONGO_TIMEOUT_MS: '1000' });
  }, 300_000);
  afterAll(async () => {
    await server?.close();
    await ferret?.stop().catch(() => {});
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('answers 503 with a clear message while the database is down and recovers by itself when it returns', async () => {
    const reg = await server.http('/api/register', { method: 'POST', json: { name: 'Outage', email: uniqueEmail('outage') } });
    expect(reg.status).toBe(200);
    const { apiKey, orgId } = ((await reg.json()) as { data: { apiKey: string; orgId: string } }).data;
    expect((await server.http('/api/orgs/me', { apiKey })).status).toBe(200);

    await ferret.stop();

    // REST: authenticated and unauthenticated routes both fail cleanly, in the contract's envelope.
    for (const res of [
      await server.http('/api/orgs/me', { apiKey }),
      await server.http('/api/sandboxes', { apiKey }),
      await server.http('/api/register', { method: 'POST', json: { name: 'During', email: uniqueEmail('during') } }),
    ]) {
      expect(res.status).toBe(503);
      const body = (await res.json()) as { error: string };
      expect(body.error).toMatch(/database is unreachable/i);
      expect(JSON.stringify(body)).not.toMatch(/127\.0\.0\.1|Mongo\w*Error|at \w+ \(/);
    }
    // tRPC: the typed client gets a SERVICE_UNAVAILABLE it can tell apart from a bug.
    const client = server.client(apiKey);
    await expect(client.trpc.org.me.query()).rejects.toMatchObject({ data: { code: 'SERVICE_UNAVAILABLE', httpStatus: 503 } });
    // The server itself stays up.
    expect((await server.http('/api/version')).status).toBe(200);

    await ferret.start();

    // The driver reconnects on its own; no restart of our server. Retry only until the driver has
    // noticed (its monitor re-checks the server at least every half second while it is down).
    let status = 0;
    for (let attempt = 0; attempt < 40 && status !== 200; attempt++) {
      status = (await server.http('/api/orgs/me', { apiKey })).status;
      if (status !== 200) await new Promise((resolve) => setTimeout(resolve, 250));
    }
    expect(status).toBe(200);
    // Nothing written before the outage was lost.
    expect((await client.trpc.org.me.query()).id).toBe(orgId);
    const after = await server.http('/api/register', { method: 'POST', json: { name: 'After', email: uniqueEmail('after') } });
    expect(after.status).toBe(200);
  }, 120_000);
});
