import { createTRPCClient, TRPCClientError, type TRPCClient } from '@trpc/client';
import type { ClientRequest } from 'node:http';
import type { Duplex } from 'node:stream';
import type { AgentRouter } from '../../agent/router.js';
import { ConflictError, DomainError, ErrorCode, ForbiddenError, InvalidInputError, NotFoundError, PayloadTooLargeError, SandboxNotRunningError } from '../errors.js';
import type { NotFoundCode } from '../../shared/errors.js';
import type { SandboxDriver } from '../hypervisor/types.js';
import { AgentConnection, AgentConnectionError, AgentProtocolError } from './agent-connection.js';
import { AgentHttpPool, CheckedAgentRequest } from './agent-http.js';
import { openPortTunnel } from './port-tunnel.js';

export type AgentClient = TRPCClient<AgentRouter>;

/**
 * A typed client of one agent connection: `.query()` and `.mutate()` go straight to
 * `AgentConnection.request` (one promise per call: these run on every exec and file call), and
 * `.subscribe()` through tRPC's client on the connection's link. Each path's function is made once.
 */
function agentClient(conn: AgentConnection): AgentClient {
  const trpc = createTRPCClient<AgentRouter>({ links: [conn.link()] }) as unknown as Record<string, unknown>;
  const nodes = new Map<string, unknown>();
  const node = (path: string[]): unknown => {
    const key = path.join('.');
    let made = nodes.get(key);
    if (made) return made;
    const last = path.at(-1);
    const procedure = path.slice(0, -1).join('.');
    if (last === 'query' || last === 'mutate') {
      const type = last === 'query' ? 'query' : 'mutation';
      made = (input: unknown, opts?: { signal?: AbortSignal; context?: { timeoutMs?: number } }) =>
        conn.request(type, procedure, input, { timeoutMs: opts?.context?.timeoutMs, signal: opts?.signal ?? undefined });
    } else if (last === 'subscribe') {
      made = (...args: unknown[]) => {
        const target = path.slice(0, -1).reduce<Record<string, unknown>>((o, k) => o[k] as Record<string, unknown>, trpc);
        return (target.subscribe as (...a: unknown[]) => unknown)(...args);
      };
    } else {
      made = new Proxy({}, { get: (_t, k) => (typeof k === 'string' && k !== 'then' ? node([...path, k]) : undefined) });
    }
    nodes.set(key, made);
    return made;
  };
  return node([]) as AgentClient;
}

/** The shortest interval between two status refreshes of one sandbox after agent failures. */
const REFRESH_INTERVAL_MS = 1000;

/** How long the agent has to start answering a raw request once it is fully sent. */
export const AGENT_ANSWER_TIMEOUT_MS = 60_000;

/**
 * The most sockets raw requests hold open to one sandbox's agent, and the most kept idle; more
 * concurrent requests wait for a socket.
 */
const RAW_SOCKET_LIMITS = { maxSockets: 256, maxFreeSockets: 8 };

/** Raised when a sandbox's agent cannot be reached or broke the protocol; 502 to callers. */
export class AgentUnavailableError extends DomainError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(ErrorCode.AGENT_UNAVAILABLE, message, options);
  }
}

/** A lifecycle transition the API is driving a sandbox through. */
export type LifecyclePhase = 'stopping' | 'starting' | 'pausing' | 'resuming' | 'deleting';

/** Where an API transition left a sandbox; null when it failed (the state is then unknown). */
export type SettledState = 'running' | 'stopped' | 'paused' | 'deleted' | null;

/** The API's last word on a sandbox's lifecycle, kept to explain agent failures it caused. */
interface LifecycleMark {
  /** Counts transitions begun; a request that saw another value when it began met one. */
  epoch: number;
  phase: LifecyclePhase | null;
  settled: SettledState;
}

/** What a sandbox's agent failure during a transition tells the caller, by phase. */
const PHASE_ADVICE: Record<LifecyclePhase, string> = {
  stopping: 'start it again once it has stopped',
  starting: 'retry once it is running',
  pausing: 'resume it once it is paused',
  resuming: 'retry once it is running',
  deleting: 'it is being deleted',
};

/** Which sandbox a call is for. */
export interface SandboxRef {
  id: string;
  orgId: string;
}

export interface AgentClientsOptions {
  /** The largest WebSocket message the server accepts from an agent. */
  maxMessageBytes: number;
  /**
   * Called (and awaited) when a call found the sandbox's agent unreachable or lying, before the
   * failure reaches the caller: the owner refreshes the sandbox's status, so the answer and
   * `GET /sandboxes/{id}` agree.
   */
  onUnavailable?: (sandbox: SandboxRef, err: AgentUnavailableError) => Promise<void>;
}

/**
 * The gateway to every sandbox's agent: one connection per sandbox, opened on first use and kept,
 * and the one failure policy (`call`, `failure`). The server's only way to talk to what runs inside
 * a sandbox; services never map agent errors themselves.
 */
export class AgentClients {
  readonly #clients = new Map<string, { conn: AgentConnection; client: AgentClient }>();
  readonly #refreshing = new Map<string, Promise<void>>();
  readonly #refreshedAt = new Map<string, number>();
  readonly #lifecycle = new Map<string, LifecycleMark>();
  /** Each sandbox's kept-alive sockets for raw requests (see `request`). */
  readonly #pools = new Map<string, AgentHttpPool>();
  /** The lifecycle epoch each raw request's errors belong to (see `request`). */
  readonly #errorEpochs = new WeakMap<object, number>();

  constructor(
    private readonly driver: SandboxDriver,
    private readonly opts: AgentClientsOptions,
  ) {}

  get(sandboxId: string): AgentClient {
    let entry = this.#clients.get(sandboxId);
    if (!entry) {
      const conn = new AgentConnection({ connect: () => this.driver.connect(sandboxId), sandboxId, maxMessageBytes: this.opts.maxMessageBytes });
      entry = { conn, client: agentClient(conn) };
      this.#clients.set(sandboxId, entry);
    }
    return entry.client;
  }

  /**
   * Runs `fn` with the sandbox's agent client; a failure comes back as a domain error (see
   * `fromAgentError`), after `onUnavailable` ran for an unreachable or lying agent.
   */
  async call<T>(sandbox: SandboxRef, fn: (agent: AgentClient) => Promise<T>): Promise<T> {
    const since = this.epoch(sandbox.id);
    try {
      return await fn(this.get(sandbox.id));
    } catch (err) {
      throw await this.failure(sandbox, err, since);
    }
  }

  /**
   * The domain error for a failed agent call or stream, after `onUnavailable` where it applies.
   * An unreachable agent explained by a transition the API is driving (or drove since `since`,
   * the `epoch` when the request began) is the sandbox's state, not the agent's failure: 409
   * SANDBOX_NOT_RUNNING naming it (404 once deleted), and no status refresh.
   */
  async failure(sandbox: SandboxRef, err: unknown, since?: number): Promise<unknown> {
    const mapped = fromAgentError(err);
    if (!(mapped instanceof AgentUnavailableError)) return mapped;
    const explained = this.#explainedByLifecycle(sandbox.id, since ?? (typeof err === 'object' && err ? this.#errorEpochs.get(err) : undefined));
    if (explained) return explained;
    await this.#unavailable(sandbox, mapped);
    return mapped;
  }

  /**
   * Marks the start of a transition the API drives a sandbox through (under its lifecycle lock);
   * returns the function that ends it with the state it left. Until then requests meeting it hear
   * the phase; afterwards those that began before it hear where it left the sandbox.
   */
  beginTransition(sandboxId: string, phase: LifecyclePhase): (settled: SettledState) => void {
    const mark: LifecycleMark = { epoch: this.epoch(sandboxId) + 1, phase, settled: null };
    this.#lifecycle.set(sandboxId, mark);
    return (settled) => {
      mark.phase = null;
      mark.settled = settled;
      // A deleted sandbox's mark only has to outlive the requests in flight when it went.
      if (settled === 'deleted') {
        setTimeout(() => {
          if (this.#lifecycle.get(sandboxId) === mark) this.#lifecycle.delete(sandboxId);
        }, AGENT_ANSWER_TIMEOUT_MS).unref();
      }
    };
  }

  /** The transition the API is driving a sandbox through, or null. */
  phaseOf(sandboxId: string): LifecyclePhase | null {
    return this.#lifecycle.get(sandboxId)?.phase ?? null;
  }

  /** The count of transitions begun for a sandbox; a request records it when it begins. */
  epoch(sandboxId: string): number {
    return this.#lifecycle.get(sandboxId)?.epoch ?? 0;
  }

  /**
   * Forgets where the API's last transition left a sandbox: its status changed otherwise (the
   * health loop found it stopped or running), so later agent failures are the agent's again.
   */
  forgetSettled(sandboxId: string): void {
    const mark = this.#lifecycle.get(sandboxId);
    if (mark) mark.settled = null;
  }

  /** The caller's answer when the API's own transition explains an unreachable agent, else null. */
  #explainedByLifecycle(sandboxId: string, since: number | undefined): DomainError | null {
    const mark = this.#lifecycle.get(sandboxId);
    if (!mark) return null;
    if (mark.phase) return new SandboxNotRunningError(`Sandbox ${sandboxId} is ${mark.phase}; ${PHASE_ADVICE[mark.phase]}`);
    if (since === mark.epoch) return null; // no transition since the request began: the agent failed
    switch (mark.settled) {
      case 'stopped':
        return new SandboxNotRunningError(`Sandbox ${sandboxId} was stopped while the request ran; start it and retry`);
      case 'paused':
        return new SandboxNotRunningError(`Sandbox ${sandboxId} was paused while the request ran; resume it and retry`);
      case 'deleted':
        return new NotFoundError(`Sandbox ${sandboxId} was deleted while the request ran`, { code: 'SANDBOX_NOT_FOUND' });
      case 'running':
        // Only a request known to predate the transition met it; others met a failing agent.
        return since === undefined ? null : new SandboxNotRunningError(`Sandbox ${sandboxId} was restarted while the request ran; retry`);
      default:
        return null;
    }
  }

  /**
   * Runs `onUnavailable` for a sandbox at most once at a time and once per second: a lying agent
   * failing every call (or a client repeating calls to a dead one) costs one status refresh, not
   * one per call. Callers in between wait for the refresh in flight, or go on.
   */
  async #unavailable(sandbox: SandboxRef, err: AgentUnavailableError): Promise<void> {
    const hook = this.opts.onUnavailable;
    if (!hook) return;
    const running = this.#refreshing.get(sandbox.id);
    if (running) return running;
    const last = this.#refreshedAt.get(sandbox.id) ?? 0;
    if (Date.now() - last < REFRESH_INTERVAL_MS) return;
    const refresh = hook(sandbox, err)
      .catch(() => {})
      .finally(() => {
        this.#refreshing.delete(sandbox.id);
        this.#refreshedAt.set(sandbox.id, Date.now());
      });
    this.#refreshing.set(sandbox.id, refresh);
    return refresh;
  }

  /**
   * A raw HTTP request to the sandbox's agent (file bytes, process streams), over the sandbox's
   * kept-alive sockets (`AgentHttpPool`). The caller writes the body and reads the response with
   * the bounded readers of `agent-http.ts`; failures to connect surface as the request's 'error'
   * event with an AgentConnectionError, and an answer that is not this request's (see
   * `AgentHttpPool.checkAnswer`) as an 'error' with an AgentProtocolError, never as a 'response'.
   */
  request(
    sandboxId: string,
    options: { method: string; path: string; headers?: Record<string, string | number>; signal?: AbortSignal; answerTimeoutMs?: number },
  ): ClientRequest {
    const epoch = this.epoch(sandboxId);
    // Response heads are bounded by Node's parser (16 KiB); bodies by the readers.
    const req = new CheckedAgentRequest(this.#pool(sandboxId), sandboxId, { method: options.method, path: options.path, headers: { host: 'agent', ...options.headers } });
    // Registered before the caller's listeners: `failure` learns which lifecycle epoch it met.
    req.once('error', (err) => this.#errorEpochs.set(err, epoch));
    // Once the request is written the answer is due within the deadline; a caller that leaves
    // (its client hung up) ends the request, so a silent agent holds no socket.
    const timeoutMs = options.answerTimeoutMs ?? AGENT_ANSWER_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    req.once('finish', () => {
      timer = setTimeout(() => req.destroy(new AgentConnectionError(`the sandbox agent did not answer within ${timeoutMs} ms`)), timeoutMs);
    });
    req.once('response', () => clearTimeout(timer));
    const signal = options.signal;
    const onAbort = () => req.destroy(new AgentConnectionError('the request was abandoned by its caller'));
    if (signal?.aborted) queueMicrotask(onAbort);
    else signal?.addEventListener('abort', onAbort, { once: true });
    req.once('close', () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    });
    return req;
  }

  /**
   * A byte stream to TCP `port` inside the sandbox, through its agent (a port tunnel over a fresh
   * connection of the driver's, never a pooled one): the caller owns it and speaks whatever the
   * port speaks. Failures come back as `call`'s do; nothing listening is UpstreamUnavailableError.
   */
  async openPort(sandbox: SandboxRef, port: number): Promise<Duplex> {
    const since = this.epoch(sandbox.id);
    try {
      const stream = await this.driver.connect(sandbox.id).catch((err: NodeJS.ErrnoException) => {
        throw new AgentConnectionError(`cannot connect (${err.code ?? 'error'})`);
      });
      return await openPortTunnel(stream, sandbox.id, port);
    } catch (err) {
      throw await this.failure(sandbox, err, since);
    }
  }

  /** The sandbox's pool of raw HTTP sockets, made on first use; `drop` closes it. */
  #pool(sandboxId: string): AgentHttpPool {
    let pool = this.#pools.get(sandboxId);
    if (!pool) {
      pool = new AgentHttpPool(
        () => this.driver.connect(sandboxId),
        (err) => new AgentConnectionError(`cannot connect (${err.code ?? 'error'})`),
        RAW_SOCKET_LIMITS,
      );
      this.#pools.set(sandboxId, pool);
    }
    return pool;
  }

  /** Forgets a sandbox's connection (it was stopped, restarted or deleted). */
  async drop(sandboxId: string): Promise<void> {
    const entry = this.#clients.get(sandboxId);
    this.#clients.delete(sandboxId);
    this.#pools.get(sandboxId)?.destroy();
    this.#pools.delete(sandboxId);
    this.#refreshedAt.delete(sandboxId);
    await entry?.conn.close();
  }

  async closeAll(): Promise<void> {
    await Promise.all([...new Set([...this.#clients.keys(), ...this.#pools.keys()])].map((id) => this.drop(id)));
  }
}

/**
 * The domain error for an error code the agent reports (over tRPC or its raw routes); a
 * NOT_FOUND gets `notFound`, the code of what the call was about (a file, a process, a session).
 */
export function fromAgentCode(code: string, message: string, cause?: unknown, notFound: NotFoundCode = 'NOT_FOUND'): DomainError | null {
  switch (code) {
    case 'NOT_FOUND':
      return new NotFoundError(message, { cause, code: notFound });
    case 'BAD_REQUEST':
    case 'PRECONDITION_FAILED':
      return new InvalidInputError(message, { cause });
    case 'FORBIDDEN':
      return new ForbiddenError(message, { cause });
    case 'CONFLICT':
      return new ConflictError(message, { cause });
    case 'PAYLOAD_TOO_LARGE':
      return new PayloadTooLargeError(message, { cause });
    default:
      return null;
  }
}

/** What a NOT_FOUND of an agent procedure is about, by the procedure's router (`files.stat` → a file). */
function notFoundCodeOf(procedure: string | undefined): NotFoundCode {
  const domain = procedure?.split('.')[0];
  if (domain === 'files') return 'FILE_NOT_FOUND';
  if (domain === 'process') return 'PROCESS_NOT_FOUND';
  if (domain === 'shell' || domain === 'pty') return 'SESSION_NOT_FOUND';
  return 'NOT_FOUND';
}

const UNREACHABLE_HINT = 'Check the sandbox status; restart it with POST /api/sandboxes/{id}/start if it stopped.';

/**
 * Maps an agent call's failure to a domain error, the one failure policy for every call:
 * unreachable agent → AgentUnavailableError (502) with a hint; a reply that broke the protocol →
 * AgentUnavailableError naming the sandbox; the agent's own NOT_FOUND / BAD_REQUEST / … → the
 * matching domain error with its (bounded) message. Plain socket errors of raw transfers count as
 * unreachable.
 */
export function fromAgentError(err: unknown): unknown {
  if (err instanceof DomainError) return err;
  const cause = err instanceof TRPCClientError ? err.cause : err;
  if (cause instanceof AgentProtocolError) return new AgentUnavailableError(`The sandbox agent broke the protocol: ${cause.message}`, { cause: err });
  if (cause instanceof AgentConnectionError) return new AgentUnavailableError(`The sandbox agent is not responding: ${cause.message}. ${UNREACHABLE_HINT}`, { cause: err });
  if (!(err instanceof TRPCClientError)) {
    if (typeof (err as NodeJS.ErrnoException | null)?.code === 'string') return new AgentUnavailableError(`The sandbox agent is not responding. ${UNREACHABLE_HINT}`, { cause: err });
    return err;
  }
  const code = (err.data as { code?: string } | undefined)?.code;
  if (code) {
    const mapped = fromAgentCode(code, err.message, err, notFoundCodeOf((err.data as { path?: string } | undefined)?.path));
    if (mapped) return mapped;
  }
  return new AgentUnavailableError(`The sandbox agent failed: ${err.message}`, { cause: err });
}
