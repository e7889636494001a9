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
    const previous = await this.hosts.findById(identity.id);
    // Draining is an operator's decision and survives a restart; every other state starts over as ready.
    const record: HostRecord = { ...identity, state: previous?.state === 'draining' ? 'draining' : 'ready', epoch, heartbeatAt: at, registeredAt: at };
    await this.hosts.put(record);
    return record;
  }

  async heartbeat(hostId: string, images?: string[]): Promise<HeartbeatResult> {
    const record = await this.hosts.findById(hostId);
    if (!record || record.epoch !== this.#epoch || (record.state !== 'ready' && record.state !== 'draining')) return 'fenced';
    await this.hosts.heartbeat(hostId, this.now(), images);
    return 'ok';
  }
}

/**
 * Declares hosts whose heartbeat is older than `deadAfterMs` `unresponsive` (run by every API
 * node; the write is idempotent, so two nodes sweeping at once agree). Resolves to the hosts it
 * declared lost now, for the caller to withdraw their capacity and mark their sandboxes `host-lost`.
 */
export async function sweepLostHosts(hosts: HostRepository, deadAfterMs: number, now: Date = new Date()): Promise<HostRecord[]> {
  const lost: HostRecord[] = [];
  for (const h of await hosts.list()) {
    if ((h.state === 'ready' || h.state === 'draining') && now.getTime() - h.heartbeatAt.getTime() > deadAfterMs) {
      const updated = await hosts.setState(h.id, 'unresponsive');
      if (updated) lost.push(updated);
    }
  }
  return lost;
}
