import { connect, createServer, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import { isCidrRule, type NetworkPolicy } from '../../../shared/schemas/network.js';
import { nameAllowed } from './dns-proxy.js';
import { HttpRequests, type RequestsVerdict } from './http-requests.js';

/*
 * The SNI/Host check for ports 80 and 443. A sandbox whose policy opens domains under
 * `egress: deny` has its new TCP connections to ports 80 and 443 (except to its `allow` CIDRs)
 * redirected here by the egress firewall. The proxy reads the name the connection is for — the
 * TLS ClientHello's server_name, or the HTTP request's Host — and only when the sandbox's policy
 * allows that name does it resolve the name itself and connect to its address on the same port,
 * passing the bytes through unchanged (TLS is not terminated). So a sandbox allowed
 * `allowed.example` reaches that name's servers and no other site sharing their address, whatever
 * address it connected to. A connection whose name is missing (no SNI, not HTTP) or not allowed is
 * closed (HTTP gets a 403 naming the name).
 */

/** How much of a connection is read to find its name. */
const MAX_PEEK_BYTES = 16 * 1024 + 5;
/** How long a connection has to send its first byte, and to name its host. */
const FIRST_BYTE_TIMEOUT_MS = 3_000;
const PEEK_TIMEOUT_MS = 5_000;
const CONNECT_TIMEOUT_MS = 10_000;
/** Connections one sandbox holds at once on both listeners, from accept (being peeked at, resolved or passed through) to close. */
export const MAX_CONNECTIONS_PER_SOURCE = 128;
/**
 * Connections one listener holds at once, from all sandboxes: each passed through costs two file
 * descriptors, so both listeners together stay at 4096, far below the server's RLIMIT_NOFILE.
 */
const MAX_CONNECTIONS = 1024;

/**
 * The server_name of a TLS ClientHello at the start of `data`: a string, `null` when the
 * ClientHello is complete and has none (or this is not TLS), `undefined` when more bytes are needed.
 */
export function sniOf(data: Buffer): string | null | undefined {
  if (data.length < 5) return data.length > 0 && data[0] !== 0x16 ? null : undefined;
  if (data[0] !== 0x16 || data[1] !== 0x03) return null;
  const recordEnd = 5 + data.readUInt16BE(3);
  if (recordEnd > MAX_PEEK_BYTES) return null;
  if (data.length < recordEnd) return undefined;
  const hello = data.subarray(5, recordEnd);
  if (hello.length < 4 || hello[0] !== 0x01) return null;
  let at = 4 + 2 + 32; // handshake header, client version, random
  const need = (n: number) => at + n <= hello.length;
  if (!need(1)) return null;
  at += 1 + hello[at]!; // session id
  if (!need(2)) return null;
  at += 2 + hello.readUInt16BE(at); // cipher suites
  if (!need(1)) return null;
  at += 1 + hello[at]!; // compression methods
  if (!need(2)) return null;
  const extensionsEnd = Math.min(hello.length, at + 2 + hello.readUInt16BE(at));
  at += 2;
  while (at + 4 <= extensionsEnd) {
    const type = hello.readUInt16BE(at);
    const length = hello.readUInt16BE(at + 2);
    at += 4;
    if (at + length > extensionsEnd) return null;
    if (type === 0 && length >= 5) {
      // server_name_list: length, then entries of type (0 = host_name), length, name
      const nameType = hello[at + 2];
      const nameLength = hello.readUInt16BE(at + 3);
      if (nameType !== 0 || 5 + nameLength > length) return null;
      return hello.toString('latin1', at + 5, at + 5 + nameLength);
    }
    at += length;
  }
  return null;
}

/** The Host of an HTTP request at the start of `data` (port dropped): a string, `null` when it has none or is not HTTP, `undefined` when more bytes are needed. */
export function httpHostOf(data: Buffer): string | null | undefined {
  const text = data.toString('latin1', 0, Math.min(data.length, MAX_PEEK_BYTES));
  const end = text.indexOf('\r\n\r\n');
  if (end < 0) return /^[A-Z]{1,16} /.test(text) || /^[A-Z]{0,16}$/.test(text) ? (data.length >= MAX_PEEK_BYTES ? null : undefined) : null;
  if (!/^[A-Z]{1,16} \S+ HTTP\/1\.[01]\r\n/.test(text)) return null;
  const host = /\r\nhost:[ \t]*([^\r\n]*)/i.exec(text.slice(0, end + 2))?.[1]?.trim();
  if (!host) return null;
  return host.startsWith('[') ? null : host.replace(/:\d+$/, '');
}

export interface NameProxyOptions {
  /** Where to listen (the gateway's address); the ports are chosen by the kernel. */
  address: string;
  /** The policy of the sandbox at a source address; null for an address that is no sandbox's. */
  policyAt(ip: string): NetworkPolicy | null;
  /** The addresses a name resolves to upstream, usable by that sandbox (public, or in its allow CIDRs). */
  resolve(name: string, policy: NetworkPolicy): Promise<string[]>;
  /** Whether the sandbox may be connected to `address` (never the host's own): checked again on the connected socket's remote address. */
  connectable(address: string, policy: NetworkPolicy): boolean;
  /** How long a connection has to send its first byte (3 s) and to name its host (5 s). */
  timeouts?: { firstByteMs: number; nameMs: number };
  log?: Logger;
}

/** The SNI/Host-checking pass-through for ports 80 and 443 (see the comment at the top of this file). */
export class NameProxy {
  #http: Server | null = null;
  #tls: Server | null = null;
  /** Open connections by sandbox address, with the name each is for. */
  readonly #open = new Map<string, Map<Socket, string>>();
  /** Connections accepted and not yet closed, by sandbox address. */
  readonly #accepted = new Map<string, number>();

  constructor(private readonly opts: NameProxyOptions) {}

  /** The ports the proxy listens on, for the firewall's redirect (80 → `http`, 443 → `tls`). */
  get ports(): { http: number; tls: number } | null {
    if (!this.#http || !this.#tls) return null;
    return { http: (this.#http.address() as { port: number }).port, tls: (this.#tls.address() as { port: number }).port };
  }

  async start(): Promise<void> {
    this.#http = await this.#listen(80, httpHostOf);
    this.#tls = await this.#listen(443, sniOf);
  }

  async stop(): Promise<void> {
    for (const conns of this.#open.values()) for (const s of conns.keys()) s.destroy();
    await Promise.all([this.#http, this.#tls].map((s) => s && new Promise<void>((r) => s.close(() => r()))));
    this.#http = this.#tls = null;
  }

  /** Closes the connections of the sandbox at `ip` that its policy (as it is now) no longer allows. */
  reevaluate(ip: string): void {
    const conns = this.#open.get(ip);
    if (!conns) return;
    const policy = this.opts.policyAt(ip);
    for (const [socket, name] of conns) if (!policy || policy.egressCut || !viaProxy(policy) || !nameAllowed(policy, name)) socket.destroy();
  }

  #listen(port: 80 | 443, nameOf: (data: Buffer) => string | null | undefined): Promise<Server> {
    const server = createServer((socket) => this.#onConnection(socket, port, nameOf));
    server.maxConnections = MAX_CONNECTIONS;
    server.on('error', (err) => this.opts.log?.warn({ err: err.message }, 'name proxy error'));
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, this.opts.address, () => {
        server.off('error', reject);
        resolve(server);
      });
    });
  }

  #onConnection(socket: Socket, port: 80 | 443, nameOf: (data: Buffer) => string | null | undefined): void {
    const source = socket.remoteAddress ?? '';
    socket.on('error', () => socket.destroy());
    const held = this.#accepted.get(source) ?? 0;
    if (held >= MAX_CONNECTIONS_PER_SOURCE) return void socket.destroy();
    this.#accepted.set(source, held + 1);
    let buffered = Buffer.alloc(0);
    const timer = setTimeout(() => socket.destroy(), this.opts.timeouts?.nameMs ?? PEEK_TIMEOUT_MS);
    const firstByte = setTimeout(() => socket.destroy(), this.opts.timeouts?.firstByteMs ?? FIRST_BYTE_TIMEOUT_MS);
    socket.on('close', () => {
      clearTimeout(timer);
      clearTimeout(firstByte);
      const left = (this.#accepted.get(source) ?? 1) - 1;
      if (left <= 0) this.#accepted.delete(source);
      else this.#accepted.set(source, left);
    });
    const onData = (chunk: Buffer) => {
      clearTimeout(firstByte);
      buffered = Buffer.concat([buffered, chunk]);
      const name = nameOf(buffered);
      if (name === undefined && buffered.length < MAX_PEEK_BYTES) return;
      socket.off('data', onData);
      socket.pause();
      clearTimeout(timer);
      void this.#forward(socket, source, port, name ?? null, buffered);
    };
    socket.on('data', onData);
  }

  async #forward(socket: Socket, source: string, port: 80 | 443, rawName: string | null, head: Buffer): Promise<void> {
    const name = rawName?.toLowerCase().replace(/\.$/, '') ?? null;
    const policy = this.opts.policyAt(source);
    const allowed = name !== null && policy !== null && viaProxy(policy) && nameAllowed(policy, name);
    if (!allowed) {
      const why = name === null ? 'the connection names no host (no TLS SNI or HTTP Host)' : `${name} is not allowed`;
      if (port === 80) socket.end(`HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\negress policy: ${why}\n`);
      else socket.destroy();
      return;
    }
    // Port 80: every request of the connection must name this host (http-requests.ts).
    const requests = port === 80 ? new HttpRequests(name) : null;
    const first = requests?.feed(head);
    if (first?.error) {
      socket.end(`HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\negress policy: ${first.error}\n`);
      return;
    }
    // Known before the lookup, so a policy change meanwhile (reevaluate) closes it too.
    const conns = this.#open.get(source) ?? new Map<Socket, string>();
    this.#open.set(source, conns);
    conns.set(socket, name);
    socket.on('close', () => {
      conns.delete(socket);
      if (conns.size === 0 && this.#open.get(source) === conns) this.#open.delete(source);
    });
    const addresses = await this.opts.resolve(name, policy).catch(() => []);
    if (addresses.length === 0 || socket.destroyed) {
      if (port === 80 && !socket.destroyed) socket.end(`HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\negress policy: ${name} does not resolve\n`);
      else socket.destroy();
      return;
    }
    const upstream = connect({ host: addresses[0]!, port, timeout: CONNECT_TIMEOUT_MS });
    const close = () => {
      socket.destroy();
      upstream.destroy();
    };
    upstream.on('timeout', close);
    upstream.on('error', close);
    upstream.on('close', close);
    socket.on('close', close);
    upstream.on('connect', () => {
      const remote = upstream.remoteAddress;
      if (!remote || remote === upstream.localAddress || !this.opts.connectable(remote, policy)) return close();
      upstream.setTimeout(0);
      upstream.pipe(socket);
      if (requests && first) return this.#checkRequests(socket, upstream, requests, first, close);
      upstream.write(head);
      socket.pipe(upstream);
      socket.resume();
    });
  }

  /**
   * Passes the client's bytes of a plain-HTTP connection to `upstream` as `requests` lets them
   * through (with backpressure), closing the connection at the first request naming another host;
   * the server's first status line settles an upgrade the first request asked for.
   */
  #checkRequests(socket: Socket, upstream: Socket, requests: HttpRequests, first: RequestsVerdict, close: () => void): void {
    // Nothing more is read from the client while an upgrade waits for the server's answer.
    const resume = () => !requests.awaitingUpgrade && !upstream.writableNeedDrain && socket.resume();
    const deliver = (verdict: RequestsVerdict) => {
      if (verdict.pass.length && !upstream.write(verdict.pass)) {
        socket.pause();
        upstream.once('drain', resume);
      }
      if (verdict.error) close();
      else if (requests.awaitingUpgrade) socket.pause();
    };
    let status = '';
    const onAnswer = (chunk: Buffer) => {
      status += chunk.toString('latin1', 0, Math.min(chunk.length, 64));
      const line = /^HTTP\/1\.[01] (\d{3})/.exec(status);
      if (!line && status.length < 64 && !status.includes('\r\n')) return;
      upstream.off('data', onAnswer);
      if (!requests.awaitingUpgrade) return;
      deliver(requests.upstreamAnswered(line ? Number(line[1]) : 0));
      resume();
    };
    if (requests.awaitingUpgrade) upstream.on('data', onAnswer);
    deliver(first);
    socket.on('data', (chunk: Buffer) => deliver(requests.feed(chunk)));
    socket.on('end', () => upstream.end());
    resume();
  }
}

/** Whether a sandbox's ports 80 and 443 go through the name check: domains allowed under `egress: deny`. */
export function viaProxy(policy: NetworkPolicy): boolean {
  return policy.mode === 'bridge' && policy.egress === 'deny' && !policy.egressCut && policy.allow.some((rule) => !isCidrRule(rule));
}
