import type { TRPCClient } from '@trpc/client';
import type { AppRouter } from '../server/routers/index.js';
import type { CreateSandboxInput, ExecChunk, ExecResult, ProcessInfo, Sandbox as SandboxInfo, SandboxEvent } from '../shared/index.js';
import { iterateSubscription } from '../shared/subscription-iterator.js';
import { ProcessNotFoundError, VoidRunError } from './errors.js';
import type { SandboxFiles } from './files.js';
import { createClient, type ClientOptions, type VoidRunClient } from './index.js';
import { envVar } from './runtime.js';
import { CommandHandle, type SandboxHandle } from './sandbox.js';

/**
 * Where the server is and who calls it. Each field falls back to an environment variable where
 * the runtime has them (Node, Bun, Deno; never in a browser): `VOIDRUN_API_URL`, `VOIDRUN_API_KEY`.
 */
export interface ConnectionOptions extends Partial<Omit<ClientOptions, 'url'>> {
  /** The server's base URL, e.g. `http://localhost:33944` (default `VOIDRUN_API_URL`). */
  apiUrl?: string;
  /** The same as `apiUrl` (the name `createClient` uses). */
  url?: string;
  /** Default `VOIDRUN_API_KEY`. */
  apiKey?: string;
  /** Use this client's connection instead of opening one; `close()` then leaves it open. */
  client?: VoidRunClient;
}

/** What `await using` (`Symbol.asyncDispose`) does at the end of the scope. */
export type DisposeAction = 'delete' | 'release';

export interface SandboxOpts extends ConnectionOptions {
  /**
   * At scope end (`await using`): `delete` the sandbox, or `release` it (close the connection,
   * leave the sandbox). Default: `delete` for `Sandbox.create`, `release` for `Sandbox.connect`.
   */
  onDispose?: DisposeAction;
}

/** `Sandbox.create`'s options: the create request's fields (`timeout`, `idle`, `labels`, `envVars`, …) and the connection's. */
export type SandboxCreateOpts = SandboxOpts &
  Omit<CreateSandboxInput, 'sync' | 'name' | 'orgId' | 'userId'> & {
    /** Default: `sandbox-` and 8 random hex digits. */
    name?: string;
    /** Resolve once the sandbox runs (default true). */
    sync?: boolean;
  };

export interface CommandRunOpts {
  args?: string[];
  env?: Record<string, string>;
  cwd?: string;
  /**
   * The command's limit, rounded up to whole seconds. Foreground: at most 300 s; 0 or omitted is
   * the server's default, 30 s. Background: at most 900 s; 0 or omitted is none.
   */
  timeoutMs?: number;
  /** Called with each piece of stdout as it comes. */
  onStdout?: (data: string) => void;
  /** Called with each piece of stderr as it comes. */
  onStderr?: (data: string) => void;
  /**
   * Throw `CommandExitError` (carrying stdout, stderr and the exit code) when the command exits
   * non-zero; a background command's `wait()` throws it. Default false: a non-zero exit is a
   * result like any other (E2B throws by default; pass `true` for that).
   */
  throwOnError?: boolean;
}

/** A command's result (foreground, or a background command's `wait()`). */
export type CommandResult = ExecResult;

/**
 * A command that exited non-zero, thrown by `Sandbox.commands.run(…, { throwOnError: true })`
 * (and by a background command's `wait()` with it): not a failed call — the command ran — so it
 * is no VoidRunError; it carries the whole result.
 */
export class CommandExitError extends Error {
  readonly stdout: string;
  readonly stderr: string;
  readonly exitCode: number;
  readonly timedOut: boolean;

  constructor(readonly result: { stdout: string; stderr: string; exitCode: number; timedOut: boolean }) {
    super(`Command exited with code ${result.exitCode}${result.timedOut ? ' (timed out)' : ''}${result.stderr ? `: ${result.stderr.slice(0, 200)}` : ''}`);
    this.name = 'CommandExitError';
    this.stdout = result.stdout;
    this.stderr = result.stderr;
    this.exitCode = result.exitCode;
    this.timedOut = result.timedOut;
  }
}

/**
 * A sandbox, with the ergonomics of E2B's SDK: `await Sandbox.create({ timeout, labels })`,
 * `sandbox.commands.run('ls')`, `sandbox.files.write(…)`, `await using sandbox = …`. It is a
 * thin layer over `createClient` and `SandboxHandle`, which stay for everything else (`handle`).
 */
export class Sandbox {
  readonly files: SandboxFiles;
  readonly commands: SandboxCommands;
  #onDispose: DisposeAction;
  readonly #ownsClient: boolean;
  #closed = false;
  #deleted = false;

  private constructor(
    /** The connection this sandbox uses (shared with the caller's when one was passed). */
    readonly client: VoidRunClient,
    /** The lower-level handle: pty, ports, snapshots, network, … */
    readonly handle: SandboxHandle,
    ownsClient: boolean,
    onDispose: DisposeAction,
  ) {
    this.#ownsClient = ownsClient;
    this.#onDispose = onDispose;
    this.files = handle.files;
    this.commands = new SandboxCommands(client.trpc, handle.id);
  }

  /** Creates a sandbox and resolves once it runs. */
  static async create(opts: SandboxCreateOpts = {}): Promise<Sandbox> {
    const { apiUrl, url, apiKey, orgId, headers, WebSocket, fetch, client: given, onDispose, name, sync, ...request } = opts;
    const client = given ?? createClient(connection({ apiUrl, url, apiKey, orgId, headers, WebSocket, fetch }));
    try {
      const handle = await client.sandboxes.create({ ...request, name: name ?? randomName(), sync: sync ?? true });
      return new Sandbox(client, handle, !given, onDispose ?? 'delete');
    } catch (err) {
      if (!given) await client.close();
      throw err;
    }
  }

  /** An existing sandbox by id. */
  static async connect(sandboxId: string, opts: SandboxOpts = {}): Promise<Sandbox> {
    const client = opts.client ?? createClient(connection(opts));
    try {
      return new Sandbox(client, await client.sandboxes.get(sandboxId), !opts.client, opts.onDispose ?? 'release');
    } catch (err) {
      if (!opts.client) await client.close();
      throw err;
    }
  }

  /** The caller's sandboxes, a page at a time; with `labels`, only those carrying all of them. */
  static async list(opts: ConnectionOptions & { page?: number; limit?: number; labels?: Record<string, string> } = {}) {
    const client = opts.client ?? createClient(connection(opts));
    try {
      const page = await client.sandboxes.list({ page: opts.page, limit: opts.limit, labels: opts.labels });
      return { ...page, sandboxes: page.sandboxes.map((s) => s.info) };
    } finally {
      if (!opts.client) await client.close();
    }
  }

  get sandboxId(): string {
    return this.handle.id;
  }

  /** The sandbox as last fetched (see `getInfo`). */
  get info(): SandboxInfo {
    return this.handle.info;
  }

  /** The sandbox as the server sees it now. */
  getInfo(): Promise<SandboxInfo> {
    return this.handle.refresh();
  }

  /**
   * Sets the sandbox's timeout from now: `seconds` later it is paused, stopped or deleted (its
   * `onTimeout`); 0 removes it. Resolves to the sandbox with its new `expiresAt`.
   */
  setTimeout(seconds: number): Promise<SandboxInfo> {
    return this.handle.setTimeout(seconds);
  }

  /**
   * The sandbox's events from after event `after` (default: from the oldest kept), live until the
   * loop leaves or the sandbox is deleted; a dropped connection resumes after the last event
   * received, so a reconnect misses nothing.
   */
  events(options: { after?: number } = {}): AsyncGenerator<SandboxEvent> {
    return this.handle.events(options);
  }

  pause(): Promise<unknown> {
    return this.handle.pause();
  }
  resume(): Promise<unknown> {
    return this.handle.resume();
  }

  /** Deletes the sandbox (with its snapshots), then closes the connection if this object opened it. */
  async kill(): Promise<void> {
    try {
      await this.handle.delete();
      this.#deleted = true;
    } finally {
      await this.close();
    }
  }

  /** Closes the connection if this object opened it; the sandbox keeps running. Closing twice is a no-op. */
  async close(): Promise<void> {
    if (!this.#ownsClient || this.#closed) return;
    this.#closed = true;
    await this.client.close();
  }

  /**
   * `await using sandbox = await Sandbox.create()`: at scope end, `kill()` or `close()` (see
   * `onDispose`). A sandbox already gone (killed in the scope, deleted elsewhere or by its
   * timeout) is no error here: what the scope's end asks for is done.
   */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.#onDispose === 'release' || this.#deleted) return this.close();
    try {
      await this.kill();
    } catch (err) {
      const code: string | undefined = err instanceof VoidRunError ? err.code : undefined;
      if (code !== 'SANDBOX_NOT_FOUND' && code !== 'SANDBOX_GONE') throw err;
    }
  }
}

/** `sandbox.commands`: run (foreground or background), list, kill, connect. */
export class SandboxCommands {
  constructor(
    private readonly trpc: TRPCClient<AppRouter>,
    readonly sandboxId: string,
  ) {}

  /**
   * Runs a command: a shell line, or a program with `args`. Foreground (default): resolves with
   * `{ stdout, stderr, exitCode }` when it exits, streaming output to `onStdout`/`onStderr` as it
   * comes. `background: true`: resolves at once with a `CommandProcess` (`pid`, `wait()`, `kill()`).
   */
  run(command: string, opts?: CommandRunOpts & { background?: false }): Promise<CommandResult>;
  run(command: string, opts: CommandRunOpts & { background: true }): Promise<CommandProcess>;
  run(command: string, opts?: CommandRunOpts & { background?: boolean }): Promise<CommandResult | CommandProcess>;
  async run(command: string, opts: CommandRunOpts & { background?: boolean } = {}): Promise<CommandResult | CommandProcess> {
    const { background, timeoutMs, onStdout, onStderr, throwOnError, ...spec } = opts;
    const timeout = timeoutMs === undefined ? undefined : Math.ceil(timeoutMs / 1000);
    if (background) {
      const started = await this.trpc.commands.run.mutate({ id: this.sandboxId, command, ...spec, timeout: timeout ?? 0 });
      return new CommandProcess(this.trpc, this.sandboxId, started.pid, started.command, { onStdout, onStderr, throwOnError });
    }
    let result: CommandResult;
    if (!onStdout && !onStderr) {
      // Nothing to stream to: one HTTP call, no WebSocket.
      const r = await this.trpc.exec.run.mutate({ id: this.sandboxId, command, ...spec, ...(timeout !== undefined ? { timeout } : {}), background: false });
      if (!('stdout' in r)) throw new Error('unexpected background result');
      result = r;
    } else {
      const input = { id: this.sandboxId, command, ...spec, ...(timeout !== undefined ? { timeout } : {}), background: false };
      const chunks = iterateSubscription<{ id: string; data: ExecChunk }>((h) => this.trpc.exec.stream.subscribe(input, h));
      result = await collect(unwrap(chunks), { onStdout, onStderr });
    }
    if (throwOnError && result.exitCode !== 0) throw new CommandExitError(result);
    return result;
  }

  /** The sandbox's background processes (running and recently exited). */
  async list(): Promise<ProcessInfo[]> {
    return (await this.trpc.commands.list.query({ id: this.sandboxId })).processes;
  }

  /** Kills a background process and its children: false when there is no such process. */
  async kill(pid: number): Promise<boolean> {
    return killed(new CommandHandle(this.trpc, this.sandboxId, pid, '').kill());
  }

  /** A background process started earlier (by pid), to wait for, kill, or follow. */
  connect(pid: number, opts: Pick<CommandRunOpts, 'onStdout' | 'onStderr' | 'throwOnError'> = {}): CommandProcess {
    return new CommandProcess(this.trpc, this.sandboxId, pid, '', opts);
  }
}

/**
 * A background command. Its output (from its start: the server keeps it) is followed once
 * `onStdout`/`onStderr` were given or `wait()` is called, over one subscription.
 */
export class CommandProcess {
  /** The lower-level handle: `write` to stdin, `output()` as an iterator, … */
  readonly handle: CommandHandle;
  #done: Promise<CommandResult> | null = null;
  #follow: { stop(): void } | null = null;

  constructor(
    private readonly trpc: TRPCClient<AppRouter>,
    readonly sandboxId: string,
    readonly pid: number,
    readonly command: string,
    private readonly opts: Pick<CommandRunOpts, 'onStdout' | 'onStderr' | 'throwOnError'>,
  ) {
    this.handle = new CommandHandle(trpc, sandboxId, pid, command);
    if (opts.onStdout || opts.onStderr) this.#result();
  }

  /** Resolves with its output and exit code once it exits (throws CommandExitError on non-zero with `throwOnError`). */
  async wait(): Promise<CommandResult> {
    const result = await this.#result();
    if (this.opts.throwOnError && result.exitCode !== 0) throw new CommandExitError(result);
    return result;
  }

  /** Kills it and its children: false when it no longer exists. */
  kill(): Promise<boolean> {
    return killed(this.handle.kill());
  }

  /** Writes to its stdin (`eof` closes it). */
  sendStdin(data: string, options: { eof?: boolean } = {}): Promise<void> {
    return this.handle.write(data, options);
  }

  /**
   * Stops following its output; the process keeps running. A `wait()` under way rejects; a later
   * one follows it again (from its start).
   */
  disconnect(): void {
    const follow = this.#follow;
    this.#follow = null;
    this.#done = null;
    follow?.stop();
  }

  #result(): Promise<CommandResult> {
    if (this.#done) return this.#done;
    const done = collect(
      iterateSubscription<ExecChunk>((h) => {
        const sub = this.trpc.commands.attach.subscribe({ id: this.sandboxId, pid: this.pid }, { ...h, onData: (e) => h.onData(e.data) });
        this.#follow = {
          stop: () => {
            sub.unsubscribe();
            h.onError(new Error(`Stopped following process ${this.pid} (disconnect)`));
          },
        };
        return sub;
      }),
      this.opts,
    );
    done.catch(() => {});
    this.#done = done;
    return done;
  }
}

/** A command's output chunks gathered into its result, each piece passed on to the callbacks as it comes. */
async function collect(chunks: AsyncIterable<ExecChunk>, callbacks: Pick<CommandRunOpts, 'onStdout' | 'onStderr'>): Promise<CommandResult> {
  let stdout = '';
  let stderr = '';
  let truncated = false;
  for await (const chunk of chunks) {
    if (chunk.type === 'stdout') {
      stdout += chunk.data;
      callbacks.onStdout?.(chunk.data);
    } else if (chunk.type === 'stderr') {
      stderr += chunk.data;
      callbacks.onStderr?.(chunk.data);
    } else if (chunk.type === 'gap') truncated = true;
    else if (chunk.type === 'exit') return { stdout, stderr, exitCode: chunk.exitCode, timedOut: chunk.timedOut, truncated };
  }
  throw new Error('The command\'s output ended before it exited (the connection was closed)');
}

async function* unwrap<T>(events: AsyncIterable<{ id: string; data: T }>): AsyncGenerator<T> {
  for await (const e of events) yield e.data;
}

async function killed(kill: Promise<void>): Promise<boolean> {
  try {
    await kill;
    return true;
  } catch (err) {
    if (err instanceof ProcessNotFoundError) return false;
    throw err;
  }
}

/** The connection options with the environment's fallbacks; a clear error naming what is missing. */
function connection(opts: ConnectionOptions): ClientOptions {
  const url = opts.apiUrl ?? opts.url ?? envVar('VOIDRUN_API_URL');
  if (!url) throw new TypeError('No VoidRun server URL: pass apiUrl, or set VOIDRUN_API_URL');
  const apiKey = opts.apiKey ?? envVar('VOIDRUN_API_KEY');
  if (!apiKey) throw new TypeError('No VoidRun API key: pass apiKey, or set VOIDRUN_API_KEY');
  return { url, apiKey, orgId: opts.orgId, headers: opts.headers, WebSocket: opts.WebSocket, fetch: opts.fetch };
}

function randomName(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  return `sandbox-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}
