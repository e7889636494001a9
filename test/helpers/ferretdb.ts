import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { freeLoopbackPort } from '../../server/hypervisor/host-process.js';

const run = promisify(execFile);
const script = join(import.meta.dirname, '..', '..', 'scripts', 'ferretdb.sh');


/**
 * A private FerretDB (scripts/ferretdb.sh) on a free loopback port, for tests and benchmarks that
 * need to own the server, e.g. to stop it under a running VoidRun. Data lives in `dataDir`, so a
 * stop/start keeps it.
 */
export class PrivateFerretDb {
  private constructor(
    readonly dataDir: string,
    readonly port: number,
    /** The script's environment: FERRETDB_BACKEND picks a backend (default: PostgreSQL when installed). */
    private readonly env: NodeJS.ProcessEnv,
  ) {}

  /** Builds (or reuses the cached build) and starts it; rejects with the script's message. */
  static async start(dataDir: string, env: Record<string, string> = {}): Promise<PrivateFerretDb> {
    const db = new PrivateFerretDb(dataDir, await freeLoopbackPort(), { ...process.env, ...env });
    await db.start();
    return db;
  }

  get uri(): string {
    return `mongodb://127.0.0.1:${this.port}/`;
  }

  async start(): Promise<void> {
    await run('bash', [script, 'start', this.dataDir, String(this.port)], { timeout: 300_000, env: this.env });
  }

  async stop(): Promise<void> {
    await run('bash', [script, 'stop', this.dataDir], { timeout: 30_000, env: this.env });
  }
}

/** The backend `scripts/ferretdb.sh start` picks on this machine. */
export async function defaultFerretBackend(): Promise<string> {
  return (await run('bash', [script, 'backend'])).stdout.trim();
}

/** Drops the test database a server ran on, when `env` selected MongoDB (`MONGO_URI`, `MONGO_DB`); nothing for SQLite. */
export async function dropMongoDatabase(env: Record<string, string> | null): Promise<void> {
  if (!env?.MONGO_URI) return;
  const { MongoClient } = await import('mongodb');
  const client = await MongoClient.connect(env.MONGO_URI);
  try {
    await client.db(env.MONGO_DB).dropDatabase();
  } finally {
    await client.close();
  }
}
