import type { Collection, Db } from 'mongodb';
import { ConflictError } from '../../errors.js';
import type { SandboxTombstoneRecord, SandboxTombstoneRepository } from '../types.js';
import { op } from './store.js';

type TombstoneDoc = { _id: string; orgId: string; name: string; reason: 'timeout'; endedAt: Date };

/** Sandboxes deleted by their timeout, `_id` the sandbox id: an insert per id, the first kept. */
export class MongoSandboxTombstones implements SandboxTombstoneRepository {
  constructor(private readonly c: Collection<TombstoneDoc>) {}
  async put(t: SandboxTombstoneRecord) {
    try {
      await op('A tombstone', () => this.c.insertOne({ _id: t.id, orgId: t.orgId, name: t.name, reason: t.reason, endedAt: t.endedAt }));
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
    }
  }
  async findById(orgId: string, id: string) {
    const d = await op('', () => this.c.findOne({ _id: id }));
    return d && d.orgId === orgId ? { id: d._id, orgId: d.orgId, name: d.name, reason: 'timeout' as const, endedAt: d.endedAt } : null;
  }
  async deleteEndedBefore(before: Date) {
    return op('', async () => (await this.c.deleteMany({ endedAt: { $lt: before } })).deletedCount);
  }
  async delete(orgId: string, id: string) {
    return op('', async () => (await this.c.deleteOne({ _id: id, orgId })).deletedCount > 0);
  }
}

export function mongoTombstones(db: Db): MongoSandboxTombstones {
  return new MongoSandboxTombstones(db.collection('sandbox_tombstones'));
}
