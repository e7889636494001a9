import { request as httpRequest, STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import { CLUSTER_TOKEN_HEADER, PRINCIPAL_HEADER } from '../services/fleet/internal-protocol.js';
import type { Duplex } from 'node:stream';
import { splice } from '../../shared/port-tunnel.js';
import { DomainError, InvalidInputError, UpstreamUnavailableError } from '../errors.js';
import type { Principal } from '../services/auth-service.js';
import type { Services } from '../services/index.js';
import type { SandboxRecord } from '../store/types.js';
import { requestedOrgOf } from '../trpc/context.js';
import { sendError } from './envelope.js';
import type { OpenStreams } from './open-streams.js';
import { decodePathSegment } from './route-table.js';

/** The header a preview token may come in. */
export const PREVIEW_TOKEN_HEADER = 'x-voidrun-preview-token';
/** The query parameter a preview token may come in once (the answer moves it into a cookie). */
export const PREVIEW_TOKEN_QUERY = 'voidrun_token';
/** The cookie a preview host keeps its token in (scoped to that host: it has no Domain). */
export const PREVIEW_TOKEN_COOKIE = 'voidrun_preview';

/** The query parameter the rest of the API takes a key in (refused on the port proxy's paths). */
const API_KEY_QUERY = 'apiKey';

/** The metrics and log label of requests to preview hosts. */
export const PREVIEW_HOST_LABEL = 'preview-host';
/** The metrics and log label of requests proxied under the API. */
export const PORT_PROXY_LABEL = '/api/sandboxes/{id}/ports/{port}/*';

/** The most header bytes the server reads of an upstream answer (as of any HTTP request). */
const MAX_UPSTREAM_HEADER_BYTES = 16 * 1024;

/** Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus ours. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade', 'http2-settings']);
// The fleet's cluster secret too: a request a host got from an API node carries it, and a sandbox's server must never see it.
const OURS = new Set(['x-api-key', 'x-org-id', PREVIEW_TOKEN_HEADER, 'x-voidrun-request', CLUSTER_TOKEN_HEADER, PRINCIPAL_HEADER]);

/**
 * Answers sent for a sandbox's server on the API's own origin run as an opaque origin: its pages
 * cannot read the API's cookies or storage, nor call the API with the browser's credentials.
 */
const API_ORIGIN_CSP = 'sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads';

/** Where one proxied request goes. */
interface Target {
  via: 'api' | 'host';
  id: string;
  port: number;
  /** The upstream request target: path and query, our parameters removed. */
  path: string;
}

export interface PortProxyOptions {
  services: Services;
  streams: OpenStreams;
  /** The access log's org of a request, once known. */
  onOrg: (req: IncomingMessage, orgId: string) => void;
  /** HTTP_MAX_CONNECTIONS: proxied requests take at most half (see `TunnelBudget`). */
  maxConnections: number;
  /** PORT_ANSWER_TIMEOUT_MS: how long a sandbox's server has to start its answer once the request was sent whole. */
  answerTimeoutMs: number;
}

/**
 * Proxied requests and upgraded tunnels open at once: at most half of HTTP_MAX_CONNECTIONS in all
 * (the API's own routes keep the rest however long sandboxes' servers take to answer), half of
 * that per org and a quarter per sandbox (one org, one sandbox's server, or the visitors of one
 * public port, leave room for the others'). Past any, a request is 503 SERVER_BUSY naming the bound.
 */
export class TunnelBudget {
  readonly #byOrg = new Map<string, number>();
  readonly #bySandbox = new Map<string, number>();
  #total = 0;
  readonly max: number;
  readonly perOrg: number;
  readonly perSandbox: number;

  constructor(maxConnections: number) {
    this.max = Math.max(1, Math.floor(maxConnections / 2));
    this.perOrg = Math.max(1, Math.ceil(this.max / 2));
    this.perSandbox = Math.max(1, Math.ceil(this.max / 4));
  }

  /** Takes one slot for sandbox `id` of org `orgId`; the function gives it back (once). */
  take(orgId: string, id: string): () => void {
    if ((this.#bySandbox.get(id) ?? 0) >= this.perSandbox) {
      throw new DomainError('SERVER_BUSY', `Sandbox ${id} has ${this.perSandbox} proxied requests open, the most one sandbox may (a quarter of half of HTTP_MAX_CONNECTIONS); close some or retry later`);
    }
    if ((this.#byOrg.get(orgId) ?? 0) >= this.perOrg) {
      throw new DomainError('SERVER_BUSY', `This organization has ${this.perOrg} proxied requests to its sandboxes' ports open, the most one org may (a half of half of HTTP_MAX_CONNECTIONS); close some or retry later`);
    }
    if (this.#total >= this.max) {
      throw new DomainError('SERVER_BUSY', `The server has ${this.max} proxied requests to sandboxes' ports open, the most allowed (half of HTTP_MAX_CONNECTIONS, the rest is kept for the API); retry later`);
    }
    count(this.#bySandbox, id, 1);
    count(this.#byOrg, orgId, 1);
    this.#total++;
    let given = false;
    return () => {
      if (given) return;
      given = true;
      this.#total--;
      count(this.#bySandbox, id, -1);
      count(this.#byOrg, orgId, -1);
    };
  }
}

/** Adds `by` to `key`'s count, dropping it at zero. */
function count(counts: Map<string, number>, key: string, by: number): void {
  const n = (counts.get(key) ?? 0) + by;
  if (n) counts.set(key, n);
  else counts.delete(key);
}

/**
 * HTTP and WebSocket requests to ports of sandboxes: under the API
 * (`/api/sandboxes/{id}/ports/{port}/<path>`, with the org's API key) and on preview hosts
 * (`{port}-{id}.{PREVIEW_DOMAIN}`: a public port, a preview token or an API key). Each request
 * gets its own tunnel through the sandbox's agent (`PortService.openPort`); bodies and upgraded
 * streams are piped both ways with flow control, never held whole. An upstream answer that is not
 * HTTP, or whose head passes 16 KiB, is a 502 naming the sandbox's server; the proxy forwards
 * neither our credentials nor hop-by-hop headers in either direction.
 */
export function createPortProxy(opts: PortProxyOptions) {
  const { services, streams } = opts;
  const budget = new TunnelBudget(opts.maxConnections);
  /** Client sockets upgraded through to a port (Node's server no longer tracks them). */
  const upgraded = new Set<Duplex>();

  /** The preview host a request is for, or null. */
  function hostTarget(req: IncomingMessage): Target | null {
    const target = services.ports.previewTarget(req.headers.host);
    return target ? { via: 'host', ...target, path: withoutOurQuery(originForm(req.url ?? '/')) } : null;
  }

  /**
   * The API proxy path a request is for, or null: `/ports/{port}` without a trailing slash and
   * `/ports/{port}/token` are the API's own routes (in every method, so a method they do not take
   * is the API's 404, not the sandbox's answer); the sandbox's `/token` is reached on its preview host.
   */
  function apiTarget(req: IncomingMessage): Target | null {
    const url = req.url ?? '/';
    const q = url.indexOf('?');
    const path = q < 0 ? url : url.slice(0, q);
    const m = /^\/api\/sandboxes\/([^/]+)\/ports\/([^/]+)(\/.*)?$/.exec(path);
    if (!m) return null;
    const rest = m[3];
    if (rest === undefined || rest === '/token') return null;
    // An invalid port is refused once the key is checked (see `authorize`).
    const port = /^\d{1,5}$/.test(m[2]!) ? Number(m[2]) : NaN;
    return { via: 'api', id: decodePathSegment(m[1]!), port, path: withoutOurQuery(rest + (q < 0 ? '' : url.slice(q))) };
  }

  /** The running sandbox a request may reach, after its credentials are checked (and, under the API, tied to its key). */
  async function authorize(req: IncomingMessage, target: Target, hold: (principal: Principal, checkStarted: number) => void): Promise<SandboxRecord> {
    if (target.via === 'host') {
      const record = await services.ports.authorizePreview(target.id, target.port, { token: previewToken(req, (t) => services.ports.tokenExpiry(t, target.id, target.port) !== null), apiKey: headerOnlyKey(req), requestedOrgId: requestedOrgOf(req) });
      opts.onOrg(req, record.orgId);
      return record;
    }
    // The key from the header only: a key in the URL would be in the address of the page the
    // sandbox serves, which its scripts read (and its Referer carries).
    if (queryParam(req.url ?? '/', API_KEY_QUERY) !== null) {
      throw new InvalidInputError(
        `?${API_KEY_QUERY}= is not taken on /api/sandboxes/{id}/ports/{port}/…: the sandbox's page could read the key from its own address. Send the key in the X-API-Key header, or open the port's preview URL with a preview token (POST /api/sandboxes/{id}/ports/{port}/token)`,
      );
    }
    const checkStarted = streams.keyCheckStarted();
    const principal = await services.auth.authenticate(headerOnlyKey(req), requestedOrgOf(req));
    opts.onOrg(req, principal.orgId);
    if (!(target.port >= 1 && target.port <= 65535)) throw new InvalidInputError(`Invalid port in ${(req.url ?? '').split('?')[0]!.slice(0, 200)}: ports are 1 to 65535`);
    const record = await services.sandboxes.running(principal, target.id);
    hold(principal, checkStarted);
    return record;
  }

  /**
   * Serves a plain request to a port (a preview host's with `phase` 'host', the API proxy's with
   * 'api'): null when it is not one, else a promise of its metrics label.
   */
  function handleRequest(req: IncomingMessage, res: ServerResponse, phase: 'host' | 'api'): Promise<string> | null {
    let target: Target | null;
    try {
      target = phase === 'host' ? hostTarget(req) : apiTarget(req);
    } catch (err) {
      sendError(res, err);
      req.resume();
      return Promise.resolve(phase === 'host' ? PREVIEW_HOST_LABEL : PORT_PROXY_LABEL);
    }
    return target ? serve(req, res, target) : null;
  }

  async function serve(req: IncomingMessage, res: ServerResponse, target: Target): Promise<string> {
    const label = target.via === 'host' ? PREVIEW_HOST_LABEL : PORT_PROXY_LABEL;
    try {
      // A browser's first visit: the token moves from the query into a cookie for this host.
      const queryToken = target.via === 'host' ? queryParam(req.url ?? '/', PREVIEW_TOKEN_QUERY) : null;
      const record = await authorize(req, target, (principal, checkStarted) => res.once('close', streams.trackKey(principal.keyId, () => res.destroy(), checkStarted)));
      // An open preview or port-proxy request keeps its sandbox awake for idle policies.
      const active = services.activity.hold(record.orgId, record.id);
      if (res.closed) active();
      else res.once('close', active);
      if (queryToken !== null && (req.method === 'GET' || req.method === 'HEAD')) {
        const expires = services.ports.tokenExpiry(queryToken, target.id, target.port);
        if (expires) {
          const maxAge = Math.max(0, Math.floor((expires.getTime() - Date.now()) / 1000));
          const secure = services.ports.previewScheme === 'https' ? '; Secure' : '';
          res.writeHead(302, {
            location: target.path,
            'set-cookie': `${PREVIEW_TOKEN_COOKIE}=${queryToken}; Path=/; Max-Age=${maxAge}; HttpOnly; SameSite=Lax${secure}`,
            'cache-control': 'no-store',
            'content-length': '0',
          });
          res.end();
          req.resume();
          return label;
        }
      }
      if (res.closed) return label; // the client left during the checks
      res.once('close', budget.take(record.orgId, target.id));
      const tunnel = await services.ports.openPort(record, target.port);
      forward(req, res, target, tunnel);
    } catch (err) {
      if (!res.headersSent) sendError(res, err);
      else res.destroy();
      req.resume();
    }
    return label;
  }

  /** The upstream request for `req` over `tunnel`, with the forwarded headers. */
  function upstreamRequest(req: IncomingMessage, target: Target, tunnel: Duplex, upgrade: boolean) {
    // A preview host's scheme is the one its URLs are handed out with (TLS ends in front of us).
    const headers = forwardedHeaders(req, target, target.via === 'host' ? services.ports.previewScheme : 'http');
    if (upgrade) {
      headers.connection = 'Upgrade';
      headers.upgrade = req.headers.upgrade ?? 'websocket';
    }
    return httpRequest({ createConnection: () => tunnel as never, method: req.method, path: target.path, headers, maxHeaderSize: MAX_UPSTREAM_HEADER_BYTES });
  }

  /**
   * A 502 naming the sandbox's server, `onExpiry`, when `upstream` has no answer head within
   * PORT_ANSWER_TIMEOUT_MS of the request being sent whole; the returned function cancels it.
   */
  function answerDeadline(upstream: ReturnType<typeof upstreamRequest>, target: Target, onExpiry: (err: UpstreamUnavailableError) => void): () => void {
    let timer: NodeJS.Timeout | undefined;
    upstream.once('finish', () => {
      timer = setTimeout(() => {
        onExpiry(new UpstreamUnavailableError(`The server on port ${target.port} in sandbox ${target.id} did not start an answer within ${opts.answerTimeoutMs} ms of the request (PORT_ANSWER_TIMEOUT_MS)`));
      }, opts.answerTimeoutMs);
      timer.unref();
    });
    return () => clearTimeout(timer);
  }

  /** Pipes the request to the upstream and its answer back; a failure before the answer's head is a 502. */
  function forward(req: IncomingMessage, res: ServerResponse, target: Target, tunnel: Duplex): void {
    const upstream = upstreamRequest(req, target, tunnel, false);
    const abandon = () => {
      upstream.destroy();
      tunnel.destroy();
    };
    let timedOut = false;
    const answered = answerDeadline(upstream, target, (err) => {
      timedOut = true;
      if (!res.headersSent) sendError(res, err);
      abandon();
    });
    res.once('close', () => {
      answered();
      if (!res.writableFinished) abandon();
    });
    upstream.once('response', (answer) => {
      answered();
      try {
        for (const [name, value] of responseHeaders(answer, target)) res.appendHeader(name, value);
        if (target.via === 'api') {
          res.appendHeader('content-security-policy', API_ORIGIN_CSP);
          // Replaces the upstream's: no address on the API's origin is sent on as a Referer.
          res.setHeader('referrer-policy', 'no-referrer');
        }
        res.writeHead(answer.statusCode!, answer.statusMessage);
      } catch (err) {
        // A header Node will not send (it parsed it, but it is not valid to write).
        answer.destroy();
        abandon();
        res.removeHeader('content-security-policy');
        return sendError(res, malformed(target, (err as NodeJS.ErrnoException).code));
      }
      answer.pipe(res);
      answer.once('error', () => res.destroy());
      answer.once('aborted', () => res.destroy());
    });
    upstream.once('error', (err: NodeJS.ErrnoException) => {
      tunnel.destroy();
      if (timedOut) return; // answered already (the deadline's own destroy)
      if (!res.headersSent) sendError(res, upstreamFailure(target, err));
      else res.destroy();
    });
    // Node's client ends a request without an answer or an error when the upstream switches
    // protocols unasked (a 101 to a plain request): that is a malformed answer too.
    upstream.once('close', () => {
      if (!res.headersSent && !res.destroyed) sendError(res, malformed(target, undefined));
    });
    req.pipe(upstream);
  }

  /**
   * Serves an upgrade (a WebSocket) to a port: resolves with the metrics label, or null when it is
   * not one; `done(status)` when the handshake is over (101, or the status it was refused with).
   */
  function handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, handshake: { done: (status: number) => void; refuse: (err: unknown) => void }): string | null {
    const { done } = handshake;
    const refuse = (err: unknown) => {
      if (!socket.destroyed && socket.writable) handshake.refuse(err);
    };
    let target: Target | null;
    try {
      target = hostTarget(req) ?? apiTarget(req);
    } catch (err) {
      refuse(err);
      return PORT_PROXY_LABEL;
    }
    if (!target) return null;
    const t = target;
    void (async () => {
      const record = await authorize(req, t, (principal, checkStarted) => {
        const release = streams.acquire(principal, 'stream', () => socket.destroy(), checkStarted);
        if (socket.destroyed) release();
        else socket.once('close', release);
      });
      if (socket.destroyed) return;
      socket.once('close', budget.take(record.orgId, t.id));
      socket.once('close', services.activity.hold(record.orgId, record.id));
      const tunnel = await services.ports.openPort(record, t.port);
      if (socket.destroyed) return void tunnel.destroy();
      const upstream = upstreamRequest(req, t, tunnel, true);
      socket.once('close', () => upstream.destroy());
      let answered = false;
      const cancelDeadline = answerDeadline(upstream, t, (err) => {
        answered = true;
        upstream.destroy();
        tunnel.destroy();
        refuse(err);
      });
      socket.once('close', cancelDeadline);
      upstream.once('upgrade', (answer, upstreamSocket, upstreamHead) => {
        cancelDeadline();
        answered = true;
        done(101);
        let text = `HTTP/1.1 101 ${answer.statusMessage || 'Switching Protocols'}\r\n`;
        for (let i = 0; i < answer.rawHeaders.length; i += 2) {
          const name = answer.rawHeaders[i]!;
          const value = answer.rawHeaders[i + 1]!;
          text += `${name}: ${name.toLowerCase() === 'set-cookie' ? ownedCookie(value, t) : value}\r\n`;
        }
        socket.write(`${text}\r\n`);
        if (upstreamHead.length) socket.write(upstreamHead);
        if (head.length) upstreamSocket.write(head);
        splice(socket, upstreamSocket);
        upgraded.add(socket);
        socket.once('close', () => upgraded.delete(socket));
      });
      upstream.once('response', (answer) => {
        // The server refused the upgrade: its answer is relayed, then the connection closes.
        cancelDeadline();
        answered = true;
        done(answer.statusCode ?? 502);
        let text = `HTTP/1.1 ${answer.statusCode} ${answer.statusMessage || STATUS_CODES[answer.statusCode!] || ''}\r\n`;
        for (const [name, value] of responseHeaders(answer, t)) text += `${name}: ${value}\r\n`;
        socket.write(`${text}connection: close\r\n\r\n`);
        answer.pipe(socket);
        answer.once('error', () => socket.destroy());
      });
      upstream.once('error', (err: NodeJS.ErrnoException) => {
        answered = true;
        tunnel.destroy();
        refuse(upstreamFailure(t, err));
      });
      // Closed with neither an answer nor an error (see `forward`): malformed.
      upstream.once('close', () => {
        if (!answered) refuse(malformed(t, undefined));
      });
      upstream.end();
    })().catch(refuse);
    return target.via === 'host' ? PREVIEW_HOST_LABEL : PORT_PROXY_LABEL;
  }

  /** Ends every upgraded connection (the server is closing). */
  function closeUpgraded(): void {
    for (const socket of upgraded) socket.destroy();
  }

  return { handleRequest, handleUpgrade, closeUpgraded };
}

/** The 502 for an upstream that did not answer HTTP. */
function malformed(target: Target, code: string | undefined): UpstreamUnavailableError {
  const what = code === 'HPE_HEADER_OVERFLOW' ? `an answer whose headers are larger than ${MAX_UPSTREAM_HEADER_BYTES / 1024} KiB` : `a malformed HTTP answer${code ? ` (${code})` : ''}`;
  return new UpstreamUnavailableError(`The server on port ${target.port} in sandbox ${target.id} sent ${what}`);
}

function upstreamFailure(target: Target, err: NodeJS.ErrnoException): UpstreamUnavailableError {
  if (err.code?.startsWith('HPE_') || err.code === 'ERR_INVALID_CHAR' || err.code === 'ERR_HTTP_INVALID_HEADER_VALUE') return malformed(target, err.code);
  return new UpstreamUnavailableError(`The server on port ${target.port} in sandbox ${target.id} closed the connection without a whole answer`);
}

/**
 * The upstream answer's headers to pass on: repeated ones kept, hop-by-hop ones (and what
 * `Connection` names) dropped, cookies kept to the target (see `ownedCookie`).
 */
function responseHeaders(answer: IncomingMessage, target: Target): [string, string][] {
  const named = connectionTokens(answer.headers.connection);
  const out: [string, string][] = [];
  for (let i = 0; i < answer.rawHeaders.length; i += 2) {
    const name = answer.rawHeaders[i]!;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || named.has(lower)) continue;
    const value = answer.rawHeaders[i + 1]!;
    out.push([name, lower === 'set-cookie' ? ownedCookie(value, target) : value]);
  }
  return out;
}

/**
 * An upstream's Set-Cookie, kept to what the sandbox's server owns: without `Domain` (a cookie for
 * PREVIEW_DOMAIN or the API's domain would reach every other sandbox's host, another org's too),
 * and under the API path with its `Path` inside `/api/sandboxes/{id}/ports/{port}/` (the API's
 * origin is shared by every sandbox).
 */
function ownedCookie(value: string, target: Target): string {
  const [pair, ...attributes] = value.split(';');
  const name = (a: string) => a.trim().split('=')[0]!.trim().toLowerCase();
  const kept = attributes.filter((a) => name(a) !== 'domain' && (target.via === 'host' || name(a) !== 'path'));
  if (target.via === 'api') {
    const given = attributes.filter((a) => name(a) === 'path').map((a) => a.slice(a.indexOf('=') + 1).trim()).pop();
    const prefix = `/api/sandboxes/${target.id}/ports/${target.port}`;
    kept.push(` Path=${prefix}${given?.startsWith('/') ? given : '/'}`);
  }
  return [pair, ...kept].join(';');
}

/** The request headers the upstream sees: without ours, without hop-by-hop ones, with our X-Forwarded-* (a client's and its `Forwarded` dropped), a Referer without our query parameters. */
function forwardedHeaders(req: IncomingMessage, target: Target, proto: string): Record<string, string> {
  const named = connectionTokens(req.headers.connection);
  const headers: Record<string, string> = {};
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    const lower = req.rawHeaders[i]!.toLowerCase();
    const value = req.rawHeaders[i + 1]!;
    // A client's `Forwarded` / `X-Forwarded-*` would tell the upstream a client address of its choosing.
    if (HOP_BY_HOP.has(lower) || OURS.has(lower) || named.has(lower) || lower === 'host' || lower === 'forwarded' || lower.startsWith('x-forwarded-')) continue;
    if (lower === 'cookie') {
      const kept = value
        .split(';')
        .map((c) => c.trim())
        .filter((c) => c && !c.startsWith(`${PREVIEW_TOKEN_COOKIE}=`));
      if (kept.length) headers.cookie = headers.cookie ? `${headers.cookie}; ${kept.join('; ')}` : kept.join('; ');
      continue;
    }
    if (lower === 'referer') {
      // A page's address may carry our credentials (`?voidrun_token=`, or an `?apiKey=` a client sent anyway).
      headers.referer = withoutOurQuery(value);
      continue;
    }
    headers[lower] = headers[lower] === undefined ? value : `${headers[lower]}, ${value}`;
  }
  const host = req.headers.host ?? '';
  headers.host = target.via === 'host' ? host : `localhost:${target.port}`;
  headers['x-forwarded-host'] = host;
  headers['x-forwarded-proto'] = proto;
  if (req.socket.remoteAddress) headers['x-forwarded-for'] = req.socket.remoteAddress;
  return headers;
}

function connectionTokens(value: string | undefined): Set<string> {
  return new Set((value ?? '').split(',').map((t) => t.trim().toLowerCase()).filter(Boolean));
}

/**
 * A request target as a path: an absolute-form target (`http://host/path`) becomes its path and
 * query, and leading slashes collapse to one, so a redirect to it never leaves the host.
 */
function originForm(url: string): string {
  let path = url;
  if (!url.startsWith('/')) {
    try {
      const parsed = new URL(url);
      path = parsed.pathname + parsed.search;
    } catch {
      path = '/';
    }
  }
  return path.replace(/^\/+/, '/');
}

/** `url` without our parameters (`voidrun_token`, `apiKey`); the rest of its query kept byte for byte. */
function withoutOurQuery(url: string): string {
  const q = url.indexOf('?');
  if (q < 0) return url;
  const kept = url
    .slice(q + 1)
    .split('&')
    .filter((pair) => {
      const name = safeDecode(pair.split('=')[0]!);
      return name !== PREVIEW_TOKEN_QUERY && name !== API_KEY_QUERY;
    });
  return kept.length ? `${url.slice(0, q)}?${kept.join('&')}` : url.slice(0, q);
}

function safeDecode(s: string): string {
  try {
    return decodeURIComponent(s.replace(/\+/g, ' '));
  } catch {
    return s;
  }
}

function queryParam(url: string, name: string): string | null {
  const q = url.indexOf('?');
  return q < 0 ? null : new URLSearchParams(url.slice(q + 1)).get(name);
}

/** The most `voidrun_preview` cookies of one request tried. */
const MAX_TOKEN_COOKIES = 16;

/**
 * A preview request's token: the header, else the one-time query parameter, else the host's
 * cookie — the first of them that `opens` the port (a browser sends every cookie of that name the
 * host sees, and a page on another preview host may have set one for the whole PREVIEW_DOMAIN).
 */
function previewToken(req: IncomingMessage, opens: (token: string) => boolean): string | null {
  const header = req.headers[PREVIEW_TOKEN_HEADER];
  if (typeof header === 'string' && header) return header.trim();
  const query = queryParam(req.url ?? '/', PREVIEW_TOKEN_QUERY);
  if (query) return query;
  const cookies: string[] = [];
  for (const c of (req.headers.cookie ?? '').split(';')) {
    const [name, ...value] = c.trim().split('=');
    if (name === PREVIEW_TOKEN_COOKIE && value.length && cookies.length < MAX_TOKEN_COOKIES) cookies.push(value.join('='));
  }
  return cookies.find(opens) ?? cookies[0] ?? null;
}

/**
 * A preview request's API key, from the X-API-Key header only: a key in the query of a preview
 * URL would sit in the address bar of a page the sandbox serves.
 */
function headerOnlyKey(req: IncomingMessage): string | null {
  const v = req.headers['x-api-key'];
  return typeof v === 'string' && v.trim() ? v.trim() : null;
}
