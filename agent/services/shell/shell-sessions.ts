import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { accessSync, constants, existsSync, realpathSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import { StringDecoder } from 'node:string_decoder';
import { afterAwake, type AwakeTimer } from '../../awake-time.js';
import { AgentError } from '../../errors.js';

export interface ShellChunk {
  stream: 'stdout' | 'stderr';
  data: string;
}

/**
 * A long-lived shell without a terminal: commands run one after another in the same process, so
 * the working directory and variables persist between them. Each command's end is found by a
 * marker line carrying a random token and the exit status, printed after it.
 */
export class ShellSession {
  readonly id = `shell-${randomUUID()}`;
  readonly #proc: ChildProcessWithoutNullStreams;
  #busy: Promise<unknown> = Promise.resolve();
  #exited = false;
  #exitCode = 0;
  #listener: ((c: ShellChunk) => void) | null = null;
  #onExit: (() => void) | null = null;
  #endedBecause = '';

  /**
   * How a command is handed to this shell. POSIX shells (dash, ash, ksh, bash) exit on a syntax
   * error inside a plain `eval` (a special builtin) unless it is run through `command`; zsh's
   * `command` runs external programs only (`command eval` is "command not found" there), and its
   * `eval` survives a syntax error as it is.
   */
  readonly #eval: string;

  constructor(shell: string, env: NodeJS.ProcessEnv, cwd: string) {
    this.#eval = evalFor(shell);
    // Its own process group, so a timeout's SIGINT reaches the command the shell is running.
    this.#proc = spawn(shell, [], { env, cwd, stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    this.#proc.stdin.on('error', () => {});
    // A handler (not "ignore", which children would inherit): SIGINT interrupts the running
    // command while the shell itself carries on.
    this.#proc.stdin.write("trap ':' INT\n");
    // A shell that cannot start (not executable, …) must not take the agent down with it.
    this.#proc.on('error', () => {
      this.#exited = true;
      this.#exitCode = 127;
      this.#onExit?.();
    });
    this.#proc.once('exit', (code, signal) => {
      this.#exited = true;
      this.#exitCode = code ?? (signal ? 128 : 1);
      this.#onExit?.();
    });
    for (const stream of ['stdout', 'stderr'] as const) {
      const decoder = new StringDecoder('utf8');
      this.#proc[stream].on('data', (chunk: Buffer) => this.#listener?.({ stream, data: decoder.write(chunk) }));
    }
  }

  #gone(): AgentError {
    const why = this.#endedBecause ? ` (it was ended: ${this.#endedBecause})` : '';
    return new AgentError('CONFLICT', `Shell session ${this.id} has exited${why}; create a new one with action "create"`);
  }

  get alive(): boolean {
    return !this.#exited;
  }

  /** Readers that are behind: while any is, the shell's pipes are not read, so its command blocks on write. */
  readonly #holds = new Set<object>();

  /** Stops reading the shell's output until every holder released it (see ManagedProcess.hold). */
  hold(holder: object): void {
    if (this.#holds.size === 0) for (const pipe of [this.#proc.stdout, this.#proc.stderr]) pipe.pause();
    this.#holds.add(holder);
  }

  /** Ends `holder`'s hold; the last one (or a timeout or close, which end them all) resumes reading. */
  release(holder?: object): void {
    if (holder ? !this.#holds.delete(holder) || this.#holds.size > 0 : this.#holds.size === 0) return;
    this.#holds.clear();
    for (const pipe of [this.#proc.stdout, this.#proc.stderr]) pipe.resume();
  }

  #endListeners: Array<() => void> = [];
  #idleTimer: AwakeTimer | undefined;

  /** Called once when the shell is gone (exited, killed, or closed for being idle an hour of awake time). */
  onEnd(listener: () => void): void {
    this.#endListeners.push(listener);
    this.#proc.once('close', () => {
      this.#idleTimer?.cancel();
      for (const l of this.#endListeners.splice(0)) l();
    });
    this.#touch();
  }

  #touch(): void {
    if (this.#idleTimer) this.#idleTimer.restart();
    else this.#idleTimer = afterAwake(60 * 60 * 1000, () => this.close());
  }

  /** Writes raw input to the shell's stdin (for a command that reads it). */
  input(data: string): void {
    if (!this.alive) throw this.#gone();
    this.#proc.stdin.write(data);
  }

  /**
   * Runs one command; `onChunk` gets its output as it comes. Resolves with the exit status.
   * Commands in one session run in order; the timeout counts from the call, time spent waiting
   * for the session's earlier commands included, so the answer is due within it either way.
   */
  exec(command: string, timeoutMs: number, onChunk: (c: ShellChunk) => void): Promise<number> {
    this.#touch();
    const called = Date.now();
    const busy = () => new AgentError('CONFLICT', `The shell session was busy with an earlier command for the whole ${timeoutMs / 1000} s timeout; this command did not run`);
    let settled: Promise<unknown> = Promise.resolve();
    // Still queued when its timeout passes: answered then (the queue skips it when its turn comes).
    let expired = false;
    let answerQueued!: (err: Error) => void;
    const queued = new Promise<never>((_, reject) => (answerQueued = reject));
    const queueTimer = setTimeout(() => {
      expired = true;
      answerQueued(busy());
    }, timeoutMs);
    const run = this.#busy.then(() => {
      clearTimeout(queueTimer);
      const left = timeoutMs - (Date.now() - called);
      if (expired || left <= 0) return Promise.reject(busy());
      const r = this.#run(command, timeoutMs, left, onChunk);
      settled = r.settled;
      return r.answer;
    });
    // The next command waits until this one's end markers went by, even after a timeout answered.
    this.#busy = run.then(
      () => undefined,
      () => settled,
    );
    return Promise.race([run, queued]);
  }

  #run(command: string, timeoutMs: number, leftMs: number, onChunk: (c: ShellChunk) => void): { answer: Promise<number>; settled: Promise<void> } {
    if (!this.alive) {
      const failed = Promise.reject(this.#gone());
      return { answer: failed, settled: Promise.resolve() };
    }
    let markSettled!: () => void;
    const settled = new Promise<void>((r) => (markSettled = r));
    const token = randomBytes(8).toString('hex');
    // Both streams get a marker: stdout's carries the status; the run ends when both are seen,
    // so no stderr output of the command arrives after its answer.
    const markerHead = `\n__VOIDRUN_DONE_${token}_`;
    const markers = { stdout: new RegExp(`\\n?__VOIDRUN_DONE_${token}_(\\d+)\\n`), stderr: new RegExp(`\\n?__VOIDRUN_DONE_${token}_\\n`) };
    const answer = new Promise<number>((resolve, reject) => {
      let answered = false;
      const pending = { stdout: '', stderr: '' };
      const seen = { stdout: false, stderr: false };
      let status = 0;
      let grace: NodeJS.Timeout | undefined;
      let nudge: NodeJS.Timeout | undefined;
      const quiet: Record<'stdout' | 'stderr', NodeJS.Timeout | undefined> = { stdout: undefined, stderr: undefined };
      const finish = () => {
        clearTimeout(timer);
        clearTimeout(grace);
        clearTimeout(nudge);
        clearTimeout(quiet.stdout);
        clearTimeout(quiet.stderr);
        this.#listener = null;
        this.#onExit = null;
        markSettled();
        if (!answered) resolve(status);
      };
      // A command that ends the shell itself (`exit 3`) ends the run with the shell's status.
      this.#onExit = () => {
        for (const stream of ['stdout', 'stderr'] as const) if (pending[stream]) onChunk({ stream, data: pending[stream] });
        status = this.#exitCode;
        finish();
      };
      const timer = setTimeout(() => {
        // Answer now; keep listening (output dropped) until the end markers pass, so they can't
        // leak into the next command's output.
        answered = true;
        // What was held back goes out first (it is kept for the marker search).
        for (const stream of ['stdout', 'stderr'] as const) if (pending[stream] && !seen[stream]) onChunk({ stream, data: pending[stream] });
        onChunk = () => {};
        this.release(); // the rest of its output is read (and dropped) up to the end markers
        reject(new AgentError('BAD_REQUEST', `The command did not finish within ${timeoutMs / 1000} s; it was interrupted`));
        try {
          process.kill(-this.#proc.pid!, 'SIGINT');
        } catch {
          this.#proc.kill('SIGINT');
        }
        // A command that survives the interrupt (it ignores SIGINT, loops on, or took the shell's
        // output away) would hold the session, and every command queued behind it, forever:
        // past the grace the shell is ended, and later commands are told so.
        grace = setTimeout(() => this.close(`a command outlived its ${timeoutMs / 1000} s timeout and the interrupt that followed`), INTERRUPT_GRACE_MS);
        // bash's `read` builtin carries on reading after the interrupt's trap: an empty line ends
        // it (the shell's parser ignores one, should it be there instead).
        nudge = setTimeout(() => this.#proc.stdin.write('\n'), INTERRUPT_NUDGE_MS);
      }, leftMs);
      this.#listener = (c) => {
        if (seen[c.stream]) return;
        pending[c.stream] += c.data;
        const m = markers[c.stream].exec(pending[c.stream]);
        if (m) {
          if (m.index > 0) onChunk({ stream: c.stream, data: pending[c.stream].slice(0, m.index) });
          pending[c.stream] = '';
          seen[c.stream] = true;
          if (c.stream === 'stdout') status = Number(m[1]);
          if (seen.stdout && seen.stderr) finish();
          return;
        }
        // Hold back only what could be the start of the marker; the rest goes out now.
        const text = pending[c.stream];
        const keep = markerStart(text, markerHead);
        if (keep > 0) {
          onChunk({ stream: c.stream, data: text.slice(0, keep) });
          pending[c.stream] = text.slice(keep);
        }
        // A line's newline held back (it could begin a marker) goes out once the command is quiet
        // for a moment, so a streamed line is seen whole. Were it the marker's own, the marker is
        // still found (its newline is optional to the search).
        clearTimeout(quiet[c.stream]);
        if (pending[c.stream] === '\n') {
          const stream = c.stream;
          quiet[stream] = setTimeout(() => {
            if (pending[stream] !== '\n' || seen[stream]) return;
            pending[stream] = '';
            onChunk({ stream, data: '\n' });
          }, QUIET_FLUSH_MS);
        }
      };
      // The command goes through `eval` of one single-quoted word, on one line with the end
      // markers: the shell reads the whole line before running any of it, so text the command
      // leaves open (an unmatched quote or backtick, a here-document without its end) is a syntax
      // error of that command alone, and a command reading stdin cannot swallow the markers.
      this.#proc.stdin.write(`${this.#eval} ${shellQuote(command)}; printf '\\n__VOIDRUN_DONE_${token}_%d\\n' "$?"; printf '\\n__VOIDRUN_DONE_${token}_\\n' >&2\n`);
    });
    return { answer, settled };
  }

  /** Ends the shell; `reason` (why it was ended) is what later commands in the session are told. */
  close(reason?: string): void {
    if (!this.alive) return;
    if (reason) this.#endedBecause = reason;
    this.release();
    try {
      process.kill(-this.#proc.pid!, 'SIGKILL');
    } catch {
      this.#proc.kill('SIGKILL');
    }
  }
}

/** How long a timed-out command has, after its interrupt, to let the shell reach its end markers. */
const INTERRUPT_GRACE_MS = 5_000;
/** When, after the interrupt, an empty line is written for a command still reading the shell's stdin. */
const INTERRUPT_NUDGE_MS = 1_000;
/** How long a held-back newline waits for more output before it goes out on its own. */
const QUIET_FLUSH_MS = 30;

/**
 * Where in `text` an end marker (`head`, then digits and a newline) may be starting: the tail
 * from there is held back until the next output shows whether it is one. `text.length` when no
 * tail of it can be.
 */
function markerStart(text: string, head: string): number {
  const at = text.lastIndexOf(head);
  if (at !== -1 && /^\d*$/.test(text.slice(at + head.length))) return at;
  for (let k = Math.min(head.length, text.length); k > 0; k--) if (text.endsWith(head.slice(0, k))) return text.length - k;
  return text.length;
}

/** How a command is handed to the shell at `path` (see ShellSession's `#eval`). */
export function evalFor(path: string): 'eval' | 'command eval' {
  return /zsh/.test(basename(realpathOr(path))) ? 'eval' : 'command eval';
}

/** `path` with its symbolic links resolved (/bin/sh → dash), or as given when that fails. */
function realpathOr(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

/** `text` as one single-quoted shell word (POSIX: nothing inside single quotes is special but the quote itself). */
function shellQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

export class ShellSessions {
  readonly #sessions = new Map<string, ShellSession>();

  constructor(private readonly env: NodeJS.ProcessEnv, private readonly home: string) {}

  create(shell?: string): ShellSession {
    const program = shell ?? (existsSync('/bin/bash') ? '/bin/bash' : '/bin/sh');
    try {
      accessSync(program, constants.X_OK);
      if (!statSync(program).isFile()) throw new Error('not a file');
    } catch {
      throw new AgentError('BAD_REQUEST', `No executable shell at ${program}`);
    }
    const s = new ShellSession(program, this.env, this.home);
    this.#sessions.set(s.id, s);
    // Finished shells leave the list; sessions nobody used for an hour are closed.
    s.onEnd(() => this.#sessions.delete(s.id));
    return s;
  }

  get(id: string): ShellSession {
    const s = this.#sessions.get(id);
    if (!s) throw new AgentError('NOT_FOUND', `Shell session ${id} not found (create one with action "create")`);
    return s;
  }

  close(id: string): void {
    this.get(id).close();
    this.#sessions.delete(id);
  }

  closeAll(): void {
    for (const s of this.#sessions.values()) s.close();
    this.#sessions.clear();
  }
}
