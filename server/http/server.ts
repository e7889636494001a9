import { timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { getTRPCErrorFromUnknown, TRPCError } from '@trpc/server';
import { isTrackedEnvelope } from '@trpc/server/unstable-core-do-not-import';
import superjson from 'superjson';
import { createHTTPHandler } from '@trpc/server/adapters/standalone';
import { applyWSSHandler } from '@trpc/server/adapters/ws';
import type { Logger } from 'pino';
import { WebSocketServer, type WebSocket } from 'ws';
import { DomainError, InvalidInputError, NotFoundError, PayloadTooLargeError, UnauthorizedError } from '../errors.js';
import type { AppRouter } from '../routers/index.js';
import type { Principal } from '../services/auth-service.js';
import type { Services } from '../services/index.js';
import type { HostRecord } from '../store/types.js';
import type { PtyEvent } from '../../shared/index.js';
import { apiKeyOf, idempotencyKeyOf, requestedOrgOf, type CallConnection, type Context, type RequestRecord } from '../trpc/context.js';
import { serveConsole } from './console-page.js';
import { serveDocs } from './docs-page.js';
import { isExpectedError, rawErrorResponse, sendError, toWireError } from './envelope.js';
import type { HttpMetrics } from './metrics.js';
import { procedureMetaIndex } from './procedure-meta.js';
import { createRawRoutes } from './raw-routes.js';
import { createPortProxy } from './port-proxy.js';
import { decodeOrNull } from '../../shared/uri.js';
import { OpenStreams } from './open-streams.js';
import { createRestHandler } from './rest.js';
import { createCors, createTrailingSlashRedirect, type CorsPolicy } from './cors.js';
import { compiledRoutes, matchRoute, routeParams, type WebSocketRouteName } from './route-table.js';
import { createInternalListener, dropFleetHeaders, fromCluster, vouchedPrincipal } from './internal-listener.js';
import { readJsonBody } from './json-body.js';
import { createCallerFactory } from '../trpc/init.js';
import { describeIssues, fieldIssues } from '../trpc/errors.js';
import { errorCodeFromTrpc } from '../../shared/errors.js';
import { hasDotSegments, InternalCall, vouchOfCall, type InternalLine, type WireError } from '../services/fleet/internal-protocol.js';

const wsRoutes = compiledRoutes('websocket');

/** The error to answer for a request Node's HTTP parser refused; never Node's own text. */
function parserError(err: NodeJS.ErrnoException): DomainError {
  switch (err.code) {
    case 'HPE_HEADER_OVERFLOW':
      return new DomainError('HEADERS_TOO_LARGE', 'Request headers are larger than the server reads (16 KiB); send fewer or shorter headers');
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return new DomainError('REQUEST_TIMEOUT', 'The request did not arrive whole in time (HTTP_HEADERS_TIMEOUT_MS, HTTP_REQUEST_TIMEOUT_MS)');
    case 'HPE_CHUNK_EXTENSIONS_OVERFLOW':
      return new PayloadTooLargeError('A chunk extension of the request body is too large');
    default:
      return new InvalidInputError('Malformed HTTP request', { details: err.code?.startsWith('HPE_') ? err.code : undefined });
  }
}

/** Refuses an upgrade with `err` as an HTTP error response (see `toWireError`), then closes the socket. */
function rejectUpgrade(socket: Duplex, err: unknown): void {
  socket.end(rawErrorResponse(err));
  // Closed once the answer is handed to the kernel, whether or not the client closes its side.
  (socket as Duplex & { destroySoon?: () => void }).destroySoon?.();
}


/** Past this many unsent reply bytes, a tRPC WebSocket is not read until its socket drains. */
const wsReadHighWater = 4 * 1024 * 1024;
/** Past this many queries and mutations in flight, a tRPC WebSocket is not read until some end. */
const wsMaxCallsInFlight = 64;

/** Where an API node sends a request: a sandbox's host (`keyless`: the host authorizes), or a host placement picks for an image import. */
type FleetRoute = { sandboxId: string; keyless: boolean } | { imageImport: true } | { imageId: string };

export interface HttpServerOptions {
  router: AppRouter;
  services: Services;
  log: Logger;
  metrics: HttpMetrics;
  openApi: { json: string; yaml: string };
  maxJsonBodyBytes: number;
  limits: EdgeLimits;
  /** Set, `/metrics` answers only `Authorization: Bearer <token>`. */
  metricsToken?: string;
  /** Where the Prometheus text is served (METRICS_PATH); null: not served (METRICS_ENABLED=false). */
  metricsPath?: string | null;
  /** The `CORS_*` policy; unset, no CORS headers are sent. */
  cors?: CorsPolicy;
  /** An API node's (VOIDRUN_ROLE=api): requests on a fleet host's sandbox are passed to that host. */
  fleet?: Context['fleet'];
  /** A host's (VOIDRUN_ROLE=host): CLUSTER_TOKEN, which its internal listener (`internal`) requires of every request. */
  clusterToken?: string;
  /** A host's: takes a stopped sandbox a draining host moves here (its internal listener's adopt route). */
  adopt?: (req: IncomingMessage, res: ServerResponse) => Promise<void>;
}

/** The HTTP edge's limits (README "The HTTP edge"); each is a config variable. */
export interface EdgeLimits {
  /** TRPC_MAX_BATCH_SIZE */
  maxBatchSize: number;
  /** ORG_MAX_CONCURRENT_EXECS */
  maxExecsPerOrg: number;
  /** ORG_MAX_STREAMS */
  maxStreamsPerOrg: number;
  /** HTTP_HEADERS_TIMEOUT_MS */
  headersTimeoutMs: number;
  /** HTTP_REQUEST_TIMEOUT_MS */
  requestTimeoutMs: number;
  /** HTTP_MAX_CONNECTIONS */
  maxConnections: number;
  /** WS_AUTH_TIMEOUT_MS */
  wsAuthTimeoutMs: number;
  /** PORT_ANSWER_TIMEOUT_MS */
  portAnswerTimeoutMs: number;
  /** HTTP_MAX_CONNECTIONS_PER_ADDRESS (0: no per-address cap) */
  maxConnectionsPerAddress: number;
}

/** `onClose` callbacks of one response or socket, run once from a single 'close' listener. */
function closeHooks(emitter: { once(event: 'close', fn: () => void): unknown }, isClosed: () => boolean): (fn: () => void) => void {
  let hooks: (() => void)[] | null = null;
  return (fn) => {
    if (isClosed()) return fn();
    if (!hooks) {
      hooks = [];
      const run = hooks;
      emitter.once('close', () => {
        for (const h of run.splice(0)) h();
      });
    }
    hooks.push(fn);
  };
}

function httpConnection(res: ServerResponse): CallConnection {
  return { onClose: closeHooks(res, () => res.closed), isOpen: () => !res.closed, cut: () => res.destroy() };
}

/**
 * Flow control of one tRPC WebSocket: tRPC reads and answers every message as it comes, so a peer
 * that sends calls and never reads the replies would have them buffered here. The socket is not
 * read while more than `wsReadHighWater` bytes are unsent (until its socket drains) or more than
 * `wsMaxCallsInFlight` calls are running; TCP then pushes back on the peer.
 */
class WsFlow {
  #inFlight = 0;
  #awaitingDrain = false;

  constructor(
    private readonly ws: WebSocket,
    private readonly socket: Duplex,
  ) {
    ws.on('message', () => this.update());
  }

  /** Counts one call in flight until the returned function runs. */
  callStarted(): () => void {
    this.#inFlight++;
    this.update();
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      this.#inFlight--;
      this.update();
    };
  }

  update(): void {
    const { ws } = this;
    if (ws.readyState !== ws.OPEN) return;
    if (!this.#awaitingDrain && ws.bufferedAmount > wsReadHighWater) {
      this.#awaitingDrain = true;
      this.socket.once('drain', () => {
        this.#awaitingDrain = false;
        this.update();
      });
    }
    const stop = this.#awaitingDrain || this.#inFlight >= wsMaxCallsInFlight;
    if (stop && !ws.isPaused) ws.pause();
    else if (!stop && ws.isPaused) ws.resume();
  }
}

function wsConnection(ws: WebSocket, flow: WsFlow | undefined): CallConnection {
  return {
    onClose: closeHooks(ws, () => ws.readyState === ws.CLOSED),
    isOpen: () => ws.readyState === ws.OPEN,
    cut: () => ws.close(1008, 'the API key was revoked or deactivated'),
    bufferedAmount: () => ws.bufferedAmount,
    callStarted: () => flow?.callStarted() ?? (() => {}),
  };
}

/** Whether `header` is `Bearer <token>`, compared in constant time. */
function bearerMatches(header: string | undefined, token: string): boolean {
  const given = Buffer.from(header?.startsWith('Bearer ') ? header.slice('Bearer '.length).trim() : '');
  const want = Buffer.from(token);
  return given.length === want.length && timingSafeEqual(given, want);
}

export interface HttpServer {
  server: Server;
  /** A host's internal listener for API nodes (not listening yet), or null outside VOIDRUN_ROLE=host. */
  internal: Server | null;
  /** Held calls and streams per org, by the key that opened them; `closeKey` cuts a revoked key's. */
  streams: OpenStreams;
  /** Stops accepting, closes WebSockets, and resolves when open requests are done. */
  close(): Promise<void>;
}

/**
 * The one HTTP server: tRPC at `/trpc` (HTTP and WebSocket), REST at `/api`, `/metrics`, and the
 * docs page. Every request is logged once and counted in the metrics.
 */
export function createHttpServer(opts: HttpServerOptions): HttpServer {
  const { router, services, log, metrics, limits } = opts;
  const streams = new OpenStreams({ maxExecsPerOrg: limits.maxExecsPerOrg, maxStreamsPerOrg: limits.maxStreamsPerOrg });
  const records = new WeakMap<IncomingMessage, RequestRecord>();
  const restRoutes = new Map([...procedureMetaIndex(router)].map(([path, meta]) => [path, meta.openapi?.path]));

  const context = (req: IncomingMessage, transport: Context['transport'], apiKey: string | null, connection: CallConnection): Context => {
    let record = records.get(req);
    if (!record) records.set(req, (record = {}));
    return { services, log, apiKey, requestedOrgId: requestedOrgOf(req), vouched: vouchedPrincipal(req), record, transport, connection, streams, idempotencyKey: idempotencyKeyOf(req), ...(opts.fleet ? { fleet: opts.fleet } : {}) };
  };

  const trpcHttp = createHTTPHandler({
    router,
    basePath: '/trpc/',
    // A body past the limit fails as it arrives (no Content-Length); one that declares it, before.
    maxBodySize: opts.maxJsonBodyBytes,
    // Batches are counted here rather than by tRPC's `maxBatchSize` (whose error would take the
    // place of this one, and names neither the limit nor the count), on the path decoded as tRPC
    // decodes it before splitting (`%2C` is a comma too); a malformed escape is left to tRPC (400).
    middleware: (req, res, next) => {
      const url = new URL(req.url ?? '/', 'http://localhost');
      const calls = (decodeOrNull(url.pathname) ?? '').slice('/trpc/'.length).split(',').length;
      if (url.searchParams.get('batch') === '1' && calls > limits.maxBatchSize) {
        return next(new TRPCError({ code: 'BAD_REQUEST', message: `A batch may hold at most ${limits.maxBatchSize} calls (TRPC_MAX_BATCH_SIZE); this one has ${calls}` }));
      }
      if (Number(req.headers['content-length'] ?? 0) > opts.maxJsonBodyBytes) {
        res.setHeader('connection', 'close'); // the body is not read
        return next(new TRPCError({ code: 'PAYLOAD_TOO_LARGE', message: `Request body is larger than ${opts.maxJsonBodyBytes} bytes (MAX_JSON_BODY_BYTES)` }));
      }
      next();
    },
    createContext: ({ req, res, info }) => {
      const ctx = context(req, 'trpc-http', apiKeyOf(req), httpConnection(res));
      ctx.record.procedurePath = info.calls.length === 1 ? info.calls[0]!.path : 'batch';
      return ctx;
    },
  });

  const raw = createRawRoutes({ services, streams, maxJsonBodyBytes: opts.maxJsonBodyBytes, log });
  const portProxy = createPortProxy({
    services,
    streams,
    onOrg: (req, orgId) => {
      let record = records.get(req);
      if (!record) records.set(req, (record = {}));
      record.orgId = orgId;
    },
    maxConnections: limits.maxConnections,
    answerTimeoutMs: limits.portAnswerTimeoutMs,
  });
  const rest = createRestHandler({
    router,
    createContext: (req, res) => context(req, 'rest', apiKeyOf(req), httpConnection(res)),
    maxJsonBodyBytes: opts.maxJsonBodyBytes,
  });

  async function route(req: IncomingMessage, res: ServerResponse, path: string): Promise<string> {
    if (path === '/trpc' || path.startsWith('/trpc/')) {
      await trpcHttp(req, res);
      const p = records.get(req)?.procedurePath;
      return p ? `/trpc/${p}` : '/trpc';
    }
    // GET (and HEAD) only, as the original mounts it; other methods fall through to the 404.
    if (path === metricsPath && (req.method === 'GET' || req.method === 'HEAD')) {
      if (opts.metricsToken && !bearerMatches(req.headers.authorization, opts.metricsToken)) {
        sendError(res, new UnauthorizedError('Metrics need a bearer token', { details: 'Send Authorization: Bearer <METRICS_TOKEN>' }));
        return '/metrics';
      }
      const text = await metrics.text();
      res.writeHead(200, { 'content-type': metrics.contentType });
      res.end(text);
      return '/metrics';
    }
    if (path === '/api/openapi.json' || path === '/api/openapi.yml') {
      const yaml = path.endsWith('.yml');
      res.writeHead(200, { 'content-type': yaml ? 'application/yaml; charset=utf-8' : 'application/json; charset=utf-8' });
      res.end(yaml ? opts.openApi.yaml : opts.openApi.json);
      return path;
    }
    if (path === '/' || path === '/console' || path.startsWith('/console/')) {
      if (await serveConsole(res, path)) return '/console';
    } else if (path === '/api/docs' || path.startsWith('/api/docs/')) {
      if (await serveDocs(res, path.slice('/api/docs'.length))) return '/api/docs';
    } else if (path.startsWith('/api/')) {
      const apiPath = req.url!.slice('/api'.length);
      let record = records.get(req);
      if (!record) records.set(req, (record = {}));
      const rawRoute = await raw(req, res, apiPath, record);
      if (rawRoute) return rawRoute;
      if (await rest(req, res, apiPath)) {
        const p = records.get(req)?.procedurePath;
        return p ? `/api${restRoutes.get(p) ?? ''}` : '/api';
      }
    }
    sendError(res, new NotFoundError(`No route for ${req.method} ${path}`, { code: 'ROUTE_NOT_FOUND', details: 'See /api/docs for the API' }));
    return 'unmatched';
  }

  // A request must send its headers within HTTP_HEADERS_TIMEOUT_MS and its whole body within
  // HTTP_REQUEST_TIMEOUT_MS, or Node answers 408 and closes the connection.
  const timeouts = {
    headersTimeout: Math.min(limits.headersTimeoutMs, limits.requestTimeoutMs),
    requestTimeout: limits.requestTimeoutMs,
    // How often Node checks the two timeouts above.
    connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(limits.headersTimeoutMs / 4))),
  };
  const cors = opts.cors ? createCors(opts.cors) : () => null;
  const redirectTrailingSlash = createTrailingSlashRedirect(JSON.parse(opts.openApi.json) as Parameters<typeof createTrailingSlashRedirect>[0]);
  const metricsPath = opts.metricsPath === undefined ? '/metrics' : opts.metricsPath;
  const server = createServer(timeouts, (req, res) => {
    const started = process.hrtime.bigint();
    const path = (req.url ?? '/').split('?')[0]!;
    // A client's own copy of the fleet's headers is dropped before anything reads (or passes on) it.
    if (!fromCluster.has(req)) dropFleetHeaders(req, false);
    let routeLabel = 'unmatched';
    res.once('close', () => {
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      const status = res.statusCode;
      metrics.observe(req.method ?? 'GET', routeLabel, status, ms / 1000);
      // The query string is left out: WebSocket-style `?apiKey=` must never reach the log.
      log.info({ method: req.method, path, status, ms: Math.round(ms * 100) / 100, orgId: records.get(req)?.orgId }, 'request');
    });
    // A fleet host serves its API to API nodes only (its internal listener): a create here would
    // bypass placement. Its public port answers what every node answers.
    if (opts.clusterToken && !fromCluster.has(req) && path !== '/api/version' && path !== metricsPath) {
      req.resume();
      sendError(res, notForHostsPublicPort(path));
      return;
    }
    const fleet = fleetRoute(req, path);
    if (fleet instanceof DomainError) {
      req.resume();
      sendError(res, fleet);
      return;
    }
    if (fleet) {
      void forwardRequest(req, res, fleet).then(
        (label) => {
          if (label) routeLabel = label;
          else serveHere(req, res, path, (l) => (routeLabel = l));
        },
        (err: unknown) => {
          if (!res.headersSent) sendError(res, err);
          else res.destroy();
        },
      );
      return;
    }
    serveHere(req, res, path, (l) => (routeLabel = l));
  });

  /**
   * Where a fleet node routes a request or upgrade: on an API node, the sandbox it addresses (under
   * `/api/sandboxes/{id}`, or its preview host `<port>-<id>.<PREVIEW_DOMAIN>`, whose paths are the
   * sandbox server's own) and whether it needs no key here; null to serve it here; a DomainError for
   * a path a fleet node refuses: it routes by the path as sent, so one the URL parser would resolve
   * elsewhere is a 400.
   */
  function fleetRoute(req: IncomingMessage, path: string): FleetRoute | DomainError | null {
    if (!opts.fleet && !opts.clusterToken) return null;
    const previewId = services.ports.previewTarget(req.headers.host)?.id ?? null;
    if (!previewId && hasDotSegments(routedPart(path))) return dotSegmentsError(path);
    if (!opts.fleet) return null;
    // An OCI import writes a layer: it runs on a host (whose layer store keeps it), one placement picks.
    if (!previewId && req.method === 'POST' && path === '/api/images/import') return { imageImport: true };
    // A build's live log is followed where the build runs: the image's host.
    const logs = previewId ? null : /^\/api\/images\/([0-9a-f]{24})\/logs\/stream$/.exec(path);
    if (logs && req.method === 'GET') return { imageId: logs[1]! };
    const sandboxId = previewId ?? fleetSandboxOfPath(path);
    // A sandbox's ports and preview host need no key of ours (public ports, preview tokens): its host decides.
    return sandboxId ? { sandboxId, keyless: previewId !== null || sandboxPortPath.test(path) } : null;
  }

  /**
   * The sandbox's host, or null when it is answered here: no fleet host, or the caller's org is not
   * the sandbox's (answered here as a sandbox that does not exist). The caller is authenticated
   * before anything reaches a host (which checks again), unless the route is keyless.
   */
  async function forwardTarget(req: IncomingMessage, route: FleetRoute): Promise<{ host: HostRecord; principal: Principal | null } | null> {
    if ('imageImport' in route) {
      const principal = await services.auth.authenticate(apiKeyOf(req), requestedOrgOf(req));
      return { host: await opts.fleet!.placement.builder(), principal };
    }
    if ('imageId' in route) {
      const principal = await services.auth.authenticate(apiKeyOf(req), requestedOrgOf(req));
      const image = await services.images.resolve(principal, route.imageId).catch(() => null);
      // Another org's image, or one without a host of its own: answered here (404, or its log so far).
      return image?.hostId && image.orgId === principal.orgId ? { host: await opts.fleet!.forwarder.imageHost(image), principal } : null;
    }
    const target = await opts.fleet!.forwarder.target(route.sandboxId);
    if (!target) return null;
    if (route.keyless) return { host: target.host, principal: null };
    // The host takes the principal found here (the key is read once, on this node).
    const principal = await services.auth.authenticate(apiKeyOf(req), requestedOrgOf(req));
    return principal.orgId === target.orgId ? { host: target.host, principal } : null;
  }

  /** Resolves the forwarded route's label, or null when the request is answered here. */
  async function forwardRequest(req: IncomingMessage, res: ServerResponse, route: FleetRoute): Promise<string | null> {
    const { forwarder } = opts.fleet!;
    const target = await forwardTarget(req, route);
    if (!target) return null;
    const { host, principal } = target;
    if ('imageImport' in route || 'imageId' in route) {
      await forwarder.proxyRequest(req, res, host, undefined, principal);
      return 'forwarded';
    }
    // A lost host's sandbox is still read and deleted here (REST GET and DELETE of the sandbox itself).
    const own = (req.url ?? '').split('?')[0] === `/api/sandboxes/${route.sandboxId}` && (req.method === 'GET' || req.method === 'DELETE');
    if (own && !forwarder.serving(host)) return null;
    forwarder.assertServing(host, route.sandboxId);
    await forwarder.proxyRequest(req, res, host, route.sandboxId, principal);
    return 'forwarded';
  }

  function serveHere(req: IncomingMessage, res: ServerResponse, path: string, label: (label: string) => void): void {
    // A preview host is the sandbox's own origin: served before everything of the API's.
    const proxied = portProxy.handleRequest(req, res, 'host');
    // CORS (preflights, refused origins) and trailing-slash redirects are answered before any
    // route; the API's port proxy comes before the redirect (its paths are the sandbox's).
    const edge = proxied ? null : (cors(req, res) ?? null);
    if (edge) {
      label(edge);
      req.resume(); // a body sent along is read and dropped
      return;
    }
    const served = proxied ?? portProxy.handleRequest(req, res, 'api');
    if (!served && redirectTrailingSlash(req, res)) {
      label('trailing-slash-redirect');
      req.resume();
      return;
    }
    (served ?? route(req, res, path)).then(label, (err: unknown) => {
      log.error({ err, path }, 'request failed');
      if (!res.headersSent) sendError(res, err);
      else res.destroy();
    });
  }

  // A connection past HTTP_MAX_CONNECTIONS, or past HTTP_MAX_CONNECTIONS_PER_ADDRESS from one
  // remote address, is answered 503 and closed before anything is read.
  let connections = 0;
  const byAddress = new Map<string, number>();
  server.prependListener('connection', (socket) => {
    const address = socket.remoteAddress ?? '';
    const fromAddress = (byAddress.get(address) ?? 0) + 1;
    connections++;
    byAddress.set(address, fromAddress);
    socket.once('close', () => {
      connections--;
      const left = byAddress.get(address)! - 1;
      if (left) byAddress.set(address, left);
      else byAddress.delete(address);
    });
    const perAddress = limits.maxConnectionsPerAddress;
    let error: string;
    if (connections > limits.maxConnections) error = `The server has ${limits.maxConnections} open connections, the most allowed (HTTP_MAX_CONNECTIONS); retry later`;
    else if (perAddress && fromAddress > perAddress) error = `Your address has ${perAddress} open connections to the server, the most allowed (HTTP_MAX_CONNECTIONS_PER_ADDRESS); close some or retry later`;
    else return;
    socket.on('error', () => {});
    socket.end(rawErrorResponse(new DomainError('SERVER_BUSY', error)));
    socket.destroySoon();
  });

  // What Node's parser refuses before any route (headers too large, a malformed request, one past
  // its timeouts) is answered like every other error, unless an answer to the request on this
  // socket has begun (as Node does it); then the connection is closed.
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    socket.on('error', () => {});
    const inFlight = (socket as Duplex & { _httpMessage?: ServerResponse | null })._httpMessage;
    if (err.code === 'ECONNRESET' || !socket.writable || inFlight?.headersSent) return void socket.destroy();
    socket.end(rawErrorResponse(parserError(err)));
    (socket as Duplex & { destroySoon?: () => void }).destroySoon?.();
  });

  // tRPC subscriptions over WebSocket on the same port. Browsers cannot set headers on a
  // WebSocket, so the key may also come as `?apiKey=` or in tRPC's `connectionParams`.
  const wss = new WebSocketServer({ noServer: true, maxPayload: opts.maxJsonBodyBytes });
  const wsHandler = applyWSSHandler({
    wss,
    router,
    keepAlive: { enabled: true, pingMs: 30_000, pongWaitMs: 5_000 },
    maxBatchSize: limits.maxBatchSize,
    createContext: async ({ req, res: ws, info }) => {
      const fromParams = info.connectionParams?.apiKey;
      const apiKey = fromParams || apiKeyOf(req);
      // `connectionParams.orgId` is X-Org-ID for browsers, which cannot set headers on a WebSocket.
      const requestedOrgId = info.connectionParams?.orgId?.trim() || requestedOrgOf(req);
      const connection = wsConnection(ws, wsFlows.get(ws));
      // A valid key ends the handshake window, takes one of the org's ORG_MAX_STREAMS slots while
      // the socket is open (past the cap the socket is closed) and ties the socket to the key
      // (closed on revocation); a missing or bad one leaves the window running (its calls fail 401).
      const checkStarted = streams.keyCheckStarted();
      const principal = apiKey ? await services.auth.authenticate(apiKey, requestedOrgId).catch(() => null) : null;
      if (principal) {
        clearTimeout(handshakeTimers.get(ws));
        try {
          connection.onClose(streams.acquire(principal, 'stream', () => connection.cut(), checkStarted));
        } catch (err) {
          ws.close(1008, (err instanceof DomainError ? err.message : 'refused').slice(0, 120));
          throw err;
        }
      }
      return { ...context(req, 'trpc-ws', apiKey, connection), requestedOrgId };
    },
  });

  // A tRPC WebSocket must present a valid key (at the upgrade or in connectionParams) within
  // WS_AUTH_TIMEOUT_MS, or it is closed: answering pings alone does not keep it open.
  const handshakeTimers = new WeakMap<WebSocket, NodeJS.Timeout>();
  const wsFlows = new WeakMap<WebSocket, WsFlow>();
  wss.on('connection', (ws: WebSocket) => {
    const timer = setTimeout(() => ws.close(1008, `no valid API key within ${limits.wsAuthTimeoutMs} ms (WS_AUTH_TIMEOUT_MS)`), limits.wsAuthTimeoutMs);
    timer.unref();
    handshakeTimers.set(ws, timer);
    ws.once('close', () => clearTimeout(timer));
  });

  const rawWss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });
  const upgradedSockets = new WeakMap<Duplex, WebSocket>();

  /**
   * A terminal or watch socket holds one of the org's ORG_MAX_STREAMS slots until it closes, and
   * closes (1008) when its key is revoked. Throws TooManyRequestsError (429 before the upgrade).
   */
  function holdUpgrade(principal: Principal, socket: Duplex, checkStarted: number): void {
    const release = streams.acquire(
      principal,
      'stream',
      () => {
        const ws = upgradedSockets.get(socket);
        if (ws) ws.close(1008, 'the API key was revoked or deactivated');
        else socket.destroy();
      },
      checkStarted,
    );
    if (socket.destroyed) release();
    else socket.once('close', release);
  }

  /**
   * Authenticates a terminal or watch upgrade; resolves null when the client left meanwhile
   * (nothing is held for it then).
   */
  async function authenticateUpgrade(req: IncomingMessage, socket: Duplex): Promise<Principal | null> {
    const checkStarted = streams.keyCheckStarted();
    const principal = vouchedPrincipal(req) ?? (await services.auth.authenticate(apiKeyOf(req), requestedOrgOf(req)));
    if (socket.destroyed) return null;
    holdUpgrade(principal, socket, checkStarted);
    return principal;
  }
  /** The upgrade handlers of the route table's WebSocket routes, by name; `p` holds the decoded path parameters. */
  const upgradeHandlers: Record<WebSocketRouteName, (req: IncomingMessage, socket: Duplex, head: Buffer, p: Record<string, string>) => Promise<void>> = {
    pty: (req, socket, head, p) => upgradePty(req, socket, head, p.id!, null),
    ptyAttach: (req, socket, head, p) => upgradePty(req, socket, head, p.id!, p.sessionId!),
    watchStream: (req, socket, head, p) => upgradeWatchStream(req, socket, head, p.id!, p.sessionId!),
  };

  /**
   * A terminal over a WebSocket: raw terminal bytes both ways; a text message that is exactly
   * `{"type":"resize","cols":…,"rows":…}` resizes. `/pty` makes an ephemeral session that dies with
   * the socket; `/pty/sessions/{sessionId}` attaches to a persistent one (scrollback first).
   */
  async function upgradePty(req: IncomingMessage, socket: Duplex, head: Buffer, sandboxId: string, sessionId: string | null): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    // A client that leaves before the upgrade completes must not leave a session or stream behind.
    const abort = new AbortController();
    let upgraded = false;
    socket.once('close', () => {
      if (!upgraded) abort.abort();
    });
    const principal = await authenticateUpgrade(req, socket);
    if (!principal) return;
    const ephemeral = sessionId === null;
    const size = (name: string, fallback: number, max: number) => Math.min(max, Math.max(1, Number(url.searchParams.get(name)) || fallback));
    const sid = sessionId ?? (await services.pty.create(principal, sandboxId, size('cols', 80, 500), size('rows', 24, 200))).sessionId;
    const cleanup = () => {
      abort.abort();
      if (ephemeral) void services.pty.kill(principal, sandboxId, sid).catch(() => {});
    };
    if (abort.signal.aborted) return cleanup();
    abort.signal.addEventListener('abort', () => {
      if (!upgraded && ephemeral) void services.pty.kill(principal, sandboxId, sid).catch(() => {});
    });
    const output = services.pty.attach(principal, sandboxId, sid, null, abort.signal);
    const first = output.next(); // 404 for an unknown session, before the upgrade
    first.catch(() => {});
    try {
      await Promise.race([first, new Promise((r) => setTimeout(r, 200))]);
    } catch (err) {
      cleanup();
      throw err;
    }
    if (abort.signal.aborted) return;
    log.info({ method: 'GET', path: url.pathname, status: 101, orgId: principal.orgId }, 'request');
    rawWss.handleUpgrade(req, socket, head, (ws) => {
      handshakeDone(socket, 101);
      upgradedSockets.set(socket, ws);
      upgraded = true;
      ws.on('error', () => {});
      ws.on('close', cleanup);
      // An attached terminal keeps its sandbox awake for idle policies while it is open.
      ws.once('close', services.activity.hold(principal.orgId, sandboxId));
      // Keystrokes and resizes go to the agent one after another, in the order they came.
      let inputChain: Promise<unknown> = Promise.resolve();
      ws.on('message', (data, isBinary) => {
        const text = isBinary ? Buffer.from(data as Buffer).toString('utf8') : data.toString();
        let resize: { cols: number; rows: number } | null = null;
        if (!isBinary && text.startsWith('{"type":"resize"')) {
          try {
            resize = JSON.parse(text) as { cols: number; rows: number };
          } catch {}
        }
        inputChain = inputChain
          .then(async (): Promise<void> => {
            if (resize) await services.pty.resize(principal, sandboxId, sid, resize.cols, resize.rows);
            else await services.pty.write(principal, sandboxId, sid, text);
          })
          .catch(() => {});
      });
      void (async () => {
        // Small pty reads are coalesced into one frame per tick (a shell echoing keystrokes or
        // printing line by line would otherwise send a message per read).
        let frame = '';
        let flushTimer: NodeJS.Timeout | null = null;
        const flush = () => {
          flushTimer = null;
          if (frame && ws.readyState === ws.OPEN) ws.send(frame);
          frame = '';
        };
        const send = async (e: { event: PtyEvent }) => {
          // Flow control: past 1 MiB unsent to this client, the pty is paused (the shell blocks on
          // its writes) until the socket drains below 256 KiB.
          if (ws.bufferedAmount > 1024 * 1024) {
            await services.pty.setPaused(principal, sandboxId, sid, true).catch(() => {});
            while (ws.readyState === ws.OPEN && ws.bufferedAmount > 256 * 1024) await new Promise((r) => setTimeout(r, 10));
            await services.pty.setPaused(principal, sandboxId, sid, false).catch(() => {});
          }
          if (e.event.type === 'data') {
            frame += e.event.data;
            if (frame.length >= 64 * 1024) flush();
            else flushTimer ??= setTimeout(flush, 2);
          } else if (e.event.type === 'exit') {
            if (flushTimer) clearTimeout(flushTimer);
            flush();
            ws.close(1000, `exit ${e.event.exitCode}`);
          }
        };
        const head = await first;
        if (!head.done) await send(head.value);
        for await (const e of output) await send(e);
      })().catch(() => ws.close(1011, 'terminal stream failed'));
    });
  }

  // Every upgrade must complete (key checked, session found, agent answered) within
  // WS_AUTH_TIMEOUT_MS, or it is answered 503 and closed: after an upgrade request no HTTP
  // timeout applies to the socket.
  const upgradeTimers = new Map<Duplex, NodeJS.Timeout>();
  /** Each pending upgrade's metrics label (the route table's, `/trpc`, or `unmatched`) and start. */
  const upgradeLabels = new Map<Duplex, { label: string; started: bigint }>();
  /** Ends an upgrade's deadline; with the status it was answered (101 or a refusal), counts it in the metrics. */
  const handshakeDone = (socket: Duplex, status?: number) => {
    clearTimeout(upgradeTimers.get(socket));
    upgradeTimers.delete(socket);
    const pending = upgradeLabels.get(socket);
    upgradeLabels.delete(socket);
    if (pending && status) metrics.observe('GET', pending.label, status, Number(process.hrtime.bigint() - pending.started) / 1e9);
  };
  const refuse = (socket: Duplex) => (err: unknown) => {
    handshakeDone(socket, toWireError(err).status);
    if (!isExpectedError(err)) log.error({ err }, 'WebSocket upgrade failed');
    rejectUpgrade(socket, err);
  };

  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => {}); // a reset before the upgrade completes ends only this socket
    const timer = setTimeout(() => {
      refuse(socket)(new DomainError('SERVER_BUSY', `The WebSocket handshake did not complete within ${limits.wsAuthTimeoutMs} ms (WS_AUTH_TIMEOUT_MS); retry`));
      socket.destroy();
    }, limits.wsAuthTimeoutMs);
    timer.unref();
    upgradeTimers.set(socket, timer);
    upgradeLabels.set(socket, { label: 'unmatched', started: process.hrtime.bigint() });
    socket.once('close', () => handshakeDone(socket));
    try {
      routeUpgrade(req, socket, head);
    } catch (err) {
      refuse(socket)(err);
    }
  });

  function routeUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const path = (req.url ?? '/').split('?')[0]!;
    if (!fromCluster.has(req)) dropFleetHeaders(req, false);
    if (opts.clusterToken && !fromCluster.has(req)) return refuse(socket)(notForHostsPublicPort(path));
    const fleet = fleetRoute(req, path);
    if (fleet instanceof DomainError) return refuse(socket)(fleet);
    if (fleet && 'sandboxId' in fleet) {
      const { forwarder } = opts.fleet!;
      void forwardTarget(req, fleet).then((target) => {
        if (!target) return routeUpgradeHere(req, socket, head, path);
        forwarder.assertServing(target.host, fleet.sandboxId);
        upgradeLabels.get(socket)!.label = 'forwarded';
        handshakeDone(socket); // the host's own deadline runs from here
        forwarder.proxyUpgrade(req, socket, head, target.host, refuse(socket), target.principal);
      }).catch(refuse(socket));
      return;
    }
    routeUpgradeHere(req, socket, head, path);
  }

  function routeUpgradeHere(req: IncomingMessage, socket: Duplex, head: Buffer, path: string): void {
    const proxied = portProxy.handleUpgrade(req, socket, head, { done: (status) => handshakeDone(socket, status), refuse: refuse(socket) });
    if (proxied) {
      upgradeLabels.get(socket)!.label = proxied;
      return;
    }
    if (path === '/trpc' || path === '/trpc/') {
      upgradeLabels.get(socket)!.label = '/trpc';
      wss.handleUpgrade(req, socket, head, (ws) => {
        handshakeDone(socket, 101);
        wsFlows.set(ws, new WsFlow(ws, socket));
        wss.emit('connection', ws, req);
      });
      return;
    }
    const match = path.startsWith('/api/') ? matchRoute(wsRoutes, req.method ?? 'GET', path.slice('/api'.length)) : null;
    if (!match) return refuse(socket)(new NotFoundError(`No WebSocket route for ${path}`, { code: 'ROUTE_NOT_FOUND' }));
    upgradeLabels.get(socket)!.label = match.route.label;
    upgradeHandlers[match.route.name](req, socket, head, routeParams(match.route, match.rawParams)).catch(refuse(socket));
  }

  /**
   * The file-watch stream: one JSON FileEvent per message, everything the session kept first.
   * A client whose socket backs up past 1 MiB misses events and then gets an `overflow` message
   * with the count, so memory stays bounded however fast files change.
   */
  async function upgradeWatchStream(req: IncomingMessage, socket: Duplex, head: Buffer, sandboxId: string, sessionId: string): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const principal = await authenticateUpgrade(req, socket);
    if (!principal) return;
    await services.watch.assertSession(principal, sandboxId, sessionId); // 404 before upgrading
    log.info({ method: 'GET', path: url.pathname, status: 101, orgId: principal.orgId }, 'request');
    // Attached only once the socket is open (a failed handshake attaches nothing); the session's
    // history replays what happened in between.
    rawWss.handleUpgrade(req, socket, head, (ws) => {
      handshakeDone(socket, 101);
      upgradedSockets.set(socket, ws);
      // An open watch stream keeps its sandbox awake for idle policies.
      ws.once('close', services.activity.hold(principal.orgId, sandboxId));
      let dropped = 0;
      let detach: () => void = () => {};
      try {
        detach = services.watch.attach(
          principal,
          sandboxId,
          sessionId,
          (m) => {
            if ('ended' in m) {
              ws.close(1000, m.ended.slice(0, 120));
              return;
            }
            if (ws.bufferedAmount > 1024 * 1024) {
              dropped++;
              return;
            }
            if (dropped) {
              services.events.emit({ sandboxId, orgId: principal.orgId, type: 'watch.overflow', data: { sessionId, dropped } });
              ws.send(JSON.stringify({ type: 'overflow', dropped, timestamp: new Date().toISOString() }));
              dropped = 0;
            }
            ws.send(JSON.stringify(m.message));
          },
          0,
        );
      } catch {
        ws.close(1011, 'the watch session ended');
        return;
      }
      ws.on('close', detach);
      ws.on('error', () => {});
    });
  }

  const internal = opts.clusterToken ? createInternalListener({ token: opts.clusterToken, main: server, call: internalCall, ...(opts.adopt ? { adopt: opts.adopt } : {}) }) : null;

  /**
   * A procedure call an API node forwarded (see Forwarder.call): run here as if it had arrived
   * here, with the caller's credentials, and answered as NDJSON lines (see InternalLine).
   */
  async function internalCall(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const parsed = InternalCall.safeParse(await readJsonBody(req, opts.maxJsonBodyBytes * 2 + 64 * 1024, { keepNulls: true }).catch(() => undefined));
    if (!parsed.success) return sendError(res, new InvalidInputError('Not a forwarded call'));
    const call = parsed.data;
    const ctx = context(req, 'trpc-http', call.apiKey, httpConnection(res));
    ctx.requestedOrgId = call.orgId;
    ctx.vouched = vouchOfCall(call); // the call's body was read before this: it is fresh
    ctx.idempotencyKey = call.idempotencyKey;
    ctx.record.procedurePath = call.path;
    const abort = new AbortController();
    res.once('close', () => abort.abort());
    const caller = createCallerFactory(router)(ctx, { signal: abort.signal }) as unknown as Record<string, Record<string, ((input: unknown) => Promise<unknown>) | undefined> | undefined>;
    const [group, name] = call.path.split('.') as [string, string];
    const fn = Object.hasOwn(router._def.record, group) ? caller[group]?.[name] : undefined;
    res.writeHead(200, { 'content-type': 'application/x-ndjson' });
    const write = async (line: InternalLine) => {
      if (!res.write(`${JSON.stringify(line)}\n`)) await new Promise((r) => (res.once('drain', r), res.once('close', r)));
    };
    try {
      if (!fn) throw new NotFoundError(`No procedure ${call.path}`, { code: 'ROUTE_NOT_FOUND' });
      const input = superjson.deserialize(call.input as Parameters<typeof superjson.deserialize>[0]);
      const out = await fn(input);
      if (call.type !== 'subscription') await write({ ok: superjson.serialize(out) });
      else {
        for await (const e of out as AsyncIterable<unknown>) {
          if (res.closed) break;
          if (isTrackedEnvelope(e)) await write({ event: superjson.serialize(e[1]), id: String(e[0]) });
          else await write({ event: superjson.serialize(e) });
        }
        await write({ end: true });
      }
    } catch (err) {
      if (!res.closed) await write({ error: wireErrorOf(err) });
    }
    res.end();
  }

  return {
    server,
    internal,
    streams,
    async close() {
      if (internal) await new Promise<void>((resolve) => {
        internal.close(() => resolve());
        internal.closeIdleConnections();
        setTimeout(() => internal.closeAllConnections(), 2000).unref();
      });
      wsHandler.broadcastReconnectNotification();
      for (const ws of wss.clients) ws.terminate();
      wss.close();
      for (const ws of rawWss.clients) ws.terminate();
      rawWss.close();
      for (const socket of upgradeTimers.keys()) socket.destroy(); // handshakes still under way
      portProxy.closeUpgraded();

      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeIdleConnections();
        // Requests still open after a grace period (a long wait, a client that never reads) are cut.
        setTimeout(() => server.closeAllConnections(), 2000).unref();
      });
    },
  };
}

/** The sandbox id of a path under `/api/sandboxes/{id}` (REST, raw routes, WebSockets, the port proxy), or null. */
function fleetSandboxOfPath(path: string): string | null {
  const m = /^\/api\/sandboxes\/([0-9a-f]{24})(?:\/|$)/.exec(path);
  return m ? m[1]! : null;
}

/** The error as the API node rethrows it (see fromWire): our code, message, details and field issues. */
function wireErrorOf(err: unknown): WireError {
  const e = getTRPCErrorFromUnknown(err);
  const domain = err instanceof DomainError ? err : e.cause instanceof DomainError ? e.cause : undefined;
  if (domain) return { errorCode: domain.code, message: domain.message, ...(domain.details ? { details: domain.details } : {}), ...(domain.issues ? { issues: domain.issues } : {}) };
  const issues = fieldIssues(e.cause);
  if (issues?.length) return { errorCode: 'INVALID_INPUT', message: describeIssues(issues).message, issues };
  const code = errorCodeFromTrpc[e.code] ?? 'INTERNAL';
  return { errorCode: code, message: code === 'INTERNAL' ? 'Internal server error' : e.message };
}

/** What a fleet host's public port answers for anything but /api/version and /metrics. */
function notForHostsPublicPort(path: string): DomainError {
  return new NotFoundError(`No route for ${path.slice(0, 200)} here: this is a fleet host (VOIDRUN_ROLE=host), which serves API nodes only; send API requests to an API node`, { code: 'ROUTE_NOT_FOUND' });
}

function dotSegmentsError(path: string): DomainError {
  return new InvalidInputError(`Invalid path: ${path.slice(0, 200)} has a "." or ".." segment or an encoded slash; send the path it resolves to`);
}

/** The part of a path the server routes by: under a sandbox's port, what follows is the sandbox server's own path, passed on as sent. */
function routedPart(path: string): string {
  return path.replace(/^(\/api\/sandboxes\/[0-9a-f]{24}\/ports\/\d+)\/.*$/, '$1');
}

/** A path under a sandbox's port (the port proxy): forwarded without a key check of the API node's. */
const sandboxPortPath = /^\/api\/sandboxes\/[0-9a-f]{24}\/ports\//;
