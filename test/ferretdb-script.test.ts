import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { defaultFerretBackend, PrivateFerretDb } from './helpers/ferretdb.js';

// Runs where the Mongo half runs (.ci/run built FerretDB and installed PostgreSQL).
const mongoHalf = Boolean(process.env.MONGO_URI);
const postgresInstalled = existsSync('/usr/lib/postgresql') && readdirSync('/usr/lib/postgresql').some((v) => existsSync(`/usr/lib/postgresql/${v}/bin/initdb`));

describe.skipIf(!mongoHalf)('scripts/ferretdb.sh', () => {
  const dirs: string[] = [];
  afterAll(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it('picks the PostgreSQL backend where PostgreSQL is installed, else SQLite', async () => {
    expect(await defaultFerretBackend()).toBe(postgresInstalled ? 'postgresql' : 'sqlite');
  });

  for (const backend of ['postgresql', 'sqlite'] as const) {
    it.skipIf(backend === 'postgresql' && !postgresInstalled)(`serves on its ${backend} backend, keeps the data over a stop and start, and a stop stops the database under it`, async () => {
      const dir = mkdtempSync(join(tmpdir(), `voidrun-ferret-${backend}-`));
      dirs.push(dir);
      const db = await PrivateFerretDb.start(dir, { FERRETDB_BACKEND: backend });
      const { MongoClient } = await import('mongodb');
      const write = await MongoClient.connect(db.uri);
      try {
        await write.db('t').collection('c').insertOne({ _id: 'kept' as never, v: 1 });
      } finally {
        await write.close();
      }
      await db.stop();
      if (backend === 'postgresql') expect(readdirSync(join(dir, 'pg-socket')).filter((f) => f.startsWith('.s.PGSQL'))).toEqual([]);
      await db.start();
      const read = await MongoClient.connect(db.uri);
      try {
        expect(await read.db('t').collection('c').findOne({ _id: 'kept' as never })).toMatchObject({ v: 1 });
      } finally {
        await read.close();
        await db.stop();
      }
    }, 300_000);
  }
});
