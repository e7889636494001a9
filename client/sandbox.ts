import type { TRPCClient } from '@trpc/client';
import type { ExecChunk, ExecResult, NetworkPolicy, SandboxEvent, PortAccess, PortList, PreviewToken, ProcessInfo, PublicUrl, Sandbox as SandboxInfo, SandboxActionResult, Snapshot } from '../shared/index.js';
import type { AppRouter } from '../server/routers/index.js';
import type { UpdateNetworkInput } from '../shared/schemas/network.js';
import { SandboxFiles, type RawHttp } from './files.js';
import { PtyHandle } from './pty.js';
import { iterateSubscription } from '../shared/subscription-iterator.js';

export interface ExecOptions {
  args?: string[];
  env?: Record<string, string>;
  cwd?: string;
  /** Seconds, 1–300 (default 30). */
  timeout?: number;
}

export interface CommandOptions {
  args?: string[];
  env?: Record<string, string>;
  cwd?: string;
  /** Seconds, 0–900; 0 (default) = no timeout. */
  timeout?: number;
}

/** A background process in a sandbox. */
export class CommandHandle {
  constructor(
    private readonly trpc: TRPCClient<AppRouter>,
    readonly sandboxId: string,
    readonly pid: number,
    readonly command: string,
  ) {}

  /** Resolves with the exit code once the process exits (or null if `timeoutSec` passed first). */
  async wait(timeoutSec = 0): Promise<number | null> {
    const r = await this.trpc.commands.wait.mutate({ id: this.sandboxId, pid: this.pid, timeout: timeoutSec });
    return r.exitCode;
  }

  async kill(): Promise<void> {
    await this.trpc.commands.kill.mutate({ id: this.sandboxId, pid: this.pid });
  }

  async write(data: string, options: { eof?: boolean } = {}): Promise<void> {
    await this.trpc.commands.writeStdin.mutate({ id: this.sandboxId, pid: this.pid, data, eof: options.eof ?? false });
  }

  /** The output so far, then live until the process exits. */
  output(): AsyncGenerator<ExecChunk> {
    return unwrapTracked(iterateSubscription((h) => this.trpc.commands.attach.subscribe({ id: this.sandboxId, pid: this.pid }, h)));
  }
}

/** A sandbox and what can be done in it. */
export class SandboxHandle {
  /** The sandbox's files: list, read, write, upload, download, watch, … */
  readonly files: SandboxFiles;

  constructor(
    private readonly trpc: TRPCClient<AppRouter>,
    public info: SandboxInfo,
    raw: RawHttp,
  ) {
    this.files = new SandboxFiles(trpc, raw, info.id);
  }

  get id(): string {
    return this.info.id;
  }

  async refresh(): Promise<SandboxInfo> {
    this.info = await this.trpc.sandbox.get.query({ id: this.id });
    return this.info;
  }

  /** Runs a command (a shell line, or a program with `args`) and waits for its result. */
  async exec(command: string, options: ExecOptions = {}): Promise<ExecResult> {
    const r = await this.trpc.exec.run.mutate({ id: this.id, command, ...options, background: false });
    if (!('stdout' in r)) throw new Error('unexpected background result');
    return r;
  }

  /** Runs a command and yields its output as it comes; the last chunk is `{type: 'exit'}`. */
  execStream(command: string, options: ExecOptions = {}): AsyncGenerator<ExecChunk> {
    return unwrapTracked(iterateSubscription((h) => this.trpc.exec.stream.subscribe({ id: this.id, command, ...options, background: false }, h)));
  }

  readonly commands = {
    run: async (command: string, options: CommandOptions = {}): Promise<CommandHandle> => {
      const r = await this.trpc.commands.run.mutate({ id: this.id, command, ...options, timeout: options.timeout ?? 0 });
      return new CommandHandle(this.trpc, this.id, r.pid, r.command);
    },
    list: async (): Promise<ProcessInfo[]> => (await this.trpc.commands.list.query({ id: this.id })).processes,
    get: (pid: number, command = ''): CommandHandle => new CommandHandle(this.trpc, this.id, pid, command),
  };

  /** Terminals: `pty.create({cols, rows})` → a handle; `pty.list()`; `pty.get(sessionId)`. */
  readonly pty = {
    create: async (size: { cols?: number; rows?: number } = {}): Promise<PtyHandle> => {
      const r = await this.trpc.pty.create.mutate({ id: this.id, cols: size.cols ?? 80, rows: size.rows ?? 24 });
      return new PtyHandle(this.trpc, this.id, r.sessionId);
    },
    list: async () => (await this.trpc.pty.list.query({ id: this.id })).sessions,
    get: (sessionId: string): PtyHandle => new PtyHandle(this.trpc, this.id, sessionId),
  };

  /**
   * The sandbox's TCP ports: `list()` what listens (with access and URLs), `token(port)` a preview
   * token, `setPublic(port, true|false)`, `publicUrls()`, and `previewUrl(port)` (null on a server
   * without PREVIEW_DOMAIN; the API path `/api/sandboxes/{id}/ports/{port}/` always proxies with a key).
   */
  readonly ports = {
    list: (): Promise<PortList> => this.trpc.ports.list.query({ id: this.id }),
    token: (port: number, options: { ttlSeconds?: number } = {}): Promise<PreviewToken> => this.trpc.ports.token.mutate({ id: this.id, port, ...options }),
    setPublic: (port: number, isPublic: boolean): Promise<PortAccess> => this.trpc.ports.setAccess.mutate({ id: this.id, port, public: isPublic }),
    publicUrls: (): Promise<PublicUrl[]> => this.trpc.ports.publicUrls.query({ id: this.id }),
    /**
     * A URL a browser can open on the port's preview host, carrying a fresh preview token (the
     * host moves it into a cookie), valid for `ttlSeconds` (default 1 h); null without PREVIEW_DOMAIN.
     */
    previewUrl: async (port: number, options: { ttlSeconds?: number } = {}): Promise<string | null> => (await this.ports.token(port, options)).url,
  };

  /**
   * Changes the sandbox's network policy (`egress`, `allow`, `deny`, `maxEgressBytes`; `mode` only
   * while it is stopped): the fields given replace its own; a running sandbox gets the rules before
   * this resolves. Resolves to the policy now in force.
   */
  async updateNetwork(policy: Omit<UpdateNetworkInput, 'id'>): Promise<NetworkPolicy> {
    return (await this.trpc.sandbox.updateNetwork.mutate({ id: this.id, ...policy })).network;
  }

  /**
   * Sets the sandbox's timeout from now (`POST /sandboxes/{id}/timeout`): `seconds` later it is
   * paused, stopped or deleted (its `onTimeout`); 0 removes it. Resolves to the sandbox with its
   * new `expiresAt` (also kept as `info`).
   */
  async setTimeout(seconds: number): Promise<SandboxInfo> {
    this.info = await this.trpc.sandbox.setTimeout.mutate({ id: this.id, timeout: seconds });
    return this.info;
  }

  /**
   * The sandbox's events (lifecycle, processes, terminals, watches, ports, policy changes) with
   * ids greater than `after` (default: from the oldest kept), then live until the loop leaves or
   * the sandbox is deleted. When the WebSocket reconnects, tRPC resumes after the last event
   * received, so nothing is missed or repeated.
   */
  events(options: { after?: number } = {}): AsyncGenerator<SandboxEvent> {
    const input = { id: this.id, lastEventId: options.after !== undefined ? String(options.after) : null };
    return unwrapTracked(iterateSubscription((h) => this.trpc.sandbox.events.subscribe(input, h)));
  }

  stop(): Promise<SandboxActionResult> {
    return this.trpc.sandbox.stop.mutate({ id: this.id });
  }
  start(): Promise<SandboxActionResult> {
    return this.trpc.sandbox.start.mutate({ id: this.id });
  }
  pause(): Promise<SandboxActionResult> {
    return this.trpc.sandbox.pause.mutate({ id: this.id });
  }
  resume(): Promise<SandboxActionResult> {
    return this.trpc.sandbox.resume.mutate({ id: this.id });
  }
  snapshot(): Promise<Snapshot> {
    return this.trpc.sandbox.snapshot.mutate({ id: this.id });
  }
  snapshots(): Promise<Snapshot[]> {
    return this.trpc.sandbox.snapshots.query({ id: this.id });
  }
  async delete(options: { keepSnapshots?: boolean } = {}): Promise<void> {
    await this.trpc.sandbox.delete.mutate({ id: this.id, keepSnapshots: options.keepSnapshots ?? false });
  }
}

async function* unwrapTracked<T>(events: AsyncGenerator<{ id: string; data: T }>): AsyncGenerator<T> {
  for await (const e of events) yield e.data;
}
