import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { WatchInput, WatchMessage } from '../../shared/index.js';
import { AgentUnavailableError } from '../agent-client/agent-clients.js';
import { NotFoundError, TooManyRequestsError } from '../errors.js';
import type { SandboxRecord } from '../store/types.js';
import type { Principal } from './auth-service.js';
import type { SandboxService } from './sandbox-service.js';

/** Messages a session keeps for clients that attach late or resume. */
const HISTORY = 1000;
/** …and at most this many bytes of them (paths count), so a lying agent's long paths stay bounded. */
const HISTORY_BYTES = 1024 * 1024;
/** How long the agent has to confirm a new watch (the path exists, the watch is set). */
export const WATCH_READY_TIMEOUT_MS = 30_000;

export interface SequencedMessage {
  seq: number;
  message: WatchMessage;
}

export type WatchListener = (m: SequencedMessage | { ended: string }) => void;

interface Session {
  id: string;
  orgId: string;
  sandboxId: string;
  history: SequencedMessage[];
  historyBytes: number;
  nextSeq: number;
  listeners: Set<WatchListener>;
  idleTimer?: NodeJS.Timeout;
  unsubscribe: () => void;
}

/**
 * File-watch sessions: one chokidar watch in the sandbox's agent per session, fanned out to any
 * number of clients. A session keeps its last 1,000 messages (older ones are gone; resuming past
 * them yields an `overflow` saying how many), ends when its sandbox stops or is deleted or the
 * agent ends the watch (the watched directory was deleted), and ends after `idleTimeoutMs` with no
 * client attached.
 */
export class WatchService {
  readonly #sessions = new Map<string, Session>();

  /** Sessions being started, per org: they count against the org's cap like live ones. */
  readonly #starting = new Map<string, number>();

  constructor(private readonly deps: { sandboxes: SandboxService; idleTimeoutMs: number; maxSessionsPerOrg: number; log: Logger }) {}

  /**
   * Starts watching; resolves once the watch is established (the path exists). An org holds at
   * most `maxSessionsPerOrg` sessions (429 past it); the agent has `WATCH_READY_TIMEOUT_MS` to
   * confirm the watch, else the call fails with 502 and the watch is stopped in the agent.
   */
  async start(principal: Principal, input: WatchInput, signal?: AbortSignal): Promise<{ sessionId: string }> {
    const record = await this.deps.sandboxes.running(principal, input.id);
    const held = [...this.#sessions.values()].filter((s) => s.orgId === record.orgId).length + (this.#starting.get(record.orgId) ?? 0);
    if (held >= this.deps.maxSessionsPerOrg) {
      throw new TooManyRequestsError(
        `Too many file-watch sessions: this organization holds ${held} of ${this.deps.maxSessionsPerOrg} (ORG_MAX_WATCH_SESSIONS); a session ends when its sandbox stops or WATCH_IDLE_TIMEOUT_SEC after its last client left`,
      );
    }
    this.#starting.set(record.orgId, (this.#starting.get(record.orgId) ?? 0) + 1);
    try {
      return await this.#start(record, input, signal);
    } finally {
      const n = (this.#starting.get(record.orgId) ?? 1) - 1;
      if (n > 0) this.#starting.set(record.orgId, n);
      else this.#starting.delete(record.orgId);
    }
  }

  async #start(record: SandboxRecord, input: WatchInput, signal?: AbortSignal): Promise<{ sessionId: string }> {
    const agents = this.deps.sandboxes.agents;
    const since = agents.epoch(record.id);
    const agent = agents.get(record.id);
    const session: Session = {
      id: randomUUID(),
      orgId: record.orgId,
      sandboxId: record.id,
      history: [],
      historyBytes: 0,
      nextSeq: 1,
      listeners: new Set(),
      unsubscribe: () => {},
    };
    await new Promise<void>((resolve, reject) => {
      let started = false;
      // Unconfirmed in time, or the caller left first: the watch is stopped in the agent.
      const giveUp = (err: Error) => {
        if (started) return;
        started = true; // nothing later may resolve
        clearTimeout(deadline);
        signal?.removeEventListener('abort', onAbort);
        sub.unsubscribe();
        reject(err);
      };
      const deadline = setTimeout(() => giveUp(new AgentUnavailableError(`The sandbox ${record.id} agent did not confirm the watch within ${WATCH_READY_TIMEOUT_MS} ms`)), WATCH_READY_TIMEOUT_MS);
      const onAbort = () => giveUp(new Error('the caller left before the watch started'));
      signal?.addEventListener('abort', onAbort, { once: true });
      const sub = agent.files.watch.subscribe(
        { path: input.path, recursive: input.recursive, ignoreHidden: input.ignoreHidden },
        {
          onData: (data) => {
            if (data.type === 'ready') {
              if (started) return;
              started = true;
              clearTimeout(deadline);
              signal?.removeEventListener('abort', onAbort);
              resolve();
              return;
            }
            for (const message of data.events) this.#publish(session, message);
          },
          onError: (err) => {
            clearTimeout(deadline);
            signal?.removeEventListener('abort', onAbort);
            void agents.failure(record, err, since).then((mapped) => {
              if (!started) reject(mapped);
              else this.#end(session, `the watch stopped: ${(mapped as Error).message}`);
            });
          },
          onComplete: () => this.#end(session, 'the watch ended'),
          onStopped: () => this.#end(session, 'the watch ended'),
        },
      );
      session.unsubscribe = () => sub.unsubscribe();
      if (signal?.aborted) onAbort();
    });
    this.#sessions.set(session.id, session);
    this.#armIdle(session);
    return { sessionId: session.id };
  }

  /** Throws NotFound unless `sessionId` is a live session of the caller's sandbox. */
  assertSession(principal: Principal, sandboxId: string, sessionId: string): void {
    this.#session(principal, sandboxId, sessionId);
  }

  #session(principal: Principal, sandboxId: string, sessionId: string): Session {
    const session = this.#sessions.get(sessionId);
    if (!session || session.orgId !== principal.orgId || session.sandboxId !== sandboxId) {
      throw new NotFoundError(`Watch session ${sessionId} not found (it ended, or belongs to another sandbox); start a new one`, { code: 'SESSION_NOT_FOUND' });
    }
    return session;
  }

  /**
   * Attaches a listener to a session of the caller's sandbox, first replaying what it kept after
   * `afterSeq` (all it kept when null). Returns the detach function.
   */
  attach(principal: Principal, sandboxId: string, sessionId: string, listener: WatchListener, afterSeq: number | null = null): () => void {
    const session = this.#session(principal, sandboxId, sessionId);
    clearTimeout(session.idleTimer);
    if (afterSeq !== null) {
      const oldest = session.history[0]?.seq ?? session.nextSeq;
      if (afterSeq + 1 < oldest) listener({ seq: oldest - 1, message: { type: 'overflow', dropped: oldest - 1 - afterSeq, timestamp: new Date().toISOString() } });
      for (const m of session.history) if (m.seq > afterSeq) listener(m);
    }
    session.listeners.add(listener);
    return () => {
      session.listeners.delete(listener);
      this.#armIdle(session);
    };
  }

  /** Ends every session of a sandbox (it was stopped or deleted). */
  endForSandbox(sandboxId: string): void {
    for (const s of this.#sessions.values()) if (s.sandboxId === sandboxId) this.#end(s, 'the sandbox stopped');
  }

  closeAll(): void {
    for (const s of [...this.#sessions.values()]) this.#end(s, 'the server is shutting down');
  }

  #publish(session: Session, message: WatchMessage): void {
    const m = { seq: session.nextSeq++, message };
    session.history.push(m);
    session.historyBytes += messageBytes(message);
    while (session.history.length > 1 && (session.history.length > HISTORY || session.historyBytes > HISTORY_BYTES)) {
      session.historyBytes -= messageBytes(session.history.shift()!.message);
    }
    for (const l of session.listeners) l(m);
  }

  #armIdle(session: Session): void {
    if (session.listeners.size > 0) return;
    clearTimeout(session.idleTimer);
    session.idleTimer = setTimeout(() => this.#end(session, 'no client was attached'), this.deps.idleTimeoutMs);
    session.idleTimer.unref();
  }

  #end(session: Session, reason: string): void {
    if (!this.#sessions.delete(session.id) && session.listeners.size === 0) return;
    clearTimeout(session.idleTimer);
    session.unsubscribe();
    for (const l of session.listeners) l({ ended: reason });
    session.listeners.clear();
    this.deps.log.info({ session: session.id, sandbox: session.sandboxId, reason }, 'watch session ended');
  }
}

function messageBytes(m: WatchMessage): number {
  return 64 + ('path' in m ? m.path.length + (m.oldPath?.length ?? 0) : 0);
}
