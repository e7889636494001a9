import type { Collection, Db } from 'mongodb';
import { ConflictError } from '../../errors.js';
import { drainedState, type HostEpochRepository, type HostRecord, type HostRepository, type HostSlotKey, type HostSlotRecord, type HostSlotRepository, type HostState, type Store } from '../types.js';
import { claimedByInsert, op } from './store.js';

/*
 * Every claim here is an insert against a unique `_id` (`<hostId>:<epoch>`, `<hostId>:<slot>`) and
 * every release a `deleteOne` by `_id`: the operations FerretDB, DocumentDB and MongoDB all make
 * atomic. Host records have one writer per field group (the host for registration and heartbeats;
 * state changes are idempotent), so no read-modify-write decides anything.
 */

type HostDoc = Omit<HostRecord, 'id'> & { _id: string };
type EpochDoc = { _id: string; hostId: string; epoch: number; createdAt: Date };
type SlotDoc = HostSlotRecord & { _id: string };

class MongoHosts implements HostRepository {
  constructor(
    private readonly c: Collection<HostDoc>,
    private readonly drains: Collection<{ _id: string; createdAt: Date }>,
  ) {}
  static #map(doc: HostDoc | null, drained: boolean): HostRecord | null {
    if (!doc) return null;
    const { _id, ...rest } = doc;
    return { id: _id, ...rest, state: drainedState(rest.state, drained) };
  }
  async put(h: HostRecord) {
    const { id, ...rest } = h;
    // Two upserts of a new id at once can both try the insert; the loser's E11000 means the record
    // now exists, and replacing it again is the write it meant.
    await op('', () => this.c.replaceOne({ _id: id }, rest, { upsert: true })).catch((err: unknown) => {
      if (!(err instanceof ConflictError)) throw err;
      return op('', () => this.c.replaceOne({ _id: id }, rest, { upsert: true }));
    });
  }
  async findById(id: string) {
    return op('', async () => {
      const [doc, drain] = await Promise.all([this.c.findOne({ _id: id }), this.drains.findOne({ _id: id })]);
      return MongoHosts.#map(doc, drain !== null);
    });
  }
  async list() {
    return op('', async () => {
      const [docs, drains] = await Promise.all([this.c.find({}).sort({ _id: 1 }).toArray(), this.drains.find({}).toArray()]);
      const drained = new Set(drains.map((d) => d._id));
      return docs.map((d) => MongoHosts.#map(d, drained.has(d._id))!);
    });
  }
  async drain(id: string) {
    await claimedByInsert(() => this.drains.insertOne({ _id: id, createdAt: new Date() }));
  }
  async undrain(id: string) {
    await op('', () => this.drains.deleteOne({ _id: id }));
  }
  async heartbeat(id: string, at: Date, images?: string[]) {
    return op('', async () => (await this.c.updateOne({ _id: id }, { $set: images ? { heartbeatAt: at, images } : { heartbeatAt: at } })).matchedCount > 0);
  }
  async setState(id: string, state: HostState) {
    await op('', () => this.c.updateOne({ _id: id }, { $set: { state } }));
    return this.findById(id);
  }
}

class MongoHostEpochs implements HostEpochRepository {
  constructor(
    private readonly c: Collection<EpochDoc>,
    private readonly losses: Collection<EpochDoc>,
  ) {}
  async declareLost(hostId: string, epoch: number) {
    return claimedByInsert(() => this.losses.insertOne({ _id: `${hostId}:${epoch}`, hostId, epoch, createdAt: new Date() }));
  }
  async isLost(hostId: string, epoch: number) {
    return op('', async () => (await this.losses.findOne({ _id: `${hostId}:${epoch}` })) !== null);
  }
  async claim(hostId: string, epoch: number) {
    return claimedByInsert(() => this.c.insertOne({ _id: `${hostId}:${epoch}`, hostId, epoch, createdAt: new Date() }));
  }
  async latest(hostId: string) {
    return op('', async () => {
      const [doc] = await this.c.find({ hostId }).sort({ epoch: -1 }).limit(1).toArray();
      return doc?.epoch ?? 0;
    });
  }
}

/**
 * `_id` is the reservation (`<hostId>:<slot>:<reservation>`; `<hostId>:<slot>` for slots held
 * before reservations had keys) and the unique index `host_slots_unique` on `(hostId, slot)` lets
 * one insert hold a slot; assign and release go by `_id`, so they only ever touch their own holding.
 */
class MongoHostSlots implements HostSlotRepository {
  constructor(private readonly c: Collection<SlotDoc>) {}
  static #id(k: HostSlotKey): string {
    return k.reservation ? `${k.hostId}:${k.slot}:${k.reservation}` : `${k.hostId}:${k.slot}`;
  }
  async reserve(s: HostSlotRecord) {
    return claimedByInsert(() => this.c.insertOne({ _id: MongoHostSlots.#id(s), ...s }));
  }
  async assign(key: HostSlotKey, sandboxId: string) {
    await op('', () => this.c.updateOne({ _id: MongoHostSlots.#id(key) }, { $set: { sandboxId } }));
  }
  async listByHost(hostId: string) {
    return op('', async () =>
      (await this.c.find({ hostId }).sort({ slot: 1 }).toArray()).map(({ hostId: h, slot, sandboxId, expiresAt, createdAt, reservation }) => ({ hostId: h, slot, sandboxId, expiresAt, createdAt, reservation: reservation ?? '' })),
    );
  }
  async release(key: HostSlotKey) {
    return op('', async () => (await this.c.deleteOne({ _id: MongoHostSlots.#id(key) })).deletedCount > 0);
  }
}

export async function ensureHostIndexes(db: Db): Promise<void> {
  await Promise.all([
    db.collection('host_epochs').createIndex({ hostId: 1, epoch: -1 }, { name: 'host_epochs_by_host' }),
  ]);
  // One holding per slot: a unique index (its first form, not unique, is replaced).
  const slots = db.collection('host_slots');
  const named = (await slots.indexes().catch(() => [])).map((i) => i.name);
  if (named.includes('host_slots_by_host')) await slots.dropIndex('host_slots_by_host').catch(() => {});
  await slots.createIndex({ hostId: 1, slot: 1 }, { unique: true, name: 'host_slots_unique' });
}

/** The hosts (and their drains), host epochs (and their losses) and host slots repositories (collections `hosts`, `host_drains`, `host_epochs`, `host_losses`, `host_slots`). */
export function mongoHostRepositories(db: Db): Pick<Store, 'hosts' | 'hostEpochs' | 'hostSlots'> {
  return {
    hosts: new MongoHosts(db.collection('hosts'), db.collection('host_drains')),
    hostEpochs: new MongoHostEpochs(db.collection('host_epochs'), db.collection('host_losses')),
    hostSlots: new MongoHostSlots(db.collection('host_slots')),
  };
}
