import { timingSafeEqual } from 'node:crypto';
import { ConflictError, ForbiddenError, NotFoundError, UnauthorizedError } from '../../errors.js';
import type { FleetHost } from '../../../shared/index.js';
import type { HostRecord, HostRepository, HostSlotRepository, SandboxRepository } from '../../store/types.js';

export interface FleetAdminOptions {
  hosts: HostRepository;
  slots: HostSlotRepository;
  sandboxes: SandboxRepository;
  /** ADMIN_API_KEY; unset, every admin call is refused. */
  adminKey: string | undefined;
}

/**
 * The fleet's admin operations (ADMIN_API_KEY, sent as X-API-Key): the hosts and their load, and
 * draining (no new sandboxes placed there; its sandboxes keep running) and undraining.
 */
export class FleetAdmin {
  constructor(private readonly o: FleetAdminOptions) {}

  /** Throws unless `apiKey` is ADMIN_API_KEY (compared in constant time). */
  authorize(apiKey: string | null): void {
    if (!this.o.adminKey) throw new ForbiddenError('The admin routes are off on this server: set ADMIN_API_KEY (32+ characters) on the API nodes and send it as X-API-Key');
    const given = Buffer.from(apiKey ?? '');
    const want = Buffer.from(this.o.adminKey);
    if (given.length !== want.length || !timingSafeEqual(given, want)) throw new UnauthorizedError('Admin routes need the ADMIN_API_KEY as X-API-Key');
  }

  async list(): Promise<FleetHost[]> {
    const [hosts, records] = await Promise.all([this.o.hosts.list(), this.o.sandboxes.listAll()]);
    const perHost = new Map<string, number>();
    for (const r of records) if (r.hostId) perHost.set(r.hostId, (perHost.get(r.hostId) ?? 0) + 1);
    return Promise.all(hosts.sort((a, b) => a.id.localeCompare(b.id)).map(async (h) => this.#view(h, (await this.o.slots.listByHost(h.id)).length, perHost.get(h.id) ?? 0)));
  }

  /** No new sandboxes go to the host; what runs there keeps running. Idempotent. */
  drain(id: string): Promise<FleetHost> {
    return this.#move(id, 'draining', ['ready', 'draining'], 'only a ready host can be drained');
  }

  /** The host takes new sandboxes again. Idempotent. */
  undrain(id: string): Promise<FleetHost> {
    return this.#move(id, 'ready', ['ready', 'draining'], 'only a draining host can be undrained (an unresponsive one registers again by itself)');
  }

  async #move(id: string, to: 'ready' | 'draining', from: HostRecord['state'][], refused: string): Promise<FleetHost> {
    const host = await this.o.hosts.findById(id);
    if (!host) throw new NotFoundError(`Host ${id} is not registered`);
    if (host.state !== to && !from.includes(host.state)) throw new ConflictError(`Host ${id} is ${host.state}: ${refused}`);
    // A drain is its own record (an insert, or a delete by its key): no heartbeat can undo it.
    if (to === 'draining') await this.o.hosts.drain(id);
    else await this.o.hosts.undrain(id);
    const now = (await this.o.hosts.findById(id)) ?? host;
    return this.#view(now, (await this.o.slots.listByHost(id)).length, (await this.o.sandboxes.listAll()).filter((r) => r.hostId === id).length);
  }

  #view(h: HostRecord, slotsHeld: number, sandboxes: number): FleetHost {
    return {
      id: h.id,
      address: h.address,
      state: h.state,
      epoch: h.epoch,
      heartbeatAt: h.heartbeatAt.toISOString(),
      registeredAt: h.registeredAt.toISOString(),
      capacity: h.capacity,
      labels: h.labels,
      slotsHeld,
      sandboxes,
    };
  }
}
