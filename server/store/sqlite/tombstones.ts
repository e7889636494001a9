import type Database from 'better-sqlite3';
import type { SandboxTombstoneRecord, SandboxTombstoneRepository } from '../types.js';
import { date, iso } from './store.js';

type Row = Record<string, unknown>;

/** The table, created with the repository (it is read only on a sandbox lookup that missed). */
const schema = `
CREATE TABLE IF NOT EXISTS sandbox_tombstones (
  id TEXT PRIMARY KEY,
  org_id TEXT NOT NULL,
  name TEXT NOT NULL,
  reason TEXT NOT NULL,
  ended_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandbox_tombstones_by_end ON sandbox_tombstones (ended_at);
`;

/** Sandboxes deleted by their timeout, by id: one insert per id, the first kept. */
export class SqliteSandboxTombstones implements SandboxTombstoneRepository {
  readonly #insert;
  readonly #byId;
  readonly #deleteBefore;
  readonly #delete;
  constructor(db: Database.Database) {
    db.exec(schema);
    this.#insert = db.prepare('INSERT INTO sandbox_tombstones (id, org_id, name, reason, ended_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING');
    this.#byId = db.prepare('SELECT * FROM sandbox_tombstones WHERE org_id = ? AND id = ?');
    this.#deleteBefore = db.prepare('DELETE FROM sandbox_tombstones WHERE ended_at < ?');
    this.#delete = db.prepare('DELETE FROM sandbox_tombstones WHERE org_id = ? AND id = ?');
  }
  async put(t: SandboxTombstoneRecord) {
    this.#insert.run(t.id, t.orgId, t.name, t.reason, iso(t.endedAt));
  }
  async findById(orgId: string, id: string) {
    const r = this.#byId.get(orgId, id) as Row | undefined;
    return r ? { id: String(r.id), orgId: String(r.org_id), name: String(r.name), reason: 'timeout' as const, endedAt: date(r.ended_at) } : null;
  }
  async deleteEndedBefore(before: Date) {
    return this.#deleteBefore.run(iso(before)).changes;
  }
  async delete(orgId: string, id: string) {
    return this.#delete.run(orgId, id).changes > 0;
  }
}
