import { randomUUID } from 'node:crypto';
import { Agent, ClientRequest, request as httpRequest, type ClientRequestArgs, type IncomingMessage } from 'node:http';
import { Socket } from 'node:net';
import type { Duplex, Readable } from 'node:stream';
import type { z } from 'zod';
import { AGENT_REQUEST_HEADER } from '../../shared/guest-protocol.js';
import { AGENT_MESSAGE_MAX_CHARS, AgentHttpErrorReply } from '../../shared/schemas/agent-replies.js';
import { AgentProtocolError } from './agent-connection.js';
import { readAtMost } from '../read-at-most.js';

/**
 * The agent's raw HTTP routes (readiness, file bytes, a VM's poweroff and identity), spoken only
 * from here. Like its tRPC replies, every body the server reads from an agent is size-bounded and
 * schema-parsed; a file's bytes are streamed, never held.
 */

/** The most the server reads of an agent's JSON answer on a raw route. */
export const AGENT_HTTP_MAX_JSON_BYTES = 64 * 1024;

/** How long an idle kept-alive socket to an agent stays open (the agent keeps its side longer). */
const IDLE_SOCKET_MS = 30_000;

/**
 * The kept-alive sockets of one sandbox's raw HTTP requests, over the driver's `connect()`: at
 * most `maxSockets` open, `maxFreeSockets` idle. The agent may lie, so a socket goes back to the
 * pool only after an answer that echoed its request's nonce (see `nonceFor`/`checkAnswer`): an
 * answer sent ahead for a request not yet written cannot know it. An idle socket on which the
 * agent sends anything is destroyed; bytes after an answer on a busy socket make Node's parser
 * destroy it.
 */
export class AgentHttpPool extends Agent {
  /** Sockets whose last answer echoed its nonce: the only ones kept. */
  readonly #proven = new WeakSet<Duplex>();

  constructor(
    private readonly connect: () => Promise<Duplex>,
    private readonly onConnectError: (err: NodeJS.ErrnoException) => Error,
    limits: { maxSockets: number; maxFreeSockets: number },
  ) {
    super({ keepAlive: true, ...limits, scheduling: 'lifo' });
  }

  /** Node's hook for a new socket: the driver's stream, asynchronously. */
  override createConnection(_opts: ClientRequestArgs, callback?: (err: Error | null, stream: Duplex) => void): undefined {
    this.connect().then(
      (stream) => callback!(null, stream),
      (err: NodeJS.ErrnoException) => callback!(this.onConnectError(err), undefined as never),
    );
    return undefined;
  }

  /**
   * Whether `res` may be the answer to the request that sent `nonce`: an echo of it marks the
   * socket fit for another request. No echo at all is accepted only on a socket's first request
   * (an agent from before the echo; the socket is then closed after it); a wrong echo, or none
   * on a reused socket, is an answer to something else.
   */
  checkAnswer(req: ClientRequest, res: IncomingMessage, nonce: string): boolean {
    const echo = res.headers[AGENT_REQUEST_HEADER];
    if (echo === nonce) {
      this.#proven.add(req.socket as Duplex);
      return true;
    }
    return echo === undefined && !req.reusedSocket;
  }

  override keepSocketAlive(socket: Duplex): boolean {
    if (!(socket instanceof Socket) || !this.#proven.has(socket)) return false;
    this.#proven.delete(socket);
    if (!(super.keepSocketAlive(socket) as unknown as boolean)) return false;
    const hinted = socket.timeout ?? 0;
    socket.setTimeout(hinted > 0 ? Math.min(hinted, IDLE_SOCKET_MS) : IDLE_SOCKET_MS);
    socket.on('data', destroyOnIdleData);
    return true;
  }

  override reuseSocket(socket: Duplex, req: ClientRequest): void {
    socket.off('data', destroyOnIdleData);
    (socket as Socket).setTimeout(0);
    super.reuseSocket(socket as Socket, req);
  }
}

/**
 * A request through an `AgentHttpPool` that carries a fresh nonce (AGENT_REQUEST_HEADER) and
 * emits 'response' only for an answer the pool accepts as this request's; any other answer is
 * this request's 'error' (an AgentProtocolError) and its socket is destroyed.
 */
export class CheckedAgentRequest extends ClientRequest {
  readonly #nonce = randomUUID();

  constructor(
    private readonly pool: AgentHttpPool,
    private readonly sandboxId: string,
    options: { method: string; path: string; headers: Record<string, string | number> },
  ) {
    super({ ...options, agent: pool });
    this.setHeader(AGENT_REQUEST_HEADER, this.#nonce);
  }

  override emit(event: string | symbol, ...args: unknown[]): boolean {
    if (event === 'response' && !this.pool.checkAnswer(this, args[0] as IncomingMessage, this.#nonce)) {
      this.destroy(new AgentProtocolError(`the sandbox ${this.sandboxId} agent's answer on a kept-alive connection was not the answer to the request sent`));
      return true; // the answer is not dumped into a later request: its socket is gone
    }
    return super.emit(event, ...args);
  }
}

/** An idle socket's agent spoke unasked: whatever it sent must not become a later request's answer. */
function destroyOnIdleData(this: Socket): void {
  this.destroy();
}

/**
 * One HTTP request to the agent over a stream from `connect()`: resolves with the status code
 * (the body is discarded unread). The stream is used for this request only.
 */
export function agentHttpStatus(agent: Duplex, method: string, path: string, opts: { body?: unknown; timeoutMs: number }): Promise<number> {
  const body = opts.body === undefined ? undefined : JSON.stringify(opts.body);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        method,
        path,
        createConnection: () => agent as never,
        timeout: opts.timeoutMs,
        headers: body === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      },
    );
    req.once('timeout', () => req.destroy(new Error(`${method} ${path}: no answer within ${opts.timeoutMs} ms`)));
    req.once('error', reject);
    req.end(body);
  });
}

/** Reads a whole body of at most `maxBytes`; more fails with `AgentProtocolError`. */
export function readBounded(stream: Readable, maxBytes: number, what: string): Promise<Buffer> {
  return readAtMost(stream, maxBytes, () => {
    stream.destroy();
    return new AgentProtocolError(`${what} was larger than ${maxBytes} bytes`);
  });
}

/** An agent's JSON answer, bounded and parsed against `schema`; anything else is an `AgentProtocolError`. */
export async function readAgentJson<T extends z.ZodType>(res: IncomingMessage, schema: T, sandboxId: string, what: string): Promise<z.infer<T>> {
  const label = `the sandbox ${sandboxId} agent's answer to ${what}`;
  const body = await readBounded(res, AGENT_HTTP_MAX_JSON_BYTES, label);
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch {
    throw new AgentProtocolError(`${label} is not JSON`);
  }
  const parsed = schema.safeParse(json);
  if (!parsed.success) throw new AgentProtocolError(`${label} is malformed`);
  return parsed.data;
}

/** An agent's error answer on a raw route: its `{error, code}` (bounded, cut), or what can be said without it. */
export async function readAgentError(res: IncomingMessage, sandboxId: string): Promise<{ code: string; message: string }> {
  const body = await readBounded(res, AGENT_HTTP_MAX_JSON_BYTES, 'an error answer').catch(() => null);
  let parsed: z.infer<typeof AgentHttpErrorReply> = {};
  try {
    const r = AgentHttpErrorReply.safeParse(JSON.parse(body?.toString('utf8') ?? ''));
    if (r.success) parsed = r.data;
  } catch {}
  const message = parsed.error ? parsed.error.slice(0, AGENT_MESSAGE_MAX_CHARS) : `the sandbox ${sandboxId} agent answered HTTP ${res.statusCode}`;
  return { code: parsed.code ?? '', message };
}

/** A response header from an agent as text, or '' (repeated headers are not accepted). */
export function agentHeader(res: IncomingMessage, name: string): string {
  const v = res.headers[name];
  return typeof v === 'string' ? v : '';
}

