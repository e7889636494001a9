import type { Logger } from 'pino';
import type { WatchInput, WatchMessage, WatchSessionInfo } from '../../shared/index.js';
import { NotFoundError, TooManyRequestsError } from '../errors.js';
import type { SandboxRecord } from '../store/types.js';
import type { Principal } from './auth-service.js';
import type { SandboxService } from './sandbox-service.js';
import type { SandboxEventSink } from './sandbox-events.js';

/** How long the agent has to confirm a new watch (the path exists, the watch is set). */
export const WATCH_READY_TIMEOUT_MS = 30_000;

export interface SequencedMessage {
  seq: number;
  message: WatchMessage;
}

export type WatchListener = (m: SequencedMessage | { ended: string }) => void;

const SESSION_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** A session the server knows of: which org and sandbox it belongs to (for the org's cap). */
interface KnownSession {
  orgId: string;
  sandboxId: string;
  /** The last `overflow` reported as a `watch.overflow` event: each client replays the kept ones, reported once. */
  overflowSeq?: number;
}

/**
 * File-watch sessions. The sandbox's agent owns them (a chokidar watch, its numbered events and
 * the last 1,000 of them, an idle timer on the sandbox's awake time), as it owns terminals: a
 * session lives through pauses and server restarts and is re-attached by its id; every client is
 * its own subscription to the agent, resumed after the last event it saw. A session ends when its
 * sandbox stops or is deleted, when its directory is deleted, or after WATCH_IDLE_TIMEOUT_SEC of
 * the sandbox's running time with no client attached.
 *
 * The server only remembers which sessions it has seen per org, to hold an org to
 * `maxSessionsPerOrg`; after a restart it learns them again as they are attached (and asks the
 * agents when an org seems to be at its cap, so ended sessions stop counting).
 */
export class WatchService {
  readonly #known = new Map<string, KnownSession>();

  /** Sessions being started, per org: they count against the org's cap like live ones. */
  readonly #starting = new Map<string, number>();

  /** Each attached client's way to end its subscription, by sandbox (ended when the sandbox stops). */
  readonly #attached = new Map<string, Set<(reason: string) => void>>();

  constructor(private readonly deps: { sandboxes: SandboxService; maxSessionsPerOrg: number; log: Logger; events?: SandboxEventSink }) {}

  /**
   * Starts watching; resolves once the watch is established (the path exists). An org holds at
   * most `maxSessionsPerOrg` sessions (429 past it); the agent has `WATCH_READY_TIMEOUT_MS` to
   * confirm the watch, else the call fails with 502. A caller that leaves first (`signal`) leaves
   * no session behind.
   */
  async start(principal: Principal, input: WatchInput, signal?: AbortSignal): Promise<{ sessionId: string }> {
    const record = await this.deps.sandboxes.running(principal, input.id);
    let held = this.#held(record.orgId);
    if (held >= this.deps.maxSessionsPerOrg) {
      await this.#refresh(principal);
      held = this.#held(record.orgId);
    }
    if (held >= this.deps.maxSessionsPerOrg) {
      throw new TooManyRequestsError(
        `Too many file-watch sessions: this organization holds ${held} of ${this.deps.maxSessionsPerOrg} (ORG_MAX_WATCH_SESSIONS); a session ends when its sandbox stops or WATCH_IDLE_TIMEOUT_SEC after its last client left`,
      );
    }
    this.#starting.set(record.orgId, (this.#starting.get(record.orgId) ?? 0) + 1);
    try {
      const agents = this.deps.sandboxes.agents;
      const started = await agents.call(record, (a) =>
        a.files.watchStart.mutate({ path: input.path, recursive: input.recursive, ignoreHidden: input.ignoreHidden }, { context: { timeoutMs: WATCH_READY_TIMEOUT_MS } }),
      );
      if (signal?.aborted) {
        await agents.call(record, (a) => a.files.watchStop.mutate({ sessionId: started.sessionId })).catch(() => {});
        throw new Error('the caller left before the watch started');
      }
      this.#known.set(started.sessionId, { orgId: record.orgId, sandboxId: record.id });
      return { sessionId: started.sessionId };
    } finally {
      const n = (this.#starting.get(record.orgId) ?? 1) - 1;
      if (n > 0) this.#starting.set(record.orgId, n);
      else this.#starting.delete(record.orgId);
    }
  }

  #held(orgId: string): number {
    let n = this.#starting.get(orgId) ?? 0;
    for (const s of this.#known.values()) if (s.orgId === orgId) n++;
    return n;
  }

  /** Asks the agents of the org's known sessions which still exist; the rest are forgotten. */
  async #refresh(principal: Principal): Promise<void> {
    const orgId = principal.orgId;
    const sandboxIds = new Set([...this.#known.values()].filter((s) => s.orgId === orgId).map((s) => s.sandboxId));
    await Promise.all(
      [...sandboxIds].map(async (sandboxId) => {
        const record = await this.deps.sandboxes.record(principal, sandboxId).catch(() => null);
        if (!record) return this.endForSandbox(sandboxId);
        // A sandbox that cannot answer (paused, in a transition) keeps its sessions counted.
        if (record.status !== 'running' || this.deps.sandboxes.agents.phaseOf(sandboxId)) return;
        await this.#listed(record).catch(() => {});
      }),
    );
  }

  /** The sessions the sandbox's agent lists; the server's record of the sandbox's sessions follows it. */
  async #listed(record: SandboxRecord): Promise<WatchSessionInfo[]> {
    const sessions = await this.deps.sandboxes.agents.call(record, (a) => a.files.watchList.query());
    for (const [id, s] of this.#known) if (s.sandboxId === record.id && !sessions.some((x) => x.id === id)) this.#known.delete(id);
    for (const x of sessions) this.#known.set(x.id, { ...this.#known.get(x.id), orgId: record.orgId, sandboxId: record.id });
    return sessions;
  }

  /** The sandbox's sessions, as its agent keeps them (the server learns them for the org's cap). */
  async list(principal: Principal, sandboxId: string): Promise<{ sessions: WatchSessionInfo[] }> {
    return { sessions: await this.#listed(await this.deps.sandboxes.running(principal, sandboxId)) };
  }

  /** Throws NotFound unless `sessionId` is a live session of the caller's sandbox (learning it after a restart). */
  async assertSession(principal: Principal, sandboxId: string, sessionId: string): Promise<void> {
    // Session ids are UUIDs: anything else names no session, whatever the sandbox (no agent is asked).
    const listed = SESSION_ID.test(sessionId) && (await this.list(principal, sandboxId)).sessions.some((s) => s.id === sessionId);
    if (!listed) throw new NotFoundError(`Watch session ${sessionId} not found (it ended, or belongs to another sandbox); start a new one`, { code: 'SESSION_NOT_FOUND' });
  }

  /**
   * Attaches a listener to a session of the caller's sandbox (checked with `assertSession` first),
   * replaying what the session kept after `afterSeq` (all it kept for 0), then live; the listener
   * hears `ended` once when the session or its subscription ends. Returns the detach function.
   */
  attach(principal: Principal, sandboxId: string, sessionId: string, listener: WatchListener, afterSeq = 0): () => void {
    const agents = this.deps.sandboxes.agents;
    const since = agents.epoch(sandboxId);
    let ended = false;
    const controller = new AbortController();
    const end = (reason: string) => {
      if (ended) return;
      ended = true;
      controller.abort();
      this.#attached.get(sandboxId)?.delete(end);
      listener({ ended: reason });
    };
    let clients = this.#attached.get(sandboxId);
    if (!clients) this.#attached.set(sandboxId, (clients = new Set()));
    clients.add(end);
    const ref = { id: sandboxId, orgId: principal.orgId };
    agents.get(sandboxId).files.watchEvents.subscribe(
      { sessionId, lastEventId: String(afterSeq) },
      {
        signal: controller.signal,
        onData: ({ data }) => {
          if (ended) return;
          if (data.type === 'ended') {
            this.#known.delete(sessionId);
            end(data.reason);
            return;
          }
          data.events.forEach((message, i) => {
            const seq = data.first + i;
            if (message.type === 'overflow') this.#reportOverflow(principal.orgId, sandboxId, sessionId, seq, message.dropped);
            listener({ seq, message });
          });
        },
        onError: (err) => {
          void agents.failure(ref, err, since).then((mapped) => {
            if (mapped instanceof NotFoundError) this.#known.delete(sessionId);
            end(`the watch stopped: ${(mapped as Error).message}`);
          });
        },
        onComplete: () => end('the watch ended'),
        onStopped: () => end('the watch ended'),
      },
    );
    return () => {
      if (ended) return;
      ended = true;
      controller.abort();
      this.#attached.get(sandboxId)?.delete(end);
    };
  }

  /** A `watch.overflow` event, once per overflow of a session however many clients replay it. */
  #reportOverflow(orgId: string, sandboxId: string, sessionId: string, seq: number, dropped: number): void {
    const known = this.#known.get(sessionId);
    if (known) {
      if (seq <= (known.overflowSeq ?? 0)) return;
      known.overflowSeq = seq;
    }
    this.deps.events?.emit({ sandboxId, orgId, type: 'watch.overflow', data: { sessionId, dropped } });
  }

  /** Forgets the sessions of a sandbox that stopped or was deleted, and ends its clients. */
  endForSandbox(sandboxId: string): void {
    for (const [id, s] of this.#known) if (s.sandboxId === sandboxId) this.#known.delete(id);
    const clients = this.#attached.get(sandboxId);
    this.#attached.delete(sandboxId);
    for (const end of clients ?? []) end('the sandbox stopped');
  }

  /** Ends every client (the server is shutting down); the sessions stay in their agents. */
  closeAll(): void {
    for (const [sandboxId, clients] of [...this.#attached]) {
      this.#attached.delete(sandboxId);
      for (const end of clients) end('the server is shutting down');
    }
  }
}
