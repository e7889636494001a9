import type { HostCapacity, HostEpochRepository, HostRecord, HostRepository } from '../../store/types.js';

export interface HostIdentity {
  id: string;
  address: string;
  capacity: HostCapacity;
  labels: Record<string, string>;
  images: string[];
}

/** How a heartbeat went: `fenced` means the fleet declared this host lost; it must reconcile and register again before it serves. */
export type HeartbeatResult = 'ok' | 'fenced';

/**
 * A host's membership of the fleet (README "Fleet"). Registering takes the next epoch by inserting
 * `(hostId, epoch)` against its unique key — of concurrent registrations under one id each epoch has
 * exactly one winner — and writes the host record `ready` with that epoch. A heartbeat that finds
 * the record no longer `ready`/`draining` under its own epoch (declared `unresponsive` by an API
 * node, `gone`, or taken over by a newer registration) reports `fenced`: the host's sandboxes were
 * given up as lost, so it must not serve them again before it has reconciled and re-registered.
 */
export class HostRegistry {
  #epoch = 0;

  constructor(
    private readonly hosts: HostRepository,
    private readonly epochs: HostEpochRepository,
    private readonly now: () => Date = () => new Date(),
  ) {}

  /** The epoch this process registered with; 0 before `register`. */
  get epoch(): number {
    return this.#epoch;
  }

  async register(identity: HostIdentity): Promise<HostRecord> {
    let epoch = (await this.epochs.latest(identity.id)) + 1;
    // A lost insert means another registration took that epoch: take the next one.
    while (!(await this.epochs.claim(identity.id, epoch))) epoch++;
    this.#epoch = epoch;
    const at = this.now();
    // Every state starts over as ready; a drain, an operator's decision, is kept apart from the
    // record (HostRepository.drain) and so survives this.
    const record: HostRecord = { ...identity, state: 'ready', epoch, heartbeatAt: at, registeredAt: at };
    this.#record = record;
    await this.#putUntilRead(record);
    // As read back: `draining` when an operator drained it.
    return (await this.hosts.findById(identity.id)) ?? record;
  }

  #record: HostRecord | null = null;

  /** Writes the record until it reads back under its epoch: a store that loses concurrent updates (FerretDB) can put an older one back. */
  async #putUntilRead(record: HostRecord): Promise<void> {
    for (let attempt = 0; attempt < 5; attempt++) {
      await this.hosts.put(record);
      if ((await this.hosts.findById(record.id))?.epoch === record.epoch) return;
    }
  }

  async heartbeat(hostId: string, images?: string[]): Promise<HeartbeatResult> {
    const record = await this.hosts.findById(hostId);
    if (!record || record.epoch > this.#epoch || record.state === 'gone' || (await this.epochs.isLost(hostId, this.#epoch))) return 'fenced';
    // An older registration written back over this one (a lost update): this one is written again.
    if (record.epoch < this.#epoch && this.#record) {
      await this.#putUntilRead({ ...this.#record, state: 'ready', heartbeatAt: this.now() });
      return 'ok';
    }
    // `unresponsive` without a loss of this epoch is a sweep's state write that lost a race with this
    // registration (it read the record before): repaired here, and placement takes the host again.
    if (record.state === 'unresponsive') await this.hosts.setState(hostId, 'ready');
    await this.hosts.heartbeat(hostId, this.now(), images);
    return 'ok';
  }
}

/**
 * Declares hosts whose heartbeat is older than `deadAfterMs` lost: their registration's epoch by an
 * insert (run by every API node; any number agree), and their state `unresponsive`. Resolves to the hosts it
 * declared lost now, for the caller to withdraw their capacity and mark their sandboxes `host-lost`.
 */
/**
 * Declares lost every host whose heartbeat is older than `deadAfterMs` (its registration, by
 * insert) and marks it `unresponsive`; resolves to the hosts this call declared lost (of several
 * sweeps at once, one declares each).
 */
export async function sweepLostHosts(hosts: HostRepository, epochs: HostEpochRepository, deadAfterMs: number, now: Date = new Date()): Promise<HostRecord[]> {
  const lost: HostRecord[] = [];
  for (const h of await hosts.list()) {
    if ((h.state === 'ready' || h.state === 'draining') && now.getTime() - h.heartbeatAt.getTime() > deadAfterMs) {
      // The loss is of the registration read here (its epoch), by insert: what decides. The state is for display and placement.
      const declaredHere = await epochs.declareLost(h.id, h.epoch);
      const updated = await hosts.setState(h.id, 'unresponsive');
      // Only the sweep whose insert declared the loss reports it (API nodes sweep side by side).
      if (updated && declaredHere) lost.push(updated);
    }
  }
  return lost;
}

/** Whether the host's current registration was declared lost (or it was removed): its sandboxes are lost. */
export async function registrationLost(h: HostRecord, epochs: HostEpochRepository): Promise<boolean> {
  return h.state === 'gone' || (await epochs.isLost(h.id, h.epoch));
}
