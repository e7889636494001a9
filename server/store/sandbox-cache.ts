import type { SandboxRecord, SandboxRepository, Store } from './types.js';

/** Past this many cached records a cache starts over (each entry is one small record). */
const MAX_ENTRIES = 10_000;

/**
 * Records read once, answered from memory after, for a store only this process writes. Every write
 * drops the record it is about before and after it runs, and a read that overlapped any write is
 * not cached, so a lookup never returns a record older than the last write made through it.
 */
export class ReadCache<V extends object> {
  readonly #records = new Map<string, V>();
  /** Counts writes begun; a read caches its record only if no write began while it ran. */
  #writes = 0;

  /** The cached record for `key` (a copy) if `accept` takes it, else `load()`'s, cached. */
  async get(key: string, accept: (record: V) => boolean, load: () => Promise<V | null>): Promise<V | null> {
    const cached = this.#records.get(key);
    if (cached && accept(cached)) return { ...cached };
    const writes = this.#writes;
    const record = await load();
    if (record && this.#writes === writes) {
      if (this.#records.size >= MAX_ENTRIES) this.#records.clear();
      this.#records.set(key, { ...record });
    }
    return record;
  }

  /** Runs a write about `key`; the record is dropped before and after. */
  async writing<T>(key: string, write: () => Promise<T>): Promise<T> {
    this.#writes++;
    this.#records.delete(key);
    try {
      return await write();
    } finally {
      this.#records.delete(key);
    }
  }

  /** Runs a write that may be about any record (one not found by its cache key); all are dropped before and after. */
  async writingAny<T>(write: () => Promise<T>): Promise<T> {
    this.#writes++;
    this.#records.clear();
    try {
      return await write();
    } finally {
      this.#records.clear();
    }
  }
}

/**
 * A sandbox repository whose `findById` answers from memory once a record has been read, so the
 * hot paths (every exec, file call and terminal keystroke looks its sandbox up) make no store
 * round trip; `update` and `delete` go through the cache's write guard (see `ReadCache`).
 */
export class CachedSandboxRepository implements SandboxRepository {
  readonly #cache = new ReadCache<SandboxRecord>();

  constructor(private readonly inner: SandboxRepository) {}

  create(sandbox: Parameters<SandboxRepository['create']>[0]): Promise<SandboxRecord> {
    return this.inner.create(sandbox);
  }

  findById(orgId: string, id: string): Promise<SandboxRecord | null> {
    // Another org's sandbox is left to the store to refuse.
    return this.#cache.get(id, (r) => r.orgId === orgId, () => this.inner.findById(orgId, id));
  }

  findByIdInAnyOrg(id: string): Promise<SandboxRecord | null> {
    return this.#cache.get(id, () => true, () => this.inner.findByIdInAnyOrg(id));
  }

  listByOrg(...args: Parameters<SandboxRepository['listByOrg']>): ReturnType<SandboxRepository['listByOrg']> {
    return this.inner.listByOrg(...args);
  }

  listAll(): Promise<SandboxRecord[]> {
    return this.inner.listAll();
  }

  update(orgId: string, id: string, patch: Parameters<SandboxRepository['update']>[2]): Promise<SandboxRecord | null> {
    return this.#cache.writing(id, () => this.inner.update(orgId, id, patch));
  }

  delete(orgId: string, id: string): Promise<boolean> {
    return this.#cache.writing(id, () => this.inner.delete(orgId, id));
  }

  claimPoolMember(id: string, claim: Parameters<SandboxRepository['claimPoolMember']>[1]): Promise<SandboxRecord | null> {
    return this.#cache.writing(id, () => this.inner.claimPoolMember(id, claim));
  }
}

/**
 * The store with its sandbox lookups cached, where that is safe: only for the embedded SQLite
 * store, which this process alone writes. With MongoDB several servers may share the records, and
 * another server's write would not be seen.
 */
export function withSandboxCache(store: Store): Store {
  if (store.kind !== 'sqlite') return store;
  return withRepository(store, 'sandboxes', new CachedSandboxRepository(store.sandboxes));
}

/** `store` with its repository `name` answered by `repository` instead; everything else is the store's own. */
export function withRepository<K extends keyof Store>(store: Store, name: K, repository: Store[K]): Store {
  return new Proxy(store, {
    get: (target, key) => {
      if (key === name) return repository;
      const value: unknown = Reflect.get(target, key, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}
