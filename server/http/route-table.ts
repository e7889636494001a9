import { z } from 'zod';
import { ExecInput, Id, ImageName, PidInput, Port, RestImage, SessionExecStreamInput, UploadResult, UploadTarResult } from '../../shared/index.js';
import { decodeOrNull } from '../../shared/uri.js';
import { InvalidInputError } from '../errors.js';

/**
 * One route served outside the tRPC router (a byte transfer, a stream, a WebSocket): everything
 * the dispatch, the metrics and the OpenAPI document need to know about it. Declarations only;
 * `raw-routes.ts` binds the HTTP handlers and `server.ts` the upgrade handlers, by name.
 */
export interface RouteSpec {
  /**
   * `http`: a plain request under /api; `websocket`: a GET that upgrades (101); `proxy`: any
   * request (any method, upgrades too) under the path, passed to a sandbox's port by `port-proxy.ts`
   * (documented as its GET).
   */
  kind: 'http' | 'websocket' | 'proxy';
  method: 'GET' | 'POST';
  /** The path under /api, OpenAPI style: `/sandboxes/{id}/files/upload`. */
  path: string;
  /**
   * Every raw route needs an API key: X-API-Key, or `?apiKey=` where a browser cannot set headers;
   * `apiKeyHeader` takes the header only (the port proxy: the sandbox's page would read a key in its URL).
   */
  auth: 'apiKey' | 'apiKeyHeader';
  /** A long-lived answer: it holds one of the org's ORG_MAX_STREAMS slots while open. */
  stream?: true;
  /** The path parameters: a sandbox's `id` (empty for a route that addresses none, e.g. an image import). */
  params: z.ZodObject;
  query?: z.ZodObject;
  /** The JSON body (path parameters excluded), or `binary` for a byte upload. */
  body?: z.ZodType | 'binary';
  /** A `binary` body's content types (default: any bytes as application/octet-stream, or multipart/form-data with a `file` field). */
  binaryTypes?: readonly string[];
  success: { status: 200 | 201 | 101; description: string; contentType?: string; schema?: z.ZodType };
  operationId: string;
  summary: string;
  description?: string;
  tag: string;
}

const SandboxParams = z.object({ id: Id });
const FilePathQuery = z.object({ path: z.string().min(1).meta({ description: 'Absolute path inside the sandbox', example: '/root/script.sh' }) });

/** The raw HTTP and WebSocket routes, by name. */
export const routeTable = {
  sessionExecStream: {
    kind: 'http',
    method: 'POST',
    path: '/sandboxes/{id}/session-exec-stream',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams,
    body: SessionExecStreamInput.omit({ id: true }),
    success: {
      status: 200,
      contentType: 'application/x-ndjson',
      description:
        'One JSON object per line: {"type":"stdout"|"stderr","data"} chunks, then {"type":"exit","exitCode"}; a reader that falls more than 4 MiB behind gets {"type":"gap","droppedBytes"} where output was dropped; a failure after the first line is {"type":"error","error","code"}',
    },
    operationId: 'sessionExecStream',
    summary: 'Run a command in a shell session, streamed as NDJSON',
    tag: 'Execution',
  },
  filesUpload: {
    kind: 'http',
    method: 'POST',
    path: '/sandboxes/{id}/files/upload',
    auth: 'apiKey',
    params: SandboxParams,
    query: FilePathQuery,
    body: 'binary',
    success: {
      status: 200,
      contentType: 'application/json',
      description: 'File uploaded',
      schema: z.object({ status: z.literal('success'), message: z.string().meta({ example: 'File uploaded' }), data: UploadResult }),
    },
    operationId: 'uploadFile',
    summary: 'Upload a file',
    description:
      'The body is the file (any content type), or a multipart/form-data body whose `file` field is the file. Parent directories are created; the file appears whole or not at all. At most MAX_UPLOAD_BYTES.',
    tag: 'File System',
  },
  filesUploadTar: {
    kind: 'http',
    method: 'POST',
    path: '/sandboxes/{id}/files/upload-tar',
    auth: 'apiKey',
    params: SandboxParams,
    query: z.object({ path: z.string().min(1).meta({ description: 'The directory inside the sandbox the entries are written under (created if missing)', example: '/root/project' }) }),
    body: 'binary',
    success: {
      status: 200,
      contentType: 'application/json',
      description: 'Files uploaded',
      schema: z.object({ status: z.literal('success'), message: z.string().meta({ example: 'Files uploaded' }), data: UploadTarResult }),
    },
    operationId: 'uploadFilesTar',
    summary: 'Upload many files as one tar stream',
    description:
      'The body is an uncompressed tar stream (`tar -cf - …`); its entries are written under `path` as they arrive, each file whole (a temporary file renamed into place). Regular files, directories and symbolic links that stay inside `path` are accepted; an absolute name, `..`, a path through a symbolic link, a link leading outside, a hard link or a device is refused with 400 naming the entry (entries before it stay written). At most MAX_UPLOAD_BYTES in all.',
    tag: 'File System',
  },
  imagesImport: {
    kind: 'http',
    method: 'POST',
    path: '/images/import',
    auth: 'apiKey',
    params: z.object({}),
    query: z.object({
      name: ImageName.meta({ description: 'The new image\'s name (unique in your org)', example: 'my-python' }),
      version: z.string().max(64).optional().meta({ description: 'Stored as the tag (default "latest")', example: '3.12' }),
    }),
    body: 'binary',
    binaryTypes: ['application/x-tar', 'application/gzip'],
    success: {
      status: 201,
      contentType: 'application/json',
      description: 'The image, ready: its fields, and also the {status, message, data} envelope as POST /images answers',
      schema: z.object({ status: z.literal('success'), message: z.string().meta({ example: 'Image imported' }), data: RestImage }),
    },
    operationId: 'importImage',
    summary: 'Import an OCI image archive (an OCI image layout or docker save tar)',
    description:
      'The body is a tar (optionally gzip) of an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`, as `skopeo copy … oci-archive:` or `docker buildx --output type=oci` write) or of `docker save` (`manifest.json`), streamed. Its layers are applied in order into one layer (whiteouts and opaque directories honoured), owners shifted into the sandbox uid range; `Env` and `WorkingDir` of the image config become the image\'s env and workdir. Blob digests are checked. Refused with 400 naming the entry: `..` components, an entry written through a symbolic link, a hard link to anything but an earlier file, device nodes and other special files, GNU sparse entries, owners past 65535, zstd or other unsupported layer media types, more than IMAGE_IMPORT_MAX_FILES entries or files declaring more than IMAGE_IMPORT_MAX_BYTES; an upload over IMAGE_IMPORT_MAX_BYTES is a 413. Nothing is kept of a refused import. 409 when your org has an image of that name; 429 when its disk quota (ORG_MAX_DISK_MB) is used up or another import of your org is still running (one at a time).',
    tag: 'Images',
  },
  filesDownload: {
    kind: 'http',
    method: 'GET',
    path: '/sandboxes/{id}/files/download',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams,
    query: FilePathQuery,
    success: { status: 200, contentType: 'application/octet-stream', description: 'The file content, streamed (Content-Disposition names the file)' },
    operationId: 'downloadFile',
    summary: 'Download a file',
    tag: 'File System',
  },
  execStream: {
    kind: 'http',
    method: 'POST',
    path: '/sandboxes/{id}/exec-stream',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams,
    body: ExecInput.omit({ id: true }),
    success: {
      status: 200,
      contentType: 'text/event-stream',
      description:
        'Server-Sent Events: `started` ({"pid"}), `stdout` and `stderr` (the text), then `exit` ({"exitCode","timedOut"}); `gap` ({"droppedBytes"}) where a slow reader missed output; `error` ({"error","code"}) if the stream fails after it began. Each event has an id: send it back as Last-Event-ID to resume.',
    },
    operationId: 'execCommandStream',
    summary: 'Run a command, output streamed as Server-Sent Events',
    tag: 'Execution',
  },
  commandsAttach: {
    kind: 'http',
    method: 'POST',
    path: '/sandboxes/{id}/commands/attach',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams,
    body: PidInput.omit({ id: true }),
    success: {
      status: 200,
      contentType: 'text/event-stream',
      description:
        "Server-Sent Events of a background process's output: `stdout`, `stderr`, `exit`, `gap`, and `error` ({\"error\",\"code\"}) if the stream fails after it began; Last-Event-ID resumes after that event.",
    },
    operationId: 'attachToBackgroundProcess',
    summary: 'Attach to a background process (Server-Sent Events)',
    tag: 'Execution',
  },
  eventsStream: {
    kind: 'http',
    method: 'GET',
    path: '/sandboxes/{id}/events/stream',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams,
    query: z.object({
      after: z.number().int().min(0).optional().meta({ description: 'Start after this event id (the Last-Event-ID header wins when both are sent); omitted: from the oldest event kept' }),
    }),
    success: {
      status: 200,
      contentType: 'text/event-stream',
      description:
        "Server-Sent Events: the sandbox's events after Last-Event-ID (or `after`), then live ones as they happen. Each SSE event's `event:` is the type (`sandbox.started`, `process.exited`, …), its `id:` the event id and its `data:` the event as JSON (as `GET /sandboxes/{id}/events` lists them); reconnecting with Last-Event-ID gets exactly the events missed. The stream ends after `sandbox.deleted`.",
    },
    operationId: 'streamSandboxEvents',
    summary: "The sandbox's events, live (Server-Sent Events)",
    tag: 'Sandboxes',
  },
  imageLogsStream: {
    kind: 'http',
    method: 'GET',
    path: '/images/{id}/logs/stream',
    auth: 'apiKey',
    stream: true,
    params: z.object({ id: Id }),
    success: {
      status: 200,
      contentType: 'text/event-stream',
      description:
        "Server-Sent Events: one `line` event per line of the image's build log (the lines so far, then live ones while it builds), then `end` ({\"status\"}: `ready` or `failed`, as GET /images/{id} then shows). An image that is not building gets its whole log, then `end`.",
    },
    operationId: 'streamImageLogs',
    summary: "An image's build log, live (Server-Sent Events)",
    tag: 'Images',
  },
  pty: {
    kind: 'websocket',
    method: 'GET',
    path: '/sandboxes/{id}/pty',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams,
    query: z.object({
      cols: z.number().int().min(1).max(500).optional().meta({ description: 'Terminal width (default 80)' }),
      rows: z.number().int().min(1).max(200).optional().meta({ description: 'Terminal height (default 24)' }),
    }),
    success: {
      status: 101,
      description:
        'WebSocket: raw terminal bytes both ways; a text message that is exactly {"type":"resize","cols","rows"} resizes. The terminal ends with the socket.',
    },
    operationId: 'connectPTY',
    summary: 'An ephemeral terminal (WebSocket)',
    tag: 'Execution',
  },
  ptyAttach: {
    kind: 'websocket',
    method: 'GET',
    path: '/sandboxes/{id}/pty/sessions/{sessionId}',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams.extend({ sessionId: z.string().min(1) }),
    success: {
      status: 101,
      description: 'WebSocket attached to a persistent terminal session: its scrollback first, then raw terminal bytes both ways; resize messages as for /pty.',
    },
    operationId: 'connectPTYSession',
    summary: 'Attach to a terminal session (WebSocket)',
    tag: 'Execution',
  },
  watchStream: {
    kind: 'websocket',
    method: 'GET',
    path: '/sandboxes/{id}/files/watch/{sessionId}/stream',
    auth: 'apiKey',
    stream: true,
    params: SandboxParams.extend({ sessionId: z.string().min(1) }),
    success: {
      status: 101,
      description:
        'WebSocket: one JSON FileEvent per message, what the session kept first; a client that falls behind gets {"type":"overflow","dropped"} with the count it missed.',
    },
    operationId: 'streamWatchEvents',
    summary: 'File watch events (WebSocket)',
    tag: 'File System',
  },
  portProxy: {
    kind: 'proxy',
    method: 'GET',
    path: '/sandboxes/{id}/ports/{port}/{path}',
    auth: 'apiKeyHeader',
    params: SandboxParams.extend({
      port: Port,
      path: z.string().meta({ description: 'The rest of the path on the sandbox\'s server (any number of segments; empty for its root)', example: 'index.html' }),
    }),
    success: {
      status: 200,
      description:
        "The answer of the server listening on that port inside the sandbox, streamed as it sent it (any method; WebSocket and other upgrades pass through too). The key is taken from the X-API-Key header only: ?apiKey= is 400 INVALID_INPUT here (the sandbox's page could read it from its address; browsers use a preview token on the preview host). Our credentials (X-API-Key, preview tokens and their cookie) are not forwarded, nor a client's Forwarded/X-Forwarded-*; a Referer loses ?apiKey= and ?voidrun_token=; the sandbox's server sees Host localhost:<port>. Its Set-Cookie loses Domain and its Path moves under /api/sandboxes/{id}/ports/{port}/. Pages served here run as an opaque origin (Content-Security-Policy: sandbox) and send no Referer (Referrer-Policy: no-referrer, replacing the server's). 502 UPSTREAM_UNAVAILABLE when nothing listens on the port or its answer is not HTTP (or its head passes 16 KiB); 409 when the sandbox is not running. The same ports are served on preview hosts `{port}-{id}.{PREVIEW_DOMAIN}` (see the README).",
    },
    operationId: 'proxyToPort',
    summary: "Any request to a port of the sandbox, proxied to the server listening there",
    tag: 'Ports',
  },
} as const satisfies Record<string, RouteSpec>;

/** The name of a route of the table. */
export type RouteName = keyof typeof routeTable;
/** The names of the plain HTTP routes (handlers in `raw-routes.ts`). */
export type HttpRouteName = { [K in RouteName]: (typeof routeTable)[K]['kind'] extends 'http' ? K : never }[RouteName];
/** The names of the WebSocket routes (upgrade handlers in `server.ts`). */
export type WebSocketRouteName = { [K in RouteName]: (typeof routeTable)[K]['kind'] extends 'websocket' ? K : never }[RouteName];

/** A route of the table with its compiled path pattern. */
export interface CompiledRoute<N extends RouteName = RouteName> {
  name: N;
  spec: RouteSpec;
  /** The label for metrics and the log: `/api` + the path template. */
  label: string;
  pattern: RegExp;
  paramNames: string[];
}

function compile<N extends RouteName>(name: N): CompiledRoute<N> {
  const spec: RouteSpec = routeTable[name];
  const paramNames: string[] = [];
  const source = spec.path.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\{(\w+)\}/g, (_, p: string) => {
    paramNames.push(p);
    return '([^/]+)';
  });
  return { name, spec, label: `/api${spec.path}`, pattern: new RegExp(`^${source}$`), paramNames };
}

/** The routes of one kind, compiled, in table order. */
export function compiledRoutes<K extends 'http' | 'websocket'>(kind: K): CompiledRoute<K extends 'http' ? HttpRouteName : WebSocketRouteName>[] {
  return (Object.keys(routeTable) as RouteName[]).filter((n) => routeTable[n].kind === kind).map((n) => compile(n)) as never;
}

/**
 * The route that `method` and `path` (under /api, no query) name, with its raw (still
 * percent-encoded) path parameters; null when none does.
 */
export function matchRoute<N extends RouteName>(routes: CompiledRoute<N>[], method: string, path: string): { route: CompiledRoute<N>; rawParams: Record<string, string> } | null {
  for (const route of routes) {
    if (route.spec.method !== method) continue;
    const m = route.pattern.exec(path);
    if (!m) continue;
    return { route, rawParams: Object.fromEntries(route.paramNames.map((p, i) => [p, m[i + 1]!])) };
  }
  return null;
}

/** A path parameter, decoded; a malformed percent-escape is the client's error (400). */
export function decodePathSegment(segment: string): string {
  const decoded = decodeOrNull(segment);
  if (decoded === null) throw new InvalidInputError(`Invalid path: ${segment.slice(0, 200)} has an invalid percent-escape (each % must start a %XX escape of UTF-8)`);
  return decoded;
}

/**
 * A matched route's path parameters, decoded and checked against its `params` schema: a ZodError
 * (400 naming the parameter) or InvalidInputError otherwise.
 */
export function routeParams(route: CompiledRoute, rawParams: Record<string, string>): Record<string, string> {
  const decoded = Object.fromEntries(Object.entries(rawParams).map(([k, v]) => [k, decodePathSegment(v)]));
  return route.spec.params.parse(decoded) as Record<string, string>;
}
