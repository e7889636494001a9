import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MongoClient } from 'mongodb';
import { afterAll, beforeAll, describe, it } from 'vitest';
import { newId } from '../../server/store/ids.js';
import { openMongoStore } from '../../server/store/mongo/store.js';
import { openSqliteStore } from '../../server/store/sqlite/store.js';
import type { Store } from '../../server/store/types.js';

/** Two connections to one store, standing for two servers (fleet nodes) sharing it. */
export type SharedStore = () => Promise<{ a: Store; b: Store; cleanup: () => Promise<void> }>;

/**
 * Defines `suite` once per store kind, each given two connections to one fresh database: SQLite
 * (one file opened twice), and MongoDB when MONGO_URI is set (FerretDB in CI; else a skipped test
 * saying so). `title` names the describe block, followed by `: sqlite` or `: mongo`.
 */
export function onSharedStores(title: string, suite: (kind: 'sqlite' | 'mongo', open: SharedStore) => void): void {
  suite('sqlite', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-shared-'));
    const a = openSqliteStore(dir);
    const b = openSqliteStore(dir);
    return {
      a,
      b,
      cleanup: async () => {
        await a.close();
        await b.close();
        rmSync(dir, { recursive: true, force: true });
      },
    };
  });
  const mongoUri = process.env.MONGO_URI;
  if (!mongoUri) {
    describe(`${title}: mongo`, () => {
      it.skipIf(true)('needs MONGO_URI pointing at a MongoDB-wire server (FerretDB in CI)', () => {});
    });
    return;
  }
  suite('mongo', async () => {
    const dbName = `voidrun_shared_${newId()}`;
    const a = await openMongoStore({ uri: mongoUri, dbName });
    const b = await openMongoStore({ uri: mongoUri, dbName });
    return {
      a,
      b,
      cleanup: async () => {
        await a.close();
        await b.close();
        const client = new MongoClient(mongoUri);
        await client.db(dbName).dropDatabase().catch(() => {});
        await client.close();
      },
    };
  });
}

/** Opens the two connections before the enclosing describe's tests (handing them to `set`) and closes them after. */
export function withSharedStore(open: SharedStore, set: (stores: { a: Store; b: Store }) => void): void {
  let cleanup: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    const opened = await open();
    cleanup = opened.cleanup;
    set(opened);
  });
  afterAll(async () => {
    await cleanup?.();
  });
}
