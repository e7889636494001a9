import { existsSync } from 'node:fs';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type {
  CreateSandboxInput,
  EgressDefault,
  Image,
  NetworkMode,
  NetworkPolicy,
  NetworkPolicyInput,
  OrgNetworkDefaults,
  OrgQuota,
  RestoreSandboxInput,
  NetworkBytes,
  Sandbox,
  SandboxActionResult,
  SandboxPage,
  SandboxImageInput,
  Snapshot,
  UpdateNetworkInput,
} from '../../shared/index.js';
import { egressCapFor, egressCapOrCeiling, privateAllowError } from '../../shared/index.js';
import type { AgentClients, LifecyclePhase, SettledState } from '../agent-client/agent-clients.js';
import {
  ConflictError,
  DomainError,
  ErrorCode,
  DriverFailureError,
  DriverUnavailableError,
  ForbiddenError,
  InvalidInputError,
  NotFoundError,
  PayloadTooLargeError,
  TooManyRequestsError,
  SandboxGoneError,
  SandboxNotRunningError,
} from '../errors.js';
import { canPause, canSnapshot, countsNetworkBytes, hasAddresses, renamesHost, SnapshotLimitError, type SandboxDriver, type SandboxSpec, type SnapshottingDriver } from '../hypervisor/types.js';
import { newId } from '../store/ids.js';
import type { ImageRecord, PoolMemberClaim, SandboxLifecycle, SandboxRecord, SandboxRepository, SandboxStatus, SandboxTombstoneRepository } from '../store/types.js';
import type { ActivityTracker } from './activity.js';
import type { Principal } from './auth-service.js';
import { readSnapshotImage, snapshotImageFile, writeSnapshotImage, type ImageFilesystem, type ImageService } from './image-service.js';
import { SandboxLocks } from './sandbox-locks.js';
import type { SandboxQuotas } from './sandbox-quotas.js';
import type { SandboxEventSink, SandboxEventType } from './sandbox-events.js';
import type { EndedReason, IdlePolicy, OnTimeout } from '../../shared/index.js';
import type { WarmPool } from './warm-pool.js';

export interface SandboxDefaults {
  cpu: number;
  memMb: number;
  diskMb: number;
  listLimit: number;
}

/** What a sandbox's network policy is when its create leaves fields out, and what this host can run. */
export interface SandboxNetworkDefaults {
  mode: NetworkMode;
  /** SANDBOX_DEFAULT_EGRESS. */
  egress: EgressDefault;
  /** SANDBOX_EGRESS_BYTES_MAX: the default cap and, set, the ceiling of every policy's; null: no cap. */
  maxEgressBytes: number | null;
  /** SANDBOX_PRIVATE_ALLOW: the private CIDRs allow entries may lie inside; absent: none. */
  privateAllow?: readonly string[];
  /** Set when `bridge` sandboxes cannot run here: asking for one is refused with this reason. */
  bridgeUnavailable?: string;
  /** Applies a changed policy to a sandbox that runs (the egress firewall); without it a change is only stored. */
  enforce?: (id: string, policy: NetworkPolicy) => Promise<void>;
  /** The org's own default policy (`PUT /orgs/me/network`), over the fields above for its new sandboxes. */
  forOrg?: (orgId: string) => Promise<OrgNetworkDefaults | undefined>;
}

export interface SandboxServiceDeps {
  /** A fleet host's: the sandboxes it moved to other hosts (draining), which its sandbox view then answers as moved. */
  movedAway?: Set<string>;
  sandboxes: SandboxRepository;
  images: ImageService;
  /** null when no driver can run here; every sandbox operation then answers 503 with `driverUnavailable`. */
  driver: SandboxDriver | null;
  driverUnavailable?: string;
  agents: AgentClients | null;
  snapshotsDir: string;
  /** Host directories never to show callers; driver messages that mention them are redacted. */
  hostPaths: string[];
  /** The sandboxes' event streams (sandbox-events.ts); absent: events go nowhere. */
  events?: SandboxEventSink;
  /** Passed to every sandbox's agent (VOIDRUN_* settings). */
  agentSettings?: Record<string, string>;
  defaults: SandboxDefaults;
  network: SandboxNetworkDefaults;
  /** Admission of creates, restores and snapshots against org quotas and the host's capacity. */
  quotas: SandboxQuotas;
  log: Logger;
  /** Lifecycle policies (services/lifecycle-policy.ts): what counts as activity, timeout bounds, tombstones. */
  lifecycle?: SandboxLifecycleDeps;
}

/** What the service needs for timeouts, idle policies and auto-resume; absent: no policies apply. */
export interface SandboxLifecycleDeps {
  activity: ActivityTracker;
  tombstones: SandboxTombstoneRepository;
  /** SANDBOX_MAX_TIMEOUT_SEC; 0: none. */
  maxTimeoutSec: number;
  /** SANDBOX_DEFAULT_TIMEOUT_SEC; 0: none. */
  defaultTimeoutSec: number;
}

/** The lifecycle fields a create, restore or PATCH may carry. */
export interface LifecycleFields {
  timeout?: number;
  onTimeout?: OnTimeout;
  idle?: IdlePolicy | null;
  autoResume?: boolean;
}

const SNAPSHOT_SUFFIX = '.tar.gz';
/** The largest page size a sandbox listing answers with. */
const MAX_LIST_LIMIT = 100;
/** Pages past this are clamped to it, so the row offset stays an exact integer for every store. */
const MAX_LIST_PAGE = 1_000_000_000;

/** What a caller can do about a sandbox that is not running, by its status. */
const NOT_RUNNING_ADVICE: Record<Exclude<SandboxStatus, 'running'>, string> = {
  creating: 'retry once it is running (GET /sandboxes/{id} says ready: true)',
  paused: 'resume it first',
  stopped: 'start it first',
  error: 'it failed; delete it, or stop and start it',
};

/** Sandbox lifecycle: records in the store kept true to what the driver runs. */
export class SandboxService {
  readonly #locks = new SandboxLocks();
  readonly #stopListeners: Array<(id: string) => void> = [];
  /** Why the next status change of a sandbox happens, for its event (set just before `#setStatus`). */
  readonly #eventReasons = new Map<string, string>();
  readonly #changeListeners: Array<(record: SandboxRecord) => void> = [];
  /** Why a sandbox being paused or stopped by a policy ends (set and read by `#setStatus` under its lock). */
  readonly #endingReason = new Map<string, EndedReason>();
  /** The calls lifecycle policies make, by their principal: why, and the condition they need (see `#policyGate`). */
  readonly #policyCalls = new WeakMap<Principal, { reason: EndedReason; still: (fresh: SandboxRecord) => boolean }>();
  /** Auto-resumes under way: concurrent calls on one paused sandbox share one. */
  readonly #resuming = new Map<string, Promise<SandboxRecord>>();
  /** WARM_POOL's members, claimed by matching creates (see `useWarmPool`). */
  #warm: WarmPool | null = null;

  constructor(private readonly deps: SandboxServiceDeps) {}

  /** Registers a callback for a sandbox that stops running (stopped, paused, deleted or died). */
  onStopped(listener: (id: string) => void): void {
    this.#stopListeners.push(listener);
  }

  /**
   * Runs `fn` under the sandbox's lifecycle lock: for another service's read-then-write of a
   * sandbox record (a port's access), so it never interleaves with a status change — the store
   * may write whole documents back (FerretDB does), and a write of one field then undoes another.
   */
  underLock<T>(id: string, fn: () => Promise<T>): Promise<T> {
    return this.#locks.run(id, fn);
  }

  /** Reports an event of the sandbox's stream; returns at once. Pool members (no org) have none. */
  #event(record: Pick<SandboxRecord, 'id' | 'orgId'>, type: SandboxEventType, data?: Record<string, unknown>): void {
    if (record.orgId) this.deps.events?.emit({ sandboxId: record.id, orgId: record.orgId, type, data });
  }

  /** The lifecycle event of a status change, with why when the service knows (`#eventReasons`). */
  #statusEvent(from: SandboxRecord, to: SandboxStatus): void {
    const reason = this.#eventReasons.get(from.id);
    this.#eventReasons.delete(from.id);
    if (from.status === to) return;
    const type: SandboxEventType = to === 'running' ? (from.status === 'paused' ? 'sandbox.resumed' : 'sandbox.started') : STATUS_EVENTS[to];
    this.#event(from, type, { from: from.status, ...(reason ? { reason } : {}) });
  }

  /** A claimed warm-pool member is new to its org: its stream starts as a cold create's does. */
  #claimedFromPool(record: SandboxRecord): SandboxRecord {
    this.#event(record, 'sandbox.created', { name: record.name, fromPool: true });
    this.#event(record, 'sandbox.started', { from: 'creating' });
    return record;
  }

  #stopped(id: string): void {
    for (const l of this.#stopListeners) l(id);
  }

  /** The driver, or null when none can run here. */
  get driverOrNull(): SandboxDriver | null {
    return this.deps.driver;
  }

  get driver(): SandboxDriver {
    if (!this.deps.driver) throw new DriverUnavailableError(`Sandboxes cannot run on this server: ${this.deps.driverUnavailable ?? 'no driver is available'}`);
    return this.deps.driver;
  }

  get agents(): AgentClients {
    if (!this.deps.agents) throw new DriverUnavailableError(`Sandboxes cannot run on this server: ${this.deps.driverUnavailable ?? 'no driver is available'}`);
    return this.deps.agents;
  }

  async create(principal: Principal, input: CreateSandboxInput): Promise<Sandbox> {
    assertOwnOrg(principal, input.orgId);
    const driver = this.driver;
    const image = await this.deps.images.resolve(principal, input.templateId);
    // Before anything is recorded: an image still building (or failed) is a 409 IMAGE_NOT_READY, not a sandbox in error.
    this.deps.images.assertUsable(image);
    this.deps.images.assertRunsHere(image);
    const fields: NewSandboxFields = {
      name: input.name,
      imageId: image.id,
      cpu: input.cpu ?? this.deps.defaults.cpu,
      mem: input.mem ?? this.deps.defaults.memMb,
      diskMb: this.deps.defaults.diskMb,
      envVars: input.envVars ?? {},
      labels: input.labels ?? {},
      network: this.#resolveNetwork(input.network ?? {}, null, await this.deps.network.forOrg?.(principal.orgId)),
      ...lifecycleField(this.lifecycleFor(input)),
    };
    // A running member of the warm pool of this shape, if there is one (see warm-pool.ts).
    const warm = await this.#warm?.claim(principal, { ...fields, orgId: principal.orgId, createdBy: principal.userId });
    if (warm) return this.#answer(this.#claimedFromPool(await this.#startLifecycleAtClaim(warm, fields.lifecycle)));
    const record = await this.#admitRecord(principal, fields);
    const boot = this.#locks.run(record.id, async () => {
      try {
        await driver.create(this.#spec(record, await this.deps.images.rootfsFor(image), image));
        return await this.#setStatus(record, 'running');
      } catch (err) {
        this.deps.log.error({ sandbox: record.id, err: (err as Error).message }, 'sandbox create failed');
        this.#eventReasons.set(record.id, this.#redact(err));
        if (input.sync) {
          await this.deps.sandboxes.delete(record.orgId, record.id);
          this.deps.events?.deleteForSandbox?.(record.id);
        }
        else await this.#setStatus(record, 'error');
        throw this.#forCaller(err, `Creating sandbox ${record.name} failed`);
      }
    });
    if (!input.sync) {
      boot.catch(() => {});
      return toSandbox(record);
    }
    return this.#answer(await boot);
  }

  /** The caller's org quotas and what its sandboxes and snapshots use of them. */
  quota(principal: Principal): Promise<OrgQuota> {
    return this.deps.quotas.report(principal.orgId);
  }

  /**
   * One page of the org's sandboxes, newest first. Out-of-range values are clamped as the original
   * VoidRun does, never refused: a page below 1 is page 1; a limit below 1 (or none) is the default,
   * one above 100 is 100. With `labels`, only the sandboxes carrying every one of them.
   */
  async list(principal: Principal, requestedPage: number, requestedLimit?: number, labels: Readonly<Record<string, string>> = {}): Promise<SandboxPage> {
    const page = Math.min(Math.max(1, requestedPage), MAX_LIST_PAGE);
    const limit = requestedLimit === undefined || requestedLimit < 1 ? this.deps.defaults.listLimit : Math.min(requestedLimit, MAX_LIST_LIMIT);
    const { items, total } = await this.deps.sandboxes.listByOrg(principal.orgId, page, limit, labels);
    return { data: await Promise.all(items.map((r) => this.#answer(r))), meta: { page, limit, total, totalPages: Math.ceil(total / limit) } };
  }

  async get(principal: Principal, id: string): Promise<Sandbox> {
    return this.#answer(await this.record(principal, id));
  }

  /** The ids of the caller's org's running sandboxes, every page (the watch cap learning an org's sessions after a restart). */
  async runningIds(principal: Principal): Promise<string[]> {
    const ids: string[] = [];
    for (let page = 1; ; page++) {
      const { items, total } = await this.deps.sandboxes.listByOrg(principal.orgId, page, MAX_LIST_LIMIT);
      for (const r of items) if (r.status === 'running') ids.push(r.id);
      if (items.length === 0 || page * MAX_LIST_LIMIT >= total) return ids;
    }
  }

  /** The sandbox's answer with the bytes through its link, read on the host now (never from its agent). */
  async #answer(record: SandboxRecord): Promise<Sandbox> {
    const driver = this.deps.driver;
    const live = record.status === 'running' || record.status === 'paused';
    const bytes = live && driver && countsNetworkBytes(driver) ? await driver.networkBytes(record.id).catch(() => null) : null;
    return toSandbox(record, bytes ?? NO_BYTES, this.deps.lifecycle?.activity.lastActivity(record.id));
  }

  /** The caller's sandbox record; 404 for a missing one and for another org's (never revealing it exists). */
  async record(principal: Principal, id: string): Promise<SandboxRecord> {
    const record = await this.deps.sandboxes.findById(principal.orgId, id);
    if (!record) {
      await this.#assertNotGone(principal.orgId, id);
      throw new NotFoundError(`Sandbox ${id} not found`, { code: 'SANDBOX_NOT_FOUND' });
    }
    return record;
  }

  /** 410 for a sandbox its timeout deleted (its tombstone), so the caller learns why, not a bare 404. */
  async #assertNotGone(orgId: string, id: string): Promise<void> {
    const tombstone = await this.deps.lifecycle?.tombstones.findById(orgId, id);
    if (!tombstone) return;
    const at = tombstone.endedAt.toISOString();
    throw new SandboxGoneError(`Sandbox ${tombstone.name} was deleted at ${at} by its timeout (onTimeout: delete); create a new one`, {
      details: `endedReason: timeout; endedAt: ${at}`,
    });
  }

  /**
   * The caller's sandbox, which must be running, for exec, files and terminals; 409 while the API
   * drives it through a transition (stopping, starting, …), as the request could not finish.
   */
  async running(principal: Principal, id: string): Promise<SandboxRecord> {
    return this.ensureRunning(await this.record(principal, id));
  }

  /**
   * `assertRunning`, after resuming the sandbox first if it is paused and asks for that
   * (`autoResume`): the call is delayed by the resume, not refused. Concurrent calls share one resume.
   */
  async ensureRunning(record: SandboxRecord): Promise<SandboxRecord> {
    // Every call that reaches into a sandbox is activity for its idle policy (one timestamp in memory);
    // reading its record (GET, listings) is not, so a dashboard polling it never keeps it awake.
    this.deps.lifecycle?.activity.touch(record.id);
    if (record.status !== 'paused' || !record.lifecycle?.autoResume || !this.deps.driver || !canPause(this.deps.driver)) return this.assertRunning(record);
    let resumed = this.#resuming.get(record.id);
    if (!resumed) {
      const principal: Principal = { orgId: record.orgId, keyId: '', userId: record.createdBy };
      resumed = this.resume(principal, record.id)
        .then(async () => (await this.deps.sandboxes.findById(record.orgId, record.id)) ?? record)
        .finally(() => this.#resuming.delete(record.id));
      this.#resuming.set(record.id, resumed);
    }
    return this.assertRunning(await resumed);
  }

  /** `record`, if its sandbox is running and no transition is under way; else the 409 `running` answers. */
  assertRunning(record: SandboxRecord): SandboxRecord {
    const id = record.id;
    const phase = this.deps.agents?.phaseOf(id);
    if (phase) throw new SandboxNotRunningError(`Sandbox ${record.name} is ${phase}; retry once it is running`);
    if (record.status !== 'running') {
      const ended = endedBy(record);
      if (ended) throw new SandboxNotRunningError(`Sandbox ${record.name} is ${record.status}: ${ended.message}; ${NOT_RUNNING_ADVICE[record.status]}`, { details: ended.details });
      throw new SandboxNotRunningError(`Sandbox ${record.name} is ${record.status}; ${NOT_RUNNING_ADVICE[record.status]}`);
    }
    return record;
  }

  /**
   * Deletes the sandbox, its runtime and (unless kept) its snapshots. A delete that waited for a
   * concurrent one to finish answers the same success: the sandbox is gone either way.
   */
  async delete(principal: Principal, id: string, keepSnapshots = false): Promise<{ id: string; deleted: true }> {
    await this.record(principal, id);
    return this.#locks.run(id, async () => {
      const record = await this.deps.sandboxes.findById(principal.orgId, id);
      if (!record) return { id, deleted: true as const };
      // A delete at timeout that no longer applies (the timeout was changed meanwhile) deletes nothing.
      if (!this.#policyGate(principal, record)) return { id, deleted: true as const };
      return this.#during(record, 'deleting', 'deleted', async () => {
        this.#stopped(id);
        await this.deps.agents?.drop(id);
        if (this.deps.driver) await this.deps.driver.destroy(id);
        if (!keepSnapshots) await rm(this.#snapshotDir(record), { recursive: true, force: true });
        await this.deps.sandboxes.delete(record.orgId, id);
        this.#event(record, 'sandbox.deleted');
        this.deps.events?.deleteForSandbox?.(id);
        return { id, deleted: true as const };
      });
    });
  }

  /** Stops the sandbox; a stopped one answers success unchanged (idempotent). */
  async stop(principal: Principal, id: string): Promise<SandboxActionResult> {
    return this.#transition(principal, id, async (record) => {
      if (record.status === 'stopped') return action(record);
      if (record.status === 'creating') throw new SandboxNotRunningError(`Sandbox ${record.name} is creating; stop it once it is running`);
      if (!this.#policyGate(principal, record)) return action(record);
      return this.#during(record, 'stopping', 'stopped', async () => {
        this.#stopped(id);
        await this.agents.drop(id);
        await this.driver.stop(id);
        return action(await this.#setStatus(record, 'stopped'));
      });
    });
  }

  /** Starts a stopped sandbox; a running one answers success unchanged, a paused one 409 (resume it). */
  async start(principal: Principal, id: string): Promise<SandboxActionResult> {
    return this.#transition(principal, id, async (record) => {
      if (record.status === 'creating') throw new SandboxNotRunningError(`Sandbox ${record.name} is creating; it starts by itself`);
      const state = await this.driver.inspect(id);
      if (state === 'running') {
        if (record.status !== 'running') this.deps.agents?.forgetSettled(id);
        return action(await this.#setStatus(record, 'running'));
      }
      if (state === 'paused') throw new SandboxNotRunningError(`Sandbox ${record.name} is paused; resume it instead`);
      const image = await this.deps.images.resolve(principal, record.imageId).catch(() => null);
      if (!image) throw new ConflictError(`Sandbox ${record.name} cannot start: its image no longer exists`);
      return this.#during(record, 'starting', 'running', async () => {
        await this.agents.drop(id);
        await this.driver.start(this.#spec(record, await this.deps.images.rootfsFor(image), image));
        return action(await this.#setStatus(record, 'running'));
      });
    });
  }

  /** Pauses a running sandbox; a paused one answers success unchanged, any other state 409. */
  async pause(principal: Principal, id: string): Promise<SandboxActionResult> {
    const driver = this.driver;
    if (!canPause(driver)) throw new InvalidInputError(`The ${driver.name} driver cannot pause sandboxes`);
    return this.#transition(principal, id, async (record) => {
      if (record.status === 'paused') return action(record);
      if (record.status !== 'running') throw new SandboxNotRunningError(`Sandbox ${record.name} is ${record.status}; only a running sandbox can be paused`);
      if (!this.#policyGate(principal, record)) return action(record);
      return this.#during(record, 'pausing', 'paused', async () => {
        await driver.pause(id);
        return action(await this.#setStatus(record, 'paused'));
      });
    });
  }

  /** Resumes a paused sandbox; a running one answers success unchanged, any other state 409. */
  async resume(principal: Principal, id: string): Promise<SandboxActionResult> {
    const driver = this.driver;
    if (!canPause(driver)) throw new InvalidInputError(`The ${driver.name} driver cannot pause sandboxes`);
    return this.#transition(principal, id, async (record) => {
      if (record.status === 'running') return action(record);
      if (record.status !== 'paused') throw new SandboxNotRunningError(`Sandbox ${record.name} is ${record.status}, not paused${record.status === 'stopped' ? '; start it instead' : ''}`);
      return this.#during(record, 'resuming', 'running', async () => {
        await driver.resume(id);
        return action(await this.#setStatus(record, 'running'));
      });
    });
  }

  /**
   * Runs one lifecycle request under the sandbox's lock. `act` gets the record as it is once the
   * lock is held: a status read before the lock could be stale by the time the runtime is driven
   * (two pauses both seeing `running`), so every check-and-act happens inside. A sandbox deleted
   * while the request waited is 404.
   */
  #transition<T>(principal: Principal, id: string, act: (record: SandboxRecord) => Promise<T>): Promise<T> {
    return this.record(principal, id).then(() =>
      this.#locks.run(id, async () => {
        const record = await this.deps.sandboxes.findById(principal.orgId, id);
        if (!record) throw new NotFoundError(`Sandbox ${id} not found (it was deleted)`, { code: 'SANDBOX_NOT_FOUND' });
        return act(record);
      }),
    );
  }

  /**
   * Drives the runtime through one transition (the caller holds the lock): requests meeting it
   * are told the sandbox is `phase` (409) rather than that its agent failed, and a driver failure
   * is a 502 with host paths redacted.
   */
  async #during<T>(record: SandboxRecord, phase: LifecyclePhase, settled: SettledState, fn: () => Promise<T>): Promise<T> {
    const end = this.deps.agents?.beginTransition(record.id, phase);
    try {
      const result = await fn();
      end?.(settled);
      return result;
    } catch (err) {
      end?.(null);
      throw this.#forCaller(err, `${phase[0]!.toUpperCase()}${phase.slice(1)} sandbox ${record.name} failed`);
    }
  }

  async snapshot(principal: Principal, id: string): Promise<Snapshot> {
    const record = await this.record(principal, id);
    const driver = this.driver;
    if (!canSnapshot(driver)) throw new InvalidInputError(`The ${driver.name} driver cannot snapshot sandboxes`);
    if (record.status === 'creating' || record.status === 'error') throw new SandboxNotRunningError(`Sandbox ${record.name} is ${record.status}`);
    return this.#locks.run(id, async () => {
      // Checked again under the lock: a delete or stop may have run while this waited.
      const fresh = await this.deps.sandboxes.findById(principal.orgId, id);
      if (!fresh) throw new NotFoundError(`Sandbox ${id} not found (it was deleted)`, { code: 'SANDBOX_NOT_FOUND' });
      if (fresh.status === 'creating' || fresh.status === 'error') throw new SandboxNotRunningError(`Sandbox ${record.name} is ${fresh.status}`);
      const snapId = `snap-${newId()}`;
      const dir = this.#snapshotDir(record);
      await mkdir(dir, { recursive: true, mode: 0o700 });
      const partial = join(dir, `.${snapId}.partial`);
      // The image it was taken on first: a restore lays the snapshot over that image, and the image counts it as a user.
      const image = await this.deps.images.resolve(principal, record.imageId).catch(() => null);
      if (image) await writeSnapshotImage(dir, snapId, image);
      try {
        await this.#snapshotWithinBudget(record, driver, partial, () => rename(partial, join(dir, snapId + SNAPSHOT_SUFFIX)));
      } catch (err) {
        // A refused or failed snapshot leaves nothing, its image record neither.
        await rm(snapshotImageFile(dir, snapId), { force: true });
        throw err;
      }
      return this.#snapshotInfo(record, snapId);
    });
  }

  /**
   * Writes the snapshot of `record` to `partial` within the org's snapshot budget, then runs `use`
   * on it (still within the budget's reservation); `partial` is removed on failure. A snapshot past
   * its budget is 413 (SNAPSHOT_MAX_BYTES) or 429 (what is left of ORG_MAX_DISK_MB).
   */
  #snapshotWithinBudget<T>(record: SandboxRecord, driver: SandboxDriver & SnapshottingDriver, partial: string, use: () => Promise<T>): Promise<T> {
    return this.deps.quotas.snapshotBudget(record.orgId, async ({ maxBytes, limitedBy }) => {
      try {
        await driver.snapshot(record.id, partial, { maxBytes });
        // Drivers that cannot stop at the budget are held to it here.
        if ((await stat(partial)).size > maxBytes) throw new SnapshotLimitError(maxBytes);
      } catch (err) {
        await rm(partial, { force: true });
        if (!(err instanceof SnapshotLimitError)) throw new DriverFailureError(`Snapshot of sandbox ${record.name} failed: ${this.#redact(err)}`, { cause: err });
        if (limitedBy === 'SNAPSHOT_MAX_BYTES') throw new PayloadTooLargeError(`Snapshot of sandbox ${record.name} refused: it is larger than SNAPSHOT_MAX_BYTES (${maxBytes} bytes)`);
        throw new TooManyRequestsError(`Org quota exceeded: snapshot of sandbox ${record.name} is larger than the ${Math.floor(maxBytes / (1024 * 1024))} MB left of ORG_MAX_DISK_MB`);
      }
      try {
        return await use();
      } catch (err) {
        await rm(partial, { force: true });
        throw err;
      }
    });
  }

  /**
   * A new image of the caller's org from sandbox `input.id`'s filesystem: its writable layer (the
   * snapshot archive, taken while frozen) becomes a layer above the sandbox image's stack. Container
   * driver only: a VM's disk is not an overlay layer. Sized against the org's disk quota.
   */
  async toImage(principal: Principal, input: SandboxImageInput): Promise<Image> {
    const record = await this.record(principal, input.id);
    const driver = this.driver;
    if (driver.name !== 'container' || !canSnapshot(driver)) {
      throw new ConflictError(`Images from sandboxes need the container driver: this server runs the ${driver.name} driver, whose sandbox disks are not filesystem layers`);
    }
    if (record.status === 'creating' || record.status === 'error') throw new SandboxNotRunningError(`Sandbox ${record.name} is ${record.status}`);
    const parent = await this.deps.images.resolve(principal, record.imageId).catch(() => null);
    if (!parent) throw new ConflictError(`Sandbox ${record.name}'s image no longer exists, so no image can be made from it`);
    await this.deps.images.assertNameFree(principal, input.name);
    return this.#locks.run(record.id, async () => {
      const fresh = await this.deps.sandboxes.findById(principal.orgId, record.id);
      if (!fresh) throw new NotFoundError(`Sandbox ${record.id} not found (it was deleted)`, { code: 'SANDBOX_NOT_FOUND' });
      const dir = this.#snapshotDir(record);
      await mkdir(dir, { recursive: true, mode: 0o700 });
      // A dot name: snapshot listings and the snapshot quota skip it (the budget reserves it meanwhile).
      const partial = join(dir, `.image-${newId()}.partial`);
      try {
        return await this.#snapshotWithinBudget(record, driver, partial, () =>
          this.deps.images.imageFromSnapshot(principal, { name: input.name, version: input.version, parent, sandboxName: record.name, file: partial }),
        );
      } catch (err) {
        throw this.#forCaller(err, `Making an image of sandbox ${record.name} failed`);
      } finally {
        await rm(partial, { force: true });
      }
    });
  }


  async listSnapshots(principal: Principal, id: string): Promise<Snapshot[]> {
    const record = await this.record(principal, id);
    const dir = this.#snapshotDir(record);
    if (!existsSync(dir)) return [];
    const names = (await readdir(dir)).filter((n) => n.endsWith(SNAPSHOT_SUFFIX) && !n.startsWith('.'));
    const snaps = await Promise.all(names.map((n) => this.#snapshotInfo(record, n.slice(0, -SNAPSHOT_SUFFIX.length))));
    return snaps.sort((a, b) => a.created_at.localeCompare(b.created_at));
  }

  /**
   * A new sandbox in the caller's org from a snapshot taken in that org. The snapshot reference is
   * `<sandboxId>/<snapshotId>` and resolves only inside the caller's org directory.
   */
  async restore(principal: Principal, input: RestoreSandboxInput): Promise<Sandbox> {
    assertOwnOrg(principal, input.orgId);
    const driver = this.driver;
    if (!canSnapshot(driver)) throw new InvalidInputError(`The ${driver.name} driver cannot restore snapshots`);
    const ref = /^([0-9a-f]{24})\/(snap-[0-9a-f]{24})$/.exec(input.snapshot_path.replace(/\.tar\.gz$/, ''));
    if (!ref) throw new InvalidInputError('snapshot_path must be a snapshot\'s full_path, "<sandboxId>/<snapshotId>"');
    const sourceId = ref[1]!;
    const snapId = ref[2]!;
    const file = join(this.deps.snapshotsDir, principal.orgId, sourceId, snapId + SNAPSHOT_SUFFIX);
    if (!existsSync(file)) throw new NotFoundError(`Snapshot ${input.snapshot_path} not found`, { code: 'SNAPSHOT_NOT_FOUND' });
    const source = await this.deps.sandboxes.findById(principal.orgId, sourceId);
    // The image the snapshot was taken on (snapshots from before this was recorded: the source's, else the default).
    const recorded = await readSnapshotImage(join(this.deps.snapshotsDir, principal.orgId, sourceId), snapId);
    const imageRef = recorded?.imageId ?? source?.imageId;
    const image = await this.deps.images.resolve(principal, imageRef).catch((err: unknown) => {
      if (recorded && err instanceof NotFoundError) {
        throw new ConflictError(`Snapshot ${snapId} was taken on image ${recorded.imageId}, which no longer exists: it cannot be restored onto another image`);
      }
      throw err;
    });
    this.deps.images.assertUsable(image);
    const record = await this.#admitRecord(principal, {
      name: input.new_id ?? `${source?.name ?? 'restored'}-${snapId.slice(-6)}`,
      imageId: image.id,
      cpu: input.cpu ?? source?.cpu ?? this.deps.defaults.cpu,
      mem: input.mem ?? source?.mem ?? this.deps.defaults.memMb,
      diskMb: source?.diskMb ?? this.deps.defaults.diskMb,
      envVars: source?.envVars ?? {},
      labels: source?.labels ?? {},
      network: source ? { ...source.network, egressCut: false } : this.#resolveNetwork({}, null, await this.deps.network.forOrg?.(principal.orgId)),
      ...lifecycleField(this.lifecycleFor(input, source?.lifecycle)),
    });
    return this.#locks.run(record.id, async () => {
      try {
        await driver.restore(this.#spec(record, await this.deps.images.rootfsFor(image), image), file);
        if (input.cold) await driver.stop(record.id);
        return toSandbox(await this.#setStatus(record, input.cold ? 'stopped' : 'running'));
      } catch (err) {
        await this.deps.sandboxes.delete(record.orgId, record.id);
        this.deps.events?.deleteForSandbox?.(record.id);
        throw this.#forCaller(err, `Restoring snapshot ${snapId} failed`);
      }
    });
  }

  /**
   * Changes a sandbox's network policy: the fields given replace its own, the rest stay. A running
   * sandbox gets the new egress rules at once; a stopped one when it starts. The mode changes only
   * while the sandbox is stopped (its network is built at start). A changed byte cap lifts a cut;
   * the counters cut again if the sandbox is still past the new cap.
   */
  async updateNetwork(principal: Principal, input: UpdateNetworkInput): Promise<Sandbox> {
    return this.#transition(principal, input.id, async (record) => {
      const down = record.status === 'stopped' || record.status === 'error';
      if (input.mode !== undefined && input.mode !== record.network.mode && !down) {
        throw new InvalidInputError(`network mode cannot change while sandbox ${record.name} is ${record.status}; stop it first (egress, allow and deny change while it runs)`);
      }
      const network = this.#resolveNetwork(input, record.network);
      const updated = (await this.deps.sandboxes.update(record.orgId, record.id, { network })) ?? { ...record, network };
      this.#event(record, 'network.policy_changed', { network });
      if (!down && network.mode === 'bridge' && this.deps.network.enforce) {
        try {
          await this.deps.network.enforce(record.id, network);
        } catch (err) {
          throw this.#forCaller(err, `Applying the network policy of sandbox ${record.name} failed`);
        }
      }
      return toSandbox(updated);
    });
  }

  /**
   * Cuts the sandbox's egress at its byte cap: records it (`network.egressCut`, shown in every
   * answer) and applies it. Under the sandbox's lock, so a policy change meanwhile is not undone.
   * False when the sandbox no longer exists or its cap no longer applies.
   */
  async cutEgress(record: SandboxRecord, egressBytes: number): Promise<boolean> {
    return this.#locks.run(record.id, async () => {
      const fresh = await this.deps.sandboxes.findById(record.orgId, record.id);
      // A cap stored before SANDBOX_EGRESS_BYTES_MAX was set or lowered counts as the ceiling.
      const cap = fresh ? egressCapOrCeiling(fresh.network.maxEgressBytes, this.deps.network.maxEgressBytes) : null;
      if (!fresh || cap == null || egressBytes <= cap) return false;
      const network = { ...fresh.network, maxEgressBytes: cap, egressCut: true };
      // Enforced before it is recorded: an answer saying `egressCut: true` means it is in force.
      await this.deps.network.enforce?.(fresh.id, network);
      if (!fresh.network.egressCut) {
        await this.deps.sandboxes.update(fresh.orgId, fresh.id, { network });
        this.#event(fresh, 'network.egress_cut', { egressBytes, maxEgressBytes: cap });
      }
      this.deps.log.warn({ sandbox: fresh.id, egressBytes, maxEgressBytes: cap }, `sandbox ${fresh.name}: egress cut after ${egressBytes} bytes (maxEgressBytes ${cap})`);
      return true;
    });
  }

  /**
   * `input` over `current` (or, for a new sandbox, over the org's defaults and then the server's),
   * checked against what this host can run.
   */
  /** The server's default network policy (SANDBOX_NETWORK as resolved here, SANDBOX_DEFAULT_EGRESS, …): what an image build sandbox gets. */
  defaultNetwork(): NetworkPolicy {
    return this.#resolveNetwork({}, null);
  }

  #resolveNetwork(input: NetworkPolicyInput, current: NetworkPolicy | null, org?: OrgNetworkDefaults): NetworkPolicy {
    const defaults = this.deps.network;
    const mode = input.mode ?? current?.mode ?? defaults.mode;
    if (input.mode === 'bridge' && defaults.bridgeUnavailable) {
      throw new InvalidInputError(`network mode bridge is not available on this server: ${defaults.bridgeUnavailable}`);
    }
    const privateError = input.allow && privateAllowError(input.allow, defaults.privateAllow ?? []);
    if (privateError) throw new InvalidInputError(privateError);
    // 0 or null: no cap, or the ceiling where SANDBOX_EGRESS_BYTES_MAX sets one (REST bodies drop null fields, so 0 is how a REST client removes one).
    const fallbackCap = org?.maxEgressBytes !== undefined ? egressCapOrCeiling(org.maxEgressBytes, defaults.maxEgressBytes) : defaults.maxEgressBytes;
    let maxEgressBytes = current ? egressCapOrCeiling(current.maxEgressBytes, defaults.maxEgressBytes) : fallbackCap;
    if (input.maxEgressBytes !== undefined) {
      const asked = egressCapFor(input.maxEgressBytes, defaults.maxEgressBytes);
      if ('error' in asked) throw new InvalidInputError(asked.error);
      maxEgressBytes = asked.cap;
    }
    return {
      mode,
      egress: input.egress ?? current?.egress ?? org?.egress ?? defaults.egress,
      allow: input.allow ?? current?.allow ?? org?.allow ?? [],
      deny: input.deny ?? current?.deny ?? org?.deny ?? [],
      maxEgressBytes,
      egressCut: current !== null && current.egressCut && maxEgressBytes === current.maxEgressBytes,
    };
  }

  /**
   * Brings one record in line with what the driver reports; returns the new status. Used by the
   * health loop and after an agent stops answering.
   */
  async reconcile(record: SandboxRecord): Promise<SandboxStatus> {
    if (!this.deps.driver || record.status === 'creating') return record.status;
    return this.#locks.run(record.id, async () => {
      const fresh = await this.deps.sandboxes.findById(record.orgId, record.id);
      if (!fresh || fresh.status === 'creating') return fresh?.status ?? record.status;
      const state = await this.deps.driver!.inspect(record.id);
      // Given up by the fleet while this host was away: its runtime is stopped, never brought back.
      if (fresh.status === 'error' && fresh.lifecycle?.endedReason === 'host-lost') {
        if (state === 'running' || state === 'paused') {
          this.#stopped(record.id);
          await this.deps.agents?.drop(record.id);
          await this.deps.driver!.stop(record.id).catch((err: Error) => this.deps.log.warn({ sandbox: record.id, err: err.message }, 'could not stop a lost sandbox'));
        }
        return 'error';
      }
      const status: SandboxStatus = state === 'missing' ? 'error' : state;
      if (status !== fresh.status) {
        this.deps.log.warn({ sandbox: record.id, from: fresh.status, to: status }, 'sandbox status corrected');
        this.deps.agents?.forgetSettled(record.id);
        if (status !== 'running') {
          this.#stopped(record.id);
          await this.deps.agents?.drop(record.id);
        }
        this.#eventReasons.set(record.id, state === 'missing' ? 'its runtime is gone' : `found ${state} by the health check`);
        await this.#setStatus(fresh, status);
      }
      return status;
    });
  }

  /**
   * What a caller sees of a failure: domain errors as they are, except driver failures (which
   * can quote host commands, e.g. an image build), whose host paths are redacted like any error's.
   */
  #forCaller(err: unknown, what: string): Error {
    if (err instanceof DomainError && err.code !== ErrorCode.DRIVER_FAILURE) return err;
    if (err instanceof DomainError) return new DriverFailureError(this.#redact(err), { cause: err });
    return new DriverFailureError(`${what}: ${this.#redact(err)}`, { cause: err });
  }

  /** A driver failure's message with host directories replaced, for callers (the log keeps the original). */
  #redact(err: unknown): string {
    let message = err instanceof Error ? err.message : String(err);
    for (const dir of this.deps.hostPaths) message = message.split(dir).join('<host>');
    return message.replace(/\/(tmp|var|run|srv|home|root)\/[^\s:'"]+/g, '<host path>');
  }

  /** A new `creating` record in the caller's org, if its quotas and the host leave room for it. */
  #admitRecord(principal: Principal, fields: NewSandboxFields): Promise<SandboxRecord> {
    return this.deps.quotas.admit(principal.orgId, fields, async () => {
      // Under the admission lock, which an image delete also holds: an image deleted since it was
      // resolved is not used by a new record (and one in use is not deleted).
      await this.deps.images.assertExists(fields.imageId);
      return this.deps.sandboxes.create({ ...fields, orgId: principal.orgId, createdBy: principal.userId, ip: '', status: 'creating' });
    }, { undo: (record) => this.deps.sandboxes.delete(record.orgId, record.id) }).then((record) => {
      this.#event(record, 'sandbox.created', { name: record.name, imageId: record.imageId, cpu: record.cpu, mem: record.mem });
      return record;
    });
  }

  // ── Warm pool (server/services/warm-pool.ts keeps the pool; these build, hand over and remove members) ──

  /** Creates matching WARM_POOL's shapes are served from `pool` first. */
  useWarmPool(pool: WarmPool): void {
    this.#warm = pool;
  }

  /** The warm pool, if WARM_POOL lists any shape. */
  get warmPool(): WarmPool | null {
    return this.#warm;
  }

  /**
   * A running sandbox owned by no org (`orgId` '', `pool` = its shape), built as a cold create
   * builds one, with the server's default network policy and no envVars. It counts against the
   * host's capacity (never an org's quota).
   */
  async createPoolMember(shape: { pool: string; imageId: string; cpu: number; mem: number; diskMb: number }): Promise<SandboxRecord> {
    const driver = this.driver;
    const image = await this.deps.images.resolve({ orgId: '', keyId: '', userId: '' }, shape.imageId);
    const fields = { name: `warm-${newId()}`, imageId: image.id, cpu: shape.cpu, mem: shape.mem, diskMb: shape.diskMb, envVars: {}, labels: {}, network: this.#resolveNetwork({}, null) };
    const record = await this.deps.quotas.admitPoolMember(fields, () =>
      this.deps.sandboxes.create({ ...fields, orgId: '', createdBy: '', ip: '', status: 'creating', pool: shape.pool }),
    );
    return this.#locks.run(record.id, async () => {
      try {
        await driver.create(this.#spec(record, await this.deps.images.rootfsFor(image), image));
        const running = await this.#setStatus(record, 'running');
        // The agent connection is opened now, and a command and the claim call run once, so a claim
        // neither waits for the connection nor pays for the agent's first command (~8 ms of the
        // agent's, measured for bench:sandbox); the claim call makes the agent forget the warm-up
        // command, so no listing shows it.
        await this.agents.call(running, async (agent) => {
          await agent.process.run.mutate({ command: 'true', timeoutMs: 10_000 });
          await agent.pool.claim.mutate({ vars: {} });
        });
        return running;
      } catch (err) {
        await this.agents.drop(record.id);
        await driver.destroy(record.id).catch(() => {});
        await this.deps.sandboxes.delete('', record.id);
        throw this.#forCaller(err, `Creating warm pool sandbox ${record.name} failed`);
      }
    });
  }

  /**
   * Hands claimed pool member `id` to `claim.orgId` in one store write, admitted against the org's
   * quotas exactly as a cold create of `request`'s size; a refusal leaves the member untouched.
   */
  handOverPoolMember(id: string, request: { cpu: number; mem: number; diskMb: number }, claim: PoolMemberClaim): Promise<SandboxRecord | null> {
    return this.deps.quotas.admitClaim(claim.orgId, request, () => this.deps.sandboxes.claimPoolMember(id, claim));
  }

  /**
   * Puts `vars` in a pool member's agent environment for the commands started from then on (the
   * agent's `pool.claim`, which also forgets any warm-up command it ran): a claim's envVars, or {}
   * to give a member back as the pool built it.
   */
  async poolEnv(member: SandboxRecord, vars: Record<string, string>): Promise<void> {
    await this.agents.call(member, (agent) => agent.pool.claim.mutate({ vars }));
  }

  /**
   * Gives a pool member the hostname `name` (a claim's sandbox name; the member's own to give it
   * back) where the driver can without a restart (containers: host-side, see setContainerHostname);
   * elsewhere it keeps the name it booted with until its first stop and start.
   */
  async poolHostname(member: SandboxRecord, name: string): Promise<void> {
    const driver = this.deps.driver;
    if (driver && renamesHost(driver)) await driver.setHostname(member.id, name);
  }

  /**
   * Enforces a claimed member's network policy (`record`, already its org's) as `updateNetwork`
   * enforces one, when it differs from the policy the member ran with.
   */
  async applyPoolPolicy(record: SandboxRecord, member: SandboxRecord): Promise<void> {
    const enforce = this.deps.network.enforce;
    if (record.network.mode === 'bridge' && enforce && JSON.stringify(record.network) !== JSON.stringify(member.network)) await enforce(record.id, record.network);
  }

  /** Removes a sandbox the warm pool owns or failed to hand over: its runtime, connections and record. */
  async discard(record: SandboxRecord): Promise<void> {
    await this.#locks.run(record.id, async () => {
      this.#stopped(record.id);
      await this.deps.agents?.drop(record.id);
      await this.deps.driver?.destroy(record.id);
      await this.deps.sandboxes.delete(record.orgId, record.id);
    });
  }

  /**
   * The driver's spec of `record` on `image` (mounted as `fs`): the image's env under the
   * sandbox's own envVars, and its workdir as the agent's default directory for commands.
   */
  #spec(record: SandboxRecord, fs: ImageFilesystem, image: ImageRecord): SandboxSpec {
    // The agent names the disk size when an upload finds no space left.
    const agentSettings: Record<string, string> = { ...this.deps.agentSettings, VOIDRUN_DISK_MB: String(record.diskMb) };
    if (image.workdir) agentSettings.VOIDRUN_WORKDIR = image.workdir;
    const envVars = { ...image.env, ...record.envVars };
    return { id: record.id, name: record.name, rootfs: fs.rootfs, layers: fs.layers, image: fs.vmImage, cpu: record.cpu, memMb: record.mem, diskMb: record.diskMb, envVars, agentSettings, network: record.network };
  }

  async #setStatus(record: SandboxRecord, status: SandboxStatus): Promise<SandboxRecord> {
    const patch: Partial<Pick<SandboxRecord, 'status' | 'ip' | 'lifecycle'>> = { status };
    // A sandbox on the bridge has an address of its own, known once it runs; with mode none it has none.
    const driver = this.deps.driver;
    if (status === 'running' && driver && hasAddresses(driver)) patch.ip = record.network.mode === 'none' ? '' : ((await driver.addressOf(record.id)) ?? record.ip);
    const lifecycle = this.#lifecycleOnStatus(record, status);
    if (lifecycle) patch.lifecycle = lifecycle;
    const updated = (await this.deps.sandboxes.update(record.orgId, record.id, patch)) ?? { ...record, ...patch };
    this.#statusEvent(record, status);
    this.#changed(updated);
    return updated;
  }

  // ---- Lifecycle policies (README "Lifecycle: timeouts, idle and auto-resume") ----

  /** Registers a callback for every record whose status or lifecycle this service changed (the lifecycle policy's schedule). */
  onRecordChanged(listener: (record: SandboxRecord) => void): void {
    this.#changeListeners.push(listener);
  }

  #changed(record: SandboxRecord): void {
    for (const l of this.#changeListeners) l(record);
  }

  /**
   * The timeout clock runs while the sandbox runs: a start or resume sets `expiresAt` to now +
   * timeout and clears `endedReason`; any other status clears `expiresAt`, and a pause or stop a
   * policy asked for (`#endingReason`) records why and when (another change of status clears it).
   * Undefined: nothing changes.
   */
  #lifecycleOnStatus(record: SandboxRecord, status: SandboxStatus): SandboxLifecycle | undefined {
    const lc = record.lifecycle;
    if (!lc) return undefined;
    const now = Date.now();
    if (status === 'running') return record.status === 'running' ? undefined : startedLifecycle(lc, now);
    const reason = status === 'paused' || status === 'stopped' ? this.#endingReason.get(record.id) : undefined;
    if (reason) return { ...lc, expiresAt: null, endedReason: reason, endedAt: new Date(now).toISOString() };
    // Any other change of status (a stop of a sandbox its idle policy paused) is not the policy's: its reason goes.
    if (record.status !== status && lc.endedReason !== null) return { ...lc, expiresAt: null, endedReason: null, endedAt: null };
    return lc.expiresAt === null ? undefined : { ...lc, expiresAt: null };
  }

  /**
   * A new sandbox's lifecycle from its create (or restore) fields over `base` (a restored one's
   * source), checked against SANDBOX_MAX_TIMEOUT_SEC. Without lifecycle deps: none.
   */
  lifecycleFor(input: LifecycleFields, base?: SandboxLifecycle): SandboxLifecycle | undefined {
    const deps = this.deps.lifecycle;
    if (!deps) return undefined;
    // A restored sandbox keeps its source's timeout where SANDBOX_MAX_TIMEOUT_SEC (as set now) allows it.
    const max = deps.maxTimeoutSec;
    const inherited = base && (max === 0 || (base.timeout > 0 && base.timeout <= max)) ? base.timeout : undefined;
    const timeout = input.timeout === undefined ? (inherited ?? this.#defaultTimeout()) : this.checkTimeout(input.timeout);
    return {
      timeout,
      expiresAt: null,
      onTimeout: input.onTimeout ?? base?.onTimeout ?? 'stop',
      idle: input.idle !== undefined ? input.idle : (base?.idle ?? null),
      autoResume: input.autoResume ?? base?.autoResume ?? false,
      endedReason: null,
      endedAt: null,
    };
  }

  /**
   * A claimed warm-pool member gets the create's lifecycle, its clock starting now (it runs already).
   * Under its lock, as every lifecycle write is.
   */
  async #startLifecycleAtClaim(record: SandboxRecord, lifecycle: SandboxLifecycle | undefined): Promise<SandboxRecord> {
    if (!lifecycle) return record;
    return this.#locks.run(record.id, async () => {
      const started = startedLifecycle(lifecycle, Date.now());
      const updated = (await this.deps.sandboxes.update(record.orgId, record.id, { lifecycle: started })) ?? { ...record, lifecycle: started };
      this.#changed(updated);
      return updated;
    });
  }

  /** SANDBOX_DEFAULT_TIMEOUT_SEC, or with it 0 and a maximum set, the maximum (no sandbox runs unbounded then). */
  #defaultTimeout(): number {
    const deps = this.deps.lifecycle!;
    return deps.defaultTimeoutSec || deps.maxTimeoutSec;
  }

  /** `timeout` if SANDBOX_MAX_TIMEOUT_SEC allows it; else a 400 naming the maximum. */
  checkTimeout(timeout: number): number {
    const max = this.deps.lifecycle?.maxTimeoutSec ?? 0;
    if (max > 0 && timeout === 0) throw new InvalidInputError(`timeout 0 (none) is not allowed on this server: sandboxes may run at most ${max} seconds (SANDBOX_MAX_TIMEOUT_SEC); send 1 to ${max}`);
    if (max > 0 && timeout > max) throw new InvalidInputError(`timeout ${timeout} is above this server's maximum of ${max} seconds (SANDBOX_MAX_TIMEOUT_SEC)`);
    return timeout;
  }

  /**
   * Changes a sandbox's lifecycle under its lock: `change` gets the record as it is then and
   * returns the new lifecycle (a record stored before policies existed starts from none). The
   * answer is the sandbox as changed.
   */
  async changeLifecycle(principal: Principal, id: string, change: (record: SandboxRecord, current: SandboxLifecycle) => SandboxLifecycle): Promise<Sandbox> {
    const updated = await this.#transition(principal, id, async (record) => {
      const lifecycle = change(record, record.lifecycle ?? this.lifecycleFor({ timeout: 0 }) ?? NO_LIFECYCLE);
      const next = (await this.deps.sandboxes.update(record.orgId, record.id, { lifecycle })) ?? { ...record, lifecycle };
      this.#changed(next);
      return next;
    });
    return this.#answer(updated);
  }

  /**
   * Pauses or stops a sandbox for a policy (its timeout, its idle period) through the same paths
   * as the API's, under the sandbox's lock; the record says why (`endedReason`) until it runs again.
   */
  async endByPolicy(record: SandboxRecord, action: 'pause' | 'stop', reason: EndedReason, still: (fresh: SandboxRecord) => boolean): Promise<void> {
    const principal = this.#policyPrincipal(record, reason, still);
    try {
      await (action === 'pause' ? this.pause(principal, record.id) : this.stop(principal, record.id));
    } finally {
      this.#endingReason.delete(record.id);
      this.#eventReasons.delete(record.id);
    }
  }

  /**
   * The principal a policy's call runs as: the sandbox's creator, marked with why and with the
   * condition its action needs, checked on the record under the sandbox's lock (`#policyGate`) so
   * a change that came meanwhile (a new timeout, a stop, activity) is never overridden.
   */
  #policyPrincipal(record: SandboxRecord, reason: EndedReason, still: (fresh: SandboxRecord) => boolean): Principal {
    const principal: Principal = { orgId: record.orgId, keyId: '', userId: record.createdBy };
    this.#policyCalls.set(principal, { reason, still });
    return principal;
  }

  /**
   * Under the sandbox's lock, before a stop, pause or delete drives the runtime: true for every
   * API call; for a policy's, whether its condition still holds of `record` — then the status change
   * that follows records the reason (`endedReason`, and in its event).
   */
  #policyGate(principal: Principal, record: SandboxRecord): boolean {
    const call = this.#policyCalls.get(principal);
    if (!call) return true;
    if (!call.still(record)) return false;
    this.#endingReason.set(record.id, call.reason);
    this.#eventReasons.set(record.id, call.reason === 'timeout' ? 'its timeout ran out' : 'it was idle');
    return true;
  }

  /**
   * Deletes a sandbox at its timeout (`onTimeout: 'delete'`) through the API's delete path (its
   * snapshots go too); its tombstone is written first, so no call meanwhile answers a bare 404.
   */
  async deleteByTimeout(record: SandboxRecord, still: (fresh: SandboxRecord) => boolean): Promise<void> {
    const tombstones = this.deps.lifecycle?.tombstones;
    await tombstones?.put({ id: record.id, orgId: record.orgId, name: record.name, reason: 'timeout', endedAt: new Date() });
    try {
      await this.delete(this.#policyPrincipal(record, 'timeout', still), record.id);
    } catch (err) {
      await tombstones?.delete(record.orgId, record.id).catch(() => {});
      throw err;
    }
    // The gate may have found the timeout changed: the sandbox stays, and so must no tombstone.
    if (await this.deps.sandboxes.findById(record.orgId, record.id)) await tombstones?.delete(record.orgId, record.id);
    else this.deps.lifecycle?.activity.forget(record.id);
  }

  /**
   * Moves stopped sandbox `id` off this host (a fleet host being drained): under its lock, its
   * filesystem is captured to `file` (at most `maxBytes`) and `send` hands it to another host,
   * which restores it there stopped; then the record names that host (read back before anything
   * here goes), `commit` runs (the slot there becomes the sandbox's), and the runtime here goes. A
   * call that waited for the lock then finds it moved (503, see `hostSandboxes`). Resolves to the
   * new host's id, or null when there is nothing to move: not a stopped sandbox any more, a driver
   * whose snapshot needs a running sandbox (VMs), or snapshots of its own (they stay restorable
   * where they are, so it stays too).
   */
  async moveOut(id: string, file: string, maxBytes: number, send: (record: SandboxRecord) => Promise<{ hostId: string; commit: () => Promise<void> }>): Promise<string | null> {
    const driver = this.driver;
    if (!canSnapshot(driver) || driver.snapshotKind !== 'filesystem') return null;
    return this.#locks.run(id, async () => {
      const record = await this.deps.sandboxes.findByIdInAnyOrg(id);
      if (!record || record.status !== 'stopped' || record.pool || !record.orgId) return null;
      if ((await readdir(this.#snapshotDir(record)).catch(() => [] as string[])).some((n) => n.endsWith(SNAPSHOT_SUFFIX))) return null;
      await driver.snapshot(id, file, { maxBytes });
      const to = await send(record);
      await this.deps.sandboxes.update(record.orgId, id, { hostId: to.hostId });
      // Read back: a concurrent write of the record (a lost-host sweep) could have put it back.
      if ((await this.deps.sandboxes.findByIdInAnyOrg(id))?.hostId !== to.hostId) throw new Error(`sandbox ${id}: its record did not come to name host ${to.hostId}`);
      // Before the lock is let go: what waited for it reads the sandbox as moved (see hostSandboxes).
      this.deps.movedAway?.add(id);
      await to.commit().catch(() => {});
      this.#stopped(id);
      await this.deps.agents?.drop(id);
      await driver.destroy(id).catch(() => {});
      return to.hostId;
    });
  }

  /** Removes this host's runtime of sandbox `id` (a moved sandbox's copy whose move did not complete); its record is not touched. */
  async dropCopy(id: string): Promise<void> {
    await this.#locks.run(id, () => this.driver.destroy(id));
  }

  /**
   * The receiving side of `moveOut`: restores another host's stopped sandbox `record` here from
   * `file`, and leaves it stopped; its record is the sender's to change. Its image must run here
   * (no image of another host's own layers).
   */
  async adoptMoved(record: SandboxRecord, file: string): Promise<void> {
    const driver = this.driver;
    if (!canSnapshot(driver)) throw new ConflictError(`The ${driver.name} driver cannot take sandboxes moved from another host`);
    await this.#locks.run(record.id, async () => {
      const image = await this.deps.images.resolve({ orgId: record.orgId, keyId: '', userId: '' }, record.imageId);
      this.deps.images.assertRunsHere(image);
      try {
        await driver.restore(this.#spec(record, await this.deps.images.rootfsFor(image), image), file);
        await driver.stop(record.id);
      } catch (err) {
        await driver.destroy(record.id).catch(() => {});
        throw err;
      }
    });
  }

  #snapshotDir(record: SandboxRecord): string {
    return join(this.deps.snapshotsDir, record.orgId, record.id);
  }

  async #snapshotInfo(record: SandboxRecord, snapId: string): Promise<Snapshot> {
    const st = await stat(join(this.#snapshotDir(record), snapId + SNAPSHOT_SUFFIX));
    const kind = this.deps.driver && canSnapshot(this.deps.driver) ? this.deps.driver.snapshotKind : 'filesystem';
    return { id: snapId, created_at: st.mtime.toISOString(), full_path: `${record.id}/${snapId}`, kind, size: st.size };
  }
}

/** What a create or restore decides of a new sandbox before its record exists. */
type NewSandboxFields = Pick<SandboxRecord, 'name' | 'imageId' | 'cpu' | 'mem' | 'diskMb' | 'envVars' | 'labels' | 'network' | 'lifecycle'>;

/** The event of a change to a status other than running (running is started or resumed, by where it came from). */
const STATUS_EVENTS: Record<Exclude<SandboxStatus, 'running'>, SandboxEventType> = {
  creating: 'sandbox.created',
  paused: 'sandbox.paused',
  stopped: 'sandbox.stopped',
  error: 'sandbox.error',
};

function assertOwnOrg(principal: Principal, orgId: string | undefined): void {
  if (orgId && orgId !== principal.orgId) throw new ForbiddenError(`orgId ${orgId} is not the organization of this API key`);
}

function action(r: SandboxRecord): SandboxActionResult {
  return { id: r.id, status: r.status };
}

/** No link, nothing counted. */
const NO_BYTES: NetworkBytes = { egress: 0, ingress: 0 };

/** A record's lifecycle when it has none stored (stored before policies existed): no policy. */
export const NO_LIFECYCLE: SandboxLifecycle = { timeout: 0, expiresAt: null, onTimeout: 'stop', idle: null, autoResume: false, endedReason: null, endedAt: null };

/** `{ lifecycle }` when there is one (a record without the field reads as no policy). */
function lifecycleField(lifecycle: SandboxLifecycle | undefined): { lifecycle?: SandboxLifecycle } {
  return lifecycle ? { lifecycle } : {};
}

/** What a 409 on a sandbox a policy paused or stopped says: why and when (message and details). */
function endedBy(record: SandboxRecord): { message: string; details: string } | null {
  const lc = record.lifecycle;
  if (!lc?.endedReason) return null;
  const why = lc.endedReason === 'timeout' ? `its timeout (${lc.timeout} s) ran out at ${lc.endedAt} (onTimeout: ${lc.onTimeout})` : `it was idle for ${lc.idle?.after ?? '?'} s and its idle policy ended it at ${lc.endedAt}`;
  return { message: `${why}, endedReason: ${lc.endedReason}`, details: `endedReason: ${lc.endedReason}; endedAt: ${lc.endedAt}` };
}

/** The sandbox's answer; `networkBytes` as the service read them on the host for it. */
export function toSandbox(r: SandboxRecord, networkBytes: NetworkBytes = NO_BYTES, lastActivityAt?: number): Sandbox {
  const lc = r.lifecycle ?? NO_LIFECYCLE;
  return {
    id: r.id,
    name: r.name,
    imageId: r.imageId,
    ip: r.ip,
    cpu: r.cpu,
    mem: r.mem,
    status: r.status,
    createdAt: r.createdAt.toISOString(),
    createdBy: r.createdBy,
    orgId: r.orgId,
    envVars: r.envVars,
    labels: r.labels,
    network: r.network,
    networkBytes,
    timeout: lc.timeout,
    expiresAt: lc.expiresAt,
    onTimeout: lc.onTimeout,
    idle: lc.idle,
    autoResume: lc.autoResume,
    endedReason: lc.endedReason,
    endedAt: lc.endedAt,
    lastActivityAt: lastActivityAt === undefined ? null : new Date(lastActivityAt).toISOString(),
  };
}

/** A lifecycle as its sandbox starts running (created, started, resumed, claimed): its timeout clock starts now, no ended reason. */
function startedLifecycle(lc: SandboxLifecycle, now: number): SandboxLifecycle {
  return { ...lc, expiresAt: lc.timeout > 0 ? new Date(now + lc.timeout * 1000).toISOString() : null, endedReason: null, endedAt: null };
}
