import type { Duplex } from 'node:stream';
import { TRPCClientError, type TRPCLink } from '@trpc/client';
import { observable } from '@trpc/server/observable';
import WebSocket from 'ws';
import { z } from 'zod';
import { AGENT_MESSAGE_MAX_CHARS, agentReplies, agentReplyMaxBytes, type AgentReplyPath } from '../../shared/schemas/agent-replies.js';
import type { AgentRouter } from '../../agent/router.js';

/** Raised for every call in flight, or attempted, while the agent cannot be reached. */
export class AgentConnectionError extends Error {
  override name = 'AgentConnectionError';
}

/** Raised for a call whose reply from the agent broke the protocol (malformed, unknown, too large). */
export class AgentProtocolError extends Error {
  override name = 'AgentProtocolError';
}

/**
 * One message from the agent, as tRPC's WebSocket protocol frames it. Anything else is a protocol
 * violation. Error messages are cut to a bounded length; the agent's error `code` is a short name.
 */
const AgentMessage = z.object({
  id: z.union([z.number().int(), z.string().max(64), z.null()]).optional(),
  result: z
    .object({
      type: z.enum(['data', 'started', 'stopped']),
      data: z.unknown().optional(),
    })
    .optional(),
  error: z
    .object({
      message: z.string().transform((m) => (m.length > AGENT_MESSAGE_MAX_CHARS ? `${m.slice(0, AGENT_MESSAGE_MAX_CHARS)}…` : m)),
      code: z.number().int(),
      data: z.object({ code: z.string().max(64).optional() }).loose().optional(),
    })
    .optional(),
  method: z.string().max(64).optional(),
});
type AgentMessage = z.infer<typeof AgentMessage>;

/** Every procedure path of a router record, dotted (`files.list`). */
type ProcedurePaths<R, P extends string = ''> = {
  [K in keyof R & string]: R[K] extends { _def: { type: 'query' | 'mutation' | 'subscription' } } ? `${P}${K}` : ProcedurePaths<R[K], `${P}${K}.`>;
}[keyof R & string];
type AgentProcedurePath = ProcedurePaths<AgentRouter['_def']['record']>;
// Compile-time check: every agent procedure has a reply schema, and no schema names a procedure that is gone.
const everyProcedureHasASchema: Record<AgentProcedurePath, unknown> & Record<Exclude<AgentReplyPath, AgentProcedurePath>, never> = agentReplies;
void everyProcedureHasASchema;

interface Pending {
  /** The largest message this call accepts. */
  maxBytes: number;
  onMessage(msg: AgentMessage): void;
  onClose(err: Error): void;
}

export interface AgentConnectionOptions {
  /** Opens a new byte stream to the agent (the driver's `connect`). */
  connect: () => Promise<Duplex>;
  /** Which sandbox the agent serves, for error messages. */
  sandboxId: string;
  connectTimeoutMs?: number;
  /** The deadline of a query or mutation that sets none itself. */
  callTimeoutMs?: number;
  /** The largest WebSocket message accepted from the agent; a larger one closes the connection. */
  maxMessageBytes: number;
}

/**
 * One WebSocket to one agent, speaking tRPC's WebSocket message protocol over whatever byte
 * stream the driver's `connect()` returns. Unlike tRPC's own wsClient it never queues or retries:
 * when the agent is unreachable every call fails at once with `AgentConnectionError`, so the server
 * can answer "agent unavailable" instead of hanging. The next call connects again.
 *
 * The agent is tenant code. Every message is size-bounded (`maxMessageBytes`) and parsed against
 * the protocol envelope, and every reply against its procedure's schema (`agentReplies`); a reply
 * that does not fit fails that call with `AgentProtocolError`, a message that cannot be attributed
 * to a call closes the connection. Nothing an agent sends can throw out of a socket listener.
 */
export class AgentConnection {
  #ws: Promise<WebSocket> | null = null;
  /** The open socket `#ws` resolved to, if any. */
  #current: WebSocket | null = null;
  #nextId = 1;
  readonly #pending = new Map<number, Pending>();
  #closed = false;
  readonly #connectTimeoutMs: number;
  readonly #callTimeoutMs: number;

  constructor(private readonly opts: AgentConnectionOptions) {
    this.#connectTimeoutMs = opts.connectTimeoutMs ?? 5000;
    this.#callTimeoutMs = opts.callTimeoutMs ?? 60_000;
  }

  /** The tRPC link that sends every operation over this connection (subscriptions; see `request` for the rest). */
  link(): TRPCLink<AgentRouter> {
    return () =>
      ({ op }) =>
        observable((observer) => {
          /** The caller has unsubscribed (tRPC's client does on a query's or mutation's first value): it is told nothing more. */
          let unsubscribed = false;
          const stop = this.#operation(
            { type: op.type, path: op.path, input: op.input, timeoutMs: (op.context as { timeoutMs?: number }).timeoutMs, signal: op.signal ?? undefined },
            {
              next: (data) => observer.next({ result: { type: 'data', data } } as never),
              error: (err) => observer.error(err),
              // A completion nobody listens for would still cost tRPC's client an abort (a DOMException) per call.
              complete: (afterData) => {
                if (!(afterData && unsubscribed)) observer.complete();
              },
            },
          );
          return () => {
            unsubscribed = true;
            stop();
          };
        });
  }

  /**
   * One query or mutation, straight to a promise: what tRPC's client does for `.query()` and
   * `.mutate()` through `link()`, without its observable chain and the abort controller it makes
   * per call. Resolves to the reply checked against the procedure's schema; rejects with a
   * `TRPCClientError` as the link's calls do. `timeoutMs` as `context.timeoutMs` there.
   */
  request(type: 'query' | 'mutation', path: string, input: unknown, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<unknown> {
    return new Promise((resolve, reject) => {
      let settled = false;
      this.#operation(
        { type, path, input, timeoutMs: opts.timeoutMs, signal: opts.signal },
        {
          next: (data) => {
            settled = true;
            resolve(data);
          },
          error: reject,
          // An abort before any answer: the call ends without one, as tRPC's client reports it.
          complete: () => {
            if (!settled) reject(TRPCClientError.from(new DOMException('This operation was aborted', 'AbortError')));
          },
        },
      );
    });
  }

  /**
   * Sends one operation and routes its replies to `sink`; returns the function that stops it
   * (a subscription is stopped on the agent too). Every query and mutation has a deadline
   * (`timeoutMs`, else the connection's; 0 = none); an abort signal ends any operation.
   */
  #operation(
    op: { type: 'query' | 'mutation' | 'subscription'; path: string; input: unknown; timeoutMs?: number; signal?: AbortSignal },
    sink: { next(data: unknown): void; error(err: TRPCClientError<AgentRouter>): void; complete(afterData: boolean): void },
  ): () => void {
    const id = this.#nextId++;
    let done = false;
    let socket: WebSocket | undefined;
    const schema = agentReplies[op.path as AgentReplyPath] as z.ZodType | undefined;
    const stopRemote = () => {
      if (op.type === 'subscription' && socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ id, method: 'subscription.stop' }));
    };
    const finish = () => {
      done = true;
      this.#pending.delete(id);
      clearTimeout(deadline);
      op.signal?.removeEventListener('abort', onAbort);
    };
    const fail = (err: Error) => {
      if (done) return;
      finish();
      stopRemote();
      sink.error(TRPCClientError.from(err));
    };
    const timeoutMs = op.type === 'subscription' ? 0 : (op.timeoutMs ?? this.#callTimeoutMs);
    const deadline = timeoutMs > 0 ? setTimeout(() => fail(new AgentConnectionError(`the sandbox agent did not answer within ${timeoutMs} ms`)), timeoutMs) : undefined;
    const onAbort = () => {
      if (done) return;
      finish();
      stopRemote();
      sink.complete(false);
    };
    op.signal?.addEventListener('abort', onAbort, { once: true });
    if (!schema) {
      fail(new AgentProtocolError(`no reply schema for the agent procedure ${op.path}`));
      return () => {};
    }
    const maxBytes = Math.min(this.opts.maxMessageBytes, agentReplyMaxBytes[op.path as AgentReplyPath] ?? Infinity);
    this.#pending.set(id, {
      maxBytes,
      onMessage: (msg) => {
        if (msg.error) {
          finish();
          sink.error(TRPCClientError.from({ error: msg.error }));
        } else if (msg.result?.type === 'data') {
          const parsed = schema.safeParse(msg.result.data);
          if (!parsed.success) {
            fail(new AgentProtocolError(`the sandbox ${this.opts.sandboxId} agent sent a malformed reply to ${op.path}`));
            return;
          }
          if (op.type !== 'subscription') finish();
          sink.next(parsed.data);
          if (op.type !== 'subscription') sink.complete(true);
        } else if (msg.result?.type === 'stopped') {
          finish();
          sink.complete(false);
        } else if (msg.result?.type !== 'started') {
          fail(new AgentProtocolError(`the sandbox ${this.opts.sandboxId} agent sent a malformed reply to ${op.path}`));
        }
      },
      // The connection closed, or this call's reply broke its bound: a subscription is
      // stopped on the agent if the socket is still open.
      onClose: (err) => fail(err),
    });
    const send = (ws: WebSocket) => {
      if (done) return;
      socket = ws;
      const lastEventId = (op.input as { lastEventId?: string } | undefined)?.lastEventId;
      ws.send(JSON.stringify({ id, method: op.type, params: { path: op.path, input: op.input, ...(lastEventId ? { lastEventId } : {}) } }));
    };
    // An open socket is written to at once (no promise turn per call).
    if (this.#current && this.#current.readyState === WebSocket.OPEN) send(this.#current);
    else {
      this.#socket().then(send, (err: AgentConnectionError) => {
        if (done) return;
        finish();
        sink.error(TRPCClientError.from(err));
      });
    }
    if (op.signal?.aborted) onAbort();
    return () => {
      if (done) return;
      finish();
      stopRemote();
    };
  }

  #socket(): Promise<WebSocket> {
    if (this.#closed) return Promise.reject(new AgentConnectionError('The sandbox agent connection is closed'));
    this.#ws ??= this.#open().catch((err: unknown) => {
      this.#ws = null;
      throw err instanceof AgentConnectionError ? err : new AgentConnectionError(`cannot connect (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
    });
    return this.#ws;
  }

  async #open(): Promise<WebSocket> {
    const stream = await this.opts.connect();
    const ws = new WebSocket('ws://agent/', {
      createConnection: () => stream as never,
      perMessageDeflate: false,
      maxPayload: this.opts.maxMessageBytes,
    });
    // ws's own handshake timeout does not apply to a supplied connection: an agent that accepts
    // but never answers (frozen, wedged) must not hang the caller.
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        stream.destroy();
        ws.terminate();
        reject(new AgentConnectionError(`the sandbox agent did not answer within ${this.#connectTimeoutMs} ms`));
      }, this.#connectTimeoutMs);
      ws.once('open', () => {
        clearTimeout(timer);
        resolve();
      });
      ws.once('error', (err) => {
        clearTimeout(timer);
        reject(new AgentConnectionError(`the connection failed (${(err as NodeJS.ErrnoException).code ?? 'error'})`));
      });
    });
    if (this.#closed) {
      ws.terminate();
      throw new AgentConnectionError('The sandbox agent connection is closed');
    }
    let closeReason: Error | null = null;
    const violation = (what: string) => {
      closeReason ??= new AgentProtocolError(`the sandbox ${this.opts.sandboxId} agent ${what}`);
      ws.terminate();
    };
    ws.on('message', (raw, isBinary) => {
      try {
        if (isBinary) return violation('sent a binary message');
        let json: unknown;
        try {
          json = JSON.parse(raw.toString());
        } catch {
          return violation('sent a message that is not JSON');
        }
        const msg = AgentMessage.safeParse(json);
        if (!msg.success) return violation('sent a message outside the protocol');
        if (msg.data.method !== undefined) return; // server-initiated notices (reconnect): nothing to do
        const pending = typeof msg.data.id === 'number' ? this.#pending.get(msg.data.id) : undefined;
        // A reply to a call that already ended (cancelled, timed out) is dropped.
        if (!pending) return;
        const size = (raw as Buffer).length;
        if (size > pending.maxBytes) {
          pending.onClose(new AgentProtocolError(`the sandbox ${this.opts.sandboxId} agent sent a reply of ${size} bytes where at most ${pending.maxBytes} are accepted`));
          return;
        }
        pending.onMessage(msg.data);
      } catch (err) {
        // Whatever a caller's observer does with a reply stays with that call.
        violation(`reply could not be handled (${(err as Error).name})`);
      }
    });
    ws.on('error', (err) => {
      const code = (err as { code?: string }).code;
      if (code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') closeReason ??= new AgentProtocolError(`the sandbox ${this.opts.sandboxId} agent sent a message larger than ${this.opts.maxMessageBytes} bytes`);
      else closeReason ??= new AgentProtocolError(`the sandbox ${this.opts.sandboxId} agent broke the WebSocket protocol`);
    });
    ws.once('close', () => {
      if (this.#current === ws) {
        this.#current = null;
        this.#ws = null;
      }
      const err = closeReason ?? new AgentConnectionError('The sandbox agent closed the connection (it stopped or was killed)');
      for (const p of [...this.#pending.values()]) p.onClose(err);
    });
    this.#current = ws;
    return ws;
  }

  /** Ends the connection at once; calls in flight fail, later calls are refused. */
  async close(): Promise<void> {
    this.#closed = true;
    const err = new AgentConnectionError('The sandbox agent connection was closed (the sandbox stopped or was deleted)');
    for (const p of [...this.#pending.values()]) p.onClose(err);
    void this.#ws?.then((ws) => ws.terminate(), () => {});
    this.#ws = null;
    this.#current = null;
  }

  /** Drops the current socket so the next call reconnects (after the sandbox restarted). */
  reset(): void {
    void this.#ws?.then((ws) => ws.terminate(), () => {});
    this.#ws = null;
    this.#current = null;
  }
}
