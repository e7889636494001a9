/**
 * A sandbox's event stream: what happened to it, in order, each with an id that only grows. Services
 * report into a `SandboxEventSink` without waiting: reporting never delays or fails the operation
 * that caused the event.
 */
import type { Logger } from 'pino';
import type { SandboxEvent, SandboxEventPage } from '../../shared/schemas/events.js';
import { ConflictError, InvalidInputError } from '../errors.js';
import type { SandboxEventRecord, SandboxEventRepository } from '../store/types.js';
import type { Principal } from './auth-service.js';

/** Every kind of event a sandbox's stream carries. */
export const SANDBOX_EVENT_TYPES = [
  'sandbox.created',
  'sandbox.started',
  'sandbox.paused',
  'sandbox.resumed',
  'sandbox.stopped',
  'sandbox.timeout',
  'sandbox.timeout_changed',
  'sandbox.idle',
  'sandbox.oom_killed',
  'sandbox.error',
  'sandbox.deleted',
  'process.started',
  'process.exited',
  'terminal.opened',
  'terminal.closed',
  'watch.overflow',
  'port.opened',
  'port.closed',
  'network.policy_changed',
  'network.egress_cut',
  'events.dropped',
] as const;
export type SandboxEventType = (typeof SANDBOX_EVENT_TYPES)[number];

/**
 * Lifecycle events: always admitted (no per-sandbox rate bound) and kept by retention
 * LIFECYCLE_RETENTION_FACTOR times longer than the others, so a flood of port or process events
 * can neither keep them out of the stream nor push them out of it soon.
 */
export const LIFECYCLE_EVENT_TYPES: readonly SandboxEventType[] = SANDBOX_EVENT_TYPES.filter((t) => t.startsWith('sandbox.'));
const LIFECYCLE = new Set<string>(LIFECYCLE_EVENT_TYPES);
/** Lifecycle events stay while within this many times EVENTS_RETENTION of the newest id. */
export const LIFECYCLE_RETENTION_FACTOR = 10;

/** One event as a service reports it; the sink assigns its id and time. */
export interface SandboxEventInput {
  sandboxId: string;
  orgId: string;
  type: SandboxEventType;
  data?: Record<string, unknown>;
}

/** Where services report events. `emit` returns at once and never throws. */
export interface SandboxEventSink {
  emit(event: SandboxEventInput): void;
  /**
   * Drops the sandbox's stream once every event reported before this call is written (a deleted
   * sandbox's, also one its timeout deleted: its tombstone answers 410 for the stream too, so
   * nothing could read the events kept).
   */
  deleteForSandbox?(sandboxId: string): void;
}

/** A sink that drops everything (services built without an event stream). */
export const noEvents: SandboxEventSink = { emit() {} };

/** Past this many characters of JSON an event's data is replaced by `{ truncated: true }`. */
const MAX_DATA_CHARS = 16 * 1024;
/** Events a subscriber may fall behind the live stream before it re-reads them from the store. */
const LIVE_BACKLOG = 1000;
/** Events read from the store at a time while a subscriber catches up. */
const REPLAY_PAGE = 500;
/** Writes of one event retried after another writer took its id. */
const MAX_ID_CONFLICTS = 5;
/** Deleted sandboxes remembered, so that a report arriving after the deletion starts no new stream. */
const MAX_REMEMBERED_DELETIONS = 10_000;

export interface SandboxEventServiceDeps {
  repository: SandboxEventRepository;
  /** The caller's sandbox, or the 404 another org's (or a missing one) answers. */
  authorize(principal: Principal, sandboxId: string): Promise<unknown>;
  log: Logger;
  /** EVENTS_RETENTION: the most events kept per sandbox (older ones are pruned in the background). */
  retention: number;
  /** EVENTS_QUEUE_MAX: events waiting to be written, across sandboxes; past it new ones are dropped and counted. */
  maxQueued: number;
  /** How often sandboxes that got events are pruned to `retention`. */
  pruneIntervalMs: number;
  /**
   * EVENTS_SANDBOX_RATE and EVENTS_SANDBOX_BURST: a sandbox's non-lifecycle events are admitted
   * at `perSecond` on average, `burst` at once; past it they are counted and reported as one
   * `events.dropped` event once the sandbox has a token again.
   */
  rate: { perSecond: number; burst: number };
}

/** One sandbox's token bucket, and what it dropped since its last `events.dropped`. */
interface Bucket {
  tokens: number;
  at: number;
  orgId: string;
  dropped: Record<string, number>;
  total: number;
  timer: NodeJS.Timeout | null;
}

type LaneOp = { kind: 'event'; input: SandboxEventInput; at: Date } | { kind: 'delete' };

/** One sandbox's writes: in order, one at a time; `nextSeq` is known once read from the store. */
interface Lane {
  ops: LaneOp[];
  writing: boolean;
  nextSeq: number | null;
}

type Listener = (event: SandboxEventRecord) => void;

/**
 * The store-backed event stream. `emit` queues the event on its sandbox's lane and returns; the
 * lane writes its events one after another, each with the next id of the sandbox (read from the
 * store's last one when the lane starts, so ids continue across restarts). The store's unique
 * `(sandboxId, seq)` key decides if another writer took an id: the lane re-reads the last id and
 * writes again. Subscribers hear an event only once it is stored, so replaying the store and then
 * following the live events (deduplicated by id) leaves no gap and repeats nothing.
 */
export class SandboxEventService implements SandboxEventSink {
  readonly #lanes = new Map<string, Lane>();
  readonly #listeners = new Map<string, Set<Listener>>();
  readonly #written = new Set<Listener>();
  /** Sandboxes that got events since the last prune. */
  readonly #touched = new Set<string>();
  readonly #idle = new Set<() => void>();
  /** Sandboxes whose stream was deleted (ids are never reused): a late report for one is dropped, not a new stream. */
  readonly #deleted = new Set<string>();
  readonly #buckets = new Map<string, Bucket>();
  #queued = 0;
  #dropped = 0;
  /** Drops since the store last took a write: logged at the first, and when writes recover. */
  #droppedSinceOk = 0;
  readonly #timer: NodeJS.Timeout;

  constructor(private readonly deps: SandboxEventServiceDeps) {
    this.#timer = setInterval(() => void this.prune(), deps.pruneIntervalMs);
    this.#timer.unref();
  }

  /** Events dropped since start (queue full, or the store refused them). */
  get dropped(): number {
    return this.#dropped;
  }

  emit(input: SandboxEventInput): void {
    try {
      if (this.#deleted.has(input.sandboxId)) return;
      const lifecycle = LIFECYCLE.has(input.type);
      if (!lifecycle && !this.#admit(input)) return;
      this.#queue(input, lifecycle);
    } catch (err) {
      this.deps.log.error({ err, sandbox: input?.sandboxId }, 'could not queue a sandbox event');
    }
  }

  /**
   * Queues the event unless the queue is full: EVENTS_QUEUE_MAX for the rate-bounded events, and
   * twice that for lifecycle ones, so a queue full of other events never keeps a lifecycle event out.
   */
  #queue(input: SandboxEventInput, lifecycle: boolean): void {
    const max = lifecycle ? 2 * this.deps.maxQueued : this.deps.maxQueued;
    if (this.#queued >= max) return this.#drop(input, `EVENTS_QUEUE_MAX (${this.deps.maxQueued}) events are waiting to be written`);
    this.#queued++;
    this.#enqueue(input.sandboxId, { kind: 'event', input, at: new Date() });
  }

  /**
   * Spends one of the sandbox's tokens; without one the event is counted for the sandbox's next
   * `events.dropped`, which goes out (once) when a token is back.
   */
  #admit(input: SandboxEventInput): boolean {
    const { perSecond, burst } = this.deps.rate;
    const now = Date.now();
    let b = this.#buckets.get(input.sandboxId);
    if (!b) this.#buckets.set(input.sandboxId, (b = { tokens: burst, at: now, orgId: input.orgId, dropped: {}, total: 0, timer: null }));
    b.tokens = Math.min(burst, b.tokens + ((now - b.at) / 1000) * perSecond);
    b.at = now;
    if (b.tokens >= 1 && !b.timer) {
      b.tokens--;
      return true;
    }
    b.dropped[input.type] = (b.dropped[input.type] ?? 0) + 1;
    b.total++;
    if (!b.timer) {
      const bucket = b;
      bucket.timer = setTimeout(() => this.#reportDropped(input.sandboxId, bucket), Math.max(1000, Math.ceil(1000 / perSecond)));
      bucket.timer.unref();
    }
    return false;
  }

  #reportDropped(sandboxId: string, b: Bucket): void {
    b.timer = null;
    if (this.#buckets.get(sandboxId) !== b || b.total === 0) return;
    const data = { dropped: b.total, types: b.dropped, reason: `more than EVENTS_SANDBOX_BURST (${this.deps.rate.burst}) events at once or EVENTS_SANDBOX_RATE (${this.deps.rate.perSecond}) a second` };
    b.dropped = {};
    b.total = 0;
    this.#queue({ sandboxId, orgId: b.orgId, type: 'events.dropped', data }, false);
  }

  deleteForSandbox(sandboxId: string): void {
    const bucket = this.#buckets.get(sandboxId);
    if (bucket?.timer) clearTimeout(bucket.timer);
    this.#buckets.delete(sandboxId);
    this.#deleted.add(sandboxId);
    // Bounded: the oldest are forgotten first (a Set iterates in insertion order).
    if (this.#deleted.size > MAX_REMEMBERED_DELETIONS) this.#deleted.delete(this.#deleted.values().next().value!);
    this.#enqueue(sandboxId, { kind: 'delete' });
  }

  /** Runs `listener` for every event once it is stored (webhook deliveries). */
  onWritten(listener: Listener): void {
    this.#written.add(listener);
  }

  /** One page of the caller's sandbox's events with ids above `after`, oldest first. */
  async list(principal: Principal, sandboxId: string, after = 0, limit = 100): Promise<SandboxEventPage> {
    await this.deps.authorize(principal, sandboxId);
    const rows = await this.deps.repository.listAfter(sandboxId, after, limit + 1);
    const events = rows.slice(0, limit).map(toSandboxEvent);
    return { events, next: events.at(-1)?.id ?? after, hasMore: rows.length > limit };
  }

  /**
   * The caller's sandbox's events after `after`, then live ones as they are stored, until
   * `sandbox.deleted` or `signal`. Authorized before it resolves, so a refusal comes before any
   * response is started.
   */
  async open(principal: Principal, sandboxId: string, after: number, signal?: AbortSignal): Promise<AsyncGenerator<SandboxEvent>> {
    await this.deps.authorize(principal, sandboxId);
    return this.#follow(sandboxId, after, signal);
  }

  /**
   * Subscribes first, then replays the store after `after`; live events at or below the last
   * replayed id are skipped. A subscriber more than LIVE_BACKLOG events behind drops its live
   * backlog and replays from the store again, so a slow reader costs store reads, not memory.
   */
  async *#follow(sandboxId: string, after: number, signal?: AbortSignal): AsyncGenerator<SandboxEvent> {
    let last = after;
    let live: SandboxEventRecord[] = [];
    let behind = false;
    let wake: (() => void) | null = null;
    const listener: Listener = (e) => {
      if (live.length >= LIVE_BACKLOG) {
        live = [];
        behind = true;
      } else live.push(e);
      wake?.();
    };
    const onAbort = () => wake?.();
    let listeners = this.#listeners.get(sandboxId);
    if (!listeners) this.#listeners.set(sandboxId, (listeners = new Set()));
    listeners.add(listener);
    signal?.addEventListener('abort', onAbort);
    try {
      let replay = true;
      while (!signal?.aborted) {
        if (replay || behind) {
          replay = behind = false;
          live = [];
          for (;;) {
            const page = await this.deps.repository.listAfter(sandboxId, last, REPLAY_PAGE);
            for (const r of page) {
              last = r.seq;
              yield toSandboxEvent(r);
              if (r.type === 'sandbox.deleted') return;
            }
            if (page.length < REPLAY_PAGE || signal?.aborted) break;
          }
          continue;
        }
        const next = live.shift();
        if (!next) {
          await new Promise<void>((resolve) => (wake = resolve));
          wake = null;
          continue;
        }
        if (next.seq <= last) continue;
        last = next.seq;
        yield toSandboxEvent(next);
        if (next.type === 'sandbox.deleted') return;
      }
    } finally {
      listeners.delete(listener);
      if (listeners.size === 0 && this.#listeners.get(sandboxId) === listeners) this.#listeners.delete(sandboxId);
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Keeps the newest `retention` events of every sandbox that got events since the last prune. */
  async prune(): Promise<void> {
    const ids = [...this.#touched];
    this.#touched.clear();
    const now = Date.now();
    for (const [id, b] of this.#buckets) {
      // A full bucket with nothing to report is the same as none.
      if (!b.timer && b.tokens + ((now - b.at) / 1000) * this.deps.rate.perSecond >= this.deps.rate.burst) this.#buckets.delete(id);
    }
    const failed = (id: string) => (err: Error) => void this.deps.log.warn({ sandbox: id, err: err.message }, 'could not prune sandbox events');
    for (const id of ids) {
      const next = this.#lanes.get(id)?.nextSeq;
      if (next == null) continue;
      const upTo = next - 1 - this.deps.retention;
      if (upTo > 0) await this.deps.repository.deleteUpTo(id, upTo, LIFECYCLE_EVENT_TYPES).catch(failed(id));
      const lifecycleUpTo = next - 1 - LIFECYCLE_RETENTION_FACTOR * this.deps.retention;
      if (lifecycleUpTo > 0) await this.deps.repository.deleteUpTo(id, lifecycleUpTo).catch(failed(id));
    }
  }

  /**
   * Removes the streams of sandboxes that have no record (`known`: every sandbox id the store has),
   * left when a server stopped between deleting a sandbox and deleting its stream. Run at startup.
   */
  async removeOrphans(known: ReadonlySet<string>, exists?: (sandboxId: string) => Promise<boolean>): Promise<number> {
    let removed = 0;
    for (const id of await this.deps.repository.sandboxIds()) {
      if (known.has(id)) continue;
      // Read again right before: a sandbox created since `known` was listed (by another fleet node) keeps its first events.
      if (exists && (await exists(id))) continue;
      await this.deps.repository.deleteForSandbox(id);
      this.#deleted.add(id);
      removed++;
    }
    if (removed) this.deps.log.warn({ removed }, `removed the events of ${removed} deleted sandboxes`);
    return removed;
  }

  /** Resolves once every event queued so far is written (or dropped), or after `timeoutMs`. */
  async flush(timeoutMs = 5000): Promise<void> {
    if (this.#busy() === 0) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(done, timeoutMs);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.#idle.add(done);
    });
  }

  /** Stops pruning and waits (bounded) for queued events to be written. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.flush();
  }

  #busy(): number {
    let n = 0;
    for (const lane of this.#lanes.values()) if (lane.writing || lane.ops.length) n++;
    return n;
  }

  #enqueue(sandboxId: string, op: LaneOp): void {
    let lane = this.#lanes.get(sandboxId);
    if (!lane) this.#lanes.set(sandboxId, (lane = { ops: [], writing: false, nextSeq: null }));
    lane.ops.push(op);
    if (!lane.writing) void this.#write(sandboxId, lane);
  }

  async #write(sandboxId: string, lane: Lane): Promise<void> {
    lane.writing = true;
    let conflicts = 0;
    try {
      while (lane.ops.length) {
        const op = lane.ops[0]!;
        if (op.kind === 'delete') {
          await this.deps.repository.deleteForSandbox(sandboxId).catch((err: Error) => this.deps.log.warn({ sandbox: sandboxId, err: err.message }, 'could not delete sandbox events'));
          lane.ops.shift();
          lane.nextSeq = null;
          this.#touched.delete(sandboxId);
          continue;
        }
        try {
          lane.nextSeq ??= (await this.deps.repository.lastSeq(sandboxId)) + 1;
          const record = toRecord(op, lane.nextSeq);
          await this.deps.repository.append(record);
          lane.nextSeq++;
          conflicts = 0;
          this.#stored(record);
        } catch (err) {
          if (err instanceof ConflictError && ++conflicts <= MAX_ID_CONFLICTS) {
            lane.nextSeq = null; // another writer took it: continue after the store's last id
            continue;
          }
          conflicts = 0;
          this.#drop(op.input, (err as Error).message);
        }
        lane.ops.shift();
        this.#queued--;
      }
    } finally {
      lane.writing = false;
      if (lane.nextSeq === null && lane.ops.length === 0 && this.#lanes.get(sandboxId) === lane) this.#lanes.delete(sandboxId);
      if (this.#busy() === 0) {
        for (const done of this.#idle) done();
        this.#idle.clear();
      }
    }
  }

  #stored(record: SandboxEventRecord): void {
    if (this.#droppedSinceOk) {
      this.deps.log.info({ dropped: this.#droppedSinceOk }, `sandbox events are being written again (${this.#droppedSinceOk} were dropped)`);
      this.#droppedSinceOk = 0;
    }
    this.#touched.add(record.sandboxId);
    for (const l of [...(this.#listeners.get(record.sandboxId) ?? []), ...this.#written]) {
      try {
        l(record);
      } catch (err) {
        this.deps.log.error({ err, sandbox: record.sandboxId }, 'a sandbox event listener failed');
      }
    }
  }

  #drop(input: SandboxEventInput, reason: string): void {
    this.#dropped++;
    if (this.#droppedSinceOk++ === 0) this.deps.log.warn({ sandbox: input.sandboxId, type: input.type, reason }, `dropping sandbox events until they can be written: ${reason}`);
  }
}

function toRecord(op: Extract<LaneOp, { kind: 'event' }>, seq: number): SandboxEventRecord {
  const { sandboxId, orgId, type, data = {} } = op.input;
  const fits = JSON.stringify(data).length <= MAX_DATA_CHARS;
  return { sandboxId, orgId, seq, type, data: fits ? data : { truncated: true }, createdAt: op.at };
}

/** The wire shape of a stored event. */
export function toSandboxEvent(r: SandboxEventRecord): SandboxEvent {
  return { id: r.seq, sandboxId: r.sandboxId, type: r.type, data: r.data, createdAt: r.createdAt.toISOString() };
}

/**
 * A Last-Event-ID (SSE) or tRPC `lastEventId`: an id this stream sent (decimal), or none to start
 * from the oldest event kept.
 */
export function parseEventId(value: string | null | undefined): number {
  if (value === null || value === undefined || value === '') return 0;
  if (!/^\d{1,15}$/.test(value)) throw new InvalidInputError(`Invalid Last-Event-ID ${JSON.stringify(value.slice(0, 64))}: send the id of an event this stream sent (a decimal number), or none to start`);
  return Number(value);
}
