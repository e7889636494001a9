import type { PtyEvent, PtySessionInfo } from '../../shared/index.js';
import type { AgentClient } from '../agent-client/agent-clients.js';
import { resumableSubscription } from '../agent-client/resumable-subscription.js';
import { NotFoundError } from '../errors.js';
import type { Principal } from './auth-service.js';
import type { SandboxService } from './sandbox-service.js';
import type { SandboxEventSink } from './sandbox-events.js';

/**
 * Terminals in sandboxes. The agent owns the sessions (a shell on a pty with 1 MiB of
 * scrollback), so they outlive their clients; the server relays bytes and keeps nothing.
 */
export class PtyService {
  constructor(private readonly deps: { sandboxes: SandboxService; events?: SandboxEventSink }) {}

  /** Sessions reported closed (a kill, or an attached client seeing the shell exit), so each is reported once. */
  readonly #closed = new Set<string>();

  #terminalEvent(p: Principal, id: string, type: 'terminal.opened' | 'terminal.closed', data: Record<string, unknown> & { sessionId: string }): void {
    if (type === 'terminal.closed') {
      const key = `${id}:${data.sessionId}`;
      if (this.#closed.has(key)) return;
      this.#closed.add(key);
      // Bounded: the oldest are forgotten first (a Set iterates in insertion order).
      if (this.#closed.size > 10_000) this.#closed.delete(this.#closed.values().next().value!);
    }
    this.deps.events?.emit({ sandboxId: id, orgId: p.orgId, type, data });
  }

  async #agent<T>(principal: Principal, id: string, fn: (agent: AgentClient) => Promise<T>): Promise<T> {
    const record = await this.deps.sandboxes.running(principal, id);
    return this.deps.sandboxes.agents.call(record, fn);
  }

  async create(p: Principal, id: string, cols: number, rows: number): Promise<{ sessionId: string; createdAt: string }> {
    const info = await this.#agent(p, id, (a) => a.pty.create.mutate({ cols, rows }));
    this.#terminalEvent(p, id, 'terminal.opened', { sessionId: info.id, cols, rows });
    return { sessionId: info.id, createdAt: info.createdAt };
  }

  list(p: Principal, id: string): Promise<{ sessions: PtySessionInfo[] }> {
    return this.#agent(p, id, async (a) => ({ sessions: await a.pty.list.query() }));
  }

  async kill(p: Principal, id: string, sessionId: string): Promise<{ sessionId: string; killed: true }> {
    await this.#agent(p, id, (a) => a.pty.kill.mutate({ sessionId }));
    this.#terminalEvent(p, id, 'terminal.closed', { sessionId });
    return { sessionId, killed: true };
  }

  async write(p: Principal, id: string, sessionId: string, data: string): Promise<{ written: number }> {
    return this.#agent(p, id, (a) => a.pty.write.mutate({ sessionId, data }));
  }

  /** Types a command line into the session (with Enter). */
  async execute(p: Principal, id: string, sessionId: string, command: string): Promise<{ sessionId: string; sent: true }> {
    await this.write(p, id, sessionId, `${command}\n`);
    return { sessionId, sent: true };
  }

  /** Flow control: a client that can't keep up holds the shell back instead of growing buffers. */
  async setPaused(p: Principal, id: string, sessionId: string, paused: boolean): Promise<void> {
    await this.#agent(p, id, (a) => (paused ? a.pty.pause.mutate({ sessionId }) : a.pty.resume.mutate({ sessionId })));
  }

  buffer(p: Principal, id: string, sessionId: string): Promise<{ output: string }> {
    return this.#agent(p, id, (a) => a.pty.buffer.query({ sessionId }));
  }

  resize(p: Principal, id: string, sessionId: string, cols: number, rows: number): Promise<PtySessionInfo> {
    return this.#agent(p, id, (a) => a.pty.resize.mutate({ sessionId, cols, rows }));
  }

  /**
   * The session's scrollback after `after` (all of it when null), then live output until the
   * shell exits. Ids are `<sessionId>:<seq>`.
   */
  async *attach(p: Principal, id: string, sessionId: string, after: string | null, signal?: AbortSignal): AsyncGenerator<{ id: string; event: PtyEvent }> {
    const record = await this.deps.sandboxes.running(p, id);
    const agent = this.deps.sandboxes.agents.get(record.id);
    // Fail early (404) for an unknown session, before the caller upgrades or subscribes.
    const sessions = await this.deps.sandboxes.agents.call(record, (a) => a.pty.list.query());
    if (!sessions.some((s) => s.id === sessionId)) throw new NotFoundError(`Terminal session ${sessionId} not found in this sandbox`, { code: 'SESSION_NOT_FOUND' });
    const events = resumableSubscription<{ id: string; data: PtyEvent }>(
      (handlers, from) => agent.pty.output.subscribe({ sessionId, lastEventId: from }, { ...handlers, signal }),
      after,
    );
    try {
      for await (const e of events) {
        yield { id: `${sessionId}:${e.id}`, event: e.data };
        if (e.data.type === 'exit') {
          this.#terminalEvent(p, id, 'terminal.closed', { sessionId, exitCode: e.data.exitCode });
          return;
        }
      }
    } catch (err) {
      throw await this.deps.sandboxes.agents.failure(record, err);
    }
  }
}
