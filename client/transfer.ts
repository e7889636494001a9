import type { IncomingMessage } from 'node:http';
import type { Readable } from 'node:stream';
import { errorFromResponse } from './errors.js';
import { nodeModules, type NodeModules } from './runtime.js';

/** Bytes for an upload; see `UploadSource` in files.ts for what each runtime takes. */
export type TransferSource = Uint8Array | ArrayBuffer | string | Blob | Response | ReadableStream<Uint8Array> | Readable | AsyncIterable<Uint8Array> | { path: string };

/** How byte transfers travel: node:http where Node's modules exist (streams both ways with backpressure), else `fetch`. */
export type Transport = { kind: 'node'; node: NodeModules } | { kind: 'fetch'; fetch: typeof globalThis.fetch };

/** node:http where the runtime has Node's modules and no `fetch` was given; else that `fetch` (or the global one). */
export function transportFor(fetchFn: typeof globalThis.fetch | undefined): Transport {
  const node = fetchFn ? null : nodeModules();
  return node ? { kind: 'node', node } : { kind: 'fetch', fetch: fetchFn ?? globalThis.fetch };
}

const isBlob = (v: unknown): v is Blob => typeof Blob === 'function' && v instanceof Blob;
const isResponse = (v: unknown): v is Response => typeof Response === 'function' && v instanceof Response;
const isWebStream = (v: unknown): v is ReadableStream<Uint8Array> => typeof ReadableStream === 'function' && v instanceof ReadableStream;

/** POSTs `source` to `url` as application/octet-stream; the JSON answer's `data`, or the answer's error class. */
export async function postBytes<T>(transport: Transport, url: URL, headers: Record<string, string>, source: TransferSource): Promise<T> {
  const res = transport.kind === 'node' ? await nodePost(transport.node, url, headers, source) : await fetchPost(transport.fetch, url, headers, source);
  if (!res.ok) throw await errorFromResponse(res);
  return ((await res.json()) as { data: T }).data;
}

/**
 * `fetchFn` that never follows a redirect. Every call carries the API key in `x-api-key`, which
 * fetch (unlike `Authorization` and cookies) keeps on a redirect to another origin, so a 3xx answer
 * (a misconfigured proxy, or anyone answering for the API's host) is an error naming it instead of a
 * second request taking the key wherever it points. node:http never follows redirects either.
 */
export function withoutRedirects(fetchFn: () => typeof globalThis.fetch): typeof globalThis.fetch {
  return async (input, init) => {
    const res = await fetchFn()(input, { ...init, redirect: 'manual' });
    // Browsers hide a manual redirect's status and target (an "opaqueredirect" with status 0).
    if (res.type === 'opaqueredirect' || (res.status >= 300 && res.status < 400 && res.status !== 304)) {
      const url = input instanceof Request ? input.url : String(input);
      const target = res.headers.get('location');
      throw new Error(
        `The server answered ${url} with a redirect${res.status ? ` (${res.status}${target ? ` to ${target}` : ''})` : ''}; the client does not follow redirects, which would send the API key elsewhere: use the final address as the API URL`,
      );
    }
    return res;
  };
}

/** GETs `url` through `fetch`; the answer when it is a 200, else its error class. */
export async function fetchGet(fetchFn: typeof globalThis.fetch, url: URL, headers: Record<string, string>): Promise<Response> {
  const res = await withoutRedirects(() => fetchFn)(url, { headers });
  if (res.status !== 200) throw await errorFromResponse(res);
  return res;
}

/** GETs `url` through node:http; the response stream when it is a 200, else its error class. */
export async function nodeGet(node: NodeModules, url: URL, headers: Record<string, string>): Promise<IncomingMessage> {
  const res = await new Promise<IncomingMessage>((resolve, reject) => {
    const req = (url.protocol === 'https:' ? node.https : node.http).request(url, { headers }, resolve);
    req.once('error', reject);
    req.end();
  });
  if (res.statusCode !== 200) throw await errorFromResponse(await toFetchResponse(res));
  return res;
}

/**
 * The fetch upload. A Blob, bytes or a string go as they are; a stream is first gathered into a
 * Blob, because browsers send a streamed request body only over HTTP/2 and the server speaks
 * HTTP/1.1 (a big upload from a browser should be a `File`, which the browser reads from disk).
 */
async function fetchPost(fetchFn: typeof globalThis.fetch, url: URL, headers: Record<string, string>, source: TransferSource): Promise<Response> {
  let body: NonNullable<RequestInit['body']>;
  if (typeof source === 'string' || isBlob(source)) body = source;
  else if (isResponse(source)) body = await source.blob();
  else if (source instanceof Uint8Array) body = source as Uint8Array<ArrayBuffer>;
  else if (source instanceof ArrayBuffer) body = source;
  else if (isWebStream(source)) body = await new Response(source).blob();
  else if (Symbol.asyncIterator in source) {
    const parts: Uint8Array<ArrayBuffer>[] = [];
    for await (const chunk of source as AsyncIterable<Uint8Array>) parts.push(chunk as Uint8Array<ArrayBuffer>);
    body = new Blob(parts);
  } else throw new TypeError('An upload from a local path needs Node (or Bun, Deno); in a browser pass a File or Blob');
  return withoutRedirects(() => fetchFn)(url, { method: 'POST', headers: { ...headers, 'content-type': 'application/octet-stream' }, body });
}

/** The node:http upload: streams `source` with backpressure, and stops sending when the server refuses early (413, 404). */
async function nodePost(node: NodeModules, url: URL, headers: Record<string, string>, source: TransferSource): Promise<Response> {
  const { Readable } = node.stream;
  let body: Readable;
  let length: number | undefined;
  if (typeof source === 'string' || source instanceof Uint8Array || source instanceof ArrayBuffer) {
    const bytes = typeof source === 'string' ? Buffer.from(source) : source instanceof ArrayBuffer ? new Uint8Array(source) : source;
    body = Readable.from([bytes]);
    length = bytes.byteLength;
  } else if (source instanceof Readable) {
    body = source;
  } else if (isBlob(source)) {
    body = Readable.from(source.stream() as AsyncIterable<Uint8Array>);
    length = source.size;
  } else if (isWebStream(source) || isResponse(source)) {
    const stream = isResponse(source) ? (source.body ?? new Blob([]).stream()) : source;
    body = Readable.from(stream as AsyncIterable<Uint8Array>);
  } else if ('path' in source) {
    length = (await node.fsPromises.stat(source.path)).size;
    body = node.fs.createReadStream(source.path, { highWaterMark: 1024 * 1024 });
  } else {
    body = Readable.from(source);
  }
  // node:http rather than fetch: it streams with backpressure, so a big file moves with flat memory.
  const req = (url.protocol === 'https:' ? node.https : node.http).request(url, {
    method: 'POST',
    headers: { ...headers, 'content-type': 'application/octet-stream', ...(length !== undefined ? { 'content-length': String(length) } : {}) },
  });
  const response = new Promise<IncomingMessage>((resolve, reject) => {
    req.once('response', resolve);
    req.once('error', reject);
  });
  response.catch(() => {});
  const sending = node.streamPromises.pipeline(body, req);
  sending.catch(() => {});
  // The server may refuse before the body is sent (413, 404): stop sending and report why.
  const first = await Promise.race([sending.then(() => 'sent' as const), response.then(() => 'answered' as const)]).catch(() => 'failed' as const);
  if (first === 'answered' && (await response).statusCode !== 200) {
    const refused = await toFetchResponse(await response);
    body.destroy();
    req.destroy();
    return refused;
  }
  if (first === 'failed') {
    const early = await Promise.race([response.catch(() => null), new Promise<null>((r) => setTimeout(() => r(null), 5000))]);
    if (early) return toFetchResponse(early);
    await sending; // rethrows the transport error
  }
  await sending;
  return toFetchResponse(await response);
}

/** A finished node:http response as a fetch Response (for the shared error mapping). */
async function toFetchResponse(res: IncomingMessage): Promise<Response> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  return new Response(Buffer.concat(chunks), { status: res.statusCode ?? 500, headers: { 'content-type': String(res.headers['content-type'] ?? '') } });
}
