import { createSocket, type RemoteInfo, type Socket as UdpSocket } from 'node:dgram';
import { connect, createServer, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import type { NetworkPolicy } from '../../../shared/schemas/network.js';
import type { ResolvedAddress } from './egress-firewall.js';

/*
 * The sandboxes' DNS resolver, on <gateway>:53 over UDP and TCP (the egress firewall sends every
 * sandbox's port-53 traffic here, whatever address it was for). It knows the sandbox by the
 * query's source address and answers by its policy:
 *
 *   * a name its policy refuses (a `deny` entry, or under `egress: deny` anything no `allow`
 *     entry names): NXDOMAIN, answered here, nothing sent upstream;
 *   * an address that is no sandbox's, or a sandbox whose egress is cut (its byte cap): REFUSED,
 *     nothing sent upstream (a query is egress too: names carry data to their servers);
 *   * a query past the sandbox's rate (QUERY_BURST at once, then QUERY_RATE a second): REFUSED,
 *     unforwarded, so one sandbox's flood neither reaches DNS_NAMESERVERS nor crowds out the others;
 *   * AAAA for an allowed name: an empty answer (sandboxes have IPv4 only);
 *   * any other query for an allowed name: forwarded to DNS_NAMESERVERS; the A records of the
 *     answer are opened in the sandbox's firewall for their TTL before the answer is passed on.
 *
 * Every packet is bounded and parsed before anything is done with it; a malformed query or
 * upstream answer is dropped (never a crash): the client times out and retries as for a lost packet.
 */

/** The longest query accepted (a question and an EDNS OPT record fit in far less). */
const MAX_QUERY_BYTES = 1024;
/** The longest answer passed on (TCP's framing limit; UDP answers are far shorter). */
const MAX_ANSWER_BYTES = 65535;
const MAX_INFLIGHT = 512;
const MAX_INFLIGHT_PER_SOURCE = 64;
const MAX_TCP_CONNECTIONS = 256;
/** TCP connections one sandbox holds at once: the rest of MAX_TCP_CONNECTIONS stays for the others. */
export const MAX_TCP_CONNECTIONS_PER_SOURCE = 16;
const MAX_TCP_QUERIES_PER_CONNECTION = 64;
const TCP_IDLE_MS = 10_000;
/** How long one TCP connection lives at most, busy or not. */
const TCP_DEADLINE_MS = 30_000;
const MAX_ANSWER_RECORDS = 256;
/** Queries one sandbox may send: QUERY_BURST at once, refilled at QUERY_RATE a second; past it they get REFUSED, unforwarded. */
export const QUERY_RATE = 200;
export const QUERY_BURST = 400;

const TYPE_A = 1;
const TYPE_AAAA = 28;
const CLASS_IN = 1;
export const RCODE_SERVFAIL = 2;
export const RCODE_NXDOMAIN = 3;
export const RCODE_REFUSED = 5;

/** A query that passed the checks: its id, its name (lowercase, no trailing dot), type, and where its question ends. */
export interface ParsedQuery {
  id: number;
  name: string;
  type: number;
  /** Bytes 12..questionEnd of the query: its question, echoed in answers. */
  questionEnd: number;
}

/**
 * Parses a DNS query defensively: a standard query (QR 0, opcode 0) with exactly one question, no
 * answer or authority records, at most one additional (EDNS), a name of uncompressed labels within
 * 255 bytes. Anything else is null.
 */
export function parseQuery(msg: Buffer): ParsedQuery | null {
  if (msg.length < 12 || msg.length > MAX_QUERY_BYTES) return null;
  const flags = msg.readUInt16BE(2);
  if (flags & 0x8000 || ((flags >> 11) & 0xf) !== 0) return null;
  if (msg.readUInt16BE(4) !== 1 || msg.readUInt16BE(6) !== 0 || msg.readUInt16BE(8) !== 0 || msg.readUInt16BE(10) > 1) return null;
  const labels: string[] = [];
  let at = 12;
  let nameBytes = 0;
  for (;;) {
    if (at >= msg.length) return null;
    const len = msg[at]!;
    if (len === 0) break;
    if (len > 63) return null; // compression pointers (or reserved label types) have no place in a question
    nameBytes += len + 1;
    if (nameBytes > 254 || at + 1 + len > msg.length) return null;
    labels.push(msg.toString('latin1', at + 1, at + 1 + len).toLowerCase());
    at += 1 + len;
  }
  at += 1;
  if (at + 4 > msg.length) return null;
  const type = msg.readUInt16BE(at);
  if (msg.readUInt16BE(at + 2) !== CLASS_IN) return null;
  return { id: msg.readUInt16BE(0), name: labels.join('.'), type, questionEnd: at + 4 };
}

/** An answer of our own to `query`: its question echoed, no records, `rcode`. */
export function localAnswer(query: Buffer, parsed: ParsedQuery, rcode: number): Buffer {
  const out = Buffer.alloc(parsed.questionEnd);
  query.copy(out, 0, 0, parsed.questionEnd);
  const rd = query.readUInt16BE(2) & 0x0100;
  out.writeUInt16BE(0x8000 | rd | 0x0080 | rcode, 2); // QR, RD as asked, RA, rcode
  out.writeUInt16BE(1, 4);
  out.writeUInt16BE(0, 6);
  out.writeUInt16BE(0, 8);
  out.writeUInt16BE(0, 10);
  return out;
}

/** Skips a (possibly compressed) name starting at `at`; the offset after it, or -1 when it runs off the message. */
function skipName(msg: Buffer, at: number): number {
  for (let labels = 0; labels < 128; labels++) {
    if (at >= msg.length) return -1;
    const len = msg[at]!;
    if (len === 0) return at + 1;
    if ((len & 0xc0) === 0xc0) return at + 2 <= msg.length ? at + 2 : -1;
    if (len > 63) return -1;
    at += 1 + len;
  }
  return -1;
}

/**
 * Checks an upstream answer against the query it answers (same id, a response, the same question)
 * and returns its A records; null for anything malformed or not an answer to that query.
 */
export function parseAnswer(answer: Buffer, query: Buffer, parsed: ParsedQuery): ResolvedAddress[] | null {
  if (answer.length < parsed.questionEnd || answer.length > MAX_ANSWER_BYTES) return null;
  if (answer.readUInt16BE(0) !== parsed.id || !(answer.readUInt16BE(2) & 0x8000) || answer.readUInt16BE(4) !== 1) return null;
  if (answer.compare(query, 12, parsed.questionEnd, 12, parsed.questionEnd) !== 0) {
    // Resolvers may echo the question in another letter case; compare names case-insensitively.
    if (answer.toString('latin1', 12, parsed.questionEnd).toLowerCase() !== query.toString('latin1', 12, parsed.questionEnd).toLowerCase()) return null;
  }
  // Truncated: the client asks again over TCP, and that answer opens the addresses.
  if (answer.readUInt16BE(2) & 0x0200) return [];
  const count = answer.readUInt16BE(6);
  if (count > MAX_ANSWER_RECORDS) return null;
  const addresses: ResolvedAddress[] = [];
  let at = parsed.questionEnd;
  for (let i = 0; i < count; i++) {
    at = skipName(answer, at);
    if (at < 0 || at + 10 > answer.length) return null;
    const type = answer.readUInt16BE(at);
    const cls = answer.readUInt16BE(at + 2);
    const ttl = answer.readUInt32BE(at + 4);
    const length = answer.readUInt16BE(at + 8);
    at += 10;
    if (at + length > answer.length) return null;
    if (type === TYPE_A && cls === CLASS_IN && length === 4) addresses.push({ address: `${answer[at]}.${answer[at + 1]}.${answer[at + 2]}.${answer[at + 3]}`, ttl });
    at += length;
  }
  return addresses;
}

/** True when `name` matches a policy entry: the domain itself, or for `*.domain` any name under it. */
function matches(entry: string, name: string): boolean {
  if (entry.startsWith('*.')) return name.endsWith(entry.slice(1)) && name.length > entry.length - 1;
  return name === entry;
}

/** Whether `policy` lets its sandbox resolve `name` (lowercase, no trailing dot): `deny` first, then `egress`, then `allow`. */
export function nameAllowed(policy: NetworkPolicy, name: string): boolean {
  if (policy.deny.some((e) => matches(e, name))) return false;
  if (policy.egress === 'allow') return true;
  return policy.allow.some((e) => matches(e, name));
}

export interface DnsProxyOptions {
  /** Where to listen: the gateway's address, port 53. */
  address: string;
  port?: number;
  /** DNS_NAMESERVERS, tried in order. */
  upstreams: readonly string[];
  upstreamPort?: number;
  /** How long one upstream may take to answer before the next is tried. */
  upstreamTimeoutMs?: number;
  /** The clock (ms) the query rate is measured with: Date.now unless given (tests pass their own). */
  now?: () => number;
  /** The policy of the sandbox at a source address; null for an address that is no sandbox's. */
  policyAt(ip: string): NetworkPolicy | null;
  /**
   * Opens the A records of an allowed answer for the sandbox at `ip`; the answer waits for it.
   * `policy` is the one the query was allowed under: nothing opens when the address has another
   * by then (the sandbox's policy changed, or the address went to another sandbox).
   */
  allowResolved(ip: string, addresses: readonly ResolvedAddress[], policy: NetworkPolicy): Promise<void>;
  log?: Logger;
}

/** The DNS resolver for one bridge's sandboxes (see the comment at the top of this file). */
export class DnsProxy {
  #udp: UdpSocket | null = null;
  #tcp: Server | null = null;
  #inflight = 0;
  readonly #perSource = new Map<string, number>();
  readonly #connections = new Set<Socket>();
  readonly #tcpPerSource = new Map<string, number>();
  /** Per source: the query tokens left and when they were counted. */
  readonly #tokens = new Map<string, { left: number; at: number }>();

  constructor(private readonly opts: DnsProxyOptions) {}

  /**
   * Binds UDP and TCP on the address, port 53 or, when something else holds it there (a host
   * resolver bound to every address), one port the kernel picks for both: the firewall redirects
   * sandboxes' port 53 to `port` either way. Rejects when neither can be bound.
   */
  async start(): Promise<void> {
    const wanted = this.opts.port ?? 53;
    for (let attempt = 0; attempt < 8; attempt++) {
      const port = attempt === 0 ? wanted : 0;
      try {
        await this.#bind(port);
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' || attempt === 7) throw err;
        if (attempt === 0) this.opts.log?.warn(`port ${wanted} on ${this.opts.address} is in use: the sandboxes' DNS resolver listens on another port (their port 53 is redirected to it)`);
      }
    }
  }

  /** Where the resolver listens (after `start`). */
  get port(): number | null {
    return this.#udp ? this.#udp.address().port : null;
  }

  async #bind(wanted: number): Promise<void> {
    const udp = createSocket({ type: 'udp4' });
    udp.on('message', (msg, rinfo) => this.#onDatagram(msg, rinfo));
    // A send to a sandbox gone meanwhile (or any socket error) must not end the resolver.
    udp.on('error', (err) => this.opts.log?.warn({ err: err.message }, 'dns proxy udp socket error'));
    await new Promise<void>((resolve, reject) => {
      udp.once('error', reject);
      udp.bind(wanted, this.opts.address, () => {
        udp.off('error', reject);
        resolve();
      });
    });
    const port = udp.address().port;
    const tcp = createServer((socket) => this.#onConnection(socket));
    tcp.maxConnections = MAX_TCP_CONNECTIONS;
    tcp.on('error', (err) => this.opts.log?.warn({ err: err.message }, 'dns proxy tcp server error'));
    try {
      await new Promise<void>((resolve, reject) => {
        tcp.once('error', reject);
        tcp.listen(port, this.opts.address, () => {
          tcp.off('error', reject);
          resolve();
        });
      });
    } catch (err) {
      udp.close();
      throw err;
    }
    this.#udp = udp;
    this.#tcp = tcp;
  }

  async stop(): Promise<void> {
    for (const s of this.#connections) s.destroy();
    await Promise.all([
      this.#udp ? new Promise<void>((r) => this.#udp!.close(() => r())) : undefined,
      this.#tcp ? new Promise<void>((r) => this.#tcp!.close(() => r())) : undefined,
    ]);
    this.#udp = null;
    this.#tcp = null;
  }

  /** Takes an in-flight slot for `source`; false when it or the resolver is at its bound. */
  #admit(source: string): boolean {
    const mine = this.#perSource.get(source) ?? 0;
    if (this.#inflight >= MAX_INFLIGHT || mine >= MAX_INFLIGHT_PER_SOURCE) return false;
    this.#inflight++;
    this.#perSource.set(source, mine + 1);
    return true;
  }

  #release(source: string): void {
    this.#inflight--;
    const mine = (this.#perSource.get(source) ?? 1) - 1;
    if (mine <= 0) this.#perSource.delete(source);
    else this.#perSource.set(source, mine);
  }

  #onDatagram(msg: Buffer, rinfo: RemoteInfo): void {
    if (!this.#admit(rinfo.address)) return;
    this.answer(msg, rinfo.address, 'udp')
      .then((reply) => {
        if (reply && this.#udp) this.#udp.send(reply, rinfo.port, rinfo.address);
      })
      .catch((err: Error) => this.opts.log?.warn({ err: err.message }, 'dns proxy query failed'))
      .finally(() => this.#release(rinfo.address));
  }

  #onConnection(socket: Socket): void {
    const source = socket.remoteAddress ?? '';
    socket.on('error', () => socket.destroy());
    const held = this.#tcpPerSource.get(source) ?? 0;
    if (held >= MAX_TCP_CONNECTIONS_PER_SOURCE) return void socket.destroy();
    this.#tcpPerSource.set(source, held + 1);
    this.#connections.add(socket);
    socket.setTimeout(TCP_IDLE_MS, () => socket.destroy());
    const deadline = setTimeout(() => socket.destroy(), TCP_DEADLINE_MS);
    socket.on('close', () => {
      clearTimeout(deadline);
      this.#connections.delete(socket);
      const left = (this.#tcpPerSource.get(source) ?? 1) - 1;
      if (left <= 0) this.#tcpPerSource.delete(source);
      else this.#tcpPerSource.set(source, left);
    });
    let buffered = Buffer.alloc(0);
    let queries = 0;
    // Queries on one connection are answered in order, one at a time.
    let chain: Promise<void> = Promise.resolve();
    socket.on('data', (chunk: Buffer) => {
      // Whole queries are taken off at once, so what stays buffered is at most one partial query.
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 2) {
        const length = buffered.readUInt16BE(0);
        if (length > MAX_QUERY_BYTES || length < 12) return void socket.destroy();
        if (buffered.length < 2 + length) break;
        const query = buffered.subarray(2, 2 + length);
        buffered = buffered.subarray(2 + length);
        if (++queries > MAX_TCP_QUERIES_PER_CONNECTION) return void socket.end();
        chain = chain.then(async () => {
          if (!this.#admit(source)) return;
          try {
            const reply = await this.answer(Buffer.from(query), source, 'tcp');
            if (reply && !socket.destroyed) {
              const framed = Buffer.alloc(2 + reply.length);
              framed.writeUInt16BE(reply.length, 0);
              reply.copy(framed, 2);
              socket.write(framed);
            }
          } catch (err) {
            this.opts.log?.warn({ err: (err as Error).message }, 'dns proxy query failed');
          } finally {
            this.#release(source);
          }
        });
      }
    });
  }

  /**
   * The reply to one query from the sandbox at `source`, or null to drop it (malformed, or no
   * usable upstream answer arrived).
   */
  async answer(query: Buffer, source: string, transport: 'udp' | 'tcp'): Promise<Buffer | null> {
    const parsed = parseQuery(query);
    if (!parsed) return null;
    if (!this.#withinRate(source)) return localAnswer(query, parsed, RCODE_REFUSED);
    const policy = this.opts.policyAt(source);
    if (!policy || policy.egressCut) return localAnswer(query, parsed, RCODE_REFUSED);
    if (!nameAllowed(policy, parsed.name)) return localAnswer(query, parsed, RCODE_NXDOMAIN);
    if (parsed.type === TYPE_AAAA) return localAnswer(query, parsed, 0);
    const upstream = await this.#forward(query, parsed, transport);
    if (!upstream) return localAnswer(query, parsed, RCODE_SERVFAIL);
    if (upstream.addresses.length) await this.opts.allowResolved(source, upstream.addresses, policy);
    return upstream.answer;
  }

  /** Takes one query token of `source` (a bucket of QUERY_BURST refilled at QUERY_RATE a second); false when none is left. */
  #withinRate(source: string): boolean {
    const now = (this.opts.now ?? Date.now)();
    const bucket = this.#tokens.get(source) ?? { left: QUERY_BURST, at: now };
    bucket.left = Math.min(QUERY_BURST, bucket.left + ((now - bucket.at) * QUERY_RATE) / 1000);
    bucket.at = now;
    if (this.#tokens.size >= 4096 && !this.#tokens.has(source)) this.#tokens.clear();
    this.#tokens.set(source, bucket);
    if (bucket.left < 1) return false;
    bucket.left -= 1;
    return true;
  }

  /** The A records of `name` as DNS_NAMESERVERS answer them (over UDP; none when no upstream answers). */
  async resolveA(name: string): Promise<ResolvedAddress[]> {
    const labels = name.split('.');
    if (name.length > 253 || labels.some((l) => l.length === 0 || l.length > 63)) return [];
    const query = Buffer.concat([
      Buffer.from([0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]),
      ...labels.map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l, 'latin1')])),
      Buffer.from([0, 0, TYPE_A, 0, CLASS_IN]),
    ]);
    const parsed = parseQuery(query);
    if (!parsed) return [];
    return (await this.#forward(query, parsed, 'udp'))?.addresses ?? [];
  }

  /** Asks each upstream in turn; the first answer that parses wins. */
  async #forward(query: Buffer, parsed: ParsedQuery, transport: 'udp' | 'tcp'): Promise<{ answer: Buffer; addresses: ResolvedAddress[] } | null> {
    for (const server of this.opts.upstreams) {
      const outgoing = Buffer.from(query);
      // Our own id upstream (an off-path spoofer must guess it and the socket's port); the client's in the reply.
      const id = (Math.random() * 0x10000) & 0xffff;
      outgoing.writeUInt16BE(id, 0);
      const raw = await (transport === 'udp' ? this.#askUdp(server, outgoing) : this.#askTcp(server, outgoing)).catch(() => null);
      if (!raw) continue;
      const addresses = parseAnswer(raw, outgoing, { ...parsed, id });
      if (!addresses) continue;
      const answer = Buffer.from(raw);
      answer.writeUInt16BE(parsed.id, 0);
      return { answer, addresses };
    }
    return null;
  }

  #askUdp(server: string, query: Buffer): Promise<Buffer | null> {
    const port = this.opts.upstreamPort ?? 53;
    return new Promise((resolve) => {
      const socket = createSocket('udp4');
      let settled = false;
      const done = (answer: Buffer | null) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.close();
        resolve(answer);
      };
      const timer = setTimeout(() => done(null), this.opts.upstreamTimeoutMs ?? 2000);
      socket.on('error', () => done(null));
      socket.on('message', (msg, rinfo) => {
        // Only the server asked, and only an answer to our id: anything else is ignored.
        if (rinfo.address !== server || rinfo.port !== port || msg.length < 2 || msg.readUInt16BE(0) !== query.readUInt16BE(0)) return;
        done(msg);
      });
      socket.send(query, port, server, (err) => err && done(null));
    });
  }

  #askTcp(server: string, query: Buffer): Promise<Buffer | null> {
    const port = this.opts.upstreamPort ?? 53;
    return new Promise((resolve) => {
      const socket = connect({ host: server, port });
      let buffered = Buffer.alloc(0);
      const done = (answer: Buffer | null) => {
        clearTimeout(timer);
        socket.destroy();
        resolve(answer);
      };
      const timer = setTimeout(() => done(null), this.opts.upstreamTimeoutMs ?? 2000);
      socket.on('error', () => done(null));
      socket.on('close', () => done(null));
      socket.on('connect', () => {
        const framed = Buffer.alloc(2 + query.length);
        framed.writeUInt16BE(query.length, 0);
        query.copy(framed, 2);
        socket.write(framed);
      });
      socket.on('data', (chunk: Buffer) => {
        buffered = Buffer.concat([buffered, chunk]);
        if (buffered.length > 2 + MAX_ANSWER_BYTES) return done(null);
        if (buffered.length >= 2 && buffered.length >= 2 + buffered.readUInt16BE(0)) done(buffered.subarray(2, 2 + buffered.readUInt16BE(0)));
      });
    });
  }
}
