import type { Logger } from 'pino';
import type { NetworkMode } from '../../shared/index.js';
import type { WarmPoolEntry } from '../config.js';
import { ConflictError } from '../errors.js';
import type { PoolClaimRepository, PoolMemberClaim, SandboxRecord, SandboxRepository } from '../store/types.js';
import type { Principal } from './auth-service.js';
import type { ImageService } from './image-service.js';
import type { SandboxService } from './sandbox-service.js';

/** What a create asks for once the service resolved it: the fields a claim matches and applies. */
export interface WarmRequest extends PoolMemberClaim {
  imageId: string;
  cpu: number;
  mem: number;
  diskMb: number;
}

export interface WarmPoolDeps {
  entries: readonly WarmPoolEntry[];
  service: SandboxService;
  sandboxes: SandboxRepository;
  claims: PoolClaimRepository;
  images: ImageService;
  /** Every member's disk (SANDBOX_DEFAULT_DISK_MB: a create cannot ask for another). */
  diskMb: number;
  /** The network mode members are built with (the server's default); a create asking for another is not served from the pool. */
  networkMode: NetworkMode;
  log: Logger;
  /** How long a shape waits after a failed build before the next (default 5 s). */
  retryMs?: number;
  /** How often ready members are checked against their records (default 10 s). */
  checkMs?: number;
  /**
   * How long after a claim the member in its place starts being built (default 250 ms): a build
   * (disk image, runtime, agent boot) takes both cores of a small host for a while, and would
   * otherwise run alongside the claimed sandbox's first commands.
   */
  refillDelayMs?: number;
}

/** One WARM_POOL entry at run time: its members ready to claim and how many are being built. */
interface Shape {
  entry: WarmPoolEntry;
  imageId: string;
  /** Running members nobody claimed, oldest first (claimed in that order). */
  ready: string[];
  /** Members being built; `ready.length + building` never passes `entry.count`. */
  building: number;
  /** Set after a failed build: no build of this shape before then. */
  retryAt: number;
}

/** Who owns a pool member: no org. Images resolve to system images only. */
const POOL_PRINCIPAL: Principal = { orgId: '', keyId: '', userId: '' };

/**
 * The warm pool: running sandboxes owned by no org (records with `orgId` '' and a `pool` key),
 * kept at the counts WARM_POOL names and handed to a create of their shape.
 *
 * - A claim is an insert against the member's id (`PoolClaimRepository`): of any number of
 *   concurrent claims of one member exactly one wins, in this process (the ready queue is taken
 *   from synchronously) and across processes sharing the store. The winner then hands the record
 *   to the org in one write (`claimPoolMember`), under the org's quota admission as a cold create
 *   is admitted; a refusal (quota, name taken) gives the member back untouched.
 * - After the write the member gets its owner's network policy (enforced as `updateNetwork` does)
 *   and envVars (the agent's `pool.claim`); if either fails the sandbox is removed and the create
 *   goes cold, so nobody gets a sandbox with the pool's policy or environment.
 * - The service then starts the claimed sandbox's lifecycle clock and its event stream
 *   (`sandbox.created` with `fromPool: true`, then `sandbox.started`), as for a cold create.
 * - Members are built one at a time in the background, never more than an entry's count counting
 *   those being built; at startup members still running are adopted, dead ones (and any whose
 *   claim was cut short by the restart, and shapes WARM_POOL no longer lists) removed.
 */
export class WarmPool {
  readonly #shapes = new Map<string, Shape>();
  #filling: Promise<void> | null = null;
  #timer: NodeJS.Timeout | undefined;
  #retryTimer: NodeJS.Timeout | undefined;
  #refillTimer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(private readonly deps: WarmPoolDeps) {}

  /** Adopts the members a previous run left, removes what no longer belongs, and starts filling. */
  async start(): Promise<void> {
    for (const entry of this.deps.entries) {
      const image = await this.deps.images.resolve(POOL_PRINCIPAL, entry.image).catch(() => null);
      if (!image) {
        this.deps.log.error({ shape: entry.key }, `warm pool ${entry.key}: there is no system image ${entry.image}; WARM_POOL entry ignored`);
        continue;
      }
      this.#shapes.set(entry.key, { entry, imageId: image.id, ready: [], building: 0, retryAt: 0 });
    }
    const records = await this.deps.sandboxes.listAll();
    const claimed = new Set(await this.deps.claims.list());
    const ids = new Set(records.map((r) => r.id));
    // Claims of sandboxes that are gone are of no use to anyone. `listAll` is this host's own
    // sandboxes in a fleet, the claims every host's: one not listed is released only once no host
    // has its sandbox (another host's member may be in the middle of its hand-over).
    for (const id of claimed) if (!ids.has(id) && !(await this.deps.sandboxes.findByIdInAnyOrg(id))) await this.deps.claims.release(id);
    let adopted = 0;
    for (const record of records.filter((r) => r.pool && r.orgId === '')) {
      const shape = this.#shapes.get(record.pool!);
      const why = !shape
        ? 'WARM_POOL no longer lists its shape'
        : claimed.has(record.id)
          ? 'its claim was cut short by a restart'
          : record.status !== 'running'
            ? `it is ${record.status}`
            : shape.ready.length >= shape.entry.count
              ? 'the pool is full without it'
              : null;
      if (why) {
        this.deps.log.info({ sandbox: record.id, shape: record.pool }, `warm pool: removing member ${record.id} (${why})`);
        await this.#remove(record, claimed.has(record.id));
        continue;
      }
      shape!.ready.push(record.id);
      adopted++;
    }
    if (this.#shapes.size > 0) this.deps.log.info({ adopted, shapes: [...this.#shapes.keys()] }, `warm pool: ${adopted} running members adopted`);
    this.#timer = setInterval(() => void this.#check(), this.deps.checkMs ?? 10_000);
    this.#timer.unref();
    this.fill();
  }

  /** Stops building; members stay (the next start adopts them). */
  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#timer);
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refillTimer);
    await this.#filling;
  }

  /** Ready members per shape, for tests and the log. */
  sizes(): Record<string, { ready: number; building: number; count: number }> {
    return Object.fromEntries([...this.#shapes].map(([key, s]) => [key, { ready: s.ready.length, building: s.building, count: s.entry.count }]));
  }

  /**
   * A member of `request`'s shape handed to the principal's org, or null for a cold create (no
   * such shape, another network mode, or the pool is empty: logged). Quota refusals and a name the
   * org already has are thrown as a cold create throws them, the member given back.
   */
  async claim(principal: Principal, request: WarmRequest): Promise<SandboxRecord | null> {
    const shape = [...this.#shapes.values()].find((s) => s.imageId === request.imageId && s.entry.cpu === request.cpu && s.entry.memMb === request.mem);
    if (!shape || request.diskMb !== this.deps.diskMb || request.network.mode !== this.deps.networkMode) return null;
    for (;;) {
      const id = shape.ready.shift();
      if (id === undefined) {
        this.deps.log.info({ shape: shape.entry.key }, `warm pool ${shape.entry.key} is empty: creating ${request.name} cold`);
        this.fill();
        return null;
      }
      if (!(await this.deps.claims.claim(id))) continue;
      const member = await this.deps.sandboxes.findByIdInAnyOrg(id);
      if (!member || member.orgId !== '' || member.status !== 'running') {
        if (member) void this.#remove(member, true);
        else await this.deps.claims.release(id);
        continue;
      }
      // The member is this claim's alone now: its envVars go to the agent while the store write runs.
      const env = Object.keys(request.envVars).length > 0 ? this.deps.service.poolEnv(member, request.envVars) : null;
      const envFailure = env ? env.then(() => null, (err: Error) => err) : Promise.resolve(null);
      // Its hostname becomes the claim's name meanwhile too (a failure is logged: it keeps warm-<id>).
      const hostname = this.deps.service.poolHostname(member, request.name).then(() => null, (err: Error) => err);
      let claimed: SandboxRecord | null;
      try {
        const { orgId, name, createdBy, envVars, labels, network } = request;
        claimed = await this.deps.service.handOverPoolMember(id, request, { orgId, name, createdBy, envVars, labels, network });
      } catch (err) {
        // Refused (quota, a name the org has): the record was not touched; the member goes back first
        // in line with the pool's environment again, or is rebuilt if that cannot be made sure of.
        await this.#giveBack(shape, member, env, hostname);
        throw err;
      }
      this.#fillSoon();
      if (!claimed) {
        await this.#giveBack(shape, member, env, hostname);
        continue;
      }
      try {
        const failed = await envFailure;
        if (failed) throw failed;
        await this.deps.service.applyPoolPolicy(claimed, member);
      } catch (err) {
        this.deps.log.warn({ sandbox: id, err: (err as Error).message }, `warm pool: applying ${request.name}'s settings to member ${id} failed; removing it, creating cold`);
        await this.deps.service.discard(claimed).catch(() => {});
        return null;
      }
      const renameFailed = await hostname;
      if (renameFailed) this.deps.log.warn({ sandbox: id, err: renameFailed.message }, `warm pool: could not give member ${id} the hostname ${request.name}; it keeps ${member.name} until its first stop and start`);
      this.deps.log.info({ sandbox: id, shape: shape.entry.key }, `warm pool: ${request.name} claimed member ${id}`);
      return claimed;
    }
  }

  /** `fill` after the refill delay (one pending at a time). */
  #fillSoon(): void {
    if (this.#closed || this.#refillTimer) return;
    this.#refillTimer = setTimeout(() => {
      this.#refillTimer = undefined;
      this.fill();
    }, this.deps.refillDelayMs ?? 250).unref();
  }

  /**
   * A member whose claim was refused: back first in line (its environment and hostname reset once
   * `env` and `hostname`, the claim's, settled), else removed.
   */
  async #giveBack(shape: Shape, member: SandboxRecord, env: Promise<void> | null, hostname: Promise<Error | null>): Promise<void> {
    const envReset = env === null || (await env.then(() => this.deps.service.poolEnv(member, {})).then(() => true, () => false));
    const renamed = (await hostname) === null;
    const hostnameReset = !renamed || (await this.deps.service.poolHostname(member, member.name).then(() => true, () => false));
    if (!envReset || !hostnameReset) {
      void this.#remove(member, true);
      return;
    }
    await this.deps.claims.release(member.id);
    shape.ready.unshift(member.id);
  }

  /** Starts building members (one at a time, every shape) until each is at its count; a no-op while that runs. */
  fill(): void {
    if (this.#closed || this.#filling) return;
    this.#filling = this.#fillAll().finally(() => (this.#filling = null));
  }

  async #fillAll(): Promise<void> {
    for (;;) {
      const now = Date.now();
      const shape = [...this.#shapes.values()].find((s) => s.ready.length + s.building < s.entry.count && s.retryAt <= now);
      if (!shape || this.#closed) break;
      shape.building++;
      try {
        const record = await this.deps.service.createPoolMember({ pool: shape.entry.key, imageId: shape.imageId, cpu: shape.entry.cpu, mem: shape.entry.memMb, diskMb: this.deps.diskMb });
        shape.ready.push(record.id);
      } catch (err) {
        shape.retryAt = Date.now() + (this.deps.retryMs ?? 5000);
        this.deps.log.warn({ shape: shape.entry.key, err: (err as Error).message }, `warm pool ${shape.entry.key}: building a member failed; retrying later`);
      } finally {
        shape.building--;
      }
    }
    // A shape waiting out a failure is tried again when its wait ends.
    const waiting = [...this.#shapes.values()].filter((s) => s.ready.length + s.building < s.entry.count).map((s) => s.retryAt);
    if (waiting.length > 0 && !this.#closed) {
      clearTimeout(this.#retryTimer);
      this.#retryTimer = setTimeout(() => this.fill(), Math.max(0, Math.min(...waiting) - Date.now())).unref();
    }
  }

  /** Ready members whose record says they no longer run (the health loop saw them die) are removed and rebuilt. */
  async #check(): Promise<void> {
    for (const shape of this.#shapes.values()) {
      for (const id of [...shape.ready]) {
        const record = await this.deps.sandboxes.findByIdInAnyOrg(id).catch(() => undefined);
        if (record === undefined || (record && record.status === 'running' && record.orgId === '')) continue;
        shape.ready = shape.ready.filter((r) => r !== id);
        if (record && record.orgId === '' && (await this.deps.claims.claim(id).catch(() => false))) await this.#remove(record, true);
      }
    }
    this.fill();
  }

  /** Removes a member: claimed first (unless `held`), so no create can take it meanwhile. */
  async #remove(record: SandboxRecord, held: boolean): Promise<void> {
    try {
      if (!held && !(await this.deps.claims.claim(record.id))) return;
      await this.deps.service.discard(record);
      await this.deps.claims.release(record.id);
    } catch (err) {
      if (err instanceof ConflictError) return;
      this.deps.log.warn({ sandbox: record.id, err: (err as Error).message }, 'warm pool: removing a member failed');
    }
  }
}
