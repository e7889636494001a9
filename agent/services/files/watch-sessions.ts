import { randomUUID } from 'node:crypto';
import type { WatchMessage } from '../../../shared/schemas/files.js';
import { afterAwake, type AwakeTimer } from '../../awake-time.js';
import { AgentError } from '../../errors.js';
import { FileWatch, type WatchSpec } from './watch.js';

/** Messages a session keeps for clients that attach late or resume… */
const HISTORY = 1000;
/** …and at most this many bytes of them (paths count). */
const HISTORY_BYTES = 1024 * 1024;

export interface SequencedMessage {
  seq: number;
  message: WatchMessage;
}

/** What a session's reader is told: messages as they come, then once why the session ended. */
export interface WatchReader {
  onMessage(m: SequencedMessage): void;
  onEnd(reason: string): void;
}

/**
 * One file watch that outlives its readers: its events are numbered and the last 1,000 kept, so
 * a reader that attaches later (or again, after its connection or the server restarted) gets
 * what it missed after its last sequence number — or an `overflow` saying how many are gone.
 */
export class WatchSession {
  readonly id = randomUUID();
  readonly createdAt = new Date();
  readonly #history: SequencedMessage[] = [];
  #historyBytes = 0;
  #nextSeq = 1;
  readonly #readers = new Set<WatchReader>();
  #idle: AwakeTimer | undefined;
  #watch: FileWatch | undefined;
  ended: string | null = null;

  constructor(
    readonly spec: WatchSpec,
    private readonly idle: { ms: number; end: (session: WatchSession, reason: string) => void },
  ) {}

  /** Starts the watch; resolves once it is set (the path exists and was scanned). */
  async start(): Promise<void> {
    this.#watch = await FileWatch.start(
      this.spec,
      (messages) => {
        for (const message of messages) this.#publish(message);
      },
      () => this.idle.end(this, 'the watch ended (its directory was deleted or replaced)'),
    );
    this.#armIdle();
  }

  get root(): string {
    return this.#watch?.root ?? this.spec.path;
  }

  get readers(): number {
    return this.#readers.size;
  }

  /**
   * Adds a reader, first replaying what is kept after `afterSeq`. Returns the function that
   * removes it; with no reader left for the idle time (awake time), the session ends.
   */
  attach(reader: WatchReader, afterSeq: number): () => void {
    if (this.ended) {
      reader.onEnd(this.ended);
      return () => {};
    }
    this.#idle?.cancel();
    const oldest = this.#history[0]?.seq ?? this.#nextSeq;
    if (afterSeq + 1 < oldest) reader.onMessage({ seq: oldest - 1, message: { type: 'overflow', dropped: oldest - 1 - afterSeq, timestamp: new Date().toISOString() } });
    for (const m of this.#history) if (m.seq > afterSeq) reader.onMessage(m);
    this.#readers.add(reader);
    return () => {
      if (this.#readers.delete(reader)) this.#armIdle();
    };
  }

  #publish(message: WatchMessage): void {
    const m = { seq: this.#nextSeq++, message };
    this.#history.push(m);
    this.#historyBytes += messageBytes(message);
    while (this.#history.length > 1 && (this.#history.length > HISTORY || this.#historyBytes > HISTORY_BYTES)) {
      this.#historyBytes -= messageBytes(this.#history.shift()!.message);
    }
    for (const r of this.#readers) r.onMessage(m);
  }

  #armIdle(): void {
    if (this.ended || this.#readers.size > 0 || this.idle.ms <= 0) return;
    this.#idle?.cancel();
    this.#idle = afterAwake(this.idle.ms, () => this.idle.end(this, 'no client was attached'));
  }

  /** Ends the session: the watch stops, readers are told why. */
  async close(reason: string): Promise<void> {
    if (this.ended) return;
    this.ended = reason;
    this.#idle?.cancel();
    for (const r of [...this.#readers]) r.onEnd(reason);
    this.#readers.clear();
    await this.#watch?.close();
  }
}

function messageBytes(m: WatchMessage): number {
  return 64 + ('path' in m ? m.path.length + (m.oldPath?.length ?? 0) : 0);
}

/**
 * The sandbox's file-watch sessions. The agent owns them, as it owns terminals: they live as long
 * as the sandbox runs (through pauses, and through restarts of the server, which re-attaches by
 * id), until stopped, until their directory goes, or after `idleMs` of awake time with no reader.
 */
export class WatchSessions {
  readonly #sessions = new Map<string, WatchSession>();

  constructor(private readonly idleMs: number) {}

  async start(spec: WatchSpec): Promise<WatchSession> {
    const session = new WatchSession(spec, { ms: this.idleMs, end: (s, reason) => void this.#end(s, reason) });
    await session.start();
    this.#sessions.set(session.id, session);
    return session;
  }

  get(id: string): WatchSession {
    const s = this.#sessions.get(id);
    if (!s) throw new AgentError('NOT_FOUND', `Watch session ${id} not found (it ended); start a new one`);
    return s;
  }

  list(): Array<{ id: string; path: string; createdAt: string; clients: number }> {
    return [...this.#sessions.values()].map((s) => ({ id: s.id, path: s.root, createdAt: s.createdAt.toISOString(), clients: s.readers }));
  }

  async stop(id: string, reason = 'the watch was stopped'): Promise<void> {
    await this.#end(this.get(id), reason);
  }

  async #end(session: WatchSession, reason: string): Promise<void> {
    if (this.#sessions.get(session.id) === session) this.#sessions.delete(session.id);
    await session.close(reason);
  }

  async closeAll(): Promise<void> {
    await Promise.all([...this.#sessions.values()].map((s) => this.#end(s, 'the agent is shutting down')));
  }
}
