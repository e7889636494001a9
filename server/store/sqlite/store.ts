import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { ConflictError } from '../../errors.js';
import { newId } from '../ids.js';
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
  SandboxLifecycle,
  SandboxRecord,
  SandboxRepository,
  Store,
  UserRecord,
  UserRepository,
} from '../types.js';
import { IMAGE_DETAIL_KEYS, imageDefaults, SANDBOX_NETWORK_NONE, withoutUndefined } from '../types.js';
import type { NetworkPolicy, OrgNetworkDefaults } from '../../../shared/schemas/network.js';
import { sqliteSchema } from './schema.js';
import { SqliteSandboxEvents, SqliteWebhookDeliveries, SqliteWebhooks } from './events-store.js';
import { SqliteSandboxTombstones } from './tombstones.js';
import { sqliteHostRepositories } from './hosts.js';

type Db = Database.Database;
type Row = Record<string, unknown>;

export const iso = (d: Date) => d.toISOString();
export const date = (v: unknown) => new Date(String(v));
const dateOrNull = (v: unknown) => (v == null ? null : new Date(String(v)));

/** Runs a write and turns a UNIQUE violation into a `ConflictError` naming what collided. */
export function uniqueWrite<T>(what: string, write: () => T): T {
  try {
    return write();
  } catch (err) {
    if (err instanceof Database.SqliteError && err.code === 'SQLITE_CONSTRAINT_UNIQUE') {
      throw new ConflictError(`${what} already exists`, { cause: err });
    }
    throw err;
  }
}

export function stamp<T extends { id?: string }>(rec: T): T & { id: string; createdAt: Date; updatedAt: Date } {
  const now = new Date();
  return { ...rec, id: rec.id ?? newId(), createdAt: now, updatedAt: now };
}

class SqliteUsers implements UserRepository {
  readonly #insert;
  readonly #byId;
  readonly #byEmail;
  readonly #delete;
  constructor(db: Db) {
    this.#insert = db.prepare('INSERT INTO users (id, name, email, created_at, updated_at) VALUES (?, ?, ?, ?, ?)');
    this.#byId = db.prepare('SELECT * FROM users WHERE id = ?');
    this.#byEmail = db.prepare('SELECT * FROM users WHERE email = ?');
    this.#delete = db.prepare('DELETE FROM users WHERE id = ?');
  }
  static #map(r: Row | undefined): UserRecord | null {
    if (!r) return null;
    return { id: String(r.id), name: String(r.name), email: String(r.email), createdAt: date(r.created_at), updatedAt: date(r.updated_at) };
  }
  async create(user: NewRecord<UserRecord>) {
    const rec = stamp(user);
    uniqueWrite(`A user with email ${rec.email}`, () => this.#insert.run(rec.id, rec.name, rec.email, iso(rec.createdAt), iso(rec.updatedAt)));
    return rec;
  }
  async findById(id: string) {
    return SqliteUsers.#map(this.#byId.get(id) as Row | undefined);
  }
  async findByEmail(email: string) {
    return SqliteUsers.#map(this.#byEmail.get(email) as Row | undefined);
  }
  async delete(id: string) {
    return this.#delete.run(id).changes > 0;
  }
}

class SqliteOrgs implements OrgRepository {
  readonly #insert;
  readonly #byId;
  readonly #byMember;
  readonly #addMember;
  readonly #exists;
  readonly #setNetwork;
  readonly #delete;
  constructor(db: Db) {
    this.#insert = db.prepare(
      'INSERT INTO orgs (id, name, owner_id, members, plan, usage, created_by, network, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    );
    this.#byId = db.prepare('SELECT * FROM orgs WHERE id = ?');
    this.#byMember = db.prepare(
      'SELECT * FROM orgs WHERE owner_id = @userId OR EXISTS (SELECT 1 FROM json_each(orgs.members) WHERE value = @userId) ORDER BY created_at, id',
    );
    // One statement, so two concurrent adds of one member leave it listed once.
    this.#addMember = db.prepare(
      `UPDATE orgs SET members = json_insert(members, '$[#]', @userId), updated_at = @now
       WHERE id = @orgId AND NOT EXISTS (SELECT 1 FROM json_each(orgs.members) WHERE value = @userId)`,
    );
    this.#exists = db.prepare('SELECT 1 FROM orgs WHERE id = ?');
    this.#setNetwork = db.prepare('UPDATE orgs SET network = ?, updated_at = ? WHERE id = ?');
    this.#delete = db.prepare('DELETE FROM orgs WHERE id = ?');
  }
  static #map(r: Row | undefined): OrgRecord | null {
    if (!r) return null;
    return {
      id: String(r.id),
      name: String(r.name),
      ownerId: String(r.owner_id),
      members: JSON.parse(String(r.members)) as string[],
      plan: String(r.plan),
      usage: Number(r.usage),
      createdBy: String(r.created_by),
      // NULL (also in rows stored before org defaults existed): the org has none.
      ...(r.network == null ? {} : { network: JSON.parse(String(r.network)) as OrgNetworkDefaults }),
      createdAt: date(r.created_at),
      updatedAt: date(r.updated_at),
    };
  }
  async create(org: NewRecord<OrgRecord>) {
    const r = stamp(org);
    uniqueWrite('An organization with this id', () =>
      this.#insert.run(r.id, r.name, r.ownerId, JSON.stringify(r.members), r.plan, r.usage, r.createdBy, r.network ? JSON.stringify(r.network) : null, iso(r.createdAt), iso(r.updatedAt)),
    );
    return r;
  }
  async setNetwork(orgId: string, network: OrgNetworkDefaults | null) {
    const changed = this.#setNetwork.run(network ? JSON.stringify(network) : null, iso(new Date()), orgId).changes;
    return changed ? this.findById(orgId) : null;
  }
  async findById(id: string): Promise<OrgRecord | null> {
    return SqliteOrgs.#map(this.#byId.get(id) as Row | undefined);
  }
  async listByMember(userId: string) {
    return (this.#byMember.all({ userId }) as Row[]).map((r) => SqliteOrgs.#map(r)!);
  }
  async addMember(orgId: string, userId: string) {
    this.#addMember.run({ orgId, userId, now: iso(new Date()) });
    return this.#exists.get(orgId) !== undefined;
  }
  async delete(id: string) {
    return this.#delete.run(id).changes > 0;
  }
}

class SqliteApiKeys implements ApiKeyRepository {
  readonly #db: Db;
  readonly #insert;
  readonly #byHash;
  readonly #byId;
  readonly #byOrg;
  readonly #byIdAnyOrg;
  readonly #setActive;
  readonly #touch;
  readonly #delete;
  constructor(db: Db) {
    this.#db = db;
    this.#insert = db.prepare(
      'INSERT INTO api_keys (id, org_id, name, key_hash, prefix, created_by, is_active, last_used_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    );
    this.#byHash = db.prepare('SELECT * FROM api_keys WHERE key_hash = ?');
    this.#byId = db.prepare('SELECT * FROM api_keys WHERE org_id = ? AND id = ?');
    this.#byIdAnyOrg = db.prepare('SELECT * FROM api_keys WHERE id = ?');
    this.#byOrg = db.prepare('SELECT * FROM api_keys WHERE org_id = ? ORDER BY created_at, rowid');
    this.#setActive = db.prepare('UPDATE api_keys SET is_active = ?, updated_at = ? WHERE org_id = ? AND id = ?');
    this.#touch = db.prepare('UPDATE api_keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)');
    this.#delete = db.prepare('DELETE FROM api_keys WHERE org_id = ? AND id = ?');
  }
  static #map(r: Row | undefined): ApiKeyRecord | null {
    if (!r) return null;
    return {
      id: String(r.id),
      orgId: String(r.org_id),
      name: String(r.name),
      keyHash: String(r.key_hash),
      prefix: String(r.prefix),
      createdBy: String(r.created_by),
      isActive: r.is_active === 1,
      lastUsedAt: dateOrNull(r.last_used_at),
      createdAt: date(r.created_at),
      updatedAt: date(r.updated_at),
    };
  }
  async create(key: NewRecord<ApiKeyRecord>) {
    const r = stamp(key);
    uniqueWrite('An API key with this hash', () =>
      this.#insert.run(r.id, r.orgId, r.name, r.keyHash, r.prefix, r.createdBy, r.isActive ? 1 : 0, r.lastUsedAt ? iso(r.lastUsedAt) : null, iso(r.createdAt), iso(r.updatedAt)),
    );
    return r;
  }
  async findByHash(keyHash: string) {
    return SqliteApiKeys.#map(this.#byHash.get(keyHash) as Row | undefined);
  }
  async findById(orgId: string, keyId: string) {
    return SqliteApiKeys.#map(this.#byId.get(orgId, keyId) as Row | undefined);
  }
  async findByIds(keyIds: readonly string[]) {
    const found: ApiKeyRecord[] = [];
    for (const id of new Set(keyIds)) {
      const r = this.#byIdAnyOrg.get(id) as Row | undefined;
      if (r) found.push(SqliteApiKeys.#map(r)!);
    }
    return found;
  }
  async listByOrg(orgId: string) {
    return (this.#byOrg.all(orgId) as Row[]).map((r) => SqliteApiKeys.#map(r)!);
  }
  async setActive(orgId: string, keyId: string, isActive: boolean) {
    const changed = this.#setActive.run(isActive ? 1 : 0, iso(new Date()), orgId, keyId).changes;
    return changed ? this.findById(orgId, keyId) : null;
  }
  async recordLastUsed(times: ReadonlyMap<string, Date>) {
    this.#db.transaction(() => {
      for (const [id, at] of times) this.#touch.run(iso(at), id, iso(at));
    })();
  }
  async delete(orgId: string, keyId: string) {
    return this.#delete.run(orgId, keyId).changes > 0;
  }
}

class SqliteSandboxes implements SandboxRepository {
  readonly #insert;
  readonly #byId;
  readonly #byIdAnyOrg;
  readonly #all;
  readonly #delete;
  readonly #db: Db;
  readonly #lists = new Map<number, { page: Database.Statement; count: Database.Statement }>();
  constructor(db: Db) {
    this.#db = db;
    this.#insert = db.prepare(
      `INSERT INTO sandboxes (id, name, org_id, created_by, image_id, ip, cpu, mem, disk_mb, status, env_vars, labels, network, pool, host_id, lifecycle, created_at, updated_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    );
    this.#byId = db.prepare('SELECT * FROM sandboxes WHERE org_id = ? AND id = ?');
    this.#byIdAnyOrg = db.prepare('SELECT * FROM sandboxes WHERE id = ?');
    this.#all = db.prepare('SELECT * FROM sandboxes ORDER BY created_at, id');
    this.#delete = db.prepare('DELETE FROM sandboxes WHERE org_id = ? AND id = ?');
  }
  static #map(r: Row | undefined): SandboxRecord | null {
    if (!r) return null;
    return {
      id: String(r.id),
      name: String(r.name),
      orgId: String(r.org_id),
      createdBy: String(r.created_by),
      imageId: String(r.image_id),
      ip: String(r.ip),
      cpu: Number(r.cpu),
      mem: Number(r.mem),
      diskMb: Number(r.disk_mb),
      status: String(r.status) as SandboxRecord['status'],
      envVars: JSON.parse(String(r.env_vars)) as Record<string, string>,
      labels: JSON.parse(String(r.labels ?? '{}')) as Record<string, string>,
      network: r.network == null ? SANDBOX_NETWORK_NONE : (JSON.parse(String(r.network)) as NetworkPolicy),
      publicPorts: JSON.parse(String(r.public_ports ?? '[]')) as number[],
      ...(r.pool ? { pool: String(r.pool) } : {}),
      ...(r.host_id ? { hostId: String(r.host_id) } : {}),
      ...(r.lifecycle != null ? { lifecycle: JSON.parse(String(r.lifecycle)) as SandboxLifecycle } : {}),
      createdAt: date(r.created_at),
      updatedAt: date(r.updated_at),
    };
  }
  async create(sandbox: NewRecord<SandboxRecord>) {
    const r = stamp(sandbox);
    uniqueWrite(`A sandbox named ${r.name}`, () =>
      this.#insert.run(r.id, r.name, r.orgId, r.createdBy, r.imageId, r.ip, r.cpu, r.mem, r.diskMb, r.status, JSON.stringify(r.envVars), JSON.stringify(r.labels), JSON.stringify(r.network), r.pool ?? '', r.hostId ?? '', r.lifecycle ? JSON.stringify(r.lifecycle) : null, iso(r.createdAt), iso(r.updatedAt)),
    );
    return r;
  }
  async findById(orgId: string, id: string) {
    return SqliteSandboxes.#map(this.#byId.get(orgId, id) as Row | undefined);
  }
  async findByIdInAnyOrg(id: string) {
    return SqliteSandboxes.#map(this.#byIdAnyOrg.get(id) as Row | undefined);
  }
  async listByOrg(orgId: string, page: number, limit: number, labels: Readonly<Record<string, string>> = {}): Promise<Page<SandboxRecord>> {
    const pairs = Object.entries(labels);
    const { page: pageOf, count } = this.#listStatements(pairs.length);
    // Each label is a bound JSON path and value: `$."key"` names the key as a string, whatever it holds.
    const args = [orgId, ...pairs.flatMap(([k, v]) => [`$.${JSON.stringify(k)}`, v])];
    const items = (pageOf.all(...args, limit, (page - 1) * limit) as Row[]).map((r) => SqliteSandboxes.#map(r)!);
    const total = Number((count.get(...args) as { n: number }).n);
    return { items, total };
  }
  /** The page and count statements for a filter on `labelCount` labels, prepared once each. */
  #listStatements(labelCount: number) {
    let statements = this.#lists.get(labelCount);
    if (!statements) {
      const where = ['org_id = ?', ...Array.from({ length: labelCount }, () => 'json_extract(labels, ?) = ?')].join(' AND ');
      statements = {
        page: this.#db.prepare(`SELECT * FROM sandboxes WHERE ${where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?`),
        count: this.#db.prepare(`SELECT COUNT(*) AS n FROM sandboxes WHERE ${where}`),
      };
      this.#lists.set(labelCount, statements);
    }
    return statements;
  }
  async listAll() {
    return (this.#all.all() as Row[]).map((r) => SqliteSandboxes.#map(r)!);
  }
  async update(orgId: string, id: string, patch: Partial<Pick<SandboxRecord, 'status' | 'ip' | 'cpu' | 'mem' | 'envVars' | 'network' | 'publicPorts' | 'lifecycle' | 'hostId'>>) {
    const columns: Record<string, unknown> = {};
    if (patch.status !== undefined) columns.status = patch.status;
    if (patch.ip !== undefined) columns.ip = patch.ip;
    if (patch.cpu !== undefined) columns.cpu = patch.cpu;
    if (patch.mem !== undefined) columns.mem = patch.mem;
    if (patch.envVars !== undefined) columns.env_vars = JSON.stringify(patch.envVars);
    if (patch.network !== undefined) columns.network = JSON.stringify(patch.network);
    if (patch.publicPorts !== undefined) columns.public_ports = JSON.stringify(patch.publicPorts);
    if (patch.lifecycle !== undefined) columns.lifecycle = JSON.stringify(patch.lifecycle);
    if (patch.hostId !== undefined) columns.host_id = patch.hostId;
    columns.updated_at = iso(new Date());
    const set = Object.keys(columns).map((c) => `${c} = @${c}`).join(', ');
    const changed = this.#db.prepare(`UPDATE sandboxes SET ${set} WHERE org_id = @orgId AND id = @id`).run({ ...columns, orgId, id }).changes;
    return changed ? this.findById(orgId, id) : null;
  }
  async delete(orgId: string, id: string) {
    return this.#delete.run(orgId, id).changes > 0;
  }
  async claimPoolMember(id: string, c: PoolMemberClaim) {
    const changed = uniqueWrite(`A sandbox named ${c.name}`, () =>
      this.#db
        .prepare(
          `UPDATE sandboxes SET org_id = @orgId, name = @name, created_by = @createdBy, env_vars = @envVars, labels = @labels, network = @network, pool = '', created_at = @now, updated_at = @now
           WHERE id = @id AND org_id = '' AND pool != ''`,
        )
        .run({ id, orgId: c.orgId, name: c.name, createdBy: c.createdBy, envVars: JSON.stringify(c.envVars), labels: JSON.stringify(c.labels), network: JSON.stringify(c.network), now: iso(new Date()) }).changes,
    );
    return changed ? this.findById(c.orgId, id) : null;
  }
}

/** The member's id is the primary key: one insert wins each member. */
class SqlitePoolClaims implements PoolClaimRepository {
  readonly #claim;
  readonly #release;
  readonly #all;
  constructor(db: Db) {
    this.#claim = db.prepare('INSERT INTO pool_claims (sandbox_id, created_at) VALUES (?, ?) ON CONFLICT (sandbox_id) DO NOTHING');
    this.#release = db.prepare('DELETE FROM pool_claims WHERE sandbox_id = ?');
    this.#all = db.prepare('SELECT sandbox_id FROM pool_claims');
  }
  async claim(sandboxId: string) {
    return this.#claim.run(sandboxId, iso(new Date())).changes === 1;
  }
  async release(sandboxId: string) {
    this.#release.run(sandboxId);
  }
  async list() {
    return (this.#all.all() as Row[]).map((r) => String(r.sandbox_id));
  }
}

class SqliteIdempotency implements IdempotencyRepository {
  readonly #claim;
  readonly #find;
  readonly #complete;
  readonly #expire;
  readonly #countLive;
  readonly #prune;
  constructor(db: Db) {
    this.#claim = db.prepare(
      `INSERT INTO idempotency_claims (org_id, operation, key, gen, request_hash, result, created_at, expires_at) VALUES (?, ?, ?, ?, ?, NULL, ?, ?)
       ON CONFLICT (org_id, operation, key, gen) DO NOTHING`,
    );
    this.#find = db.prepare('SELECT * FROM idempotency_claims WHERE org_id = ? AND operation = ? AND key = ? ORDER BY gen DESC LIMIT 1');
    this.#complete = db.prepare('UPDATE idempotency_claims SET result = ?, expires_at = COALESCE(?, expires_at) WHERE org_id = ? AND operation = ? AND key = ? AND gen = ?');
    this.#expire = db.prepare('UPDATE idempotency_claims SET expires_at = ? WHERE org_id = ? AND operation = ? AND key = ? AND gen = ?');
    this.#countLive = db.prepare('SELECT COUNT(*) AS n FROM idempotency_claims WHERE org_id = ? AND expires_at > ?');
    this.#prune = db.prepare('DELETE FROM idempotency_claims WHERE expires_at < ?');
  }
  async claim(r: Omit<IdempotencyRecord, 'result'>) {
    return this.#claim.run(r.orgId, r.operation, r.key, r.gen, r.requestHash, iso(r.createdAt), iso(r.expiresAt)).changes === 1;
  }
  async find(orgId: string, operation: string, key: string): Promise<IdempotencyRecord | null> {
    const r = this.#find.get(orgId, operation, key) as Row | undefined;
    if (!r) return null;
    return {
      orgId: String(r.org_id),
      operation: String(r.operation),
      key: String(r.key),
      gen: Number(r.gen),
      requestHash: String(r.request_hash),
      result: r.result == null ? null : String(r.result),
      createdAt: date(r.created_at),
      expiresAt: date(r.expires_at),
    };
  }
  async complete(c: IdempotencyClaim, result: string, expiresAt?: Date) {
    this.#complete.run(result, expiresAt ? iso(expiresAt) : null, c.orgId, c.operation, c.key, c.gen);
  }
  async expire(c: IdempotencyClaim, at: Date) {
    this.#expire.run(iso(at), c.orgId, c.operation, c.key, c.gen);
  }
  async countLive(orgId: string, now: Date) {
    return Number((this.#countLive.get(orgId, iso(now)) as Row).n);
  }
  async prune(before: Date) {
    return this.#prune.run(iso(before)).changes;
  }
}

class SqliteImages implements ImageRepository {
  readonly #insert;
  readonly #byId;
  readonly #byName;
  readonly #visible;
  readonly #all;
  readonly #update;
  readonly #delete;
  constructor(db: Db) {
    this.#insert = db.prepare(
      'INSERT INTO images (id, name, tag, description, base, org_id, is_system, created_by, created_at, updated_at, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    );
    this.#all = db.prepare('SELECT * FROM images ORDER BY created_at, id');
    this.#update = db.prepare('UPDATE images SET description = ?, details = ?, updated_at = ? WHERE id = ?');
    this.#byId = db.prepare('SELECT * FROM images WHERE id = ?');
    // The org's own image wins over a system image of the same name.
    this.#byName = db.prepare('SELECT * FROM images WHERE name = ? AND (org_id = ? OR org_id IS NULL) ORDER BY org_id IS NULL LIMIT 1');
    this.#visible = db.prepare('SELECT * FROM images WHERE org_id IS NULL OR org_id = ? ORDER BY created_at, id');
    this.#delete = db.prepare('DELETE FROM images WHERE id = ?');
  }
  static #map(r: Row | undefined): ImageRecord | null {
    if (!r) return null;
    return {
      id: String(r.id),
      name: String(r.name),
      tag: String(r.tag),
      description: String(r.description),
      base: String(r.base),
      orgId: r.org_id == null ? null : String(r.org_id),
      isSystem: r.is_system === 1,
      createdBy: String(r.created_by),
      createdAt: date(r.created_at),
      updatedAt: date(r.updated_at),
      // Records stored before layered images have no details: ready aliases (or system images).
      ...imageDefaults(r.is_system === 1),
      ...(r.details == null ? {} : (JSON.parse(String(r.details)) as Partial<ImageRecord>)),
    };
  }
  static #details(r: ImageRecord): string {
    return JSON.stringify(Object.fromEntries(IMAGE_DETAIL_KEYS.map((k) => [k, r[k]])));
  }
  async create(image: NewImageRecord) {
    const r: ImageRecord = stamp({ ...imageDefaults(image.isSystem), ...withoutUndefined(image) });
    uniqueWrite(`An image named ${r.name}`, () =>
      this.#insert.run(r.id, r.name, r.tag, r.description, r.base, r.orgId, r.isSystem ? 1 : 0, r.createdBy, iso(r.createdAt), iso(r.updatedAt), SqliteImages.#details(r)),
    );
    return r;
  }
  async listAll() {
    return (this.#all.all() as Row[]).map((r) => SqliteImages.#map(r)!);
  }
  async update(id: string, patch: ImagePatch) {
    const current = SqliteImages.#map(this.#byId.get(id) as Row | undefined);
    if (!current) return null;
    const next: ImageRecord = { ...current, ...withoutUndefined(patch), updatedAt: new Date() };
    this.#update.run(next.description, SqliteImages.#details(next), iso(next.updatedAt), id);
    return next;
  }
  async findById(id: string) {
    return SqliteImages.#map(this.#byId.get(id) as Row | undefined);
  }
  async findByName(orgId: string | null, name: string) {
    return SqliteImages.#map(this.#byName.get(name, orgId) as Row | undefined);
  }
  async listVisible(orgId: string) {
    return (this.#visible.all(orgId) as Row[]).map((r) => SqliteImages.#map(r)!);
  }
  async delete(id: string) {
    return this.#delete.run(id).changes > 0;
  }
}

class SqliteIpLeases implements IpLeaseRepository {
  readonly #claim;
  readonly #bySandbox;
  readonly #release;
  readonly #all;
  constructor(db: Db) {
    // The address is the primary key: of two concurrent claims (even from two processes sharing the
    // file) exactly one inserts a row.
    this.#claim = db.prepare('INSERT INTO ip_leases (ip, sandbox_id, created_at) VALUES (?, ?, ?) ON CONFLICT (ip) DO NOTHING');
    this.#bySandbox = db.prepare('SELECT * FROM ip_leases WHERE sandbox_id = ? AND substr(ip, 1, length(?)) = ? ORDER BY created_at, ip LIMIT 1');
    this.#release = db.prepare('DELETE FROM ip_leases WHERE sandbox_id = ? AND substr(ip, 1, length(?)) = ?');
    this.#all = db.prepare('SELECT * FROM ip_leases');
  }
  static #map(r: Row): IpLeaseRecord {
    return { ip: String(r.ip), sandboxId: String(r.sandbox_id), createdAt: date(r.created_at) };
  }
  async claim(ip: string, sandboxId: string) {
    return this.#claim.run(ip, sandboxId, iso(new Date())).changes === 1;
  }
  async findBySandbox(sandboxId: string, ipPrefix = '') {
    const r = this.#bySandbox.get(sandboxId, ipPrefix, ipPrefix) as Row | undefined;
    return r ? SqliteIpLeases.#map(r) : null;
  }
  async releaseBySandbox(sandboxId: string, ipPrefix = '') {
    return this.#release.run(sandboxId, ipPrefix, ipPrefix).changes;
  }
  async list() {
    return (this.#all.all() as Row[]).map((r) => SqliteIpLeases.#map(r));
  }
}

/** Brings stores created by earlier versions to the current schema. */
function migrate(db: Db): void {
  const orgColumns = (db.prepare('PRAGMA table_info(orgs)').all() as Array<{ name: string }>).map((c) => c.name);
  if (!orgColumns.includes('network')) db.exec('ALTER TABLE orgs ADD COLUMN network TEXT');
  const imageColumns = (db.prepare('PRAGMA table_info(images)').all() as Array<{ name: string }>).map((c) => c.name);
  if (!imageColumns.includes('base')) db.exec("ALTER TABLE images ADD COLUMN base TEXT NOT NULL DEFAULT 'debian'");
  // Layered images' status, layers, recipe and config (JSON); null for records stored before them: ready aliases.
  if (!imageColumns.includes('details')) db.exec('ALTER TABLE images ADD COLUMN details TEXT');
  const sandboxColumns = (db.prepare('PRAGMA table_info(sandboxes)').all() as Array<{ name: string }>).map((c) => c.name);
  if (!sandboxColumns.includes('labels')) db.exec("ALTER TABLE sandboxes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'");
  if (!sandboxColumns.includes('network')) db.exec('ALTER TABLE sandboxes ADD COLUMN network TEXT');
  if (!sandboxColumns.includes('public_ports')) db.exec("ALTER TABLE sandboxes ADD COLUMN public_ports TEXT NOT NULL DEFAULT '[]'");
  if (!sandboxColumns.includes('pool')) db.exec("ALTER TABLE sandboxes ADD COLUMN pool TEXT NOT NULL DEFAULT ''");
  if (!sandboxColumns.includes('host_id')) db.exec("ALTER TABLE sandboxes ADD COLUMN host_id TEXT NOT NULL DEFAULT ''");
  // Timeout, idle and auto-resume policies (JSON); null for records stored before them: no policy.
  if (!sandboxColumns.includes('lifecycle')) db.exec('ALTER TABLE sandboxes ADD COLUMN lifecycle TEXT');
}

/** Opens (creating if needed) the embedded store at `<dataDir>/voidrun.db`. */
export function openSqliteStore(dataDir: string): Store {
  mkdirSync(dataDir, { recursive: true });
  const db = new Database(join(dataDir, 'voidrun.db'));
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = NORMAL');
  db.pragma('busy_timeout = 5000');
  db.exec(sqliteSchema);
  migrate(db);
  return {
    kind: 'sqlite',
    users: new SqliteUsers(db),
    orgs: new SqliteOrgs(db),
    apiKeys: new SqliteApiKeys(db),
    sandboxes: new SqliteSandboxes(db),
    images: new SqliteImages(db),
    ipLeases: new SqliteIpLeases(db),
    sandboxTombstones: new SqliteSandboxTombstones(db),
    poolClaims: new SqlitePoolClaims(db),
    idempotency: new SqliteIdempotency(db),
    sandboxEvents: new SqliteSandboxEvents(db),
    webhooks: new SqliteWebhooks(db),
    webhookDeliveries: new SqliteWebhookDeliveries(db),
    ...sqliteHostRepositories(db),
    async close() {
      db.close();
    },
  };
}
