import type { SandboxRecord, SandboxRepository, Store } from './types.js';

/** Past this many cached records the cache starts over (each entry is one small record). */
const MAX_ENTRIES = 10_000;

/**
 * A sandbox repository that answers `findById` from memory once a record has been read, so the
 * hot paths (every exec, file call and terminal keystroke looks its sandbox up) make no store
 * round trip. Every write through it (`update`, `delete`) drops the record before and after the
 * write, and a read that overlapped any write is not cached, so a lookup never returns a record
 * older than the last write made through this process.
 *
 * Only for a store that this process alone writes (the embedded SQLite store): with MongoDB,
 * several servers may share the records, and another server's write would not be seen.
 */
export class CachedSandboxRepository implements SandboxRepository {
  readonly #records = new Map<string, SandboxRecord>();
  /** Counts writes begun; a read caches its record only if no write began while it ran. */
  #writes = 0;

  constructor(private readonly inner: SandboxRepository) {}

  create(sandbox: Parameters<SandboxRepository['create']>[0]): Promise<SandboxRecord> {
    return this.inner.create(sandbox);
  }

  async findById(orgId: string, id: string): Promise<SandboxRecord | null> {
    const cached = this.#records.get(id);
    // Another org's sandbox is left to the store to refuse.
    if (cached && cached.orgId === orgId) return { ...cached };
    const writes = this.#writes;
    const record = await this.inner.findById(orgId, id);
    if (record && this.#writes === writes) {
      if (this.#records.size >= MAX_ENTRIES) this.#records.clear();
      this.#records.set(id, { ...record });
    }
    return record;
  }

  listByOrg(...args: Parameters<SandboxRepository['listByOrg']>): ReturnType<SandboxRepository['listByOrg']> {
    return this.inner.listByOrg(...args);
  }

  listAll(): Promise<SandboxRecord[]> {
    return this.inner.listAll();
  }

  async update(orgId: string, id: string, patch: Parameters<SandboxRepository['update']>[2]): Promise<SandboxRecord | null> {
    return this.#writing(id, () => this.inner.update(orgId, id, patch));
  }

  async delete(orgId: string, id: string): Promise<boolean> {
    return this.#writing(id, () => this.inner.delete(orgId, id));
  }

  async #writing<T>(id: string, write: () => Promise<T>): Promise<T> {
    this.#writes++;
    this.#records.delete(id);
    try {
      return await write();
    } finally {
      this.#records.delete(id);
    }
  }
}

/** The store with its sandbox lookups cached where that is safe (see `CachedSandboxRepository`). */
export function withSandboxCache(store: Store): Store {
  if (store.kind !== 'sqlite') return store;
  const sandboxes = new CachedSandboxRepository(store.sandboxes);
  return new Proxy(store, {
    get: (target, key) => {
      if (key === 'sandboxes') return sandboxes;
      const value: unknown = Reflect.get(target, key, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}
