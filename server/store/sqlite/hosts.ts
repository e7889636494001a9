import type Database from 'better-sqlite3';
import type { HostEpochRepository, HostRecord, HostRepository, HostSlotKey, HostSlotRecord, HostSlotRepository, HostState, Store } from '../types.js';
import { drainedState } from '../types.js';
import { date, iso } from './store.js';

type Row = Record<string, unknown>;

/** The fleet's tables (README "Fleet"), created with the repositories. */
const schema = `
CREATE TABLE IF NOT EXISTS hosts (
  id TEXT PRIMARY KEY,
  address TEXT NOT NULL,
  capacity TEXT NOT NULL,
  labels TEXT NOT NULL,
  images TEXT NOT NULL,
  state TEXT NOT NULL,
  epoch INTEGER NOT NULL,
  heartbeat_at TEXT NOT NULL,
  registered_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS host_epochs (
  host_id TEXT NOT NULL,
  epoch INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (host_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS host_losses (
  host_id TEXT NOT NULL,
  epoch INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (host_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS host_drains (
  host_id TEXT PRIMARY KEY,
  created_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS host_slots (
  host_id TEXT NOT NULL,
  slot INTEGER NOT NULL,
  sandbox_id TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  created_at TEXT NOT NULL,
  reservation TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (host_id, slot)
) WITHOUT ROWID;
`;

class SqliteHosts implements HostRepository {
  readonly #put;
  readonly #byId;
  readonly #all;
  readonly #beat;
  readonly #beatImages;
  readonly #state;
  readonly #drain;
  readonly #undrain;
  constructor(db: Database.Database) {
    this.#put = db.prepare(
      `INSERT INTO hosts (id, address, capacity, labels, images, state, epoch, heartbeat_at, registered_at) VALUES (@id, @address, @capacity, @labels, @images, @state, @epoch, @heartbeat_at, @registered_at)
       ON CONFLICT (id) DO UPDATE SET address = excluded.address, capacity = excluded.capacity, labels = excluded.labels, images = excluded.images, state = excluded.state, epoch = excluded.epoch, heartbeat_at = excluded.heartbeat_at, registered_at = excluded.registered_at`,
    );
    this.#byId = db.prepare('SELECT h.*, d.host_id AS drained FROM hosts h LEFT JOIN host_drains d ON d.host_id = h.id WHERE h.id = ?');
    this.#all = db.prepare('SELECT h.*, d.host_id AS drained FROM hosts h LEFT JOIN host_drains d ON d.host_id = h.id ORDER BY h.id');
    this.#drain = db.prepare('INSERT INTO host_drains (host_id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING');
    this.#undrain = db.prepare('DELETE FROM host_drains WHERE host_id = ?');
    this.#beat = db.prepare('UPDATE hosts SET heartbeat_at = ? WHERE id = ?');
    this.#beatImages = db.prepare('UPDATE hosts SET heartbeat_at = ?, images = ? WHERE id = ?');
    this.#state = db.prepare('UPDATE hosts SET state = ? WHERE id = ?');
  }
  static #map(r: Row): HostRecord {
    return {
      id: String(r.id),
      address: String(r.address),
      capacity: JSON.parse(String(r.capacity)) as HostRecord['capacity'],
      labels: JSON.parse(String(r.labels)) as Record<string, string>,
      images: JSON.parse(String(r.images)) as string[],
      state: drainedState(String(r.state) as HostState, r.drained != null),
      epoch: Number(r.epoch),
      heartbeatAt: date(r.heartbeat_at),
      registeredAt: date(r.registered_at),
    };
  }
  async put(h: HostRecord) {
    this.#put.run({
      id: h.id,
      address: h.address,
      capacity: JSON.stringify(h.capacity),
      labels: JSON.stringify(h.labels),
      images: JSON.stringify(h.images),
      state: h.state,
      epoch: h.epoch,
      heartbeat_at: iso(h.heartbeatAt),
      registered_at: iso(h.registeredAt),
    });
  }
  async findById(id: string) {
    const r = this.#byId.get(id) as Row | undefined;
    return r ? SqliteHosts.#map(r) : null;
  }
  async list() {
    return (this.#all.all() as Row[]).map((r) => SqliteHosts.#map(r));
  }
  async heartbeat(id: string, at: Date, images?: string[]) {
    const result = images ? this.#beatImages.run(iso(at), JSON.stringify(images), id) : this.#beat.run(iso(at), id);
    return result.changes > 0;
  }
  async setState(id: string, state: HostState) {
    this.#state.run(state, id);
    return this.findById(id);
  }
  async drain(id: string) {
    this.#drain.run(id, iso(new Date()));
  }
  async undrain(id: string) {
    this.#undrain.run(id);
  }
}

class SqliteHostEpochs implements HostEpochRepository {
  readonly #claim;
  readonly #latest;
  constructor(db: Database.Database) {
    this.#claim = db.prepare('INSERT INTO host_epochs (host_id, epoch, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING');
    this.#latest = db.prepare('SELECT MAX(epoch) AS epoch FROM host_epochs WHERE host_id = ?');
    this.#declare = db.prepare('INSERT INTO host_losses (host_id, epoch, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING');
    this.#isLost = db.prepare('SELECT 1 FROM host_losses WHERE host_id = ? AND epoch = ?');
  }
  readonly #declare;
  readonly #isLost;
  async declareLost(hostId: string, epoch: number) {
    return this.#declare.run(hostId, epoch, iso(new Date())).changes === 1;
  }
  async isLost(hostId: string, epoch: number) {
    return this.#isLost.get(hostId, epoch) !== undefined;
  }
  async claim(hostId: string, epoch: number) {
    return this.#claim.run(hostId, epoch, iso(new Date())).changes === 1;
  }
  async latest(hostId: string) {
    return Number((this.#latest.get(hostId) as Row | undefined)?.epoch ?? 0);
  }
}

class SqliteHostSlots implements HostSlotRepository {
  readonly #reserve;
  readonly #assign;
  readonly #byHost;
  readonly #release;
  constructor(db: Database.Database) {
    this.#reserve = db.prepare('INSERT INTO host_slots (host_id, slot, sandbox_id, expires_at, created_at, reservation) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING');
    this.#assign = db.prepare('UPDATE host_slots SET sandbox_id = ? WHERE host_id = ? AND slot = ? AND reservation = ?');
    this.#byHost = db.prepare('SELECT * FROM host_slots WHERE host_id = ? ORDER BY slot');
    this.#release = db.prepare('DELETE FROM host_slots WHERE host_id = ? AND slot = ? AND reservation = ?');
  }
  async reserve(s: HostSlotRecord) {
    return this.#reserve.run(s.hostId, s.slot, s.sandboxId, iso(s.expiresAt), iso(s.createdAt), s.reservation).changes === 1;
  }
  async assign(key: HostSlotKey, sandboxId: string) {
    this.#assign.run(sandboxId, key.hostId, key.slot, key.reservation);
  }
  async listByHost(hostId: string) {
    return (this.#byHost.all(hostId) as Row[]).map((r) => ({
      hostId: String(r.host_id),
      slot: Number(r.slot),
      sandboxId: String(r.sandbox_id),
      expiresAt: date(r.expires_at),
      createdAt: date(r.created_at),
      reservation: String(r.reservation ?? ''),
    }));
  }
  async release(key: HostSlotKey) {
    return this.#release.run(key.hostId, key.slot, key.reservation).changes > 0;
  }
}

/** The hosts, host epochs and host slots repositories over the embedded store's database. */
export function sqliteHostRepositories(db: Database.Database): Pick<Store, 'hosts' | 'hostEpochs' | 'hostSlots'> {
  db.exec(schema);
  const slotColumns = (db.prepare('PRAGMA table_info(host_slots)').all() as Array<{ name: string }>).map((c) => c.name);
  if (!slotColumns.includes('reservation')) db.exec("ALTER TABLE host_slots ADD COLUMN reservation TEXT NOT NULL DEFAULT ''");
  return { hosts: new SqliteHosts(db), hostEpochs: new SqliteHostEpochs(db), hostSlots: new SqliteHostSlots(db) };
}
