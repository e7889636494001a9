import type { Duplex } from 'node:stream';
import { TRPCClientError, type TRPCLink } from '@trpc/client';
import { observable } from '@trpc/server/observable';
import WebSocket from 'ws';
import type { AgentRouter } from '../../agent/router.js';

/** Raised for every call in flight, or attempted, while the agent cannot be reached. */
export class AgentConnectionError extends Error {
  override name = 'AgentConnectionError';
}

interface Pending {
  onMessage(msg: ResponseMessage): void;
  onClose(err: AgentConnectionError): void;
}

interface ResponseMessage {
  id: number;
  result?: { type: 'data' | 'started' | 'stopped'; data?: unknown; id?: string };
  error?: { message: string; code: number; data?: unknown };
}

/**
 * One WebSocket to one agent, speaking tRPC's WebSocket message protocol over whatever byte
 * stream the driver's `connect()` returns. Unlike tRPC's own wsClient it never queues or retries:
 * when the agent is unreachable every call fails at once with `AgentConnectionError`, so the server
 * can answer "agent unavailable" instead of hanging. The next call connects again.
 */
export class AgentConnection {
  #ws: Promise<WebSocket> | null = null;
  #nextId = 1;
  readonly #pending = new Map<number, Pending>();
  #closed = false;

  constructor(
    private readonly connect: () => Promise<Duplex>,
    private readonly connectTimeoutMs = 5000,
    /** The deadline of a query or mutation that sets none itself. */
    private readonly callTimeoutMs = 60_000,
  ) {}

  /** The tRPC link that sends every operation over this connection. */
  link(): TRPCLink<AgentRouter> {
    return () =>
      ({ op }) =>
        observable((observer) => {
          const id = this.#nextId++;
          let done = false;
          let socket: WebSocket | undefined;
          const finish = () => {
            done = true;
            this.#pending.delete(id);
            cleanup();
          };
          const fail = (err: AgentConnectionError) => {
            if (done) return;
            finish();
            if (op.type === 'subscription' && socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ id, method: 'subscription.stop' }));
            observer.error(TRPCClientError.from(err));
          };
          // Every query and mutation has a deadline (callers may set `context.timeoutMs`, 0 = none);
          // a caller's abort signal ends any operation, subscriptions included.
          const timeoutMs = op.type === 'subscription' ? 0 : ((op.context as { timeoutMs?: number }).timeoutMs ?? this.callTimeoutMs);
          const deadline = timeoutMs > 0 ? setTimeout(() => fail(new AgentConnectionError(`the sandbox agent did not answer within ${timeoutMs} ms`)), timeoutMs) : undefined;
          const onAbort = () => {
            if (done) return;
            finish();
            if (op.type === 'subscription' && socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ id, method: 'subscription.stop' }));
            observer.complete();
          };
          op.signal?.addEventListener('abort', onAbort, { once: true });
          const cleanup = () => {
            clearTimeout(deadline);
            op.signal?.removeEventListener('abort', onAbort);
          };
          this.#pending.set(id, {
            onMessage: (msg) => {
              if (msg.error) {
                finish();
                observer.error(TRPCClientError.from({ error: msg.error }));
              } else if (msg.result?.type === 'data') {
                observer.next({ result: { type: 'data', data: msg.result.data } } as never);
                if (op.type !== 'subscription') {
                  finish();
                  observer.complete();
                }
              } else if (msg.result?.type === 'stopped') {
                finish();
                observer.complete();
              }
            },
            onClose: (err) => {
              finish();
              observer.error(TRPCClientError.from(err));
            },
          });
          this.#socket().then(
            (ws) => {
              if (done) return;
              socket = ws;
              const lastEventId = (op.input as { lastEventId?: string } | undefined)?.lastEventId;
              ws.send(JSON.stringify({ id, method: op.type, params: { path: op.path, input: op.input, ...(lastEventId ? { lastEventId } : {}) } }));
            },
            (err: AgentConnectionError) => {
              if (done) return;
              finish();
              observer.error(TRPCClientError.from(err));
            },
          );
          if (op.signal?.aborted) onAbort();
          return () => {
            if (done) return;
            finish();
            if (op.type === 'subscription' && socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ id, method: 'subscription.stop' }));
          };
        });
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
    const stream = await this.connect();
    const ws = new WebSocket('ws://agent/', { createConnection: () => stream as never, perMessageDeflate: false });
    // ws's own handshake timeout does not apply to a supplied connection: an agent that accepts
    // but never answers (frozen, wedged) must not hang the caller.
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        stream.destroy();
        ws.terminate();
        reject(new AgentConnectionError(`the sandbox agent did not answer within ${this.connectTimeoutMs} ms`));
      }, this.connectTimeoutMs);
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
    ws.on('message', (raw) => {
      let msg: ResponseMessage;
      try {
        msg = JSON.parse(raw.toString()) as ResponseMessage;
      } catch {
        return;
      }
      this.#pending.get(msg.id)?.onMessage(msg);
    });
    ws.on('error', () => {});
    ws.once('close', () => {
      this.#ws = null;
      const err = new AgentConnectionError('The sandbox agent closed the connection (it stopped or was killed)');
      for (const p of [...this.#pending.values()]) p.onClose(err);
    });
    return ws;
  }

  /** Ends the connection at once; calls in flight fail, later calls are refused. */
  async close(): Promise<void> {
    this.#closed = true;
    const err = new AgentConnectionError('The sandbox agent connection was closed (the sandbox stopped or was deleted)');
    for (const p of [...this.#pending.values()]) p.onClose(err);
    void this.#ws?.then((ws) => ws.terminate(), () => {});
    this.#ws = null;
  }

  /** Drops the current socket so the next call reconnects (after the sandbox restarted). */
  reset(): void {
    void this.#ws?.then((ws) => ws.terminate(), () => {});
    this.#ws = null;
  }
}
