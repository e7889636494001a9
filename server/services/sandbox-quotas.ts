import { existsSync, readFileSync } from 'node:fs';
import { readdir, stat, statfs } from 'node:fs/promises';
import { availableParallelism, totalmem } from 'node:os';
import { join } from 'node:path';
import type { OrgQuota } from '../../shared/index.js';
import { InvalidInputError, TooManyRequestsError } from '../errors.js';
import type { ImageRepository, SandboxRecord, SandboxRepository } from '../store/types.js';
import { SandboxLocks } from './sandbox-locks.js';

const MiB = 1024 * 1024;

/** Per-org totals, each with the variable that sets it (named in refusals). */
export interface OrgLimits {
  sandboxes: number;
  vcpus: number;
  memoryMb: number;
  diskMb: number;
}

/** What one host can give: per-sandbox maxima and how many sandboxes it runs at most. */
export interface HostLimits {
  cpus: number;
  memoryMb: number;
  /** The filesystem sandbox disks live on; a disk larger than its free space is refused. */
  diskDir: string;
  /** null: no host-wide count (the driver's sandboxes don't each hold a pids budget). */
  maxSandboxes: number | null;
  /** How `maxSandboxes` was derived, for the refusal. */
  maxSandboxesReason: string;
  /** The memory all sandboxes together may be promised (their `mem` summed), in MiB. */
  memoryCommitMb: number;
  /** HOST_MEMORY_COMMIT_PERCENT, for the refusal. */
  memoryCommitPercent: number;
  /** HOST_DISK_COMMIT_PERCENT: all sandboxes' `diskMb` together against the free space of `diskDir`. */
  diskCommitPercent: number;
}

export interface SandboxQuotasOptions {
  sandboxes: SandboxRepository;
  /** The org's images count against its disk too (absent: no images count). */
  images?: ImageRepository;
  /**
   * A layer's bytes on the host (null when it is gone). With it an org is charged every layer its
   * images reference, each once, less those a system image references; without it, each image's
   * own `sizeBytes`.
   */
  layerBytes?: (id: string) => Promise<number | null>;
  snapshotsDir: string;
  org: OrgLimits;
  host: HostLimits;
  snapshotMaxBytes: number;
  /** A fleet host's id (VOIDRUN_ROLE=host): the host's capacity counts only the sandboxes it runs; org quotas count every host's. */
  hostId?: string;
}

/** What one new sandbox asks for. */
export interface SandboxRequest {
  cpu: number;
  mem: number;
  diskMb: number;
}

interface Usage {
  sandboxes: number;
  vcpus: number;
  memoryMb: number;
  /** Sandboxes' diskMb plus snapshot archives and images (each rounded up to MiB) plus snapshots being written. */
  diskMb: number;
  snapshotBytes: number;
  imageBytes: number;
}

/**
 * What this host gives: its CPUs and memory as per-sandbox maxima, and, when each sandbox holds a
 * pids budget (`pidsLimit`, containers), how many sandboxes fit in the kernel's pid space:
 * (min(kernel.pid_max, kernel.threads-max) − reservedPids) / pidsLimit, at least 1.
 */
export function hostLimits(o: { diskDir: string; pidsLimit: number | null; reservedPids: number; memoryCommitPercent: number; diskCommitPercent: number }): HostLimits {
  const memoryMb = Math.floor(totalmem() / MiB);
  // A sandbox's memory is a ceiling (an idle one uses ~20 MiB), so promising more than the RAM is
  // normal; promising without bound lets a few orgs' sandboxes, each within quota, exhaust the host.
  const base = { cpus: availableParallelism(), memoryMb, diskDir: o.diskDir, memoryCommitMb: Math.floor((memoryMb * o.memoryCommitPercent) / 100), memoryCommitPercent: o.memoryCommitPercent, diskCommitPercent: o.diskCommitPercent };
  const read = (name: string) => {
    try {
      return Number(readFileSync(`/proc/sys/kernel/${name}`, 'utf8').trim()) || Infinity;
    } catch {
      return Infinity;
    }
  };
  const pidMax = Math.min(read('pid_max'), read('threads-max'));
  if (o.pidsLimit === null || !Number.isFinite(pidMax)) return { ...base, maxSandboxes: null, maxSandboxesReason: '' };
  const max = Math.max(1, Math.floor((pidMax - o.reservedPids) / o.pidsLimit));
  return { ...base, maxSandboxes: max, maxSandboxesReason: `${max} × SANDBOX_PIDS_LIMIT ${o.pidsLimit} + HOST_RESERVED_PIDS ${o.reservedPids} ≤ kernel.pid_max ${pidMax}` };
}

/**
 * Admission of new sandboxes and snapshots against per-org quotas and the host's capacity.
 *
 * Every sandbox record counts, whatever its status, until it is deleted: a stopped sandbox keeps
 * its disk and may start at any moment, and a start never fails for quota reasons, so what a
 * sandbox holds is reserved when it is created. Check and insert run under one in-process lock
 * (this server is one process, and FerretDB loses concurrent conditional updates), so concurrent
 * creates cannot overcommit. A snapshot being written reserves its byte budget until it is done.
 */
export class SandboxQuotas {
  readonly #lock = new SandboxLocks();
  /** Bytes reserved by snapshots in progress, per org. */
  readonly #pendingSnapshots = new Map<string, number>();
  /** Layer id → bytes (layers are immutable). */
  readonly #layerSizes = new Map<string, number>();

  constructor(private readonly opts: SandboxQuotasOptions) {}

  /** Refuses (400) a sandbox larger than the host: more CPUs or memory than it has, a disk larger than its free space. */
  async checkFitsHost(request: SandboxRequest): Promise<void> {
    const { host } = this.opts;
    if (request.cpu > host.cpus) throw new InvalidInputError(`cpu ${request.cpu} is more than this host has: ${host.cpus} CPUs`);
    if (request.mem > host.memoryMb) throw new InvalidInputError(`mem ${request.mem} MiB is more than this host has: ${host.memoryMb} MiB`);
    const freeMb = await this.#freeMb();
    if (request.diskMb > freeMb) throw new InvalidInputError(`diskMb ${request.diskMb} is more than this host's free disk: ${freeMb} MB`);
  }

  /** Free space where sandbox disks live, in MB (Infinity when it cannot be read). */
  async #freeMb(): Promise<number> {
    const dir = this.opts.host.diskDir;
    const fs = existsSync(dir) ? await statfs(dir) : null;
    return fs ? Math.floor((fs.bavail * fs.bsize) / MiB) : Infinity;
  }

  /**
   * Runs `insert` (the store write that makes the sandbox count) if the org's quotas and the host's
   * capacity leave room for `request`; otherwise throws `TooManyRequestsError` (429) naming the limit.
   */
  async admit<T>(orgId: string, request: SandboxRequest, insert: () => Promise<T>, { orgQuota = true, undo }: { orgQuota?: boolean; undo?: (inserted: T) => Promise<unknown> } = {}): Promise<T> {
    await this.checkFitsHost(request);
    const inserted = await this.#lock.run('admission', async () => {
      const all = await this.opts.sandboxes.listAll();
      const here = this.opts.hostId ? all.filter((s) => s.hostId === this.opts.hostId) : all;
      const host = this.opts.host;
      if (host.maxSandboxes !== null && here.length + 1 > host.maxSandboxes) {
        throw new TooManyRequestsError(`The host is full: it runs at most ${host.maxSandboxes} sandboxes (${host.maxSandboxesReason}); try again later`);
      }
      // Disks are sparse images, so what they are promised is what can fill the host later: the
      // promises together stay within a share of the free space (as sandboxes fill theirs, free
      // space shrinks and later creates are refused sooner: the check errs on the safe side).
      const diskPromised = here.reduce((sum, s) => sum + s.diskMb, 0);
      const freeMb = await this.#freeMb();
      const diskCommitMb = Math.floor((freeMb * host.diskCommitPercent) / 100);
      if (diskPromised + request.diskMb > diskCommitMb) {
        throw new TooManyRequestsError(
          `The host is full: its sandboxes are promised ${diskPromised} MB of disk and ${request.diskMb} more would pass ${diskCommitMb} MB (HOST_DISK_COMMIT_PERCENT ${host.diskCommitPercent}% of ${freeMb} MB free); ask for a smaller disk or try again later`,
        );
      }
      const committed = here.reduce((sum, s) => sum + s.mem, 0);
      if (committed + request.mem > host.memoryCommitMb) {
        throw new TooManyRequestsError(
          `The host is full: its sandboxes are promised ${committed} of ${host.memoryCommitMb} MiB (HOST_MEMORY_COMMIT_PERCENT ${host.memoryCommitPercent}% of ${host.memoryMb} MiB); ask for less memory or try again later`,
        );
      }
      if (orgQuota) await this.#checkOrg(orgId, request, all);
      return insert();
    });
    // A fleet host is one of several processes admitting one org's creates (placement spreads them
    // over hosts), and the lock above holds only here: each checks again once its record is in,
    // counting it, and one that finds the org over a quota takes its own back. Of any two racers
    // one sees the other, so the quotas hold (under contention both may back off: a 429 to retry).
    if (orgQuota && this.opts.hostId !== undefined && undo) {
      try {
        await this.#checkOrg(orgId, { cpu: 0, mem: 0, diskMb: 0 }, await this.opts.sandboxes.listAll(), { counted: request });
      } catch (err) {
        await undo(inserted);
        throw err;
      }
    }
    return inserted;
  }

  /**
   * Runs `claim` (the write that hands a warm-pool member to the org) if the org's quotas leave
   * room for `request`, exactly as `admit` would for a new sandbox. The host's capacity is not
   * checked again: the member already holds its share of it (pool members count there, never in
   * any org's use).
   */
  async admitClaim<T>(orgId: string, request: SandboxRequest, claim: () => Promise<T>): Promise<T> {
    return this.#lock.run('admission', async () => {
      await this.#checkOrg(orgId, request, await this.opts.sandboxes.listAll());
      return claim();
    });
  }

  /**
   * Runs `insert` (the write of a warm-pool member) if the host's capacity leaves room for it; the
   * pool belongs to no org, so no org quota applies. Refusals are `admit`'s.
   */
  async admitPoolMember<T>(request: SandboxRequest, insert: () => Promise<T>): Promise<T> {
    return this.admit('', request, insert, { orgQuota: false });
  }

  /**
   * Refuses (429 naming the limit) a request past the org's quotas, given every sandbox record `all`.
   * With `counted`, `all` already holds that request's record (the check after an insert): it is
   * judged as the request and the rest as what was in use.
   */
  async #checkOrg(orgId: string, request: SandboxRequest, all: SandboxRecord[], { counted }: { counted?: SandboxRequest } = {}): Promise<void> {
    const use = await this.#usage(orgId, all);
    if (counted) {
      use.sandboxes -= 1;
      use.vcpus -= counted.cpu;
      use.memoryMb -= counted.mem;
      use.diskMb -= counted.diskMb;
      request = counted;
    }
    const { org } = this.opts;
    const refuse = (what: string, asked: string, used: number, limit: number, unit: string, variable: string) =>
      new TooManyRequestsError(`Org quota exceeded: ${what} ${asked} requested, ${used} of ${limit}${unit} in use (${variable})`);
    if (use.sandboxes + 1 > org.sandboxes) throw refuse('sandboxes', '1', use.sandboxes, org.sandboxes, '', 'ORG_MAX_SANDBOXES');
    if (use.vcpus + request.cpu > org.vcpus) throw refuse('vcpus', String(request.cpu), use.vcpus, org.vcpus, '', 'ORG_MAX_VCPUS');
    if (use.memoryMb + request.mem > org.memoryMb) throw refuse('memory', `${request.mem} MB`, use.memoryMb, org.memoryMb, ' MB', 'ORG_MAX_MEMORY_MB');
    if (use.diskMb + request.diskMb > org.diskMb) throw refuse('disk', `${request.diskMb} MB`, use.diskMb, org.diskMb, ' MB', 'ORG_MAX_DISK_MB');
  }

  /**
   * Runs `write(maxBytes)` for a snapshot of the org's: its budget is SNAPSHOT_MAX_BYTES or what is
   * left of ORG_MAX_DISK_MB, whichever is smaller, reserved while it runs. `limitedBy` says which.
   */
  async snapshotBudget<T>(orgId: string, write: (budget: { maxBytes: number; limitedBy: 'SNAPSHOT_MAX_BYTES' | 'ORG_MAX_DISK_MB' }) => Promise<T>): Promise<T> {
    const budget = await this.#lock.run('admission', async () => {
      const use = await this.#usage(orgId, await this.opts.sandboxes.listAll());
      const left = (this.opts.org.diskMb - use.diskMb) * MiB;
      if (left <= 0) throw new TooManyRequestsError(`Org quota exceeded: no disk left for a snapshot, ${use.diskMb} of ${this.opts.org.diskMb} MB in use (ORG_MAX_DISK_MB counts sandboxes' diskMb and snapshots)`);
      const maxBytes = Math.min(this.opts.snapshotMaxBytes, left);
      this.#pendingSnapshots.set(orgId, (this.#pendingSnapshots.get(orgId) ?? 0) + maxBytes);
      return { maxBytes, limitedBy: maxBytes === this.opts.snapshotMaxBytes ? ('SNAPSHOT_MAX_BYTES' as const) : ('ORG_MAX_DISK_MB' as const) };
    });
    try {
      return await write(budget);
    } finally {
      const left = (this.#pendingSnapshots.get(orgId) ?? 0) - budget.maxBytes;
      if (left > 0) this.#pendingSnapshots.set(orgId, left);
      else this.#pendingSnapshots.delete(orgId);
    }
  }

  /** Runs `fn` under the admission lock: no sandbox record is inserted meanwhile (an image delete's in-use check). */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.#lock.run('admission', fn);
  }

  /**
   * Bytes of ORG_MAX_DISK_MB the org has left for a new image (a build, an import, an image from a
   * sandbox); 429 naming the quota when nothing is left, so work that cannot be kept never starts.
   */
  async imageBudget(orgId: string, what: string): Promise<number> {
    const use = await this.#usage(orgId, await this.opts.sandboxes.listAll());
    const left = (this.opts.org.diskMb - use.diskMb) * MiB;
    if (left <= 0) throw new TooManyRequestsError(`Org quota exceeded: no disk left for ${what}, ${use.diskMb} of ${this.opts.org.diskMb} MB in use (ORG_MAX_DISK_MB counts sandboxes' diskMb, snapshots and images)`);
    return left;
  }

  /** The org's limits and current use, for `GET /orgs/me/limits`. */
  async report(orgId: string): Promise<OrgQuota> {
    const use = await this.#usage(orgId, await this.opts.sandboxes.listAll());
    const { org, host } = this.opts;
    return {
      orgId,
      limits: { sandboxes: org.sandboxes, vcpus: org.vcpus, memoryMb: org.memoryMb, diskMb: org.diskMb, snapshotMaxBytes: this.opts.snapshotMaxBytes },
      usage: { sandboxes: use.sandboxes, vcpus: use.vcpus, memoryMb: use.memoryMb, diskMb: use.diskMb, snapshotBytes: use.snapshotBytes, imageBytes: use.imageBytes },
      perSandbox: { maxCpu: host.cpus, maxMemoryMb: host.memoryMb },
    };
  }

  async #usage(orgId: string, all: SandboxRecord[]): Promise<Usage> {
    const mine = all.filter((r) => r.orgId === orgId);
    const snapshotBytes = await this.#snapshotBytes(orgId);
    const pending = this.#pendingSnapshots.get(orgId) ?? 0;
    const sum = (f: (r: SandboxRecord) => number) => mine.reduce((n, r) => n + f(r), 0);
    const imageBytes = orgId ? await this.#imageBytes(orgId) : 0;
    return {
      sandboxes: mine.length,
      vcpus: sum((r) => r.cpu),
      memoryMb: sum((r) => r.mem),
      diskMb: sum((r) => r.diskMb) + Math.ceil((snapshotBytes + pending) / MiB) + Math.ceil(imageBytes / MiB),
      snapshotBytes,
      imageBytes,
    };
  }

  /**
   * What the org's images keep on the host: the union of the layers they reference (a child image
   * keeps its parent's layers alive after the parent is deleted, so the child carries them), each
   * layer once, less the layers of system images (kept for every org anyway). Layers never change,
   * so their sizes are remembered.
   */
  async #imageBytes(orgId: string): Promise<number> {
    const visible = (await this.opts.images?.listVisible(orgId)) ?? [];
    const mine = visible.filter((i) => i.orgId === orgId);
    const layerBytes = this.opts.layerBytes;
    if (!layerBytes) return mine.reduce((n, i) => n + i.sizeBytes, 0);
    const system = new Set(visible.filter((i) => i.orgId === null).flatMap((i) => i.layers));
    const charged = new Set(mine.flatMap((i) => i.layers).filter((id) => !system.has(id)));
    let total = 0;
    for (const id of charged) {
      let bytes = this.#layerSizes.get(id);
      if (bytes === undefined) {
        const read = await layerBytes(id);
        bytes = read ?? 0;
        if (this.#layerSizes.size > 100_000) this.#layerSizes.clear();
        if (read !== null) this.#layerSizes.set(id, read);
      }
      total += bytes;
    }
    return total;
  }

  /** Bytes of every archive under SNAPSHOTS_DIR/<orgId>/ (kept snapshots of deleted sandboxes too). */
  async #snapshotBytes(orgId: string): Promise<number> {
    const orgDir = join(this.opts.snapshotsDir, orgId);
    let total = 0;
    for (const sandbox of await readdir(orgDir).catch(() => [] as string[])) {
      for (const name of await readdir(join(orgDir, sandbox)).catch(() => [] as string[])) {
        if (name.startsWith('.')) continue; // partial archives count as pending reservations
        total += (await stat(join(orgDir, sandbox, name)).catch(() => null))?.size ?? 0;
      }
    }
    return total;
  }
}
