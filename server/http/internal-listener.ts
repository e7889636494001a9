import { timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { UnauthorizedError } from '../errors.js';
import type { Principal } from '../services/auth-service.js';
import { CLUSTER_TOKEN_HEADER, INTERNAL_ADOPT_PATH, INTERNAL_CALL_PATH, PRINCIPAL_HEADER, PRINCIPAL_HEADER_MAX, VouchedPrincipal } from '../services/fleet/internal-protocol.js';
import { rawErrorResponse, sendError } from './envelope.js';

export interface InternalListenerOptions {
  /** CLUSTER_TOKEN: every request must carry it in the `x-voidrun-cluster-token` header. */
  token: string;
  /** The node's public server: every other request and upgrade is served by it, as if it had arrived there. */
  main: Server;
  /** A forwarded procedure call (INTERNAL_CALL_PATH). */
  call(req: IncomingMessage, res: ServerResponse): Promise<void>;
  /** A stopped sandbox another host moves here (INTERNAL_ADOPT_PATH); absent, that path is not served. */
  adopt?: (req: IncomingMessage, res: ServerResponse) => Promise<void>;
}

/** Whether the request carries the cluster secret, compared in constant time. */
function carriesToken(req: IncomingMessage, token: string): boolean {
  const given = Buffer.from(String(req.headers[CLUSTER_TOKEN_HEADER] ?? ''));
  const want = Buffer.from(token);
  return given.length === want.length && timingSafeEqual(given, want);
}

/** Requests and upgrades that arrived on a host's internal listener (with the cluster secret). */
export const fromCluster = new WeakSet<IncomingMessage>();

const vouched = new WeakMap<IncomingMessage, { principal: Principal; at: number }>();

/**
 * How long after a request's head arrived its vouch is taken. The API node read the key when the
 * head arrived there (and sends the head on at once); a route that authenticates only once the
 * body is in (every JSON route) would otherwise act on a key revoked while a client held its body
 * back. Past this the key is read here, as a single server would.
 */
export const VOUCH_FRESH_MS = 1000;

/**
 * The caller as the forwarding API node authenticated it (PRINCIPAL_HEADER), for a request that
 * arrived on this host's internal listener less than VOUCH_FRESH_MS ago; null otherwise (the
 * caller's key is read here then).
 */
export function vouchedPrincipal(req: IncomingMessage): Principal | null {
  const v = vouched.get(req);
  return v && performance.now() - v.at <= VOUCH_FRESH_MS ? v.principal : null;
}

/**
 * Drops the fleet's own headers from the request (parsed and raw alike: what is passed on, to a
 * sandbox's port too, is read from either); on the internal listener (`trusted`) the principal an
 * API node vouched for is kept aside first.
 */
export function dropFleetHeaders(req: IncomingMessage, trusted: boolean): void {
  const vouch = req.headers[PRINCIPAL_HEADER];
  if (trusted && typeof vouch === 'string' && vouch.length <= PRINCIPAL_HEADER_MAX) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(vouch);
    } catch {
      parsed = null;
    }
    const principal = VouchedPrincipal.safeParse(parsed);
    if (principal.success) vouched.set(req, { principal: principal.data, at: performance.now() });
  }
  if (req.headers[CLUSTER_TOKEN_HEADER] === undefined && vouch === undefined) return;
  delete req.headers[CLUSTER_TOKEN_HEADER];
  delete req.headers[PRINCIPAL_HEADER];
  for (let i = req.rawHeaders.length - 2; i >= 0; i -= 2) {
    const name = req.rawHeaders[i]!.toLowerCase();
    if (name === CLUSTER_TOKEN_HEADER || name === PRINCIPAL_HEADER) req.rawHeaders.splice(i, 2);
  }
}

const refused = () => new UnauthorizedError('This is a VoidRun host\'s internal listener: only API nodes of its fleet (with its CLUSTER_TOKEN) are served here');

/**
 * A host's internal listener (HOST_INTERNAL_PORT): what API nodes forward — whole requests and
 * upgrades on the host's sandboxes, served by the public server's own routes, and procedure calls.
 * Nothing is served without the cluster secret.
 */
export function createInternalListener(o: InternalListenerOptions): Server {
  const server = createServer((req, res) => {
    if (!carriesToken(req, o.token)) {
      req.resume();
      return sendError(res, refused());
    }
    dropFleetHeaders(req, true);
    fromCluster.add(req);
    const path = (req.url ?? '').split('?')[0];
    if (path === INTERNAL_CALL_PATH && req.method === 'POST') {
      o.call(req, res).catch(() => res.destroy());
      return;
    }
    if (path === INTERNAL_ADOPT_PATH && req.method === 'POST' && o.adopt) {
      o.adopt(req, res).catch(() => res.destroy());
      return;
    }
    o.main.emit('request', req, res);
  });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => {});
    if (!carriesToken(req, o.token)) {
      socket.end(rawErrorResponse(refused()));
      return;
    }
    dropFleetHeaders(req, true);
    fromCluster.add(req);
    o.main.emit('upgrade', req, socket, head);
  });
  server.on('clientError', (_err, socket: Duplex) => socket.destroy());
  return server;
}
