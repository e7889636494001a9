import { Agent, request, type IncomingMessage, type ServerResponse } from 'node:http';
import { connect } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import superjson from 'superjson';
import { DomainError, HostUnavailableError } from '../../errors.js';

import { sendError } from '../../http/envelope.js';
import type { HostRecord, HostRepository, SandboxRepository } from '../../store/types.js';
import type { Principal } from '../auth-service.js';
import { CLUSTER_TOKEN_HEADER, INTERNAL_CALL_PATH, InternalLine, PRINCIPAL_HEADER, splitAddress, vouchFor, type InternalCall, type WireError } from './internal-protocol.js';

export interface ForwarderOptions {
  sandboxes: SandboxRepository;
  hosts: HostRepository;
  token: string;
  /** A host whose heartbeat is older than this is not forwarded to (HOST_DEAD_AFTER_SEC). */
  deadAfterMs: number;
  /** The longest answer line a host may send (a call's output, one stream event). */
  maxLineBytes: number;
  log: Logger;
}

/** Headers that belong to one hop (RFC 9110 §7.6.1) and are not passed on. */
const hopByHop = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', CLUSTER_TOKEN_HEADER, PRINCIPAL_HEADER]);

/** How long a host record (its address and state) is reused before it is read again. */
const HOST_CACHE_MS = 1000;
/** How long a sandbox's host is reused before it is read again (a drained host moves its stopped sandboxes). */
const SANDBOX_HOST_CACHE_MS = 5000;


/**
 * An API node's side of the fleet (VOIDRUN_ROLE=api): finds the host a sandbox runs on and passes
 * the request there, to the host's internal listener — whole HTTP requests and WebSocket upgrades
 * under `/api/sandboxes/{id}` (bytes streamed both ways, TCP's backpressure end to end), and tRPC
 * procedure calls (`call`, `subscribe`) for the tRPC transports. The host authenticates the caller
 * itself: what it answers, errors included, is what a single server would have answered.
 * A sandbox's host changes only when a draining host moves it, so sandbox→host is cached for 5 s
 * (meanwhile its old host answers 503 "moved; retry"); host records for a second.
 */
export class Forwarder {
  readonly #ofSandbox = new Map<string, { hostId: string; orgId: string; at: number }>();
  readonly #hosts = new Map<string, { record: HostRecord | null; at: number }>();
  /**
   * Proxied requests (long downloads, SSE streams) and procedure calls (subscriptions too) keep
   * their sockets alive in separate pools. Neither caps its sockets: every SSE stream and
   * subscription holds one for as long as it runs, and a cap would queue every later request to
   * that host behind them (a hang, not an answer) once a few orgs' streams filled it. Each socket
   * here serves one request of a client connected to this node, so they are bounded by this node's
   * HTTP_MAX_CONNECTIONS, and the streams on a host by its ORG_MAX_STREAMS per org.
   */
  readonly #agent = new Agent({ keepAlive: true, maxFreeSockets: 64 });
  readonly #callAgent = new Agent({ keepAlive: true, maxFreeSockets: 64 });
  /** What is in flight to each host, to cut when the host is declared lost (a frozen host accepts and never answers). */
  readonly #inflight = new Map<string, Set<(err: Error) => void>>();

  #track(hostId: string, cut: (err: Error) => void): () => void {
    let set = this.#inflight.get(hostId);
    if (!set) this.#inflight.set(hostId, (set = new Set()));
    set.add(cut);
    return () => {
      set.delete(cut);
      if (set.size === 0 && this.#inflight.get(hostId) === set) this.#inflight.delete(hostId);
    };
  }

  /**
   * Cuts every request, upgrade and call in flight to the host (it was declared lost): an answer
   * not begun is a 503 naming the host, one under way ends where it is.
   */
  cutHost(hostId: string): number {
    const set = this.#inflight.get(hostId);
    if (!set) return 0;
    this.#hosts.delete(hostId);
    const err = new HostUnavailableError(`The sandbox's host ${hostId} stopped answering (host-lost); the sandbox is lost: delete it and create another`);
    for (const cut of [...set]) cut(err);
    return set.size;
  }

  constructor(private readonly o: ForwarderOptions) {}

  /**
   * The host of the sandbox and the org that owns it, or null when there is no such sandbox or it
   * names no host (the call is answered here). Both never change once an org owns it: cached.
   */
  async target(sandboxId: string): Promise<{ host: HostRecord; orgId: string } | null> {
    let known = this.#ofSandbox.get(sandboxId);
    if (!known || Date.now() - known.at >= SANDBOX_HOST_CACHE_MS) {
      const record = await this.o.sandboxes.findByIdInAnyOrg(sandboxId);
      if (!record?.hostId) return null;
      known = { hostId: record.hostId, orgId: record.orgId, at: Date.now() };
      // A warm-pool member (no org yet) is not cached: its org is set when it is claimed.
      if (record.orgId) {
        if (this.#ofSandbox.size > 100_000) this.#ofSandbox.clear();
        this.#ofSandbox.set(sandboxId, known);
      }
    }
    const host = await this.#host(known.hostId);
    return host ? { host, orgId: known.orgId } : null;
  }

  /** A host by id (as `target` finds it: cached a second while it serves); null when it is not registered. */
  host(hostId: string): Promise<HostRecord | null> {
    return this.#host(hostId);
  }

  /** The host holding an image's layers (`hostId`), serving now; a 503 naming it otherwise. */
  async imageHost(image: { name: string; hostId: string | null }): Promise<HostRecord> {
    const host = image.hostId ? await this.#host(image.hostId) : null;
    if (!host || !this.serving(host)) {
      throw new HostUnavailableError(`Image ${image.name}'s layers are on fleet host ${image.hostId}, which is not serving now (unresponsive or gone); retry later`);
    }
    return host;
  }

  /**
   * The host record, read at most once a second while it serves; null when it is not registered.
   * One not serving is read again each time: it may have registered again a moment ago (a
   * sandbox just placed there must not meet a 503 from this node's old copy).
   */
  async #host(hostId: string): Promise<HostRecord | null> {
    const cached = this.#hosts.get(hostId);
    if (cached?.record && Date.now() - cached.at < HOST_CACHE_MS && this.serving(cached.record)) return cached.record;
    const record = await this.o.hosts.findById(hostId);
    this.#hosts.set(hostId, { record, at: Date.now() });
    return record;
  }

  /**
   * Whether the host serves its sandboxes now: a fresh heartbeat (a lost host's stopped; a fenced
   * one writes none until it has registered again) and not removed. Its state alone is not read: a
   * sweep's `unresponsive` can be a write that lost a race with the host's new registration.
   */
  serving(host: HostRecord): boolean {
    return host.state !== 'gone' && Date.now() - host.heartbeatAt.getTime() <= this.o.deadAfterMs;
  }

  /** Throws the 503 a call on a sandbox of a host that is not serving answers. */
  assertServing(host: HostRecord, sandboxId: string): void {
    if (this.serving(host)) return;
    const why = host.state === 'gone' ? 'was removed from the fleet' : 'stopped answering (host-lost)';
    throw new HostUnavailableError(`Sandbox ${sandboxId} ran on host ${host.id}, which ${why}; the sandbox is lost: delete it and create another`);
  }

  /**
   * Passes an HTTP request to the host and its answer back, both streamed. A 503 from the host for
   * a sandbox's request drops that sandbox's cached host (it may have been moved: the retry finds it).
   */
  proxyRequest(req: IncomingMessage, res: ServerResponse, host: HostRecord, sandboxId?: string, principal?: Principal | null): Promise<void> {
    const { host: hostname, port } = splitAddress(host.address);
    return new Promise((resolve) => {
      const headers: Record<string, string | string[]> = {};
      for (const [name, value] of Object.entries(req.headers)) if (value !== undefined && !hopByHop.has(name)) headers[name] = value;
      headers[CLUSTER_TOKEN_HEADER] = this.o.token;
      if (principal) headers[PRINCIPAL_HEADER] = JSON.stringify(vouchFor(principal));
      // A chunked body is sent chunked: Node frames a GET's or DELETE's body only when told, and an
      // unframed body on a kept-alive socket would be read by the host as the start of the next request.
      if (req.headers['transfer-encoding'] !== undefined) {
        delete headers['content-length'];
        headers['transfer-encoding'] = 'chunked';
      }
      headers['x-forwarded-for'] = [req.headers['x-forwarded-for'], req.socket.remoteAddress].filter(Boolean).join(', ');
      let untrack = () => {};
      const upstream = request({ host: hostname, port, method: req.method, path: req.url, headers, agent: this.#agent }, (answer) => {
        if (answer.statusCode === 503 && sandboxId) this.#ofSandbox.delete(sandboxId);
        const out: Record<string, string | string[]> = {};
        for (const [name, value] of Object.entries(answer.headers)) if (value !== undefined && !hopByHop.has(name)) out[name] = value;
        res.writeHead(answer.statusCode ?? 502, answer.statusMessage, out);
        answer.pipe(res);
        answer.once('error', () => res.destroy());
        answer.once('end', resolve);
      });
      let lost: Error | null = null;
      untrack = this.#track(host.id, (err) => {
        lost = err;
        upstream.destroy(err);
      });
      upstream.once('error', (err) => {
        if (res.headersSent) res.destroy();
        else if (lost) sendError(res, lost);
        else this.#sendUnavailable(res, host, err);
        resolve();
      });
      res.once('close', () => {
        untrack();
        if (!res.writableFinished) upstream.destroy();
        resolve();
      });
      // A vouched request whose body is not all here yet has its head sent now, not with its first
      // body byte: the host takes the vouch only for a while after the head arrived (VOUCH_FRESH_MS),
      // the key having been read about when the head arrived here. (One already whole goes at once.)
      if (principal && !req.complete) upstream.flushHeaders();
      req.pipe(upstream);
    });
  }

  /** Passes a WebSocket upgrade to the host: the handshake with the cluster secret, then bytes both ways. */
  proxyUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, host: HostRecord, refuse: (err: unknown) => void, principal?: Principal | null): void {
    const { host: hostname, port } = splitAddress(host.address);
    const upstream = connect({ host: hostname, port });
    let lost: Error | null = null;
    const untrack = this.#track(host.id, (err) => {
      lost = err;
      upstream.destroy(err);
      socket.destroy();
    });
    socket.on('error', () => upstream.destroy());
    upstream.once('connect', () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const name = req.rawHeaders[i]!;
        const lower = name.toLowerCase();
        if (lower !== CLUSTER_TOKEN_HEADER && lower !== PRINCIPAL_HEADER) lines.push(`${name}: ${req.rawHeaders[i + 1]}`);
      }
      lines.push(`${CLUSTER_TOKEN_HEADER}: ${this.o.token}`, `x-forwarded-for: ${req.socket.remoteAddress ?? ''}`);
      if (principal) lines.push(`${PRINCIPAL_HEADER}: ${JSON.stringify(vouchFor(principal))}`);
      upstream.write(`${lines.join('\r\n')}\r\n\r\n`);
      if (head.length) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    upstream.once('error', (err) => {
      if (upstream.bytesRead === 0 && !lost) refuse(this.#unavailable(host, err));
      else socket.destroy();
    });
    upstream.once('close', () => socket.destroy());
    socket.once('close', () => {
      untrack();
      upstream.destroy();
    });
  }

  /** A query or mutation run on the host; resolves with its output or throws its error. */
  async call(host: HostRecord, call: InternalCall, signal?: AbortSignal): Promise<unknown> {
    for await (const line of this.#lines(host, call, signal)) {
      if ('ok' in line) return superjson.deserialize(line.ok as Parameters<typeof superjson.deserialize>[0]);
      if ('error' in line) {
        // Its sandbox was moved to another host (drained): the retry looks it up again.
        if (line.error.details === 'moved') this.#forgetCallSandbox(call);
        throw fromWire(line.error);
      }
    }
    throw new HostUnavailableError(`Host ${host.id} ended its answer without a result; retry`);
  }

  /** A subscription run on the host: its events (tracked ones with their ids), until it ends or fails. */
  async *subscribe(host: HostRecord, call: InternalCall, signal?: AbortSignal): AsyncGenerator<{ event: unknown; id?: string }> {
    for await (const line of this.#lines(host, call, signal)) {
      if ('event' in line) yield { event: superjson.deserialize(line.event as Parameters<typeof superjson.deserialize>[0]), ...(line.id !== undefined ? { id: line.id } : {}) };
      else if ('error' in line) throw fromWire(line.error);
      else if ('end' in line) return;
    }
    throw new HostUnavailableError(`Host ${host.id} ended the stream without its end; reconnect (with the last event id) to resume`);
  }

  /** The host's answer lines, each parsed and bounded; the request is cut when the consumer stops. */
  async *#lines(host: HostRecord, call: InternalCall, signal?: AbortSignal): AsyncGenerator<InternalLine> {
    const { host: hostname, port } = splitAddress(host.address);
    const body = JSON.stringify(call);
    let lost: Error | null = null;
    let current: { destroy(err?: Error): void } | null = null;
    const untrack = this.#track(host.id, (err) => {
      lost = err;
      current?.destroy(err);
    });
    const answer = await new Promise<IncomingMessage>((resolve, reject) => {
      const req = request(
        { host: hostname, port, method: 'POST', path: INTERNAL_CALL_PATH, agent: this.#callAgent, signal, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), [CLUSTER_TOKEN_HEADER]: this.o.token } },
        resolve,
      );
      current = req;
      req.once('error', (err) => reject(lost ?? (signal?.aborted ? err : this.#unavailable(host, err))));
      req.end(body);
    }).catch((err: unknown) => {
      untrack();
      throw err;
    });
    current = answer;
    try {
      if (answer.statusCode === 401) throw new HostUnavailableError(`Host ${host.id} refused this API node (HTTP 401): every node of a fleet needs the same CLUSTER_TOKEN`);
      if (answer.statusCode !== 200) throw new HostUnavailableError(`Host ${host.id} refused a forwarded call (HTTP ${answer.statusCode}); are all nodes on the same VoidRun version?`);
      // Decoded as a stream (a character split across chunks stays whole); each chunk is searched once.
      answer.setEncoding('utf8');
      let parts: string[] = [];
      let size = 0;
      for await (const chunk of answer as AsyncIterable<string>) {
        let start = 0;
        let nl: number;
        while ((nl = chunk.indexOf('\n', start)) >= 0) {
          parts.push(chunk.slice(start, nl));
          const text = parts.join('');
          parts = [];
          size = 0;
          start = nl + 1;
          const parsed = InternalLine.safeParse(safeJson(text));
          if (!parsed.success) throw new HostUnavailableError(`Host ${host.id} sent an answer this node cannot read`);
          yield parsed.data;
        }
        if (start < chunk.length) {
          parts.push(chunk.slice(start));
          size += chunk.length - start;
          if (size > this.o.maxLineBytes) throw new HostUnavailableError(`Host ${host.id} sent an answer line over ${this.o.maxLineBytes} bytes`);
        }
      }
    } catch (err) {
      throw lost ?? err;
    } finally {
      untrack();
      answer.destroy();
    }
  }

  #forgetCallSandbox(call: InternalCall): void {
    const input = superjson.deserialize(call.input as Parameters<typeof superjson.deserialize>[0]) as { id?: unknown; sandboxId?: unknown } | null;
    const id = typeof input?.id === 'string' ? input.id : typeof input?.sandboxId === 'string' ? input.sandboxId : null;
    if (id) this.#ofSandbox.delete(id);
  }

  #unavailable(host: HostRecord, err: Error): HostUnavailableError {
    this.o.log.warn({ host: host.id, address: host.address, err: err.message }, 'a forwarded request could not reach its host');
    return new HostUnavailableError(`The sandbox's host ${host.id} cannot be reached now; retry shortly`, { cause: err });
  }

  #sendUnavailable(res: ServerResponse, host: HostRecord, err: Error): void {
    sendError(res, this.#unavailable(host, err));
  }

  close(): void {
    this.#agent.destroy();
    this.#callAgent.destroy();
  }
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** The host's error as the same domain error here: the tRPC formatter answers it as the host would have. */
export function fromWire(e: WireError): DomainError {
  return new DomainError(e.errorCode, e.message, { details: e.details, issues: e.issues });
}
