import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from 'pino';
import { z } from 'zod';
import { ExecInput, PidInput, SandboxPath, SessionExecStreamInput, toRestImage, type ExecChunk } from '../../shared/index.js';
import { InvalidInputError } from '../errors.js';
import busboy from 'busboy';
import { basename } from 'node:path';
import type { Readable } from 'node:stream';
import type { Services } from '../services/index.js';
import { forwardStream } from '../services/file-service.js';
import type { TrackedChunk } from '../services/exec-service.js';
import { apiKeyOf, requestedOrgOf, type RequestRecord } from '../trpc/context.js';
import { isExpectedError, sendError, sendJson, successBody, toWireError } from './envelope.js';
import { writeOrWait } from './response-writer.js';
import type { Principal } from '../services/auth-service.js';
import type { OpenStreams } from './open-streams.js';
import { readJsonBody } from './json-body.js';
import { vouchedPrincipal } from './internal-listener.js';
import { writeSse, type SseEvent } from './sse.js';
import { parseEventId } from '../services/sandbox-events.js';
import { compiledRoutes, matchRoute, routeParams, routeTable, type CompiledRoute, type HttpRouteName } from './route-table.js';

const httpRoutes = compiledRoutes('http');
/** How often an idle event stream gets an SSE comment line. */
const SSE_KEEPALIVE_MS = 25_000;
const websocketRoutes = compiledRoutes('websocket');

function isHttpRoute(route: CompiledRoute): route is CompiledRoute<HttpRouteName> {
  return route.spec.kind === 'http';
}

/** The handler of one raw HTTP route of the route table; `params` are its path parameters, decoded. */
type RawHandler = (req: IncomingMessage, res: ServerResponse, params: string[], services: Services, principal: Principal, maxJsonBodyBytes: number) => Promise<void>;

function toSse(e: TrackedChunk): SseEvent {
  const c: ExecChunk = e.chunk;
  switch (c.type) {
    case 'stdout':
    case 'stderr':
      return { id: e.id, event: c.type, data: c.data };
    case 'exit':
      return { id: e.id, event: 'exit', data: JSON.stringify({ exitCode: c.exitCode, timedOut: c.timedOut }) };
    case 'started':
      return { id: e.id, event: 'started', data: JSON.stringify({ pid: c.pid }) };
    case 'gap':
      return { id: e.id, event: 'gap', data: JSON.stringify({ droppedBytes: c.droppedBytes }) };
  }
}

/** Runs `chunks` as an SSE response; an error before the first event is answered as JSON instead. */
async function streamChunks(res: ServerResponse, open: (signal: AbortSignal) => AsyncGenerator<TrackedChunk>): Promise<void> {
  const abort = new AbortController();
  res.once('close', () => abort.abort());
  const chunks = open(abort.signal);
  const first = await chunks.next(); // errors here become a JSON error response
  const mapped = (async function* () {
    for await (const c of chunks) yield toSse(c);
  })();
  await writeSse(res, first.done ? null : toSse(first.value), mapped, abort.signal);
}

async function parseBody<T extends z.ZodType>(req: IncomingMessage, schema: T, extra: Record<string, unknown>, limit: number): Promise<z.infer<T>> {
  const body = await readJsonBody(req, limit);
  return schema.parse({ ...(body as object), ...extra });
}

/** A raw file route's `path` query parameter (built once: zod compiles an object schema on its first parse). */
const PathQuery = z.object({ path: SandboxPath });

/** The `path` query parameter of a raw file route, checked as every sandbox path is (ZodError: 400 naming it). */
function queryPath(req: IncomingMessage): string {
  const path = new URL(req.url ?? '/', 'http://localhost').searchParams.get('path');
  if (!path) throw new InvalidInputError('Invalid path: the path query parameter is required');
  return PathQuery.parse({ path }).path;
}

function contentDisposition(path: string): string {
  const name = basename(path) || 'download';
  const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, '_');
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encodeURIComponent(name)}`;
}

/** Aborted when the client hangs up before its answer was sent in full (not after). */
function leftSignal(res: ServerResponse): AbortController {
  const left = new AbortController();
  res.once('close', () => {
    if (!res.writableFinished) left.abort(LEFT);
  });
  return left;
}
const LEFT = new Error('the client hung up');

/** The file stream of a multipart/form-data body's `file` field; other fields are ignored. */
function multipartFile(req: IncomingMessage, limit: number): Promise<Readable> {
  return new Promise((resolve, reject) => {
    let found = false;
    let parser: busboy.Busboy;
    try {
      parser = busboy({ headers: req.headers, limits: { files: 1, fileSize: limit + 1 } });
    } catch (err) {
      // A Content-Type busboy cannot parse: multipart/form-data without its boundary parameter.
      const reason = (err as Error).message;
      return reject(new InvalidInputError(`Invalid multipart/form-data Content-Type (${reason}): it needs a boundary parameter, as curl -F file=@… sends it; or send the raw bytes with any other Content-Type`));
    }
    parser.on('file', (field, stream) => {
      if (field !== 'file' || found) {
        stream.resume();
        return;
      }
      found = true;
      resolve(stream);
    });
    parser.on('error', (err: Error) => reject(new InvalidInputError(`Malformed multipart body: ${err.message}`)));
    parser.on('close', () => {
      if (!found) reject(new InvalidInputError('The multipart body has no "file" field'));
    });
    req.pipe(parser);
  });
}

/** The handlers of the route table's HTTP routes (method, path, auth and stream slot come from the table). */
const handlers: Record<HttpRouteName, RawHandler> = {
  // One JSON object per line: {"type":"stdout"|"stderr","data":…} as output comes, then {"type":"exit","exitCode":n}.
  sessionExecStream: async (req, res, [id], services, principal, limit) => {
    const input = await parseBody(req, SessionExecStreamInput, { id }, limit);
    const abort = new AbortController();
    res.once('close', () => abort.abort());
    const chunks = services.exec.sessionExecStream(principal, input.id, input.sessionId, input.command, input.timeout, abort.signal);
    const first = await chunks.next(); // errors before the first chunk are answered as JSON
    res.writeHead(200, { 'content-type': 'application/x-ndjson; charset=utf-8', 'cache-control': 'no-cache' });
    const write = (line: unknown) => writeOrWait(res, `${JSON.stringify(line)}\n`);
    try {
      if (!first.done) await write(first.value);
      for await (const c of chunks) {
        if (res.destroyed) break;
        await write(c);
      }
    } catch (err) {
      await write({ type: 'error', ...toWireError(err).body });
    } finally {
      await chunks.return(undefined);
    }
    res.end();
  },
  filesUpload: async (req, res, [id], services, principal) => {
    const path = queryPath(req);
    const type = (req.headers['content-type'] ?? '').toLowerCase();
    const declared = req.headers['content-length'] ? Number(req.headers['content-length']) : undefined;
    const multipart = type.startsWith('multipart/form-data');
    const source = multipart ? await multipartFile(req, services.files.maxUploadBytes) : req;
    const left = leftSignal(res); // the client hung up: the agent request ends with it
    const result = await services.files.upload(principal, id!, path, source, multipart ? undefined : declared, left.signal);
    sendJson(res, 200, successBody(result, 'File uploaded'));
  },
  filesUploadTar: async (req, res, [id], services, principal) => {
    const path = queryPath(req);
    const declared = req.headers['content-length'] ? Number(req.headers['content-length']) : undefined;
    const left = leftSignal(res); // the client hung up: the agent request ends with it
    const result = await services.files.uploadTar(principal, id!, path, req, declared, left.signal);
    sendJson(res, 200, successBody(result, 'Files uploaded'));
  },
  imagesImport: async (req, res, _params, services, principal) => {
    const query = Object.fromEntries(new URL(req.url ?? '/', 'http://localhost').searchParams);
    const input = routeTable.imagesImport.query.parse(query); // ZodError: 400 naming the parameter
    if ((req.headers['content-type'] ?? '').toLowerCase().startsWith('multipart/')) {
      throw new InvalidInputError('Send the image archive as the request body itself (curl --data-binary @image.tar), not as a multipart form');
    }
    const declared = req.headers['content-length'] ? Number(req.headers['content-length']) : undefined;
    const image = toRestImage(await services.imageImports.import(principal, input, req, declared));
    sendJson(res, 201, { ...image, ...successBody(image, 'Image imported') });
  },
  filesDownload: async (req, res, [id], services, principal) => {
    const left = leftSignal(res); // the client hung up: the agent request ends with it
    const download = await services.files.download(principal, id!, queryPath(req), left.signal);
    res.writeHead(200, {
      'content-type': 'application/octet-stream',
      'content-disposition': contentDisposition(download.path),
      ...(download.size !== null ? { 'content-length': download.size } : {}),
    });
    await forwardStream(download.stream, res).catch(() => {
      download.stream.destroy();
      res.destroy();
    });
  },
  execStream: async (req, res, [id], services, principal, limit) => {
    const input = await parseBody(req, ExecInput, { id }, limit);
    // EventSource clients resume with Last-Event-ID: re-attach to the same process after that event.
    const resume = req.headers['last-event-id'];
    await streamChunks(res, (signal) => services.exec.stream(principal, input, typeof resume === 'string' ? resume : null, signal));
  },
  eventsStream: async (req, res, [id], services, principal) => {
    const header = req.headers['last-event-id'];
    const query = new URL(req.url ?? '/', 'http://localhost').searchParams.get('after');
    const after = parseEventId(typeof header === 'string' && header !== '' ? header : query);
    const abort = new AbortController();
    res.once('close', () => abort.abort());
    const events = await services.events.open(principal, id!, after, abort.signal); // a refusal is answered as JSON
    const sse = (async function* () {
      for await (const e of events) yield { id: String(e.id), event: e.type, data: JSON.stringify(e) };
    })();
    await writeLongSse(res, sse, abort.signal);
  },
  imageLogsStream: async (req, res, [id], services, principal) => {
    const abort = new AbortController();
    res.once('close', () => abort.abort());
    const lines = await services.images.followLogs(principal, id!, abort.signal); // a refusal is answered as JSON
    const sse = (async function* () {
      for await (const line of lines) yield { event: 'line', data: line };
      yield { event: 'end', data: JSON.stringify({ status: (await services.images.get(principal, id!)).status }) };
    })();
    await writeLongSse(res, sse, abort.signal);
  },
  commandsAttach: async (req, res, [id], services, principal, limit) => {
    const input = await parseBody(req, PidInput, { id }, limit);
    const resume = req.headers['last-event-id'];
    const after = typeof resume === 'string' ? (resume.split(':')[1] ?? null) : null;
    await streamChunks(res, (signal) => services.exec.attach(principal, input.id, input.pid, after, signal));
  },
};

/** `writeSse` for a stream that may wait long for its next event: a comment line now and then keeps proxies from closing it. */
async function writeLongSse(res: ServerResponse, events: AsyncIterator<SseEvent>, signal: AbortSignal): Promise<void> {
  const keepalive = setInterval(() => {
    if (res.headersSent && !res.writableNeedDrain && !res.writableEnded) res.write(': keepalive\n\n');
  }, SSE_KEEPALIVE_MS);
  res.once('close', () => clearInterval(keepalive));
  try {
    await writeSse(res, null, events, signal);
  } finally {
    clearInterval(keepalive);
  }
}

/**
 * The route table's HTTP routes: answers that are not JSON envelopes (byte transfers, SSE and
 * NDJSON streams). They sit beside the REST facade under /api and call the same services. Resolves
 * with the route's metrics label when one matched, else null.
 */
export function createRawRoutes(opts: { services: Services; streams: OpenStreams; maxJsonBodyBytes: number; log?: Logger }) {
  return async function handleRaw(req: IncomingMessage, res: ServerResponse, apiPath: string, record: RequestRecord): Promise<string | null> {
    const path = apiPath.split('?')[0]!;
    const match = matchRoute(httpRoutes, req.method ?? 'GET', path) ?? matchRoute(websocketRoutes, req.method ?? 'GET', path);
    if (match) {
      const { route, rawParams } = match;
      try {
        const parsed = routeParams(route, rawParams);
        const params = route.paramNames.map((p) => parsed[p]!);
        // Every raw route needs a key: authenticated here, once.
        const checkStarted = opts.streams.keyCheckStarted();
        const principal = vouchedPrincipal(req) ?? (await opts.services.auth.authenticate(apiKeyOf(req), requestedOrgOf(req)));
        record.orgId = principal.orgId;
        // The client left while its key was checked: nothing to hold or answer.
        if (res.closed) return route.label;
        // A WebSocket route reached without an upgrade (the upgrades are served by server.ts).
        if (!isHttpRoute(route)) throw new InvalidInputError(`${route.spec.method} /api${route.spec.path} is a WebSocket route: connect with a WebSocket client (Upgrade: websocket)`);
        // Every raw route is cut if its key is revoked; streams also count against the org's cap.
        const cut = () => res.destroy();
        const release = route.spec.stream ? opts.streams.acquire(principal, 'stream', cut, checkStarted) : opts.streams.trackKey(principal.keyId, cut, checkStarted);
        res.once('close', release);
        // A call on a sandbox is activity for its idle policy until its response is done (a stream
        // while it is open), counted only once the sandbox is found in the caller's org (see
        // ActivityTracker.hold). Its event stream is not: it reads the server's records, never the
        // sandbox, and watching for `sandbox.idle` must not keep that from happening.
        if (parsed.id !== undefined && route.spec.path.startsWith('/sandboxes/{id}') && route.name !== 'eventsStream') res.once('close', opts.services.activity.hold(principal.orgId, parsed.id));
        await handlers[route.name](req, res, params, opts.services, principal, opts.maxJsonBodyBytes);
      } catch (err) {
        if (res.headersSent) {
          // The answer was under way: it is cut. A failure no route expects is a bug, logged (the
          // client sees only a cut connection).
          if (!isExpectedError(err)) opts.log?.error({ err, route: route.name }, 'a streamed answer failed midway; cut');
          res.destroy();
        } else if (isExpectedError(err)) {
          // A body not read to its end: keep reading (and dropping) it for a while rather than
          // closing, so the client reads this answer instead of a connection reset; then cut.
          if (!req.complete) {
            req.resume();
            setTimeout(() => req.socket.destroy(), 5000).unref();
          }
          sendError(res, err);
        } else {
          throw err; // a bug: logged and answered 500 by the server
        }
      }
      return route.label;
    }
    return null;
  };
}
