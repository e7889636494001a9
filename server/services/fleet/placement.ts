import { randomInt } from 'node:crypto';
import { HostUnavailableError, TooManyRequestsError } from '../../errors.js';
import { newId } from '../../store/ids.js';
import type { HostRecord, HostRepository, HostSlotRepository } from '../../store/types.js';

/** What a new sandbox needs from a host. */
export interface PlacementRequest {
  /** Hosts that already have this image's root filesystem are preferred (no pull or build there). */
  imageId?: string;
  /** Only this host will do: the image's own layers are there (`ImageRecord.hostId`), or the snapshot restored. */
  hostId?: string;
  /** What that host holds, for the refusals ("the image's layers" by default). */
  holds?: string;
  cpu: number;
  memMb: number;
}

/** A slot held on one host for one create: assign it the sandbox once created, or release it when the create fails. */
export interface Placed {
  host: HostRecord;
  slot: number;
  assign(sandboxId: string): Promise<void>;
  release(): Promise<void>;
}

export interface PlacementOptions {
  hosts: HostRepository;
  slots: HostSlotRepository;
  /** A host whose last heartbeat is older than this takes no sandboxes (HOST_DEAD_AFTER_SEC). */
  deadAfterMs: number;
  /** Best-of-K: how many hosts are sampled per attempt (the one with most free slots wins). */
  sample?: number;
  /** How long a slot may stay reserved without a sandbox before `reapExpired` frees it. */
  pendingTtlMs?: number;
  now?: () => Date;
}

/**
 * Chooses a host for each new sandbox (README "Fleet"). Candidates are the `ready` hosts with a
 * fresh heartbeat whose size fits the sandbox, those with its image first; K of them are sampled
 * and the one with the most free slots is tried. A slot is held by inserting `(hostId, slot)`
 * against its unique key, the one write atomic on every MongoDB-wire store (FerretDB loses
 * concurrent updates), so any number of API nodes placing at once never hold more slots on a host
 * than it has: a lost insert tries the host's next free slot, then the next host. With every slot
 * held, the create answers 429 "fleet full".
 */
export class Placement {
  readonly #o: Required<Omit<PlacementOptions, 'now'>> & { now: () => Date };

  constructor(options: PlacementOptions) {
    this.#o = { sample: 2, pendingTtlMs: 10 * 60_000, now: () => new Date(), ...options };
  }

  /** Hosts that take new sandboxes now. */
  async candidates(request: PlacementRequest): Promise<HostRecord[]> {
    const now = this.#o.now().getTime();
    return (await this.#o.hosts.list()).filter(
      (h) => h.state === 'ready' && now - h.heartbeatAt.getTime() <= this.#o.deadAfterMs && h.capacity.slots > 0 && h.capacity.cpu >= request.cpu && h.capacity.memoryMb >= request.memMb,
    );
  }

  async place(request: PlacementRequest): Promise<Placed> {
    const all = (await this.candidates(request)).filter((h) => !request.hostId || h.id === request.hostId);
    let left = [...all];
    while (left.length > 0) {
      const preferred = request.imageId ? left.filter((h) => h.images.includes(request.imageId!)) : [];
      const pool = preferred.length > 0 ? preferred : left;
      const sampled = sample(pool, this.#o.sample);
      const loads = await Promise.all(sampled.map(async (host) => ({ host, held: new Set((await this.#o.slots.listByHost(host.id)).map((s) => s.slot)) })));
      loads.sort((a, b) => b.host.capacity.slots - b.held.size - (a.host.capacity.slots - a.held.size));
      for (const { host, held } of loads) {
        const placed = await this.#reserveOn(host, held);
        if (placed) return placed;
        left = left.filter((h) => h.id !== host.id);
      }
    }
    const slots = all.reduce((n, h) => n + h.capacity.slots, 0);
    const holds = request.holds ?? "the image's layers";
    if (request.hostId && all.length === 0) {
      throw new HostUnavailableError(`Fleet host ${request.hostId}, which holds ${holds}, takes no sandboxes now (draining, unresponsive, gone, or too small for this size); retry later`);
    }
    if (request.hostId) {
      throw new TooManyRequestsError(`Fleet host ${request.hostId}, which holds ${holds}, has all its ${slots} sandbox slots held; delete sandboxes there or retry later`);
    }
    throw new TooManyRequestsError(
      all.length === 0
        ? 'Sandbox fleet full: no host is ready to take sandboxes of this size (none registered, all draining or unresponsive, or none this large); retry later or add hosts'
        : `Sandbox fleet full: all ${slots} sandbox slots of the ${all.length} ready host(s) are held; delete sandboxes, retry later or add hosts`,
    );
  }

  /** Tries the host's free slots, lowest first; null once each was taken (by this or another API node). */
  async #reserveOn(host: HostRecord, held: Set<number>): Promise<Placed | null> {
    const now = this.#o.now();
    for (let slot = 0; slot < host.capacity.slots; slot++) {
      if (held.has(slot)) continue;
      const key = { hostId: host.id, slot, reservation: newId() };
      const won = await this.#o.slots.reserve({ ...key, sandboxId: '', expiresAt: new Date(now.getTime() + this.#o.pendingTtlMs), createdAt: now });
      if (!won) continue;
      const slots = this.#o.slots;
      return {
        host,
        slot,
        assign: (sandboxId) => slots.assign(key, sandboxId),
        release: async () => void (await slots.release(key)),
      };
    }
    return null;
  }

  /**
   * A host to build or import an image on (no slot is held: builds run in the host's build
   * sandbox, not in its slots): a ready one with a fresh heartbeat, the freer of two sampled.
   */
  async builder(): Promise<HostRecord> {
    const all = await this.candidates({ cpu: 0, memMb: 0 });
    if (all.length === 0) throw new HostUnavailableError('No fleet host is ready to build images now (none registered, all draining or unresponsive); retry later');
    const loads = await Promise.all(sample(all, this.#o.sample).map(async (host) => ({ host, free: host.capacity.slots - (await this.#o.slots.listByHost(host.id)).length })));
    return loads.sort((a, b) => b.free - a.free)[0]!.host;
  }

  /** Whether the sandbox holds a slot on the host already (an idempotent create's replay returns a sandbox placed before). */
  async holdsSlot(hostId: string, sandboxId: string): Promise<boolean> {
    return (await this.#o.slots.listByHost(hostId)).some((s) => s.sandboxId === sandboxId);
  }

  /**
   * Frees the host's slots reserved for a create that never finished (no sandbox assigned past
   * their expiry: its API node died mid-create). Run by the host itself, the one writer that frees
   * unassigned slots, so a reap never frees a slot reserved again meanwhile by another node.
   */
  async reapExpired(hostId: string): Promise<number> {
    const now = this.#o.now().getTime();
    let freed = 0;
    for (const s of await this.#o.slots.listByHost(hostId)) {
      if (s.sandboxId === '' && s.expiresAt.getTime() < now && (await this.#o.slots.release(s))) freed++;
    }
    return freed;
  }
}

/** Up to `k` distinct hosts chosen uniformly at random. */
function sample<T>(items: readonly T[], k: number): T[] {
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = randomInt(i + 1);
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy.slice(0, Math.max(1, k));
}
