import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Config } from '../config.js';
import { ForbiddenError } from '../errors.js';
import { sendError } from './envelope.js';

/** The original VoidRun's CORS settings (its `CORS_*` variables), as gin-contrib/cors applies them. */
export interface CorsPolicy {
  enabled: boolean;
  allowOrigins: readonly string[];
  allowMethods: readonly string[];
  allowHeaders: readonly string[];
  exposeHeaders: readonly string[];
  allowCredentials: boolean;
  maxAgeSec: number;
}

/** The policy the `CORS_*` variables describe. */
export function corsPolicy(config: Config): CorsPolicy {
  return {
    enabled: config.CORS_ENABLED,
    allowOrigins: config.CORS_ALLOW_ORIGINS,
    allowMethods: config.CORS_ALLOW_METHODS,
    allowHeaders: config.CORS_ALLOW_HEADERS,
    exposeHeaders: config.CORS_EXPOSE_HEADERS,
    allowCredentials: config.CORS_ALLOW_CREDENTIALS,
    maxAgeSec: config.CORS_MAX_AGE_SEC,
  };
}

/** `x-api-key` → `X-Api-Key`, the form Go's http.CanonicalHeaderKey gives (header names ignore case). */
function canonicalHeader(name: string): string {
  return name.toLowerCase().replace(/(^|-)([a-z])/g, (_, dash: string, c: string) => dash + c.toUpperCase());
}

const unique = (values: readonly string[]) => [...new Set(values)];

/** What `cors(req, res)` did: answered the request (a preflight or a refused origin), or let it through. */
export type CorsOutcome = 'preflight' | 'origin-refused' | null;

/**
 * The CORS edge, run before routing on every request (REST, raw routes, tRPC, `/metrics`, unknown
 * paths): a request without `Origin`, or from the server's own origin, is not touched. An origin
 * outside `CORS_ALLOW_ORIGINS` is answered 403. `OPTIONS` from an allowed origin is a preflight,
 * answered 204 with the allowed methods, headers and max age. Other requests get
 * `Access-Control-Allow-Origin` (and credentials and exposed headers) and go on to their route.
 *
 * `*` allows every origin and is sent as `*`; with `CORS_ALLOW_CREDENTIALS` the request's origin
 * is echoed instead (a browser refuses `*` with credentials), with `Vary: Origin`.
 */
export function createCors(policy: CorsPolicy): (req: IncomingMessage, res: ServerResponse) => CorsOutcome {
  const listed = new Set(policy.allowOrigins.filter((o) => o !== '*').map((o) => o.toLowerCase()));
  const anyOrigin = policy.allowOrigins.includes('*');
  // `*` is only ever sent without credentials.
  const sendStar = anyOrigin && !policy.allowCredentials;
  const methods = unique(policy.allowMethods.map((m) => m.toUpperCase())).join(',');
  const headers = unique(policy.allowHeaders.map(canonicalHeader)).join(',');
  const expose = unique(policy.exposeHeaders.map(canonicalHeader)).join(',');

  return (req, res) => {
    if (!policy.enabled) return null;
    const origin = req.headers.origin;
    if (!origin) return null;
    const host = req.headers.host ?? '';
    if (origin === `http://${host}` || origin === `https://${host}`) return null;
    if (!anyOrigin && !listed.has(origin)) {
      sendError(res, new ForbiddenError(`Origin ${origin.slice(0, 200)} is not allowed`, { details: 'The server admits browser requests only from the origins in CORS_ALLOW_ORIGINS' }));
      return 'origin-refused';
    }
    if (policy.allowCredentials) res.setHeader('access-control-allow-credentials', 'true');
    res.setHeader('access-control-allow-origin', sendStar ? '*' : origin);
    if (req.method === 'OPTIONS') {
      if (methods) res.setHeader('access-control-allow-methods', methods);
      if (headers) res.setHeader('access-control-allow-headers', headers);
      if (policy.maxAgeSec > 0) res.setHeader('access-control-max-age', String(policy.maxAgeSec));
      if (!sendStar) res.setHeader('vary', ['Origin', 'Access-Control-Request-Method', 'Access-Control-Request-Headers']);
      res.writeHead(204, { 'content-length': '0' });
      res.end();
      return 'preflight';
    }
    if (expose) res.setHeader('access-control-expose-headers', expose);
    if (!sendStar) res.setHeader('vary', 'Origin');
    return null;
  };
}

/** One operation of the OpenAPI document: its method and its full path template. */
interface DocumentedRoute {
  method: string;
  pattern: RegExp;
}

interface OpenApiLike {
  servers?: { url: string }[];
  paths?: Record<string, Record<string, { servers?: { url: string }[] } | unknown>>;
}

const httpMethods = new Set(['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace']);

/**
 * A trailing-slash redirect like the original's (gin's RedirectTrailingSlash): a request for
 * `/api/sandboxes/` whose path without the slash is a documented operation for its method is
 * answered 301 (GET) or 307 (any other method, so the body is sent again) to that path, query kept.
 * Routes come from the OpenAPI document; a path that is no route is left to the 404.
 */
export function createTrailingSlashRedirect(document: OpenApiLike): (req: IncomingMessage, res: ServerResponse) => boolean {
  const base = (document.servers?.[0]?.url ?? '').replace(/\/$/, '');
  const routes: DocumentedRoute[] = [];
  for (const [template, item] of Object.entries(document.paths ?? {})) {
    for (const [method, operation] of Object.entries(item)) {
      if (!httpMethods.has(method)) continue;
      const servers = (operation as { servers?: { url: string }[] } | null)?.servers;
      const prefix = servers?.[0] ? servers[0].url.replace(/\/$/, '') : base;
      const source = (prefix + template)
        .split(/(\{[^}]+\})/)
        .map((part) => (part.startsWith('{') ? '[^/]+' : part.replace(/[.*+?^$()|[\]\\]/g, '\\$&')))
        .join('');
      routes.push({ method: method.toUpperCase(), pattern: new RegExp(`^${source}$`) });
    }
  }

  return (req, res) => {
    const url = req.url ?? '/';
    const q = url.indexOf('?');
    const path = q < 0 ? url : url.slice(0, q);
    if (path.length < 2 || !path.endsWith('/') || path.endsWith('//')) return false;
    const method = req.method ?? 'GET';
    const target = path.slice(0, -1);
    if (!routes.some((r) => r.method === method && r.pattern.test(target))) return false;
    const location = target + (q < 0 ? '' : url.slice(q));
    res.writeHead(method === 'GET' ? 301 : 307, { location, 'content-length': '0' });
    res.end();
    return true;
  };
}
