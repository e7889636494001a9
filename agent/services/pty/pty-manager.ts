import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { IPty } from 'node-pty';
import type { PtySessionInfo } from '../../../shared/schemas/pty.js';
import { afterAwake, type AwakeTimer } from '../../awake-time.js';
import { AgentError } from '../../errors.js';
import { OutputLog } from '../process/output-log.js';
import { PtyInput } from './pty-input.js';

// node-pty is native: loaded at run time from the node_modules mounted beside the agent.
const require = createRequire(__filename);

/** Scrollback each session keeps for new clients and reconnects. */
const SCROLLBACK_BYTES = 1024 * 1024;

/** A terminal in the sandbox: a shell on a pty, its scrollback, and how many clients watch it. */
export class PtySession {
  readonly id = `session-${randomUUID()}`;
  readonly createdAt = new Date();
  readonly output = new OutputLog(SCROLLBACK_BYTES);
  exitCode: number | null = null;
  clients = 0;
  cols: number;
  rows: number;
  #idleTimer: AwakeTimer | undefined;
  /** What clients type, written on the main thread only (see PtyInput). */
  readonly input: PtyInput;

  constructor(
    readonly pty: IPty,
    cols: number,
    rows: number,
    private readonly idle: { ms: number; expire: () => void },
  ) {
    this.cols = cols;
    this.rows = rows;
    this.input = new PtyInput(pty);
    // node-pty rethrows a read error other than EIO (EBADF once its descriptor closed under a
    // pending read) unless someone besides itself listens for errors: the session ends instead.
    (pty as unknown as NodeJS.EventEmitter).on('error', () => {});
    pty.onData((data) => this.output.append({ type: 'stdout', data }));
    pty.onExit(({ exitCode }) => {
      this.input.close();
      this.exitCode = exitCode;
      this.output.append({ type: 'exit', exitCode, signal: null, timedOut: false });
    });
    this.#armIdle();
  }

  attachClient(): void {
    this.clients++;
    this.#idleTimer?.cancel();
  }

  detachClient(): void {
    this.clients--;
    this.#armIdle();
  }

  /** With no client attached for the idle time (awake time: a paused sandbox's pause does not count), the session ends. */
  #armIdle(): void {
    if (this.clients > 0 || this.idle.ms <= 0) return;
    this.#idleTimer?.cancel();
    this.#idleTimer = afterAwake(this.idle.ms, this.idle.expire);
  }

  dispose(): void {
    this.#idleTimer?.cancel();
  }

  get alive(): boolean {
    return this.exitCode === null;
  }

  info(): PtySessionInfo {
    return { id: this.id, createdAt: this.createdAt.toISOString(), clients: this.clients, alive: this.alive, exitCode: this.exitCode, cols: this.cols, rows: this.rows };
  }
}

/** The sandbox's terminals. They outlive their clients until killed or their shell exits. */
export class PtyManager {
  readonly #sessions = new Map<string, PtySession>();

  constructor(
    private readonly baseEnv: NodeJS.ProcessEnv,
    private readonly home: string,
    /** A session with no client attached for this long ends (0 = never). */
    private readonly idleMs: number,
  ) {}

  create(cols: number, rows: number): PtySession {
    const { spawn } = require('node-pty') as typeof import('node-pty');
    const shell = existsSync('/bin/bash') ? '/bin/bash' : '/bin/sh';
    const pty = spawn(shell, ['-l'], { name: 'xterm-256color', cols, rows, cwd: this.home, env: { ...this.baseEnv, TERM: 'xterm-256color' } as Record<string, string> });
    const session: PtySession = new PtySession(pty, cols, rows, { ms: this.idleMs, expire: () => this.#sessions.has(session.id) && this.kill(session.id) });
    this.#sessions.set(session.id, session);
    return session;
  }

  get(id: string): PtySession {
    const s = this.#sessions.get(id);
    if (!s) throw new AgentError('NOT_FOUND', `Terminal session ${id} not found`);
    return s;
  }

  list(): PtySessionInfo[] {
    return [...this.#sessions.values()].map((s) => s.info());
  }

  write(id: string, data: string): void {
    const s = this.get(id);
    if (!s.alive) throw new AgentError('CONFLICT', `Terminal session ${id} has exited (code ${s.exitCode})`);
    if (!s.input.write(data)) throw new AgentError('CONFLICT', `Terminal session ${id} has more input waiting than its shell reads (8 MiB); wait for it to read, or kill the session`);
  }

  resize(id: string, cols: number, rows: number): PtySessionInfo {
    const s = this.get(id);
    if (s.alive) s.pty.resize(cols, rows);
    s.cols = cols;
    s.rows = rows;
    return s.info();
  }

  /** Stops reading the shell's output (the shell blocks once the pty buffer fills): flow control. */
  pause(id: string): void {
    const s = this.get(id);
    if (s.alive) s.pty.pause();
  }

  resume(id: string): void {
    const s = this.get(id);
    if (s.alive) s.pty.resume();
  }

  kill(id: string): void {
    const s = this.get(id);
    // Input still queued for the pty must not be written after its descriptor closes (the number
    // may be reused by another file by then).
    s.input.close();
    if (s.alive) s.pty.kill('SIGKILL');
    s.dispose();
    this.#sessions.delete(id);
  }

  /** The scrollback as text (what `buffer` returns). */
  buffer(id: string): string {
    return this.get(id)
      .output.since(0)
      .map((e) => (e.event.type === 'stdout' ? e.event.data : ''))
      .join('');
  }

  killAll(): void {
    for (const id of [...this.#sessions.keys()]) this.kill(id);
  }
}
