/**
 * `npm run bench:store`: the repository operations the server leans on, on the embedded SQLite
 * store and on the mongo adapter against FerretDB, side by side: create a sandbox record, get one
 * by id, list a page of 20 out of 10,000, authenticate an API key (lookup by hash). Each store's
 * raw baseline is the same primary-key read done directly with its driver in the same process, so
 * the ratio column is the cost of the repository layer over the bare driver.
 *
 * The mongo side uses MONGO_URI when set, else starts a private FerretDB with scripts/ferretdb.sh
 * (built from the Go module proxy on first use). When neither works it says why and skips it.
 */
import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MongoClient, ObjectId } from 'mongodb';
import { generatePlainKey, hashKey, displayPrefix } from '../server/services/api-key-material.js';
import { openMongoStore } from '../server/store/mongo/store.js';
import { openSqliteStore } from '../server/store/sqlite/store.js';
import { SANDBOX_NETWORK_NONE, type Store } from '../server/store/types.js';
import { PrivateFerretDb } from '../test/helpers/ferretdb.js';
import { interleaved, printTable, summarize, type Summary } from './lib/measure.js';

const SANDBOXES = Number(process.env.BENCH_SANDBOXES ?? 10_000);
const KEYS = Number(process.env.BENCH_KEYS ?? 1_000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 10);
const PER_ROUND = Number(process.env.BENCH_PER_ROUND ?? 100);
// FerretDB's SQLite backend scans a collection for every query but a bare `_id` (its explain says
// `filterPushdown: false`); a list of 10,000 takes most of a second, so it gets fewer samples.
const MONGO_ROUNDS = Number(process.env.BENCH_MONGO_ROUNDS ?? 2);
const MONGO_PER_ROUND = Number(process.env.BENCH_MONGO_PER_ROUND ?? 10);
const scratch = mkdtempSync(join(tmpdir(), 'voidrun-bench-store-'));

interface Backend {
  label: string;
  rounds: number;
  perRound: number;
  store: Store;
  /** The same read as `get by id`, straight through the driver. */
  rawGet: (id: string) => Promise<unknown>;
  close: () => Promise<void>;
}

async function sqliteBackend(): Promise<Backend> {
  const dir = join(scratch, 'sqlite');
  const store = openSqliteStore(dir);
  const raw = new Database(join(dir, 'voidrun.db'), { readonly: true });
  const byId = raw.prepare('SELECT * FROM sandboxes WHERE id = ?');
  return {
    label: 'sqlite',
    rounds: ROUNDS,
    perRound: PER_ROUND,
    store,
    rawGet: async (id) => byId.get(id),
    close: async () => {
      raw.close();
      await store.close();
    },
  };
}

async function mongoBackend(): Promise<Backend | string> {
  let uri = process.env.MONGO_URI;
  let stop = async () => {};
  if (!uri) {
    try {
      const ferret = await PrivateFerretDb.start(join(scratch, 'ferretdb'));
      uri = ferret.uri;
      stop = () => ferret.stop();
    } catch (err) {
      return `FerretDB could not be started and MONGO_URI is not set: ${String((err as { stderr?: string }).stderr ?? err).trim().split('\n').at(-1)}`;
    }
  }
  const dbName = `voidrun_bench_${Date.now()}`;
  const store = await openMongoStore({ uri, dbName });
  const raw = await MongoClient.connect(uri);
  const sandboxes = raw.db(dbName).collection('sandboxes');
  return {
    label: process.env.MONGO_URI ? 'mongo (MONGO_URI)' : 'mongo (FerretDB)',
    rounds: MONGO_ROUNDS,
    perRound: MONGO_PER_ROUND,
    store,
    rawGet: (id) => sandboxes.findOne({ _id: new ObjectId(id) }),
    close: async () => {
      await raw.db(dbName).dropDatabase();
      await raw.close();
      await store.close();
      await stop();
    },
  };
}

async function bench(backend: Backend): Promise<Summary[]> {
  const { store } = backend;
  const user = await store.users.create({ name: 'Bench', email: `bench-${Date.now()}@example.com` });
  const org = await store.orgs.create({ name: 'Bench', ownerId: user.id, members: [user.id], plan: 'free', usage: 0, createdBy: user.id });
  const record = (name: string) => ({
    name,
    orgId: org.id,
    createdBy: user.id,
    imageId: 'debian',
    ip: '',
    cpu: 1,
    mem: 1024,
    diskMb: 5120,
    status: 'running' as const,
    envVars: { LANG: 'C.UTF-8' },
    labels: {},
    network: SANDBOX_NETWORK_NONE,
  });

  const started = Date.now();
  process.stdout.write(`${backend.label}: inserting ${SANDBOXES} sandbox records and ${KEYS} API keys… `);
  const ids: string[] = [];
  for (let i = 0; i < SANDBOXES; i++) ids.push((await store.sandboxes.create(record(`seed-${i}`))).id);
  const hashes: string[] = [];
  for (let i = 0; i < KEYS; i++) {
    const plain = generatePlainKey();
    hashes.push(hashKey(plain));
    await store.apiKeys.create({ orgId: org.id, name: `k${i}`, keyHash: hashes[i]!, prefix: displayPrefix(plain), createdBy: user.id, isActive: true, lastUsedAt: null });
  }
  console.log(`${((Date.now() - started) / 1000).toFixed(1)} s`);

  const pages = Math.floor(SANDBOXES / 20);
  let created = 0;
  const pick = <T>(items: T[]) => items[Math.floor(Math.random() * items.length)]!;
  const samples = await interleaved(
    {
      raw: () => backend.rawGet(pick(ids)),
      create: () => store.sandboxes.create(record(`bench-${created++}`)),
      get: () => store.sandboxes.findById(org.id, pick(ids)),
      firstPage: () => store.sandboxes.listByOrg(org.id, 1, 20),
      somePage: () => store.sandboxes.listByOrg(org.id, 1 + Math.floor(Math.random() * pages), 20),
      auth: () => store.apiKeys.findByHash(pick(hashes)),
    },
    backend.rounds,
    backend.perRound,
    Math.min(200, backend.perRound),
  );
  const baseline = summarize(`${backend.label}: raw driver get by id [baseline]`, samples.raw!);
  const rows = [
    baseline,
    summarize('  create sandbox record', samples.create!),
    summarize('  get sandbox by id', samples.get!),
    summarize(`  list page 1 (20 of ${SANDBOXES})`, samples.firstPage!),
    summarize(`  list a random page (20 of ${SANDBOXES})`, samples.somePage!),
    summarize(`  authenticate a key (of ${KEYS}, by hash)`, samples.auth!),
  ];
  printTable(rows, baseline);
  console.log('');
  return rows;
}

try {
  console.log(`calls per case, interleaved: sqlite ${ROUNDS}×${PER_ROUND}, mongo ${MONGO_ROUNDS}×${MONGO_PER_ROUND}; ratio = p50 / the store's raw driver read\n`);
  const backends: Backend[] = [await sqliteBackend()];
  const mongo = await mongoBackend();
  if (typeof mongo === 'string') console.log(`mongo: SKIPPED — ${mongo}\n`);
  else backends.push(mongo);
  const results: Summary[][] = [];
  for (const backend of backends) {
    try {
      results.push(await bench(backend));
    } finally {
      await backend.close();
    }
  }
  if (results.length === 2) {
    console.log('side by side, p50 ms (mongo / sqlite):');
    const [sqlite, mongoRows] = results as [Summary[], Summary[]];
    for (let i = 1; i < sqlite.length; i++) {
      console.log(`${sqlite[i]!.name.trim().padEnd(44)}${sqlite[i]!.p50.toFixed(3).padStart(9)}${mongoRows[i]!.p50.toFixed(3).padStart(9)}${(mongoRows[i]!.p50 / sqlite[i]!.p50).toFixed(1).padStart(8)}×`);
    }
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
