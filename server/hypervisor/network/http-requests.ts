/*
 * The requests of one plain-HTTP connection through the name proxy (name-proxy.ts), followed from
 * the client's side so that every request of a kept-alive connection names the host the connection
 * was opened for, not only the first. Each request head is read whole (at most 16 KiB) and checked:
 * an HTTP/1.x request line, exactly one Host, equal to the connection's name, an origin-form target
 * or an absolute-form one naming that same host, no CONNECT, and an unambiguous body (a single
 * Content-Length, or Transfer-Encoding ending in chunked, never both). The body is then passed by
 * its length (chunked bodies are followed chunk by chunk) and the next head is checked in turn.
 * A request asking to upgrade the connection (WebSocket) may only be the first: the bytes after it
 * wait until the server answers; a 101 turns the rest of the connection into an opaque stream,
 * anything else goes on as HTTP.
 */

/** The longest request head (or chunk-size line and trailer section) accepted. */
export const MAX_REQUEST_HEAD_BYTES = 16 * 1024;
const MAX_CHUNK_LINE_BYTES = 1024;

/** What one `feed` gives: the bytes to pass to the server now, and why the connection must end, if it must. */
export interface RequestsVerdict {
  pass: Buffer;
  error?: string;
}

type State =
  | { kind: 'head' }
  | { kind: 'body'; left: number }
  | { kind: 'chunk-size' }
  | { kind: 'chunk-data'; left: number }
  | { kind: 'chunk-end' }
  | { kind: 'trailers' }
  | { kind: 'upgrade-pending' }
  | { kind: 'raw' }
  | { kind: 'failed' };

/** The connection's name as the proxy compares names: lowercase, port and trailing dot dropped. */
function hostName(value: string): string {
  return value.trim().toLowerCase().replace(/:\d*$/, '').replace(/\.$/, '');
}

/** What a checked request head says about the request's body; or why the request is refused. */
export type HeadCheck = { error: string } | { body: 'none' | 'chunked' | number; upgrade: boolean };

/**
 * Checks one request head (the text before its empty line) against the connection's `host`.
 * Pure: table-tested.
 */
export function checkRequestHead(head: string, host: string): HeadCheck {
  const lines = head.split('\r\n');
  const requestLine = /^([!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}) (\S+) HTTP\/1\.[01]$/.exec(lines[0] ?? '');
  if (!requestLine) return { error: 'the request is not HTTP/1.x' };
  const method = requestLine[1]!;
  const target = requestLine[2]!;
  if (method.toUpperCase() === 'CONNECT') return { error: 'CONNECT is not allowed' };
  const headers: Array<[string, string]> = [];
  for (const line of lines.slice(1)) {
    const field = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*$/.exec(line);
    // Folded or malformed fields could be read differently by the server.
    if (!field) return { error: 'the request has a malformed header field' };
    headers.push([field[1]!.toLowerCase(), field[2]!]);
  }
  const values = (name: string) => headers.filter(([n]) => n === name).map(([, v]) => v);
  const hosts = values('host');
  if (hosts.length !== 1) return { error: hosts.length === 0 ? 'the request names no host' : 'the request names more than one Host' };
  if (hostName(hosts[0]!) !== host) return { error: `${hostName(hosts[0]!) || 'an empty Host'} is not this connection's host (${host})` };
  if (!target.startsWith('/') && target !== '*') {
    let targetHost: string | null = null;
    try {
      const url = new URL(target);
      if (url.protocol === 'http:' || url.protocol === 'https:') targetHost = hostName(url.hostname);
    } catch {
      // Not a URL: refused below.
    }
    if (targetHost !== host) return { error: `the request target ${target.slice(0, 100)} does not name ${host}` };
  }
  const encodings = values('transfer-encoding').join(',').split(',').map((e) => e.trim().toLowerCase()).filter(Boolean);
  const lengths = values('content-length');
  if (encodings.length && lengths.length) return { error: 'the request has both Transfer-Encoding and Content-Length' };
  const upgrade = values('upgrade').length > 0;
  if (encodings.length) {
    if (encodings.at(-1) !== 'chunked') return { error: 'the request body is not chunked' };
    return { body: 'chunked', upgrade };
  }
  if (lengths.length) {
    if (lengths.some((l) => l !== lengths[0]) || !/^\d{1,15}$/.test(lengths[0]!)) return { error: 'the request has an invalid Content-Length' };
    const length = Number(lengths[0]);
    return { body: length === 0 ? 'none' : length, upgrade };
  }
  return { body: 'none', upgrade };
}

/** Follows the client's side of one plain-HTTP connection opened for `host` (see the top of this file). */
export class HttpRequests {
  #state: State = { kind: 'head' };
  #buffered: Buffer = Buffer.alloc(0);
  #requests = 0;

  constructor(private readonly host: string) {}

  /** Whether the bytes after an upgrade request wait for the server's answer (`upstreamAnswered`). */
  get awaitingUpgrade(): boolean {
    return this.#state.kind === 'upgrade-pending';
  }

  /** Takes the client's next bytes. */
  feed(chunk: Buffer): RequestsVerdict {
    if (this.#state.kind === 'raw') return { pass: chunk };
    if (this.#state.kind === 'failed') return { pass: Buffer.alloc(0), error: 'the connection was refused' };
    this.#buffered = this.#buffered.length ? Buffer.concat([this.#buffered, chunk]) : chunk;
    return this.#run();
  }

  /** The status of the server's first answer, when the first request asked to upgrade: 101 makes the rest opaque. */
  upstreamAnswered(status: number): RequestsVerdict {
    if (this.#state.kind !== 'upgrade-pending') return { pass: Buffer.alloc(0) };
    this.#state = status === 101 ? { kind: 'raw' } : { kind: 'head' };
    if (status === 101) {
      const pass = this.#buffered;
      this.#buffered = Buffer.alloc(0);
      return { pass };
    }
    return this.#run();
  }

  #fail(error: string, pass: Buffer[]): RequestsVerdict {
    this.#state = { kind: 'failed' };
    this.#buffered = Buffer.alloc(0);
    return { pass: Buffer.concat(pass), error };
  }

  #run(): RequestsVerdict {
    const pass: Buffer[] = [];
    const take = (n: number) => {
      pass.push(this.#buffered.subarray(0, n));
      this.#buffered = this.#buffered.subarray(n);
    };
    for (;;) {
      const state = this.#state;
      const data = this.#buffered;
      if (data.length === 0 || state.kind === 'upgrade-pending' || state.kind === 'failed') break;
      if (state.kind === 'raw') {
        take(data.length);
        break;
      }
      if (state.kind === 'head') {
        // Empty lines between requests are skipped, as servers do.
        if (data[0] === 0x0d || data[0] === 0x0a) {
          const skip = data[0] === 0x0d ? (data.length < 2 ? 0 : data[1] === 0x0a ? 2 : -1) : 1;
          if (skip < 0) return this.#fail('the request is not HTTP/1.x', pass);
          if (skip === 0) break;
          take(skip);
          continue;
        }
        const end = data.indexOf('\r\n\r\n');
        if (end < 0) {
          if (data.length > MAX_REQUEST_HEAD_BYTES) return this.#fail('the request head is longer than 16 KiB', pass);
          break;
        }
        if (end > MAX_REQUEST_HEAD_BYTES) return this.#fail('the request head is longer than 16 KiB', pass);
        const check = checkRequestHead(data.toString('latin1', 0, end), this.host);
        if ('error' in check) return this.#fail(check.error, pass);
        if (check.upgrade && this.#requests > 0) return this.#fail('only the first request of a connection may upgrade it', pass);
        this.#requests++;
        take(end + 4);
        if (check.body === 'chunked') this.#state = { kind: 'chunk-size' };
        else if (typeof check.body === 'number') this.#state = { kind: 'body', left: check.body };
        else this.#state = check.upgrade ? { kind: 'upgrade-pending' } : { kind: 'head' };
        if (check.upgrade && check.body !== 'none') return this.#fail('an upgrade request has no body', pass);
        continue;
      }
      if (state.kind === 'body' || state.kind === 'chunk-data') {
        const n = Math.min(state.left, data.length);
        take(n);
        state.left -= n;
        if (state.left === 0) this.#state = state.kind === 'body' ? { kind: 'head' } : { kind: 'chunk-end' };
        continue;
      }
      if (state.kind === 'chunk-end') {
        if (data.length < 2) break;
        if (data[0] !== 0x0d || data[1] !== 0x0a) return this.#fail('the chunked request body is malformed', pass);
        take(2);
        this.#state = { kind: 'chunk-size' };
        continue;
      }
      // chunk-size or trailers: one line at a time.
      const lineEnd = data.indexOf('\r\n');
      const limit = state.kind === 'chunk-size' ? MAX_CHUNK_LINE_BYTES : MAX_REQUEST_HEAD_BYTES;
      if (lineEnd < 0) {
        if (data.length > limit) return this.#fail('the chunked request body is malformed', pass);
        break;
      }
      const line = data.toString('latin1', 0, lineEnd);
      if (state.kind === 'chunk-size') {
        const size = /^([0-9A-Fa-f]{1,12})[ \t]*(;.*)?$/.exec(line);
        if (!size) return this.#fail('the chunked request body is malformed', pass);
        take(lineEnd + 2);
        const length = parseInt(size[1]!, 16);
        this.#state = length === 0 ? { kind: 'trailers' } : { kind: 'chunk-data', left: length };
        continue;
      }
      take(lineEnd + 2);
      if (line === '') this.#state = { kind: 'head' };
    }
    return { pass: Buffer.concat(pass) };
  }
}
