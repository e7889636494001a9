import { MongoClient, MongoServerError, ObjectId, type Collection, type Db, type Document, type Filter } from 'mongodb';
import { ConflictError, StoreUnavailableError } from '../../errors.js';
import { isObjectIdHex, newId } from '../ids.js';
import type {
  ApiKeyRecord,
  ApiKeyRepository,
  ImagePatch,
  ImageRecord,
  ImageRepository,
  NewImageRecord,
  IpLeaseRecord,
  IpLeaseRepository,
  IdempotencyClaim,
  IdempotencyRecord,
  IdempotencyRepository,
  NewRecord,
  OrgRecord,
  OrgRepository,
  Page,
  PoolClaimRepository,
  PoolMemberClaim,
  SandboxRecord,
  SandboxRepository,
  Store,
  UserRecord,
  UserRepository,
} from '../types.js';
import { imageDefaults, SANDBOX_NETWORK_NONE, withoutUndefined } from '../types.js';
import type { OrgNetworkDefaults } from '../../../shared/schemas/network.js';
import { ensureEventIndexes, mongoEventRepositories } from './events-store.js';
import { mongoTombstones } from './tombstones.js';
import { ensureHostIndexes, mongoHostRepositories } from './hosts.js';

/*
 * Ids: a record's `id` is the hex text of its `_id` ObjectId; references to other records (orgId,
 * createdBy, …) are stored as that same text. `toDoc`/`fromDoc` are the only places that convert.
 * Only features MongoDB 4.4+, FerretDB and DocumentDB share are used: no transactions, change
 * streams or TTL indexes.
 */

type WithId = { id: string };

export function objectId(id: string): ObjectId | null {
  return isObjectIdHex(id) ? new ObjectId(id) : null;
}

export function toDoc<T extends WithId>(rec: T): Document {
  const { id, ...rest } = rec;
  return { _id: new ObjectId(id), ...rest };
}

export function fromDoc<T extends WithId>(doc: Document | null): T | null {
  if (!doc) return null;
  const { _id, ...rest } = doc;
  return { id: (_id as ObjectId).toHexString(), ...rest } as T;
}

function isUnavailable(err: unknown): boolean {
  return (
    err instanceof Error &&
    (err.name === 'MongoNetworkError' ||
      err.name === 'MongoServerSelectionError' ||
      err.name === 'MongoNetworkTimeoutError' ||
      err.name === 'MongoTopologyClosedError' ||
      err.name === 'MongoNotConnectedError')
  );
}

/** Runs one store operation, translating driver failures into domain errors. */
export async function op<T>(conflictWhat: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof MongoServerError && err.code === 11000) throw new ConflictError(`${conflictWhat} already exists`, { cause: err });
    if (isUnavailable(err)) throw new StoreUnavailableError('The database is unreachable; retry shortly', { cause: err });
    throw err;
  }
}

/**
 * Whether a write failed on a unique index: MongoDB's E11000, or FerretDB's report of a unique
 * index refusing an update or upsert (an InternalError naming the constraint: its SQLite backend
 * says "UNIQUE constraint failed", its PostgreSQL backend SQLSTATE 23505).
 */
export function isDuplicateKey(err: unknown): boolean {
  return err instanceof MongoServerError && (err.code === 11000 || /UNIQUE constraint failed|duplicate key value violates unique constraint|SQLSTATE 23505/.test(err.message));
}

/**
 * Runs an insert that makes a claim: true when it inserted, false on a duplicate key (the claim
 * was taken). Claims are inserts against a unique key, the one write atomic on every MongoDB-wire
 * store (FerretDB loses concurrent conditional updates).
 */
export async function claimedByInsert(insert: () => Promise<unknown>): Promise<boolean> {
  try {
    await op('', insert);
    return true;
  } catch (err) {
    // `op` reports a duplicate key (11000) as a conflict; for a claim that just means "taken".
    if (err instanceof ConflictError) return false;
    throw err;
  }
}

export function stamp<T extends { id?: string }>(rec: T): T & { id: string; createdAt: Date; updatedAt: Date } {
  const now = new Date();
  return { ...rec, id: rec.id ?? newId(), createdAt: now, updatedAt: now };
}

class MongoUsers implements UserRepository {
  constructor(private readonly c: Collection) {}
  async create(user: NewRecord<UserRecord>) {
    const rec = stamp(user);
    await op(`A user with email ${rec.email}`, () => this.c.insertOne(toDoc(rec)));
    return rec;
  }
  async findById(id: string) {
    const _id = objectId(id);
    return _id ? op('', async () => fromDoc<UserRecord>(await this.c.findOne({ _id }))) : null;
  }
  async findByEmail(email: string) {
    return op('', async () => fromDoc<UserRecord>(await this.c.findOne({ email })));
  }
  async delete(id: string) {
    const _id = objectId(id);
    return _id ? op('', async () => (await this.c.deleteOne({ _id })).deletedCount > 0) : false;
  }
}

class MongoOrgs implements OrgRepository {
  constructor(private readonly c: Collection) {}
  /** A stored org; `network` null or absent (documents stored before org defaults existed): it has none. */
  static #map(doc: Document | null): OrgRecord | null {
    const rec = fromDoc<OrgRecord & { network?: OrgNetworkDefaults | null }>(doc);
    if (!rec) return null;
    const { network, ...rest } = rec;
    return network ? { ...rest, network } : rest;
  }
  async create(org: NewRecord<OrgRecord>) {
    const rec = stamp(org);
    await op('An organization with this id', () => this.c.insertOne(toDoc(rec)));
    return rec;
  }
  async findById(id: string) {
    const _id = objectId(id);
    return _id ? op('', async () => MongoOrgs.#map(await this.c.findOne({ _id }))) : null;
  }
  async listByMember(userId: string) {
    return op('', async () =>
      (await this.c.find({ $or: [{ ownerId: userId }, { members: userId }] }).sort({ createdAt: 1, _id: 1 }).toArray()).map((d) => MongoOrgs.#map(d)!),
    );
  }
  async addMember(orgId: string, userId: string) {
    const _id = objectId(orgId);
    if (!_id) return false;
    // `$addToSet` is one atomic single-document update: a member is listed once however many add it.
    return op('', async () => (await this.c.updateOne({ _id }, { $addToSet: { members: userId }, $set: { updatedAt: new Date() } })).matchedCount > 0);
  }
  async setNetwork(orgId: string, network: OrgNetworkDefaults | null) {
    const _id = objectId(orgId);
    if (!_id) return null;
    // Absent (also in documents stored before org defaults existed): the org has none.
    const update = network ? { $set: { network, updatedAt: new Date() } } : { $set: { updatedAt: new Date() }, $unset: { network: '' } };
    return op('', async () => MongoOrgs.#map(await this.c.findOneAndUpdate({ _id }, update, { returnDocument: 'after' })));
  }
  async delete(id: string) {
    const _id = objectId(id);
    return _id ? op('', async () => (await this.c.deleteOne({ _id })).deletedCount > 0) : false;
  }
}

/**
 * API keys. A key's last use is kept in a document of its own (`api_key_last_used`, `_id` = the
 * key's), not in the key's: FerretDB writes a whole document back on every update, so a last-use
 * flush (every API_KEY_LAST_USED_FLUSH_SEC, on every node that saw the key) running beside a
 * deactivation put `isActive: true` back (182 of 200 races on FerretDB 1.24). The key document is
 * now written only by `setActive`; a lost last-use race costs only a slightly older time.
 * (`lastUsedAt` still in a key document, from before, counts when it is the later.)
 */
class MongoApiKeys implements ApiKeyRepository {
  constructor(
    private readonly c: Collection,
    private readonly lastUsed: Collection<{ _id: ObjectId; at: Date }>,
  ) {}
  #filter(orgId: string, keyId: string): Filter<Document> | null {
    const _id = objectId(keyId);
    return _id ? { _id, orgId } : null;
  }
  /** Key documents as records, each with its last use from `api_key_last_used` (one query for all). */
  async #withLastUse(docs: Document[]): Promise<ApiKeyRecord[]> {
    if (docs.length === 0) return [];
    const uses = new Map((await this.lastUsed.find({ _id: { $in: docs.map((d) => d._id as ObjectId) } }).toArray()).map((u) => [u._id.toHexString(), u.at]));
    return docs.map((d) => {
      const rec = fromDoc<ApiKeyRecord>(d)!;
      const at = uses.get(rec.id);
      return at && (!rec.lastUsedAt || at > rec.lastUsedAt) ? { ...rec, lastUsedAt: at } : { ...rec, lastUsedAt: rec.lastUsedAt ?? null };
    });
  }
  async create(key: NewRecord<ApiKeyRecord>) {
    const rec = stamp(key);
    const { lastUsedAt, ...doc } = toDoc(rec) as Document & { lastUsedAt?: Date | null };
    await op('An API key with this hash', () => this.c.insertOne({ ...doc, lastUsedAt: null }));
    if (lastUsedAt) await this.recordLastUsed(new Map([[rec.id, lastUsedAt]]));
    return rec;
  }
  /** The hot path: the key document alone (its `lastUsedAt` may be older than its last use; see `findById`). */
  async findByHash(keyHash: string) {
    return op('', async () => fromDoc<ApiKeyRecord>(await this.c.findOne({ keyHash })));
  }
  async findById(orgId: string, keyId: string) {
    const f = this.#filter(orgId, keyId);
    if (!f) return null;
    return op('', async () => {
      const doc = await this.c.findOne(f);
      return doc ? (await this.#withLastUse([doc]))[0]! : null;
    });
  }
  async findByIds(keyIds: readonly string[]) {
    const ids = [...new Set(keyIds)].flatMap((id) => objectId(id) ?? []);
    if (ids.length === 0) return [];
    return op('', async () => this.#withLastUse(await this.c.find({ _id: { $in: ids } }).toArray()));
  }
  async listByOrg(orgId: string) {
    return op('', async () => this.#withLastUse(await this.c.find({ orgId }).sort({ createdAt: 1, _id: 1 }).toArray()));
  }
  async setActive(orgId: string, keyId: string, isActive: boolean) {
    const f = this.#filter(orgId, keyId);
    if (!f) return null;
    return op('', async () => {
      const doc = await this.c.findOneAndUpdate(f, { $set: { isActive, updatedAt: new Date() } }, { returnDocument: 'after' });
      return doc ? (await this.#withLastUse([doc]))[0]! : null;
    });
  }
  /**
   * Last uses of keys that exist (others are skipped), never moving a key's time backwards in one
   * write (`$max`; concurrent writers of one key may keep the older of two times).
   */
  async recordLastUsed(times: ReadonlyMap<string, Date>) {
    const wanted = [...times].flatMap(([id, at]) => {
      const _id = objectId(id);
      return _id ? [{ _id, at }] : [];
    });
    // The driver refuses an empty batch, which is what ids that are none of ours leave.
    if (wanted.length === 0) return;
    await op('', async () => {
      const existing = new Set((await this.c.find({ _id: { $in: wanted.map((w) => w._id) } }, { projection: { _id: 1 } }).toArray()).map((d) => (d._id as ObjectId).toHexString()));
      const ops = wanted.filter((w) => existing.has(w._id.toHexString())).map((w) => ({ updateOne: { filter: { _id: w._id }, update: { $max: { at: w.at } }, upsert: true } }));
      if (ops.length === 0) return;
      try {
        await this.lastUsed.bulkWrite(ops, { ordered: false });
      } catch (err) {
        // Two first uses of one key racing: one upsert inserts, the other meets its _id; either time is fine.
        if (!isDuplicateKey(err)) throw err;
      }
    });
  }
  async delete(orgId: string, keyId: string) {
    const f = this.#filter(orgId, keyId);
    if (!f) return false;
    return op('', async () => {
      const deleted = (await this.c.deleteOne(f)).deletedCount > 0;
      if (deleted) await this.lastUsed.deleteOne({ _id: f._id as ObjectId });
      return deleted;
    });
  }
}

class MongoSandboxes implements SandboxRepository {
  constructor(private readonly c: Collection) {}
  async create(sandbox: NewRecord<SandboxRecord>) {
    const rec = stamp(sandbox);
    await op(`A sandbox named ${rec.name}`, () => this.c.insertOne(toDoc(rec)));
    return rec;
  }
  async findById(orgId: string, id: string) {
    const _id = objectId(id);
    if (!_id) return null;
    // The hot path of every sandbox request. Filtering on `_id` alone and checking the (immutable)
    // owner here costs MongoDB nothing, and FerretDB pushes only a bare `_id` equality down to its
    // SQL backend: `{_id, orgId}` decodes every document instead (3× slower, bench:store).
    const doc = await op('', () => this.c.findOne({ _id }));
    return doc && doc.orgId === orgId ? MongoSandboxes.#map(doc) : null;
  }
  async findByIdInAnyOrg(id: string) {
    const _id = objectId(id);
    if (!_id) return null;
    const doc = await op('', () => this.c.findOne({ _id }));
    return doc ? MongoSandboxes.#map(doc) : null;
  }
  /** A stored sandbox; one stored before labels (or network policies) existed has none (loopback only). */
  static #map(doc: Document): SandboxRecord {
    const rec = fromDoc<SandboxRecord>(doc)!;
    return { ...rec, labels: rec.labels ?? {}, network: rec.network ?? SANDBOX_NETWORK_NONE, publicPorts: rec.publicPorts ?? [] };
  }
  async listByOrg(orgId: string, page: number, limit: number, labels: Readonly<Record<string, string>> = {}): Promise<Page<SandboxRecord>> {
    // Label keys are lowercase letters, digits, `-` and `_` (shared/schemas/sandbox.ts): never a `.` or `$`.
    const filter: Filter<Document> = { orgId };
    for (const [k, v] of Object.entries(labels)) filter[`labels.${k}`] = v;
    return op('', async () => {
      const [docs, total] = await Promise.all([
        this.c.find(filter).sort({ createdAt: -1, _id: -1 }).skip((page - 1) * limit).limit(limit).toArray(),
        this.c.countDocuments(filter),
      ]);
      return { items: docs.map((d) => MongoSandboxes.#map(d)), total };
    });
  }
  async listAll() {
    return op('', async () => (await this.c.find({}).sort({ createdAt: 1, _id: 1 }).toArray()).map((d) => MongoSandboxes.#map(d)));
  }
  async update(orgId: string, id: string, patch: Partial<Pick<SandboxRecord, 'status' | 'ip' | 'cpu' | 'mem' | 'envVars' | 'network' | 'publicPorts' | 'lifecycle' | 'hostId'>>) {
    const _id = objectId(id);
    if (!_id) return null;
    const $set: Document = { updatedAt: new Date() };
    for (const [k, v] of Object.entries(patch)) if (v !== undefined) $set[k] = v;
    return op('', async () => {
      const doc = await this.c.findOneAndUpdate({ _id, orgId }, { $set }, { returnDocument: 'after' });
      return doc ? MongoSandboxes.#map(doc) : null;
    });
  }
  async delete(orgId: string, id: string) {
    const _id = objectId(id);
    return _id ? op('', async () => (await this.c.deleteOne({ _id, orgId })).deletedCount > 0) : false;
  }
  async claimPoolMember(id: string, c: PoolMemberClaim) {
    const _id = objectId(id);
    if (!_id) return null;
    // Only the holder of the member's claim (an insert, see MongoPoolClaims) gets here, so this
    // update never races another; the unique (orgId, name) index refuses a name the org has.
    const conflict = `A sandbox named ${c.name}`;
    const now = new Date();
    try {
      return await op(conflict, async () => {
        const doc = await this.c.findOneAndUpdate({ _id, orgId: '' }, { $set: { ...c, createdAt: now, updatedAt: now }, $unset: { pool: '' } }, { returnDocument: 'after' });
        return doc ? MongoSandboxes.#map(doc) : null;
      });
    } catch (err) {
      // FerretDB reports a unique index refusing an update as an InternalError naming the constraint, not as 11000.
      if (isDuplicateKey(err)) throw new ConflictError(`${conflict} already exists`, { cause: err });
      throw err;
    }
  }
}

/** `_id` is the member's sandbox id: the built-in unique `_id` index picks each member's one claimer. */
class MongoPoolClaims implements PoolClaimRepository {
  constructor(private readonly c: Collection<{ _id: string; createdAt: Date }>) {}
  async claim(sandboxId: string) {
    return claimedByInsert(() => this.c.insertOne({ _id: sandboxId, createdAt: new Date() }));
  }
  async release(sandboxId: string) {
    await op('', () => this.c.deleteOne({ _id: sandboxId }));
  }
  async list() {
    return op('', async () => (await this.c.find({}).toArray()).map((d) => d._id));
  }
}

type IdempotencyDoc = Omit<IdempotencyRecord, 'orgId' | 'operation' | 'key'> & { _id: string; orgId: string; operation: string; key: string };

/**
 * `_id` is the JSON of `[orgId, operation, key, gen]`, so the built-in unique index decides every
 * claim; a claim's later writes are by its claimer alone, on its `_id`.
 */
class MongoIdempotency implements IdempotencyRepository {
  constructor(private readonly c: Collection<IdempotencyDoc>) {}
  static #id(c: IdempotencyClaim): string {
    return JSON.stringify([c.orgId, c.operation, c.key, c.gen]);
  }
  async claim(r: Omit<IdempotencyRecord, 'result'>) {
    return claimedByInsert(() => this.c.insertOne({ _id: MongoIdempotency.#id(r), ...r, result: null }));
  }
  async find(orgId: string, operation: string, key: string) {
    return op('', async () => {
      const doc = await this.c.findOne({ orgId, operation, key }, { sort: { gen: -1 } });
      if (!doc) return null;
      const { _id, ...rest } = doc;
      return rest as IdempotencyRecord;
    });
  }
  async complete(c: IdempotencyClaim, result: string, expiresAt?: Date) {
    await op('', () => this.c.updateOne({ _id: MongoIdempotency.#id(c) }, { $set: expiresAt ? { result, expiresAt } : { result } }));
  }
  async expire(c: IdempotencyClaim, at: Date) {
    await op('', () => this.c.updateOne({ _id: MongoIdempotency.#id(c) }, { $set: { expiresAt: at } }));
  }
  async countLive(orgId: string, now: Date) {
    return op('', () => this.c.countDocuments({ orgId, expiresAt: { $gt: now } }));
  }
  async prune(before: Date) {
    return op('', async () => (await this.c.deleteMany({ expiresAt: { $lt: before } })).deletedCount);
  }
}

class MongoImages implements ImageRepository {
  constructor(private readonly c: Collection) {}
  /** Documents stored before layered images lack the detail fields: they read as ready aliases (or system images). */
  static #map(doc: Document | null): ImageRecord | null {
    const r = fromDoc<ImageRecord>(doc);
    return r && { ...imageDefaults(r.isSystem), ...withoutUndefined(r) };
  }
  async create(image: NewImageRecord) {
    const rec: ImageRecord = stamp({ ...imageDefaults(image.isSystem), ...withoutUndefined(image) });
    await op(`An image named ${rec.name}`, () => this.c.insertOne(toDoc(rec)));
    return rec;
  }
  async findById(id: string) {
    const _id = objectId(id);
    return _id ? op('', async () => MongoImages.#map(await this.c.findOne({ _id }))) : null;
  }
  async findByName(orgId: string | null, name: string) {
    return op('', async () => {
      const own = orgId ? await this.c.findOne({ name, orgId }) : null;
      return MongoImages.#map(own ?? (await this.c.findOne({ name, orgId: null })));
    });
  }
  async listVisible(orgId: string) {
    return op('', async () =>
      (await this.c.find({ $or: [{ orgId: null }, { orgId }] }).sort({ createdAt: 1, _id: 1 }).toArray()).map((d) => MongoImages.#map(d)!),
    );
  }
  async listAll() {
    return op('', async () => (await this.c.find({}).sort({ createdAt: 1, _id: 1 }).toArray()).map((d) => MongoImages.#map(d)!));
  }
  async update(id: string, patch: ImagePatch) {
    const _id = objectId(id);
    if (!_id) return null;
    // One writer per image (see ImageRepository.update), so a plain $set is enough here.
    const res = await op('', () => this.c.updateOne({ _id }, { $set: { ...withoutUndefined(patch), updatedAt: new Date() } }));
    return res.matchedCount > 0 ? this.findById(id) : null;
  }
  async delete(id: string) {
    const _id = objectId(id);
    return _id ? op('', async () => (await this.c.deleteOne({ _id })).deletedCount > 0) : false;
  }
}

/** `_id` is the address itself, so the collection's built-in unique `_id` index decides every claim. */
class MongoIpLeases implements IpLeaseRepository {
  constructor(private readonly c: Collection<{ _id: string; sandboxId: string; createdAt: Date }>) {}
  static #map(doc: { _id: string; sandboxId: string; createdAt: Date }): IpLeaseRecord {
    return { ip: doc._id, sandboxId: doc.sandboxId, createdAt: doc.createdAt };
  }
  async claim(ip: string, sandboxId: string) {
    return claimedByInsert(() => this.c.insertOne({ _id: ip, sandboxId, createdAt: new Date() }));
  }
  static #filter(sandboxId: string, ipPrefix?: string) {
    return ipPrefix ? { sandboxId, _id: { $regex: `^${ipPrefix.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}` } } : { sandboxId };
  }
  async findBySandbox(sandboxId: string, ipPrefix?: string) {
    return op('', async () => {
      const [doc] = await this.c.find(MongoIpLeases.#filter(sandboxId, ipPrefix)).sort({ createdAt: 1, _id: 1 }).limit(1).toArray();
      return doc ? MongoIpLeases.#map(doc) : null;
    });
  }
  async releaseBySandbox(sandboxId: string, ipPrefix?: string) {
    return op('', async () => (await this.c.deleteMany(MongoIpLeases.#filter(sandboxId, ipPrefix))).deletedCount);
  }
  async list() {
    return op('', async () => (await this.c.find({}).toArray()).map((d) => MongoIpLeases.#map(d)));
  }
}

async function ensureIndexes(db: Db): Promise<void> {
  await Promise.all([
    db.collection('users').createIndex({ email: 1 }, { unique: true, name: 'users_email_unique' }),
    db.collection('api_keys').createIndex({ keyHash: 1 }, { unique: true, name: 'api_keys_hash_unique' }),
    db.collection('api_keys').createIndex({ orgId: 1, createdAt: 1 }, { name: 'api_keys_by_org' }),
    db.collection('sandboxes').createIndex({ orgId: 1, createdAt: -1, _id: -1 }, { name: 'sandboxes_by_org' }),
    db.collection('sandboxes').createIndex({ orgId: 1, name: 1 }, { unique: true, name: 'sandboxes_name_per_org' }),
    db.collection('images').createIndex({ orgId: 1, name: 1 }, { unique: true, name: 'images_by_owner_name' }),
    db.collection('ip_leases').createIndex({ sandboxId: 1 }, { name: 'ip_leases_by_sandbox' }),
    db.collection('idempotency_claims').createIndex({ expiresAt: 1 }, { name: 'idempotency_claims_expiry' }),
    db.collection('idempotency_claims').createIndex({ orgId: 1, operation: 1, key: 1, gen: -1 }, { name: 'idempotency_claims_by_key' }),
    db.collection('idempotency_claims').createIndex({ orgId: 1, expiresAt: 1 }, { name: 'idempotency_claims_by_org' }),
  ]);
}

export interface MongoStoreOptions {
  uri: string;
  dbName: string;
  /** How long to wait for a server before an operation fails with 503. */
  serverSelectionTimeoutMS?: number;
}

/** Connects to MongoDB (or a wire-compatible server), creates indexes, and returns the store. */
export async function openMongoStore(opts: MongoStoreOptions): Promise<Store> {
  const client = new MongoClient(opts.uri, {
    serverSelectionTimeoutMS: opts.serverSelectionTimeoutMS ?? 5000,
    appName: 'voidrun',
  });
  try {
    await client.connect();
    const db = client.db(opts.dbName);
    await Promise.all([ensureIndexes(db), ensureEventIndexes(db), ensureHostIndexes(db)]);
    return {
      kind: 'mongo',
      users: new MongoUsers(db.collection('users')),
      orgs: new MongoOrgs(db.collection('orgs')),
      apiKeys: new MongoApiKeys(db.collection('api_keys'), db.collection('api_key_last_used')),
      sandboxes: new MongoSandboxes(db.collection('sandboxes')),
      images: new MongoImages(db.collection('images')),
      ipLeases: new MongoIpLeases(db.collection('ip_leases')),
      sandboxTombstones: mongoTombstones(db),
      poolClaims: new MongoPoolClaims(db.collection('pool_claims')),
      idempotency: new MongoIdempotency(db.collection('idempotency_claims')),
      ...mongoEventRepositories(db),
      ...mongoHostRepositories(db),
      async close() {
        await client.close();
      },
    };
  } catch (err) {
    await client.close().catch(() => {});
    if (isUnavailable(err)) throw new StoreUnavailableError(`Cannot reach MongoDB at MONGO_URI within ${opts.serverSelectionTimeoutMS ?? 5000} ms`, { cause: err });
    throw err;
  }
}
