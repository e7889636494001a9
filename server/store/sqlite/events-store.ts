import type Database from 'better-sqlite3';
import type {
  NewRecord,
  SandboxEventRecord,
  SandboxEventRepository,
  WebhookAttemptRecord,
  WebhookDeliveryRecord,
  WebhookDeliveryRepository,
  WebhookRecord,
  WebhookRepository,
} from '../types.js';
import { date, iso, stamp, uniqueWrite } from './store.js';

type Db = Database.Database;
type Row = Record<string, unknown>;

/** Sandbox events keyed by `(sandbox_id, seq)`: an insert of a taken id fails, whoever wrote it. */
export class SqliteSandboxEvents implements SandboxEventRepository {
  readonly #insert;
  readonly #after;
  readonly #last;
  readonly #deleteUpTo;
  readonly #deleteAll;
  readonly #ids;
  readonly #db: Db;
  /** `deleteUpTo` statements keeping some types, by how many. */
  readonly #deleteExcept = new Map<number, ReturnType<Db['prepare']>>();
  constructor(db: Db) {
    this.#db = db;
    this.#ids = db.prepare('SELECT DISTINCT sandbox_id FROM sandbox_events');
    this.#insert = db.prepare('INSERT INTO sandbox_events (sandbox_id, seq, org_id, type, data, created_at) VALUES (?, ?, ?, ?, ?, ?)');
    this.#after = db.prepare('SELECT * FROM sandbox_events WHERE sandbox_id = ? AND seq > ? ORDER BY seq LIMIT ?');
    this.#last = db.prepare('SELECT MAX(seq) AS seq FROM sandbox_events WHERE sandbox_id = ?');
    this.#deleteUpTo = db.prepare('DELETE FROM sandbox_events WHERE sandbox_id = ? AND seq <= ?');
    this.#deleteAll = db.prepare('DELETE FROM sandbox_events WHERE sandbox_id = ?');
  }
  static #map(r: Row): SandboxEventRecord {
    return { sandboxId: String(r.sandbox_id), seq: Number(r.seq), orgId: String(r.org_id), type: String(r.type), data: JSON.parse(String(r.data)) as Record<string, unknown>, createdAt: date(r.created_at) };
  }
  async append(e: SandboxEventRecord) {
    uniqueWrite(`Event ${e.seq} of sandbox ${e.sandboxId}`, () => this.#insert.run(e.sandboxId, e.seq, e.orgId, e.type, JSON.stringify(e.data), iso(e.createdAt)));
  }
  async listAfter(sandboxId: string, after: number, limit: number) {
    return (this.#after.all(sandboxId, after, limit) as Row[]).map((r) => SqliteSandboxEvents.#map(r));
  }
  async lastSeq(sandboxId: string) {
    return Number((this.#last.get(sandboxId) as { seq: number | null }).seq ?? 0);
  }
  async deleteUpTo(sandboxId: string, upTo: number, keepTypes: readonly string[] = []) {
    if (keepTypes.length === 0) return this.#deleteUpTo.run(sandboxId, upTo).changes;
    const except = this.#deleteExcept.get(keepTypes.length) ?? this.#db.prepare(`DELETE FROM sandbox_events WHERE sandbox_id = ? AND seq <= ? AND type NOT IN (${keepTypes.map(() => '?').join(', ')})`);
    this.#deleteExcept.set(keepTypes.length, except);
    return except.run(sandboxId, upTo, ...keepTypes).changes;
  }
  async deleteForSandbox(sandboxId: string) {
    return this.#deleteAll.run(sandboxId).changes;
  }
  async sandboxIds() {
    return (this.#ids.all() as Row[]).map((r) => String(r.sandbox_id));
  }
}

export class SqliteWebhooks implements WebhookRepository {
  readonly #db: Db;
  readonly #insert;
  readonly #byId;
  readonly #byOrg;
  readonly #delete;
  readonly #deleteDeliveries;
  readonly #deleteAttempts;
  readonly #deleteClaims;
  constructor(db: Db) {
    this.#db = db;
    this.#insert = db.prepare('INSERT INTO webhooks (id, org_id, url, events, secret, created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)');
    this.#byId = db.prepare('SELECT * FROM webhooks WHERE org_id = ? AND id = ?');
    this.#byOrg = db.prepare('SELECT * FROM webhooks WHERE org_id = ? ORDER BY created_at, id');
    this.#delete = db.prepare('DELETE FROM webhooks WHERE org_id = ? AND id = ?');
    this.#deleteDeliveries = db.prepare('DELETE FROM webhook_deliveries WHERE webhook_id = ?');
    this.#deleteAttempts = db.prepare('DELETE FROM webhook_attempts WHERE webhook_id = ?');
    this.#deleteClaims = db.prepare('DELETE FROM webhook_attempt_claims WHERE webhook_id = ?');
  }
  static #map(r: Row): WebhookRecord {
    return {
      id: String(r.id),
      orgId: String(r.org_id),
      url: String(r.url),
      events: JSON.parse(String(r.events)) as string[],
      secret: String(r.secret),
      createdBy: String(r.created_by),
      createdAt: date(r.created_at),
      updatedAt: date(r.updated_at),
    };
  }
  async create(webhook: NewRecord<WebhookRecord>) {
    const r = stamp(webhook);
    uniqueWrite('A webhook with this id', () => this.#insert.run(r.id, r.orgId, r.url, JSON.stringify(r.events), r.secret, r.createdBy, iso(r.createdAt), iso(r.updatedAt)));
    return r;
  }
  async findById(orgId: string, id: string) {
    const r = this.#byId.get(orgId, id) as Row | undefined;
    return r ? SqliteWebhooks.#map(r) : null;
  }
  async listByOrg(orgId: string) {
    return (this.#byOrg.all(orgId) as Row[]).map((r) => SqliteWebhooks.#map(r));
  }
  async delete(orgId: string, id: string) {
    return this.#db.transaction(() => {
      const gone = this.#delete.run(orgId, id).changes > 0;
      if (gone) {
        this.#deleteDeliveries.run(id);
        this.#deleteAttempts.run(id);
        this.#deleteClaims.run(id);
      }
      return gone;
    })();
  }
}

export class SqliteWebhookDeliveries implements WebhookDeliveryRepository {
  readonly #db: Db;
  readonly #insert;
  readonly #byId;
  readonly #claim;
  readonly #claimedAt;
  readonly #reschedule;
  readonly #finish;
  readonly #finishClaims;
  readonly #pendingAfter;
  readonly #releaseClaim;
  readonly #pending;
  readonly #insertAttempt;
  readonly #attempts;
  readonly #prune;
  constructor(db: Db) {
    this.#db = db;
    this.#insert = db.prepare(
      'INSERT INTO webhook_deliveries (id, webhook_id, org_id, event_id, event_type, body, attempts, next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    );
    this.#reschedule = db.prepare('UPDATE webhook_deliveries SET attempts = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?');
    this.#finish = db.prepare('DELETE FROM webhook_deliveries WHERE id = ?');
    this.#finishClaims = db.prepare('DELETE FROM webhook_attempt_claims WHERE delivery_id = ?');
    this.#byId = db.prepare('SELECT * FROM webhook_deliveries WHERE id = ?');
    this.#claim = db.prepare('INSERT INTO webhook_attempt_claims (id, delivery_id, webhook_id, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING');
    this.#claimedAt = db.prepare('SELECT created_at FROM webhook_attempt_claims WHERE id = ?');
    this.#pending = db.prepare('SELECT * FROM webhook_deliveries ORDER BY next_attempt_at, id LIMIT ?');
    this.#pendingAfter = db.prepare('SELECT * FROM webhook_deliveries WHERE next_attempt_at > ? OR (next_attempt_at = ? AND id > ?) ORDER BY next_attempt_at, id LIMIT ?');
    this.#releaseClaim = db.prepare('DELETE FROM webhook_attempt_claims WHERE id = ?');
    this.#insertAttempt = db.prepare(
      'INSERT INTO webhook_attempts (id, delivery_id, webhook_id, org_id, event_id, event_type, attempt, status_code, error, ok, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    );
    this.#attempts = db.prepare('SELECT * FROM webhook_attempts WHERE org_id = ? AND webhook_id = ? ORDER BY created_at DESC, id DESC LIMIT ?');
    this.#prune = db.prepare(
      'DELETE FROM webhook_attempts WHERE webhook_id = @webhookId AND id NOT IN (SELECT id FROM webhook_attempts WHERE webhook_id = @webhookId ORDER BY created_at DESC, id DESC LIMIT @keep)',
    );
  }
  static #map(r: Row): WebhookDeliveryRecord {
    return {
      id: String(r.id),
      webhookId: String(r.webhook_id),
      orgId: String(r.org_id),
      eventId: String(r.event_id),
      eventType: String(r.event_type),
      body: String(r.body),
      attempts: Number(r.attempts),
      nextAttemptAt: date(r.next_attempt_at),
      createdAt: date(r.created_at),
      updatedAt: date(r.updated_at),
    };
  }
  static #mapAttempt(r: Row): WebhookAttemptRecord {
    return {
      id: String(r.id),
      deliveryId: String(r.delivery_id),
      webhookId: String(r.webhook_id),
      orgId: String(r.org_id),
      eventId: String(r.event_id),
      eventType: String(r.event_type),
      attempt: Number(r.attempt),
      statusCode: r.status_code == null ? null : Number(r.status_code),
      error: r.error == null ? null : String(r.error),
      ok: r.ok === 1,
      createdAt: date(r.created_at),
      updatedAt: date(r.updated_at),
    };
  }
  async create(delivery: NewRecord<WebhookDeliveryRecord>) {
    const r = stamp(delivery);
    uniqueWrite('A delivery with this id', () =>
      this.#insert.run(r.id, r.webhookId, r.orgId, r.eventId, r.eventType, r.body, r.attempts, iso(r.nextAttemptAt), iso(r.createdAt), iso(r.updatedAt)),
    );
    return r;
  }
  async reschedule(id: string, attempts: number, nextAttemptAt: Date) {
    this.#reschedule.run(attempts, iso(nextAttemptAt), iso(new Date()), id);
  }
  async findById(id: string) {
    const r = this.#byId.get(id) as Row | undefined;
    return r ? SqliteWebhookDeliveries.#map(r) : null;
  }
  async claimAttempt(c: { deliveryId: string; webhookId: string; attempt: number; gen: number }) {
    return this.#claim.run(`${c.deliveryId}:${c.attempt}:${c.gen}`, c.deliveryId, c.webhookId, iso(new Date())).changes === 1;
  }
  async attemptClaimedAt(deliveryId: string, attempt: number, gen: number) {
    const r = this.#claimedAt.get(`${deliveryId}:${attempt}:${gen}`) as Row | undefined;
    return r ? date(r.created_at) : null;
  }
  async finish(id: string) {
    this.#db.transaction(() => {
      this.#finish.run(id);
      this.#finishClaims.run(id);
    })();
  }
  async listPending(limit: number, after?: Pick<WebhookDeliveryRecord, 'id' | 'nextAttemptAt'>) {
    const rows = after ? (this.#pendingAfter.all(iso(after.nextAttemptAt), iso(after.nextAttemptAt), after.id, limit) as Row[]) : (this.#pending.all(limit) as Row[]);
    return rows.map((r) => SqliteWebhookDeliveries.#map(r));
  }
  async releaseAttemptClaim(deliveryId: string, attempt: number, gen: number) {
    this.#releaseClaim.run(`${deliveryId}:${attempt}:${gen}`);
  }
  async addAttempt(attempt: NewRecord<WebhookAttemptRecord>) {
    const r = stamp(attempt);
    uniqueWrite('An attempt with this id', () =>
      this.#insertAttempt.run(r.id, r.deliveryId, r.webhookId, r.orgId, r.eventId, r.eventType, r.attempt, r.statusCode, r.error, r.ok ? 1 : 0, iso(r.createdAt), iso(r.updatedAt)),
    );
    return r;
  }
  async listAttempts(orgId: string, webhookId: string, limit: number) {
    return (this.#attempts.all(orgId, webhookId, limit) as Row[]).map((r) => SqliteWebhookDeliveries.#mapAttempt(r));
  }
  async pruneAttempts(webhookId: string, keep: number) {
    return this.#prune.run({ webhookId, keep }).changes;
  }
}
