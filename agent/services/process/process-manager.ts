import { spawn, type ChildProcess } from 'node:child_process';
import { statSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { StringDecoder } from 'node:string_decoder';
import type { AgentExecResult, AgentProcessInfo, OutputEvent, ProcessSpec } from '../../../shared/schemas/agent.js';
import { afterAwake } from '../../awake-time.js';
import { AgentError } from '../../errors.js';
import { OutputLog, type SequencedEvent } from './output-log.js';

/** What each process keeps of its output for late readers and reconnects. */
const OUTPUT_LOG_BYTES = 1024 * 1024;
/** Output read from a pipe is appended as one event once a turn of the event loop passed or this much came. */
const COALESCE_BYTES = 64 * 1024;
/** Finished processes stay listed (and attachable) until this many newer ones have finished… */
const KEEP_FINISHED = 100;
/** …or until the output logs they keep pass this many bytes together (the oldest go first). */
const FINISHED_LOGS_BYTES = 16 * 1024 * 1024;
/**
 * What all one-shot runs in flight may hold of their output together. The agent shares the
 * sandbox's memory with the tenant's commands: thirty concurrent runs printing 4 MiB each must
 * not get it OOM-killed, so past this budget further output is dropped and the run says
 * `truncated`, as it does at its own limit.
 */
export const RUN_OUTPUT_BUDGET_BYTES = 48 * 1024 * 1024;

/**
 * How long a kill waits for the process to exit after a signal before escalating to SIGKILL, and
 * after SIGKILL before answering that it still runs.
 */
export const KILL_GRACE_MS = 5000;

/**
 * How long after the process itself exited its output pipes are still read. A descendant that left
 * its process group (`setsid cmd &`, a daemon) keeps them open; past this they are closed, so the
 * process's exit is reported instead of waiting for that descendant to end (maybe never).
 */
export const EXIT_PIPE_GRACE_MS = 2000;

export interface ExitInfo {
  exitCode: number;
  signal: string | null;
  timedOut: boolean;
}

/** One process the agent started, with its output log and exit. */
export class ManagedProcess {
  readonly pid: number;
  readonly startTime = new Date();
  readonly output = new OutputLog(OUTPUT_LOG_BYTES);
  exit: ExitInfo | null = null;
  readonly exited: Promise<ExitInfo>;
  readonly #child: ChildProcess;
  /** Set once the process itself is gone ('exit'); `exit` waits for its output pipes to close too. */
  #gone = false;
  readonly #pipes: NodeJS.ReadableStream[] = [];
  /** Readers that are behind: while any is, the pipes are not read, so the process blocks on write. */
  readonly #holds = new Set<object>();

  constructor(
    readonly command: string,
    child: ChildProcess,
    timeoutMs: number,
  ) {
    this.#child = child;
    this.pid = child.pid!;
    // A process that closes its stdin makes the next write fail with EPIPE; that must not take
    // the agent (and with it the sandbox) down.
    child.stdin?.on('error', () => {});
    let timedOut = false;
    // Awake time: a command's time limit does not run out while its sandbox is paused.
    // terminate, not kill: it also closes pipes a descendant outside the group holds, so the exit is reported.
    const timer = timeoutMs > 0 ? afterAwake(timeoutMs, () => ((timedOut = true), void this.terminate('SIGKILL'))) : undefined;
    for (const [stream, type] of [
      [child.stdout, 'stdout'],
      [child.stderr, 'stderr'],
    ] as const) {
      if (!stream) continue;
      this.#pipes.push(stream);
      // What the pipe gave since the last flush: appended as one event on the next turn of the
      // event loop (or once it reaches COALESCE_BYTES), so a fast writer makes few, large events.
      const decoder = new StringDecoder('utf8');
      let pending: Buffer[] = [];
      let pendingBytes = 0;
      let scheduled = false;
      const flush = () => {
        scheduled = false;
        if (!pendingBytes) return;
        const data = decoder.write(pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes));
        if (data) this.output.append({ type, data }, pendingBytes);
        pending = [];
        pendingBytes = 0;
      };
      stream.on('data', (chunk: Buffer) => {
        pending.push(chunk);
        pendingBytes += chunk.length;
        if (pendingBytes >= COALESCE_BYTES) flush();
        else if (!scheduled) {
          scheduled = true;
          setImmediate(flush);
        }
      });
      stream.on('end', () => {
        flush();
        const rest = decoder.end();
        if (rest) this.output.append({ type, data: rest }, Buffer.byteLength(rest));
      });
    }
    let pipeTimer: NodeJS.Timeout | undefined;
    const closeLeftPipes = () => {
      // A reader that is behind still gets what the pipes hold: the grace starts once it caught up.
      if (this.#holds.size > 0) return void (pipeTimer = setTimeout(closeLeftPipes, EXIT_PIPE_GRACE_MS));
      this.#child.stdout?.destroy();
      this.#child.stderr?.destroy();
    };
    child.once('exit', () => {
      this.#gone = true;
      pipeTimer = setTimeout(closeLeftPipes, EXIT_PIPE_GRACE_MS);
    });
    // 'close' fires after stdout and stderr ended, so the exit event is always the last.
    this.exited = new Promise((resolve) => {
      child.once('close', (code, signal) => {
        timer?.cancel();
        clearTimeout(pipeTimer);
        // 124 for a timeout, as timeout(1) reports; 128+n for a signal, as shells do.
        const exitCode = timedOut ? 124 : (code ?? 128 + signalNumber(signal));
        this.exit = { exitCode, signal: signal ?? null, timedOut };
        this.output.append({ type: 'exit', ...this.exit });
        resolve(this.exit);
      });
    });
  }

  /**
   * Stops reading the process's output until every holder released it: the pipes fill and the
   * process blocks on its next write, instead of its output piling up in the agent.
   */
  hold(holder: object): void {
    if (this.#holds.size === 0) for (const pipe of this.#pipes) pipe.pause();
    this.#holds.add(holder);
  }

  /** Ends `holder`'s hold (see `hold`); the last one resumes reading. */
  release(holder: object): void {
    if (!this.#holds.delete(holder) || this.#holds.size > 0) return;
    for (const pipe of this.#pipes) pipe.resume();
  }

  get running(): boolean {
    return this.exit === null;
  }

  /** Signals the whole process group, so children the command started go too. */
  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    if (!this.running) return;
    // What is left in its pipes is read (into the bounded log), so its end is seen.
    if (this.#holds.size > 0) {
      this.#holds.clear();
      for (const pipe of this.#pipes) pipe.resume();
    }
    try {
      process.kill(-this.pid, signal);
    } catch {
      this.#child.kill(signal);
    }
  }

  /**
   * Kills the process group with `signal` and resolves once the process has exited and been
   * reaped (its exit code is known, so a list right after shows it finished). A signal that has not
   * ended it within `graceMs` is followed by SIGKILL. Output pipes held open by a descendant that
   * left the group are closed once the process itself is gone, so they cannot keep it listed as
   * running. A process still there `graceMs` after SIGKILL (blocked in the kernel, e.g. on a hung
   * mount) is left to exit when it can: this resolves with it still running.
   */
  async terminate(signal: NodeJS.Signals = 'SIGKILL', graceMs = KILL_GRACE_MS): Promise<void> {
    if (!this.running) return;
    this.kill(signal);
    if (await this.#reapedWithin(graceMs)) return;
    if (signal !== 'SIGKILL') {
      this.kill('SIGKILL');
      await this.#reapedWithin(graceMs);
    }
  }

  /** Whether the process is reaped within `ms`; past it, pipes of a process already gone are closed. */
  async #reapedWithin(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    const reaped = await Promise.race([this.exited.then(() => true as const), timeout]);
    clearTimeout(timer);
    if (reaped) return true;
    if (!this.#gone) return false;
    this.#child.stdout?.destroy();
    this.#child.stderr?.destroy();
    await this.exited;
    return true;
  }

  /** Writes to the process's stdin; resolves once the pipe accepted it (backpressure). */
  async writeStdin(data: string): Promise<void> {
    const stdin = this.#child.stdin;
    if (!stdin || stdin.destroyed || !stdin.writable) throw new AgentError('BAD_REQUEST', `Process ${this.pid} has no open stdin (it closed it or exited)`);
    await new Promise<void>((resolve, reject) => {
      stdin.write(data, (err) => (err ? reject(new AgentError('BAD_REQUEST', `Process ${this.pid} closed its stdin`)) : resolve()));
    });
  }

  closeStdin(): void {
    this.#child.stdin?.end();
  }

  info(): AgentProcessInfo {
    return { pid: this.pid, command: this.command, startTime: this.startTime.toISOString(), running: this.running, exitCode: this.exit?.exitCode ?? null };
  }
}

function signalNumber(signal: NodeJS.Signals | null): number {
  const numbers: Partial<Record<NodeJS.Signals, number>> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGTERM: 15, SIGSEGV: 11, SIGABRT: 6, SIGPIPE: 13 };
  return (signal && numbers[signal]) || 0;
}

/** Starts, tracks and ends the processes of one sandbox. */
export class ProcessManager {
  readonly #table = new ProcessTable<ManagedProcess>();
  /** Output held by one-shot runs in flight (see RUN_OUTPUT_BUDGET_BYTES). */
  #runOutputBytes = 0;

  constructor(private readonly baseEnv: NodeJS.ProcessEnv, private readonly defaultCwd: string) {}

  start(spec: ProcessSpec): ManagedProcess {
    const env = { ...this.baseEnv, ...spec.env };
    const [file, args] = spec.args?.length ? [spec.command, spec.args] : ['/bin/sh', ['-c', spec.command]];
    // A relative cwd is inside the default directory (the sandbox user's home), as relative file paths are.
    const cwd = resolve(this.defaultCwd, spec.cwd ?? '');
    let child: ChildProcess;
    try {
      child = spawn(file, args, {
        cwd,
        env,
        detached: true, // its own process group, so a timeout or kill reaches its children
        stdio: [spec.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'],
      });
    } catch (err) {
      // spawn throws for most exec failures (E2BIG, ENOTDIR, …) and for NUL bytes in its strings.
      throw spawnError(err, cwd);
    }
    child.on('error', () => {}); // a spawn failure is reported below; later errors through 'close'
    if (child.pid === undefined) throw new AgentError('BAD_REQUEST', describeSpawnFailure(spec, cwd));
    lowerOomPriority(child.pid);
    const command = spec.args?.length ? [spec.command, ...spec.args].join(' ') : spec.command;
    const proc = new ManagedProcess(command, child, spec.timeoutMs);
    const entry = this.#table.add(proc);
    void proc.exited.then(() => this.#table.retire(entry));
    return proc;
  }

  /** Runs to completion and returns its output, each stream capped at `maxOutputBytes`. */
  async run(spec: ProcessSpec): Promise<AgentExecResult> {
    const limit = spec.maxOutputBytes ?? 4 * 1024 * 1024;
    const proc = this.start(spec);
    const out = { stdout: '', stderr: '' };
    const kept = { stdout: 0, stderr: 0 };
    let truncated = false;
    let held = 0;
    const collect = (e: SequencedEvent) => {
      if (e.event.type !== 'stdout' && e.event.type !== 'stderr') return;
      const type = e.event.type;
      const room = Math.max(0, Math.min(limit - kept[type], RUN_OUTPUT_BUDGET_BYTES - this.#runOutputBytes));
      let piece = e.event.data;
      let bytes = e.bytes;
      if (bytes > room) {
        truncated = true;
        piece = utf8Prefix(piece, room);
        bytes = Buffer.byteLength(piece);
      }
      if (!bytes) return;
      out[type] += piece;
      kept[type] += bytes;
      held += bytes;
      this.#runOutputBytes += bytes;
    };
    for (const e of proc.output.since(0)) collect(e);
    const unsubscribe = proc.output.subscribe(collect);
    try {
      const exit = await proc.exited;
      return { ...out, exitCode: exit.exitCode, truncated, timedOut: exit.timedOut, signal: exit.signal };
    } finally {
      unsubscribe();
      this.#runOutputBytes -= held;
    }
  }

  get(pid: number): ManagedProcess {
    const proc = this.#table.get(pid);
    if (!proc) throw new AgentError('NOT_FOUND', `No process with pid ${pid} was started in this sandbox (or it finished long ago)`);
    return proc;
  }

  list(): AgentProcessInfo[] {
    return this.#table.all().map((p) => p.info());
  }

  /** See `ProcessTable.forgetFinished`. */
  forgetFinished(): void {
    this.#table.forgetFinished();
  }

  get size(): number {
    return this.#table.size;
  }

  killAll(): void {
    for (const p of this.#table.all()) p.kill('SIGKILL');
  }

}

/** What the process table needs of a process. */
export interface TableEntry {
  readonly pid: number;
  readonly output: { readonly bytes: number };
}

/**
 * The processes the agent lists, each under its own identity (a serial number the agent gives
 * it), not its pid: the kernel reuses a pid once its process was reaped — which can happen while
 * the agent still reads the pipes a descendant holds open — so two entries can share a pid, and
 * retiring one never evicts the other. A pid names the newest process started with it.
 * Finished processes stay until more than `keepFinished` finished after them or their logs pass
 * `finishedLogBytes` together (the oldest go first).
 */
export class ProcessTable<P extends TableEntry> {
  readonly #entries = new Map<number, P>();
  readonly #byPid = new Map<number, P>();
  readonly #finished: Array<{ serial: number; proc: P }> = [];
  #finishedLogBytes = 0;
  #nextSerial = 1;

  constructor(
    private readonly keepFinished = KEEP_FINISHED,
    private readonly finishedLogBytes = FINISHED_LOGS_BYTES,
  ) {}

  /** Lists a process just started; returns its identity, for `retire`. */
  add(proc: P): number {
    const serial = this.#nextSerial++;
    this.#entries.set(serial, proc);
    this.#byPid.set(proc.pid, proc);
    return serial;
  }

  /** Marks a process finished; the oldest finished ones past the bounds are forgotten. */
  retire(serial: number): void {
    const proc = this.#entries.get(serial);
    if (!proc) return;
    this.#finished.push({ serial, proc });
    this.#finishedLogBytes += proc.output.bytes;
    while (this.#finished.length > this.keepFinished || (this.#finished.length > 1 && this.#finishedLogBytes > this.finishedLogBytes)) {
      const oldest = this.#finished.shift()!;
      this.#finishedLogBytes -= oldest.proc.output.bytes;
      this.#entries.delete(oldest.serial);
      if (this.#byPid.get(oldest.proc.pid) === oldest.proc) this.#byPid.delete(oldest.proc.pid);
    }
  }

  /** Forgets every finished process (a warm-pool sandbox's warm-up, at its claim); running ones stay listed. */
  forgetFinished(): void {
    for (const { serial, proc } of this.#finished.splice(0)) {
      this.#entries.delete(serial);
      if (this.#byPid.get(proc.pid) === proc) this.#byPid.delete(proc.pid);
    }
    this.#finishedLogBytes = 0;
  }

  /** The newest listed process started with `pid`, if any. */
  get(pid: number): P | undefined {
    return this.#byPid.get(pid);
  }

  all(): P[] {
    return [...this.#entries.values()];
  }

  get size(): number {
    return this.#entries.size;
  }
}

/** The longest start of `text` whose UTF-8 encoding fits in `maxBytes` (never a split character). */
export function utf8Prefix(text: string, maxBytes: number): string {
  if (maxBytes <= 0) return '';
  if (text.length * 3 <= maxBytes) return text;
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= maxBytes) return text;
  let end = maxBytes;
  // Back up to the first byte of the character the cut falls in (continuation bytes are 10xxxxxx).
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end).toString('utf8');
}

/** Children must be the OOM killer's choice, never the agent. */
function lowerOomPriority(pid: number): void {
  try {
    writeFileSync(`/proc/${pid}/oom_score_adj`, '500');
  } catch {
    // Not fatal: outside a sandbox (tests) /proc may refuse.
  }
}

/** Why a working directory cannot be entered, or null when it can. */
function cwdProblem(cwd: string): string | null {
  try {
    return statSync(cwd).isDirectory() ? null : `Invalid cwd: ${cwd} is not a directory`;
  } catch {
    return `Invalid cwd: ${cwd} does not exist`;
  }
}

/** A spawn failure reported asynchronously (ENOENT, EACCES): no pid, and the cause not yet known. */
function describeSpawnFailure(spec: ProcessSpec, cwd: string): string {
  const problem = cwdProblem(cwd);
  if (problem) return problem;
  return spec.args?.length ? `Cannot start ${spec.command}: it does not exist or is not executable` : 'Cannot start the command';
}

/** A spawn failure thrown synchronously, as an AgentError (BAD_REQUEST) saying what to fix; other errors as they are. */
function spawnError(err: unknown, cwd: string): Error {
  const code = (err as NodeJS.ErrnoException).code;
  switch (code) {
    case 'E2BIG':
      return new AgentError('BAD_REQUEST', 'The command, its arguments and environment are too large for the kernel (E2BIG): each argument and NAME=value must be under 128 KiB, and all of them together within ARG_MAX (about 2 MiB)');
    case 'ENOTDIR':
      return new AgentError('BAD_REQUEST', cwdProblem(cwd) ?? 'Cannot start the command: a component of its path is not a directory');
    case 'ENAMETOOLONG':
      return new AgentError('BAD_REQUEST', 'Cannot start the command: its program or working directory path is too long');
    case 'ELOOP':
      return new AgentError('BAD_REQUEST', 'Cannot start the command: too many levels of symbolic links in its program or working directory path');
    case 'ERR_INVALID_ARG_VALUE':
    case 'ERR_INVALID_ARG_TYPE':
      return new AgentError('BAD_REQUEST', 'Cannot start the command: its command, arguments, environment and cwd must be strings without NUL bytes');
    default:
      return err instanceof Error ? err : new Error(String(err));
  }
}

export type { OutputEvent };
