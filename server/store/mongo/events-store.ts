import type { Collection, Db } from 'mongodb';
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
import { claimedByInsert, fromDoc, objectId, op, stamp, toDoc } from './store.js';

/** Wide enough for any safe integer, so `_id`s of one sandbox sort as their `seq`s do. */
const SEQ_DIGITS = 16;

/**
 * `_id` is `<sandboxId>:<seq, zero-padded>`: the built-in unique `_id` index decides between two
 * writers of one id (an insert is the only operation FerretDB performs atomically).
 */
function eventKey(sandboxId: string, seq: number): string {
  return `${sandboxId}:${String(seq).padStart(SEQ_DIGITS, '0')}`;
}

type EventDoc = { _id: string; sandboxId: string; seq: number; orgId: string; type: string; data: Record<string, unknown>; createdAt: Date };

export class MongoSandboxEvents implements SandboxEventRepository {
  constructor(private readonly c: Collection<EventDoc>) {}
  static #map(d: EventDoc): SandboxEventRecord {
    return { sandboxId: d.sandboxId, seq: d.seq, orgId: d.orgId, type: d.type, data: d.data ?? {}, createdAt: d.createdAt };
  }
  async append(e: SandboxEventRecord) {
    await op(`Event ${e.seq} of sandbox ${e.sandboxId}`, () => this.c.insertOne({ _id: eventKey(e.sandboxId, e.seq), ...e }));
  }
  async listAfter(sandboxId: string, after: number, limit: number) {
    return op('', async () => (await this.c.find({ sandboxId, seq: { $gt: after } }).sort({ seq: 1 }).limit(limit).toArray()).map((d) => MongoSandboxEvents.#map(d)));
  }
  async lastSeq(sandboxId: string) {
    return op('', async () => {
      const [doc] = await this.c.find({ sandboxId }).sort({ seq: -1 }).limit(1).toArray();
      return doc?.seq ?? 0;
    });
  }
  async deleteUpTo(sandboxId: string, upTo: number, keepTypes: readonly string[] = []) {
    const filter = keepTypes.length ? { sandboxId, seq: { $lte: upTo }, type: { $nin: [...keepTypes] } } : { sandboxId, seq: { $lte: upTo } };
    return op('', async () => (await this.c.deleteMany(filter)).deletedCount);
  }
  async deleteForSandbox(sandboxId: string) {
    return op('', async () => (await this.c.deleteMany({ sandboxId })).deletedCount);
  }
  async sandboxIds() {
    return op('', async () => (await this.c.distinct('sandboxId')).map(String));
  }
}

export class MongoWebhooks implements WebhookRepository {
  constructor(
    private readonly c: Collection,
    private readonly deliveries: Collection,
    private readonly attempts: Collection,
    private readonly claims: Collection<ClaimDoc>,
  ) {}
  async create(webhook: NewRecord<WebhookRecord>) {
    const rec = stamp(webhook);
    await op('A webhook with this id', () => this.c.insertOne(toDoc(rec)));
    return rec;
  }
  async findById(orgId: string, id: string) {
    const _id = objectId(id);
    if (!_id) return null;
    const doc = await op('', () => this.c.findOne({ _id }));
    return doc && doc.orgId === orgId ? fromDoc<WebhookRecord>(doc) : null;
  }
  async listByOrg(orgId: string) {
    return op('', async () => (await this.c.find({ orgId }).sort({ createdAt: 1, _id: 1 }).toArray()).map((d) => fromDoc<WebhookRecord>(d)!));
  }
  async delete(orgId: string, id: string) {
    const _id = objectId(id);
    if (!_id) return false;
    const gone = await op('', async () => (await this.c.deleteOne({ _id, orgId })).deletedCount > 0);
    if (gone) await op('', () => Promise.all([this.deliveries.deleteMany({ webhookId: id }), this.attempts.deleteMany({ webhookId: id }), this.claims.deleteMany({ webhookId: id })]));
    return gone;
  }
}

/** An attempt's claim: `_id` is `<deliveryId>:<attempt>:<gen>`, so the built-in unique index picks its one claimer. */
type ClaimDoc = { _id: string; deliveryId: string; webhookId: string; createdAt: Date };

export class MongoWebhookDeliveries implements WebhookDeliveryRepository {
  constructor(
    private readonly c: Collection,
    private readonly attempts: Collection,
    private readonly claims: Collection<ClaimDoc>,
  ) {}
  async findById(id: string) {
    const _id = objectId(id);
    if (!_id) return null;
    return op('', async () => fromDoc<WebhookDeliveryRecord>(await this.c.findOne({ _id })));
  }
  async claimAttempt(c: { deliveryId: string; webhookId: string; attempt: number; gen: number }) {
    return claimedByInsert(() => this.claims.insertOne({ _id: `${c.deliveryId}:${c.attempt}:${c.gen}`, deliveryId: c.deliveryId, webhookId: c.webhookId, createdAt: new Date() }));
  }
  async attemptClaimedAt(deliveryId: string, attempt: number, gen: number) {
    return op('', async () => (await this.claims.findOne({ _id: `${deliveryId}:${attempt}:${gen}` }))?.createdAt ?? null);
  }
  async create(delivery: NewRecord<WebhookDeliveryRecord>) {
    const rec = stamp(delivery);
    await op('A delivery with this id', () => this.c.insertOne(toDoc(rec)));
    return rec;
  }
  async reschedule(id: string, attempts: number, nextAttemptAt: Date) {
    const _id = objectId(id);
    // Only the claimer of the attempt writes this (see claimAttempt), so it never races another write.
    if (_id) await op('', () => this.c.updateOne({ _id }, { $set: { attempts, nextAttemptAt, updatedAt: new Date() } }));
  }
  async finish(id: string) {
    const _id = objectId(id);
    if (_id) await op('', () => this.c.deleteOne({ _id }));
    await op('', () => this.claims.deleteMany({ deliveryId: id }));
  }
  async listPending(limit: number, after?: Pick<WebhookDeliveryRecord, 'id' | 'nextAttemptAt'>) {
    const _id = after ? objectId(after.id) : null;
    const filter = after && _id ? { $or: [{ nextAttemptAt: { $gt: after.nextAttemptAt } }, { nextAttemptAt: after.nextAttemptAt, _id: { $gt: _id } }] } : {};
    return op('', async () => (await this.c.find(filter).sort({ nextAttemptAt: 1, _id: 1 }).limit(limit).toArray()).map((d) => fromDoc<WebhookDeliveryRecord>(d)!));
  }
  async releaseAttemptClaim(deliveryId: string, attempt: number, gen: number) {
    await op('', () => this.claims.deleteOne({ _id: `${deliveryId}:${attempt}:${gen}` }));
  }
  async addAttempt(attempt: NewRecord<WebhookAttemptRecord>) {
    const rec = stamp(attempt);
    await op('An attempt with this id', () => this.attempts.insertOne(toDoc(rec)));
    return rec;
  }
  async listAttempts(orgId: string, webhookId: string, limit: number) {
    return op('', async () =>
      (await this.attempts.find({ orgId, webhookId }).sort({ createdAt: -1, _id: -1 }).limit(limit).toArray()).map((d) => fromDoc<WebhookAttemptRecord>(d)!),
    );
  }
  async pruneAttempts(webhookId: string, keep: number) {
    return op('', async () => {
      const [oldestKept] = await this.attempts.find({ webhookId }).sort({ createdAt: -1, _id: -1 }).skip(keep - 1).limit(1).toArray();
      if (!oldestKept) return 0;
      return (await this.attempts.deleteMany({ webhookId, $or: [{ createdAt: { $lt: oldestKept.createdAt } }, { createdAt: oldestKept.createdAt, _id: { $lt: oldestKept._id } }] })).deletedCount;
    });
  }
}

export async function ensureEventIndexes(db: Db): Promise<void> {
  await Promise.all([
    db.collection('sandbox_events').createIndex({ sandboxId: 1, seq: 1 }, { unique: true, name: 'sandbox_events_seq' }),
    db.collection('webhooks').createIndex({ orgId: 1, createdAt: 1 }, { name: 'webhooks_by_org' }),
    db.collection('webhook_deliveries').createIndex({ nextAttemptAt: 1 }, { name: 'webhook_deliveries_due' }),
    db.collection('webhook_attempts').createIndex({ webhookId: 1, createdAt: -1 }, { name: 'webhook_attempts_by_webhook' }),
    db.collection('webhook_attempt_claims').createIndex({ deliveryId: 1 }, { name: 'webhook_attempt_claims_by_delivery' }),
    db.collection('webhook_attempt_claims').createIndex({ webhookId: 1 }, { name: 'webhook_attempt_claims_by_webhook' }),
  ]);
}

export function mongoEventRepositories(db: Db) {
  const deliveries = db.collection('webhook_deliveries');
  const attempts = db.collection('webhook_attempts');
  const claims = db.collection<ClaimDoc>('webhook_attempt_claims');
  return {
    sandboxEvents: new MongoSandboxEvents(db.collection<EventDoc>('sandbox_events')),
    webhooks: new MongoWebhooks(db.collection('webhooks'), deliveries, attempts, claims),
    webhookDeliveries: new MongoWebhookDeliveries(deliveries, attempts, claims),
  };
}


