import type { Logger } from 'pino';
import type { HostEpochRepository, HostRepository, HostSlotRepository, ImageRepository, IpLeaseRepository, SandboxRecord, SandboxRepository } from '../../store/types.js';
import { HostUnavailableError } from '../../errors.js';
import { newId } from '../../store/ids.js';
import { HostRegistry, registrationLost, sweepLostHosts, type HostIdentity } from './host-registry.js';
import type { Placement } from './placement.js';

/**
 * The sandboxes a fleet host sees as its own (VOIDRUN_ROLE=host): what it creates names it
 * (`hostId`), and `listAll` — what the health loop, startup adoption, lifecycle timers, warm pool,
 * host events and metrics walk — holds only its own, so no loop of one host ever touches a
 * sandbox of another. A lookup of a sandbox this host moved to another (`movedAway`: off this
 * host while draining, see SandboxMover) is a 503 saying so: whatever waited for its lock here
 * (a call forwarded before the API node knew) must not act on it. Other lookups by id see every
 * sandbox (an idempotent create's replay reads the one another host made). A delete frees the
 * sandbox's placement slot at once.
 */
export function hostSandboxes(repo: SandboxRepository, hostId: string, slots: HostSlotRepository, movedAway: ReadonlySet<string> = new Set()): SandboxRepository {
  return {
    create: (sandbox) => repo.create({ ...sandbox, hostId }),
    findById: async (orgId, id) => {
      const record = await repo.findById(orgId, id);
      if (record?.hostId && record.hostId !== hostId && movedAway.has(id)) {
        throw new HostUnavailableError(`Sandbox ${record.name} was moved to fleet host ${record.hostId} (its host was drained); retry`, { details: 'moved' });
      }
      return record;
    },
    listByOrg: (orgId, page, limit, labels) => repo.listByOrg(orgId, page, limit, labels),
    listAll: async () => (await repo.listAll()).filter((r) => r.hostId === hostId),
    findByIdInAnyOrg: (id) => repo.findByIdInAnyOrg(id),
    update: (orgId, id, patch) => repo.update(orgId, id, patch),
    claimPoolMember: (id, claim) => repo.claimPoolMember(id, claim),
    // Its placement slot is free as soon as the sandbox is gone (the heartbeat's sweep is the backstop).
    delete: async (orgId, id) => {
      const deleted = await repo.delete(orgId, id);
      const slot = (await slots.listByHost(hostId)).find((s) => s.sandboxId === id);
      if (slot) await slots.release(slot);
      return deleted;
    },
  };
}

/**
 * A fleet host's address leases: each host's bridge is its own network, so its leases are keyed
 * `<hostId>/<ip>` in the shared store — two hosts may lease one address to sandboxes of their own,
 * and a host's startup reconcile (which frees every lease no sandbox of its own holds) sees and
 * frees only its own. Without this a restarting host freed every other host's leases, and their
 * next creates leased addresses live sandboxes held (two sandboxes with one address on a bridge).
 */
export function hostIpLeases(repo: IpLeaseRepository, hostId: string): IpLeaseRepository {
  const prefix = `${hostId}/`;
  const own = <T extends { ip: string }>(lease: T): T => ({ ...lease, ip: lease.ip.slice(prefix.length) });
  return {
    claim: (ip, sandboxId) => repo.claim(prefix + ip, sandboxId),
    findBySandbox: async (sandboxId) => {
      const lease = await repo.findBySandbox(sandboxId, prefix);
      return lease ? own(lease) : null;
    },
    // Only this host's: a sandbox moved off a draining host holds a lease on each for a moment.
    releaseBySandbox: (sandboxId) => repo.releaseBySandbox(sandboxId, prefix),
    list: async () => (await repo.list()).filter((l) => l.ip.startsWith(prefix)).map(own),
  };
}

export interface HostMembershipOptions {
  registry: HostRegistry;
  slots: HostSlotRepository;
  placement: Placement;
  /** This host's sandboxes (see hostSandboxes). */
  sandboxes: SandboxRepository;
  /** What this host registers as, read at each registration and heartbeat (images change). */
  identity: () => Promise<HostIdentity>;
  /** Run when the fleet gave this host up (fenced), before it registers again: stop what it must not run. */
  reconcile: () => Promise<void>;
  /** Started (not awaited) at each heartbeat while this host is draining: move its stopped sandboxes elsewhere. */
  whileDraining?: () => Promise<unknown>;
  /** The host records, to read this host's own state (draining) at each heartbeat. */
  hosts?: HostRepository;
  heartbeatMs: number;
  log: Logger;
}

/**
 * A host's membership in the fleet: registers (a new epoch), heartbeats every HOST_HEARTBEAT_SEC
 * with the images it has, and frees its own slots that no longer hold a sandbox (deleted, or a
 * create that never finished). Fenced — declared lost while it was away, or superseded — it
 * reconciles (its lost sandboxes' runtimes are stopped) and registers again with a new epoch.
 */
export class HostMembership {
  #timer: NodeJS.Timeout | null = null;
  #beating: Promise<void> | null = null;
  #stopped = false;

  constructor(private readonly o: HostMembershipOptions) {}

  async start(): Promise<void> {
    const record = await this.o.registry.register(await this.o.identity());
    this.o.log.info({ host: record.id, address: record.address, epoch: record.epoch, state: record.state }, `fleet: registered as host ${record.id} (epoch ${record.epoch})`);
    this.#schedule();
  }

  #schedule(): void {
    if (this.#stopped) return;
    this.#timer = setTimeout(() => {
      this.#beating = this.beat()
        .catch((err: Error) => this.o.log.warn({ err: err.message }, 'fleet: heartbeat failed; retrying'))
        .finally(() => this.#schedule());
    }, this.o.heartbeatMs);
    this.#timer.unref();
  }

  /** One heartbeat (and slot cleanup); registers again after a fence. */
  async beat(): Promise<void> {
    const identity = await this.o.identity();
    const result = await this.o.registry.heartbeat(identity.id, identity.images);
    if (result === 'fenced') {
      this.o.log.warn({ host: identity.id }, 'fleet: this host was declared lost (or registered elsewhere); reconciling before it registers again');
      await this.o.reconcile();
      const record = await this.o.registry.register(await this.o.identity());
      this.o.log.info({ host: record.id, epoch: record.epoch }, `fleet: registered again (epoch ${record.epoch})`);
    }
    await this.#reconcileSlots(identity.id, identity.capacity.slots);
    if (this.o.whileDraining && (await this.o.hosts?.findById(identity.id))?.state === 'draining') {
      void this.o.whileDraining().catch((err: Error) => this.o.log.warn({ err: err.message }, 'fleet: moving sandboxes off this draining host failed; trying again'));
    }
  }

  /**
   * Frees slots whose sandbox is gone and pending ones past their TTL, and gives a slot to each of
   * its sandboxes that holds none (a create whose API node was cut off before it assigned one), so
   * placement counts every sandbox here.
   */
  async #reconcileSlots(hostId: string, capacity: number): Promise<void> {
    const live = (await this.o.sandboxes.listAll()).filter((r) => !r.pool);
    const liveIds = new Set(live.map((r) => r.id));
    const held = await this.o.slots.listByHost(hostId);
    for (const s of held) {
      if (s.sandboxId !== '' && !liveIds.has(s.sandboxId)) await this.o.slots.release(s);
    }
    await this.o.placement.reapExpired(hostId);
    const assigned = new Set(held.filter((s) => liveIds.has(s.sandboxId)).map((s) => s.sandboxId));
    const taken = new Set(held.map((s) => s.slot));
    for (const r of live) {
      if (assigned.has(r.id) || (r.status === 'error' && r.lifecycle?.endedReason === 'host-lost')) continue;
      // Younger than a create's TTL (or just moved here): its API node (or the host it came from)
      // may still be about to assign the slot it reserved.
      if (Date.now() - Math.max(r.createdAt.getTime(), r.updatedAt.getTime()) < 60_000) continue;
      let slot = 0;
      while (taken.has(slot) && slot < capacity) slot++;
      if (slot >= capacity) {
        this.o.log.warn({ host: hostId, sandbox: r.id }, `fleet: sandbox ${r.id} holds no slot and all ${capacity} are held; this host runs more than HOST_SLOTS`);
        break;
      }
      const now = new Date();
      await this.o.slots.reserve({ hostId, slot, sandboxId: r.id, expiresAt: new Date(now.getTime() + 60_000), createdAt: now, reservation: newId() });
      taken.add(slot);
    }
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearTimeout(this.#timer);
    await this.#beating;
  }
}

export interface LostHostSweeperOptions {
  hosts: HostRepository;
  epochs: HostEpochRepository;
  slots: HostSlotRepository;
  /** Every sandbox record, unfiltered. */
  sandboxes: SandboxRepository;
  /** The images, whose builds on a lost host end `failed` (absent: images are not looked at). */
  images?: ImageRepository;
  deadAfterMs: number;
  intervalMs: number;
  log: Logger;
  /** Told of each sandbox marked lost (its event). */
  onLost?: (record: SandboxRecord) => void;
  /** Told, at every sweep, of each host not serving (this node cuts what it has in flight there). */
  onNotServing?: (hostId: string) => void;
}

/**
 * Run by every API node: a host whose heartbeat is older than HOST_DEAD_AFTER_SEC becomes
 * `unresponsive`, its sandboxes `error` with `endedReason: "host-lost"`, and its slots are freed
 * (its capacity withdrawn), and the images it was building `failed` saying so (a build lives in
 * its host's memory and layer store: nothing else finishes it). Idempotent, so any number of API nodes sweep at once; a sweep that
 * missed a sandbox (or was cut short) is made good by the next one, which marks every sandbox of
 * every host not serving.
 */
export class LostHostSweeper {
  #timer: NodeJS.Timeout | null = null;
  #running: Promise<void> | null = null;

  constructor(private readonly o: LostHostSweeperOptions) {}

  start(): void {
    this.#timer = setInterval(() => {
      if (this.#running) return;
      this.#running = this.sweep()
        .catch((err: Error) => this.o.log.warn({ err: err.message }, 'fleet: lost-host sweep failed'))
        .finally(() => (this.#running = null));
    }, this.o.intervalMs);
    this.#timer.unref();
  }

  /**
   * Declares hosts past their heartbeats lost, then marks the sandboxes of every host whose
   * current registration is lost `error/host-lost` and frees its slots. Only what predates the
   * decision is touched, and each host is read again right before: a host that registered again
   * meanwhile is not lost (its own reconcile ends its old registration's sandboxes), and what it
   * was given since is its new registration's. The sandbox events are reported by the sweep that
   * declared the host lost (of the API nodes sweeping side by side, one).
   */
  async sweep(): Promise<void> {
    const declared = new Set<string>();
    for (const host of await sweepLostHosts(this.o.hosts, this.o.epochs, this.o.deadAfterMs)) {
      declared.add(host.id);
      this.o.log.warn({ host: host.id, heartbeatAt: host.heartbeatAt }, `fleet: host ${host.id} missed its heartbeats for ${this.o.deadAfterMs / 1000} s: unresponsive, its sandboxes are lost`);
    }
    // Decided by the loss of each host's current registration, not by its state (a racing state write can be stale).
    const decidedAt = new Date();
    const notServing = new Set<string>();
    for (const h of await this.o.hosts.list()) if (await registrationLost(h, this.o.epochs)) notServing.add(h.id);
    if (notServing.size === 0) return;
    for (const hostId of notServing) this.o.onNotServing?.(hostId);
    const all = await this.o.sandboxes.listAll();
    const now = decidedAt.toISOString();
    for (const hostId of notServing) {
      const current = await this.o.hosts.findById(hostId);
      if (current && !(await registrationLost(current, this.o.epochs))) continue;
      for (const r of all) {
        if (r.hostId !== hostId || r.createdAt >= decidedAt) continue;
        if (r.status === 'error' && r.lifecycle?.endedReason === 'host-lost') continue;
        const updated = await this.o.sandboxes.update(r.orgId, r.id, { status: 'error', lifecycle: lostLifecycle(r, now) });
        if (updated && declared.has(hostId)) this.o.onLost?.(updated);
      }
      for (const s of await this.o.slots.listByHost(hostId)) if (s.createdAt < decidedAt) await this.o.slots.release(s);
    }
    if (!this.o.images) return;
    for (const image of await this.o.images.listAll()) {
      if (image.status !== 'building' || !image.hostId || !notServing.has(image.hostId) || image.createdAt >= decidedAt) continue;
      const current = await this.o.hosts.findById(image.hostId);
      if (current && !(await registrationLost(current, this.o.epochs))) continue;
      await this.o.images.update(image.id, {
        status: 'failed',
        progress: null,
        error: `Its build host ${image.hostId} stopped answering (host-lost) before the build finished; delete the image and create it again`,
      });
      if (declared.has(image.hostId)) this.o.log.warn({ image: image.id, host: image.hostId }, 'fleet: an image building on a lost host failed');
    }
  }

  async stop(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer);
    await this.#running;
  }
}

/** A sandbox's lifecycle once its host is lost: no timer runs, and `endedReason` says why it ended. */
export function lostLifecycle(r: SandboxRecord, at: string): NonNullable<SandboxRecord['lifecycle']> {
  return { timeout: 0, onTimeout: 'stop', idle: null, autoResume: false, ...r.lifecycle, expiresAt: null, endedReason: 'host-lost', endedAt: at };
}
