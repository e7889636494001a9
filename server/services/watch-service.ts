import type { Logger } from 'pino';
import type { WatchInput, WatchMessage, WatchSessionInfo } from '../../shared/index.js';
import { AgentProtocolError } from '../agent-client/agent-connection.js';
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

/** How long an org's first watch start waits for its sandboxes to list their sessions (see `#learnOrg`). */
const LEARN_WAIT_MS = 2000;

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
 * `maxSessionsPerOrg`; after a restart it learns them again by asking the agents of all the org's
 * running sandboxes at the org's first watch start (and again when an org seems to be at its cap,
 * so ended sessions stop counting).
 *
 * What an agent lists is tenant input: a listing longer than `maxSessionsPerOrg` (more than an
 * honest agent can hold, since every session was started through this cap) fails the call as a
 * lying agent's, and the server's record follows a listing in time linear in its length (indexed
 * by sandbox and org, no pairwise comparison), never taking over a session known for another
 * sandbox.
 */
export class WatchService {
  readonly #known = new Map<string, KnownSession>();
  /** The ids in `#known`, by sandbox. */
  readonly #bySandbox = new Map<string, Set<string>>();
  /** The count of `#known` sessions, by org. */
  readonly #perOrg = new Map<string, number>();
  /** Orgs whose sandboxes were asked for their sessions since this server started (learning them after a restart). */
  readonly #learnedOrgs = new Set<string>();

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
    if (!this.#learnedOrgs.has(record.orgId)) await this.#learnOrg(principal);
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
      this.#learn(started.sessionId, record.orgId, record.id);
      return { sessionId: started.sessionId };
    } finally {
      const n = (this.#starting.get(record.orgId) ?? 1) - 1;
      if (n > 0) this.#starting.set(record.orgId, n);
      else this.#starting.delete(record.orgId);
    }
  }

  #held(orgId: string): number {
    return (this.#starting.get(orgId) ?? 0) + (this.#perOrg.get(orgId) ?? 0);
  }

  #learn(sessionId: string, orgId: string, sandboxId: string): void {
    if (this.#known.has(sessionId)) return;
    this.#known.set(sessionId, { orgId, sandboxId });
    let ids = this.#bySandbox.get(sandboxId);
    if (!ids) this.#bySandbox.set(sandboxId, (ids = new Set()));
    ids.add(sessionId);
    this.#perOrg.set(orgId, (this.#perOrg.get(orgId) ?? 0) + 1);
  }

  #forget(sessionId: string): void {
    const s = this.#known.get(sessionId);
    if (!s) return;
    this.#known.delete(sessionId);
    const ids = this.#bySandbox.get(s.sandboxId);
    ids?.delete(sessionId);
    if (ids?.size === 0) this.#bySandbox.delete(s.sandboxId);
    const n = (this.#perOrg.get(s.orgId) ?? 1) - 1;
    if (n > 0) this.#perOrg.set(s.orgId, n);
    else this.#perOrg.delete(s.orgId);
  }

  /**
   * After a restart the server knows none of the sessions the agents kept: the first watch start
   * of an org asks every running sandbox of the org for its sessions, so they count at once.
   */
  async #learnOrg(principal: Principal): Promise<void> {
    this.#learnedOrgs.add(principal.orgId);
    const running = await this.deps.sandboxes.runningIds(principal).catch(() => []);
    // An agent slow to answer delays this start by LEARN_WAIT_MS at most; its sessions count once it answers.
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.#ask(principal, new Set(running)), new Promise<void>((resolve) => (timer = setTimeout(resolve, LEARN_WAIT_MS)))]);
    clearTimeout(timer);
  }

  /** Asks the agents of the org's known sessions which still exist; the rest are forgotten. */
  async #refresh(principal: Principal): Promise<void> {
    const orgId = principal.orgId;
    const sandboxIds = new Set<string>();
    for (const [sandboxId, ids] of this.#bySandbox) {
      const first = ids.values().next().value;
      if (first !== undefined && this.#known.get(first)?.orgId === orgId) sandboxIds.add(sandboxId);
    }
    await this.#ask(principal, sandboxIds);
  }

  async #ask(principal: Principal, sandboxIds: ReadonlySet<string>): Promise<void> {
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
    const max = this.deps.maxSessionsPerOrg;
    const sessions = await this.deps.sandboxes.agents.call(record, async (a) => {
      const listed = await a.files.watchList.query();
      if (listed.length > max) throw new AgentProtocolError(`the sandbox ${record.id} agent listed ${listed.length} watch sessions, more than the ${max} an organization may hold (ORG_MAX_WATCH_SESSIONS)`);
      return listed;
    });
    const listedIds = new Set(sessions.map((x) => x.id));
    for (const id of [...(this.#bySandbox.get(record.id) ?? [])]) if (!listedIds.has(id)) this.#forget(id);
    // A session known for another sandbox stays that sandbox's (an agent naming it takes nothing over).
    for (const x of sessions) this.#learn(x.id, record.orgId, record.id);
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
            this.#forget(sessionId);
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
            if (mapped instanceof NotFoundError) this.#forget(sessionId);
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
    for (const id of [...(this.#bySandbox.get(sandboxId) ?? [])]) this.#forget(id);
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
