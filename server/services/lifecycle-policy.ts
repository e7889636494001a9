import type { Logger } from 'pino';
import { idleFromAutoSleep, type Sandbox, type SetTimeoutInput, type UpdateSandboxInput } from '../../shared/index.js';
import { canPause, reportsUsage, type SandboxDriver } from '../hypervisor/types.js';
import type { SandboxLifecycle, SandboxRecord, SandboxRepository, SandboxTombstoneRepository } from '../store/types.js';
import type { ActivityTracker } from './activity.js';
import type { Principal } from './auth-service.js';
import { noEvents, type SandboxEventSink } from './sandbox-events.js';
import type { SandboxService } from './sandbox-service.js';

/** How long a sandbox deleted by its timeout keeps answering 410 before its tombstone goes (then 404). */
export const TOMBSTONE_RETENTION_MS = 7 * 24 * 3600 * 1000;
/** How often every record is read again (another server's changes, records written outside this service). */
const RESYNC_MS = 60_000;
/** How long the agent has to list its processes for an idle check. */
const PROCESS_LIST_TIMEOUT_MS = 5000;

export interface LifecyclePolicyOptions {
  sandboxes: SandboxRepository;
  tombstones: SandboxTombstoneRepository;
  service: SandboxService;
  activity: ActivityTracker;
  driver: SandboxDriver | null;
  events?: SandboxEventSink;
  /** LIFECYCLE_TICK_MS */
  tickMs: number;
  /** SANDBOX_IDLE_CPU_PERCENT: CPU use (percent of one CPU) above which a sandbox is active. */
  idleCpuPercent: number;
  log: Logger;
}

/** What the schedule keeps of one sandbox with a policy. */
interface Entry {
  orgId: string;
  status: SandboxRecord['status'];
  lifecycle: SandboxLifecycle;
}

/**
 * Acts on sandboxes' timeouts and idle policies (README "Lifecycle: timeouts, idle and
 * auto-resume"). The schedule is in memory, built from every record at `start` (so a restart
 * loses nothing, and a sandbox that expired while the server was down is acted on at the first
 * tick), kept current by the service's record changes, and read again every minute. Each tick
 * (LIFECYCLE_TICK_MS) compares times in memory; a sandbox is read from the store, its agent asked
 * or its cgroup read only when its timeout is due or it looks idle. Actions go through the
 * service's own pause, stop and delete, under the sandbox's lock.
 */
export class LifecyclePolicy {
  readonly #entries = new Map<string, Entry>();
  /** Sandboxes with an action or check under way (never two at once for one sandbox). */
  readonly #busy = new Set<string>();
  /** The last host CPU sample of sandboxes with an idle policy: cumulative seconds, and when. */
  readonly #cpu = new Map<string, { seconds: number; at: number }>();
  readonly #events: SandboxEventSink;
  #timer: NodeJS.Timeout | null = null;
  #resync: NodeJS.Timeout | null = null;
  /** When this server started watching: the idle clock of a sandbox with no activity seen since starts here. */
  #startedAt = Date.now();
  #stopped = false;
  /** Actions and checks under way, for `stop` to wait on. */
  readonly #inFlight = new Set<Promise<void>>();

  constructor(private readonly opts: LifecyclePolicyOptions) {
    this.#events = opts.events ?? noEvents;
    opts.service.onRecordChanged((record) => this.track(record));
  }

  /** Reads every record and starts the ticks. */
  async start(): Promise<void> {
    this.#startedAt = Date.now();
    await this.#load();
    this.#timer = setInterval(() => this.#tick(), this.opts.tickMs);
    this.#timer.unref();
    this.#resync = setInterval(() => void this.#load().catch((err: Error) => this.opts.log.warn({ err: err.message }, 'lifecycle: re-reading records failed')), RESYNC_MS);
    this.#resync.unref();
    this.#tick();
  }

  /** Stops the ticks and waits for actions under way. */
  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    if (this.#resync) clearInterval(this.#resync);
    await Promise.all(this.#inFlight);
  }

  /** Keeps the schedule of one sandbox current (called on every status or lifecycle change). */
  track(record: SandboxRecord): void {
    // Whose streams and connections count as its activity (ActivityTracker.hold).
    this.opts.activity.own(record.id, record.orgId);
    const lc = record.lifecycle;
    if (!lc || (lc.timeout === 0 && !lc.idle) || record.pool) {
      this.#entries.delete(record.id);
      return;
    }
    const prev = this.#entries.get(record.id);
    this.#entries.set(record.id, { orgId: record.orgId, status: record.status, lifecycle: lc });
    // The idle clock starts when the sandbox starts running (created, started, resumed, claimed).
    if (record.status === 'running' && prev?.status !== 'running') this.opts.activity.touch(record.id);
    if (record.status !== 'running') this.#cpu.delete(record.id);
  }

  async #load(): Promise<void> {
    const records = await this.opts.sandboxes.listAll();
    const ids = new Set(records.map((r) => r.id));
    for (const id of this.#entries.keys()) if (!ids.has(id)) this.#entries.delete(id);
    for (const id of this.#cpu.keys()) if (!ids.has(id)) this.#cpu.delete(id);
    this.opts.activity.retain(ids);
    for (const r of records) this.track(r);
    await this.opts.tombstones.deleteEndedBefore(new Date(Date.now() - TOMBSTONE_RETENTION_MS));
  }

  // ---- API: POST /sandboxes/{id}/timeout, PATCH /sandboxes/{id} ----

  /** E2B's setTimeout: the sandbox may run `timeout` more seconds from now (0: no timeout); it becomes its timeout. */
  async setTimeout(principal: Principal, input: SetTimeoutInput): Promise<Sandbox> {
    const timeout = this.opts.service.checkTimeout(input.timeout);
    return this.#change(principal, input.id, (record, lc) => ({ ...lc, timeout, expiresAt: expiry(record, timeout) }));
  }

  /** Replaces the lifecycle fields given; `autoSleep` is shorthand for an idle policy that pauses. */
  async update(principal: Principal, input: UpdateSandboxInput): Promise<Sandbox> {
    const timeout = input.timeout === undefined ? undefined : this.opts.service.checkTimeout(input.timeout);
    const idle = input.autoSleep !== undefined ? idleFromAutoSleep(input.autoSleep) : input.idle;
    return this.#change(principal, input.id, (record, lc) => ({
      ...lc,
      ...(timeout !== undefined ? { timeout, expiresAt: expiry(record, timeout) } : {}),
      ...(input.onTimeout !== undefined ? { onTimeout: input.onTimeout } : {}),
      ...(idle !== undefined ? { idle } : {}),
      ...(input.autoResume !== undefined ? { autoResume: input.autoResume } : {}),
    }));
  }

  async #change(principal: Principal, id: string, change: (record: SandboxRecord, lc: SandboxLifecycle) => SandboxLifecycle): Promise<Sandbox> {
    let before: SandboxLifecycle | null = null;
    const answer = await this.opts.service.changeLifecycle(principal, id, (record, lc) => {
      before = lc;
      return change(record, lc);
    });
    const was = before as SandboxLifecycle | null;
    if (was && (was.timeout !== answer.timeout || was.expiresAt !== answer.expiresAt)) {
      this.#events.emit({ sandboxId: id, orgId: answer.orgId, type: 'sandbox.timeout_changed', data: { timeout: answer.timeout, expiresAt: answer.expiresAt, previousExpiresAt: was.expiresAt } });
    }
    return answer;
  }

  // ---- The schedule ----

  #tick(): void {
    if (this.#stopped) return;
    const now = Date.now();
    for (const [id, e] of this.#entries) {
      if (this.#busy.has(id) || e.status !== 'running') continue;
      const expiresAt = e.lifecycle.expiresAt ? Date.parse(e.lifecycle.expiresAt) : null;
      if (expiresAt !== null && now >= expiresAt) this.#run(id, () => this.#expire(id, e));
      else if (e.lifecycle.idle) this.#run(id, () => this.#checkIdle(id, e, now));
    }
  }

  /** Runs one action or check for a sandbox, never two at once for it; failures are logged. */
  #run(id: string, fn: () => Promise<void>): void {
    this.#busy.add(id);
    const done: Promise<void> = fn()
      .catch((err: Error) => this.opts.log.warn({ sandbox: id, err: err.message }, 'lifecycle policy action failed'))
      .finally(() => {
        this.#busy.delete(id);
        this.#inFlight.delete(done);
      });
    this.#inFlight.add(done);
  }

  /** The sandbox's record if it still exists; a missing one leaves the schedule. */
  async #fresh(id: string, e: Entry): Promise<SandboxRecord | null> {
    const record = await this.opts.sandboxes.findById(e.orgId, id);
    if (!record) {
      this.#entries.delete(id);
      this.#cpu.delete(id);
      this.opts.activity.forget(id);
      return null;
    }
    this.track(record);
    return record;
  }

  async #expire(id: string, e: Entry): Promise<void> {
    const record = await this.#fresh(id, e);
    const lc = record?.lifecycle;
    // Checked on the record as stored: a setTimeout or a stop may have come since the schedule was read.
    if (!record || !lc?.expiresAt || record.status !== 'running' || Date.parse(lc.expiresAt) > Date.now()) return;
    let action = lc.onTimeout;
    // A driver that cannot pause stops instead (said in the event and the log).
    if (action === 'pause' && !(this.opts.driver && canPause(this.opts.driver))) action = 'stop';
    this.opts.log.info({ sandbox: id, expiresAt: lc.expiresAt, action }, `sandbox ${record.name}: timeout reached; ${action}`);
    this.#events.emit({ sandboxId: id, orgId: record.orgId, type: 'sandbox.timeout', data: { timeout: lc.timeout, expiresAt: lc.expiresAt, action } });
    // Checked again under the sandbox's lock: a new timeout or a stop that came meanwhile wins.
    const expired = (fresh: SandboxRecord) => fresh.status === 'running' && fresh.lifecycle?.expiresAt === lc.expiresAt;
    if (action === 'delete') await this.opts.service.deleteByTimeout(record, expired);
    else await this.opts.service.endByPolicy(record, action, 'timeout', expired);
  }

  /**
   * Whether the sandbox has been quiet for its idle period, from the cheapest evidence up: API
   * calls (a timestamp), open streams and connections (a counter), CPU above the threshold (the
   * cgroup's or VM process's counter, read on the host), then commands started through the API
   * still running (its agent's process list). The agent is asked only about its own sandbox, and
   * what it says can only keep that sandbox awake ("running") or let that sandbox be idled
   * ("nothing runs"); it never drives anything else. An agent that does not answer keeps its
   * sandbox awake this round.
   */
  async #checkIdle(id: string, e: Entry, now: number): Promise<void> {
    const idle = e.lifecycle.idle!;
    const { activity } = this.opts;
    if (activity.held(e.orgId, id)) return activity.touch(id, now);
    const last = Math.max(activity.lastActivity(id) ?? 0, this.#startedAt);
    const quietMs = now - last;
    // The host's CPU counter is read only in the last ticks before the idle period ends.
    if (quietMs < idle.after * 1000 - 2 * this.opts.tickMs) return;
    const cpu = await this.#cpuUse(id, now);
    if (cpu === 'busy') return activity.touch(id, now);
    if (cpu === 'unknown' || quietMs < idle.after * 1000) return;
    const record = await this.#fresh(id, e);
    if (!record || record.status !== 'running' || !record.lifecycle?.idle) return;
    if (await this.#commandsRunning(record)) return activity.touch(id, Date.now());
    // Activity may have come while the agent was asked.
    if (activity.held(e.orgId, id) || (activity.lastActivity(id) ?? 0) > last) return;
    const action = record.lifecycle.idle.action === 'pause' && this.opts.driver && canPause(this.opts.driver) ? 'pause' : 'stop';
    const lastActivityAt = new Date(last).toISOString();
    this.opts.log.info({ sandbox: id, after: idle.after, lastActivityAt, action }, `sandbox ${record.name}: idle for ${idle.after} s; ${action}`);
    this.#events.emit({ sandboxId: id, orgId: record.orgId, type: 'sandbox.idle', data: { after: record.lifecycle.idle.after, action, lastActivityAt } });
    // Checked again under the sandbox's lock: activity or a policy change that came meanwhile wins.
    const stillIdle = (fresh: SandboxRecord) =>
      fresh.status === 'running' && fresh.lifecycle?.idle?.after === idle.after && !activity.held(fresh.orgId, id) && (activity.lastActivity(id) ?? 0) <= last;
    await this.opts.service.endByPolicy(record, action, 'idle', stillIdle);
  }

  /**
   * The sandbox's CPU use since the previous sample against SANDBOX_IDLE_CPU_PERCENT, read on the
   * host (cgroup or VM process). `unknown` without a recent previous sample (the first of a quiet
   * spell, or a late tick): the sandbox is neither idled nor counted active on it. A driver that
   * cannot read usage, or a sandbox whose counter is gone, is `quiet`.
   */
  async #cpuUse(id: string, now: number): Promise<'busy' | 'quiet' | 'unknown'> {
    const driver = this.opts.driver;
    if (!driver || !reportsUsage(driver)) return 'quiet';
    const usage = await driver.hostUsage(id).catch(() => null);
    if (!usage) return 'quiet';
    const prev = this.#cpu.get(id);
    this.#cpu.set(id, { seconds: usage.cpuSeconds, at: now });
    if (!prev || now <= prev.at || now - prev.at > 3 * this.opts.tickMs) return 'unknown';
    const percent = ((usage.cpuSeconds - prev.seconds) / ((now - prev.at) / 1000)) * 100;
    return percent > this.opts.idleCpuPercent ? 'busy' : 'quiet';
  }

  /** Whether a command started through the API still runs, by the sandbox's own agent (see `#checkIdle`). */
  async #commandsRunning(record: SandboxRecord): Promise<boolean> {
    try {
      const agents = this.opts.service.agents;
      const processes = await agents.call(record, (agent) => agent.process.list.query(undefined, { context: { timeoutMs: PROCESS_LIST_TIMEOUT_MS } }));
      return processes.some((p) => p.running);
    } catch (err) {
      this.opts.log.debug({ sandbox: record.id, err: (err as Error).message }, 'idle check: the agent did not list its processes; not idled this round');
      return true;
    }
  }
}

/** The expiry a timeout set now gives: from now while the sandbox runs; none while it does not (the clock starts at its next start or resume). */
function expiry(record: SandboxRecord, timeout: number): string | null {
  return timeout > 0 && record.status === 'running' ? new Date(Date.now() + timeout * 1000).toISOString() : null;
}
