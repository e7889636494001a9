import { ReadCache, withRepository } from './sandbox-cache.js';
import type { OrgNetworkDefaults } from '../../shared/schemas/network.js';
import type { ApiKeyRecord, ApiKeyRepository, OrgRecord, OrgRepository, Store } from './types.js';

/**
 * An API key repository whose `findByHash` (every authenticated request) answers from memory once
 * a key has been read. Keys are cached by hash but written by id, so every write that can end or
 * change a key (`setActive`, `delete`) drops the whole cache before and after it runs, and a read
 * that overlapped one is not cached (see `ReadCache`): a key revoked or deactivated through this
 * process fails on the very next request. `lastUsedAt` is not kept current in the cache (the
 * LastUsedTracker holds the newer value); other reads go to the store.
 */
export class CachedApiKeyRepository implements ApiKeyRepository {
  readonly #cache = new ReadCache<ApiKeyRecord>();

  constructor(private readonly inner: ApiKeyRepository) {}

  create(key: Parameters<ApiKeyRepository['create']>[0]): Promise<ApiKeyRecord> {
    return this.inner.create(key);
  }

  findByHash(keyHash: string): Promise<ApiKeyRecord | null> {
    return this.#cache.get(keyHash, () => true, () => this.inner.findByHash(keyHash));
  }

  findById(orgId: string, keyId: string): Promise<ApiKeyRecord | null> {
    return this.inner.findById(orgId, keyId);
  }

  findByIds(keyIds: readonly string[]): Promise<ApiKeyRecord[]> {
    return this.inner.findByIds(keyIds);
  }

  listByOrg(orgId: string): Promise<ApiKeyRecord[]> {
    return this.inner.listByOrg(orgId);
  }

  setActive(orgId: string, keyId: string, isActive: boolean): Promise<ApiKeyRecord | null> {
    return this.#cache.writingAny(() => this.inner.setActive(orgId, keyId, isActive));
  }

  recordLastUsed(times: ReadonlyMap<string, Date>): Promise<void> {
    return this.inner.recordLastUsed(times);
  }

  delete(orgId: string, keyId: string): Promise<boolean> {
    return this.#cache.writingAny(() => this.inner.delete(orgId, keyId));
  }
}

/**
 * An org repository whose `findById` (`GET /orgs/me`, every `X-Org-ID` check) answers from memory
 * once an org has been read; `addMember`, `setNetwork` and `delete` go through the cache's write guard (see
 * `ReadCache`), so a lookup never returns an org older than the last write made through it.
 */
export class CachedOrgRepository implements OrgRepository {
  readonly #cache = new ReadCache<OrgRecord>();

  constructor(private readonly inner: OrgRepository) {}

  create(org: Parameters<OrgRepository['create']>[0]): Promise<OrgRecord> {
    return this.inner.create(org);
  }

  async findById(id: string): Promise<OrgRecord | null> {
    const org = await this.#cache.get(id, () => true, () => this.inner.findById(id));
    // The cache copies the record, not its members: the caller gets its own list.
    return org && { ...org, members: [...org.members] };
  }

  listByMember(userId: string): Promise<OrgRecord[]> {
    return this.inner.listByMember(userId);
  }

  addMember(orgId: string, userId: string): Promise<boolean> {
    return this.#cache.writing(orgId, () => this.inner.addMember(orgId, userId));
  }

  setNetwork(orgId: string, network: OrgNetworkDefaults | null): Promise<OrgRecord | null> {
    return this.#cache.writing(orgId, () => this.inner.setNetwork(orgId, network));
  }

  delete(id: string): Promise<boolean> {
    return this.#cache.writing(id, () => this.inner.delete(id));
  }
}

/**
 * The store with its API key and org lookups (each authenticated request's) cached, only for the
 * embedded SQLite store, which this process alone writes (with MongoDB another server may revoke a
 * key or change an org, and this one would not see it).
 */
export function withAuthCaches(store: Store): Store {
  if (store.kind !== 'sqlite') return store;
  const keys = withRepository(store, 'apiKeys', new CachedApiKeyRepository(store.apiKeys));
  return withRepository(keys, 'orgs', new CachedOrgRepository(store.orgs));
}
