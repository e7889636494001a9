import type { Config } from '../config.js';
import { openSqliteStore } from './sqlite/store.js';
import type { Store } from './types.js';

export type * from './types.js';

/**
 * The embedded SQLite store unless `MONGO_URI` is set. The MongoDB driver is loaded only then: it
 * allocates a 17 MiB serialization buffer when loaded.
 */
export async function openStore(config: Pick<Config, 'MONGO_URI' | 'MONGO_DB' | 'MONGO_TIMEOUT_MS' | 'DATA_DIR'>): Promise<Store> {
  if (config.MONGO_URI) {
    const { openMongoStore } = await import('./mongo/store.js');
    return openMongoStore({ uri: config.MONGO_URI, dbName: config.MONGO_DB, serverSelectionTimeoutMS: config.MONGO_TIMEOUT_MS });
  }
  return openSqliteStore(config.DATA_DIR);
}
