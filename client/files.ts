import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { TRPCClient } from '@trpc/client';
import type {
  ArchiveFormat,
  ArchiveResult,
  DiskUsageResult,
  ExtractResult,
  FileInfo,
  FileOpResult,
  HeadTailResult,
  SearchResult,
  StatResult,
  UploadResult,
  UploadTarResult,
  WatchMessage,
} from '../shared/index.js';
import type { AppRouter } from '../server/routers/index.js';
import { errorFromResponse, FileNotFoundError } from './errors.js';
import { iterateSubscription } from '../shared/subscription-iterator.js';

/** What `files` needs to reach the raw byte routes. */
export interface RawHttp {
  baseUrl: string;
  headers: Record<string, string>;
}

export type UploadSource = Buffer | Uint8Array | string | Readable | AsyncIterable<Uint8Array> | { path: string };

/**
 * The files of one sandbox. Bytes go through the raw upload/download routes as streams (nothing
 * is held whole in memory); everything else through the typed tRPC router.
 */
export class SandboxFiles {
  constructor(
    private readonly trpc: TRPCClient<AppRouter>,
    private readonly raw: RawHttp,
    private readonly sandboxId: string,
  ) {}

  async list(path: string): Promise<FileInfo[]> {
    return (await this.trpc.files.list.query({ id: this.sandboxId, path })).files;
  }

  stat(path: string): Promise<StatResult> {
    return this.trpc.files.stat.query({ id: this.sandboxId, path });
  }

  /**
   * Whether a path exists: false when the file is missing (FILE_NOT_FOUND); a missing sandbox or
   * any other failure throws.
   */
  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (err) {
      if (err instanceof FileNotFoundError) return false;
      throw err;
    }
  }

  /** A file's content as a Buffer (streamed, then joined; use `download` for big files). */
  async read(path: string): Promise<Buffer> {
    const chunks: Buffer[] = [];
    for await (const chunk of await this.download(path)) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  }

  /** Writes a whole file (replacing it atomically); parent directories are created. */
  write(path: string, data: UploadSource): Promise<UploadResult> {
    return this.upload(path, data);
  }

  /** Streams data into a file; the file appears only when all of it arrived. */
  async upload(path: string, source: UploadSource): Promise<UploadResult> {
    return this.#post<UploadResult>(`files/upload?path=${encodeURIComponent(path)}`, source);
  }

  /** POSTs `source` as the body of the sandbox's raw route `route`; the answer's `data`. */
  async #post<T>(route: string, source: UploadSource): Promise<T> {
    const url = new URL(`${this.raw.baseUrl}/api/sandboxes/${this.sandboxId}/${route}`);
    let body: Readable;
    let length: number | undefined;
    if (typeof source === 'string' || source instanceof Uint8Array) {
      const bytes = typeof source === 'string' ? Buffer.from(source) : source;
      body = Readable.from([bytes]);
      length = bytes.byteLength;
    } else if (source instanceof Readable) {
      body = source;
    } else if ('path' in source) {
      length = (await stat(source.path)).size;
      body = createReadStream(source.path, { highWaterMark: 1024 * 1024 });
    } else {
      body = Readable.from(source);
    }
    // node:http rather than fetch: it streams with backpressure, so a big file moves with flat memory.
    const req = (url.protocol === 'https:' ? httpsRequest : httpRequest)(url, {
      method: 'POST',
      headers: { ...this.raw.headers, 'content-type': 'application/octet-stream', ...(length !== undefined ? { 'content-length': String(length) } : {}) },
    });
    const response = new Promise<IncomingMessage>((resolve, reject) => {
      req.once('response', resolve);
      req.once('error', reject);
    });
    response.catch(() => {});
    const sending = pipeline(body, req);
    sending.catch(() => {});
    // The server may refuse before the body is sent (413, 404): stop sending and report why.
    const first = await Promise.race([sending.then(() => 'sent' as const), response.then(() => 'answered' as const)]).catch(() => 'failed' as const);
    if (first === 'answered' && (await response).statusCode !== 200) {
      const refused = await toFetchResponse(await response);
      body.destroy();
      req.destroy();
      throw await errorFromResponse(refused);
    }
    if (first === 'failed') {
      const early = await Promise.race([response.catch(() => null), new Promise<null>((r) => setTimeout(() => r(null), 5000))]);
      if (early) throw await errorFromResponse(await toFetchResponse(early));
      await sending; // rethrows the transport error
    }
    await sending;
    const res = await toFetchResponse(await response);
    if (!res.ok) throw await errorFromResponse(res);
    return ((await res.json()) as { data: T }).data;
  }

  /**
   * Writes many files under `dir` in one request (a tar stream the agent extracts): `files` maps
   * names relative to `dir` (`a.txt`, `src/b.ts`; parent directories are created) to their
   * content. Each file appears whole; an entry the server refuses (an absolute name, `..`) fails
   * the call with InvalidInputError naming it, and entries before it stay written.
   */
  async writeMany(dir: string, files: Record<string, string | Uint8Array> | Iterable<[string, string | Uint8Array]>): Promise<UploadTarResult> {
    const entries = Symbol.iterator in files ? [...(files as Iterable<[string, string | Uint8Array]>)] : Object.entries(files);
    return this.uploadTar(dir, tarOf(entries));
  }

  /** Streams a tar stream (`tar -cf - …`) into `dir`: its entries are written under it as they arrive (see `writeMany`). */
  async uploadTar(dir: string, tar: UploadSource): Promise<UploadTarResult> {
    return this.#post<UploadTarResult>(`files/upload-tar?path=${encodeURIComponent(dir)}`, tar);
  }

  /** A file's bytes as a Node stream. */
  async download(path: string): Promise<Readable> {
    const url = new URL(`${this.raw.baseUrl}/api/sandboxes/${this.sandboxId}/files/download?path=${encodeURIComponent(path)}`);
    const res = await new Promise<IncomingMessage>((resolve, reject) => {
      const req = (url.protocol === 'https:' ? httpsRequest : httpRequest)(url, { headers: this.raw.headers }, resolve);
      req.once('error', reject);
      req.end();
    });
    if (res.statusCode !== 200) throw await errorFromResponse(await toFetchResponse(res));
    return res;
  }

  remove(path: string): Promise<FileOpResult> {
    return this.trpc.files.delete.mutate({ id: this.sandboxId, path });
  }
  mkdir(path: string): Promise<FileOpResult> {
    return this.trpc.files.mkdir.mutate({ id: this.sandboxId, path });
  }
  create(path: string, content = ''): Promise<FileOpResult> {
    return this.trpc.files.create.mutate({ id: this.sandboxId, path, content });
  }
  copy(from: string, to: string): Promise<FileOpResult> {
    return this.trpc.files.copy.mutate({ id: this.sandboxId, from, to });
  }
  move(from: string, to: string): Promise<FileOpResult> {
    return this.trpc.files.move.mutate({ id: this.sandboxId, from, to });
  }
  chmod(path: string, mode: string): Promise<FileOpResult> {
    return this.trpc.files.chmod.mutate({ id: this.sandboxId, path, mode });
  }
  du(path: string): Promise<DiskUsageResult> {
    return this.trpc.files.du.query({ id: this.sandboxId, path });
  }
  head(path: string, lines = 10): Promise<HeadTailResult> {
    return this.trpc.files.headTail.query({ id: this.sandboxId, path, lines, head: true });
  }
  tail(path: string, lines = 10): Promise<HeadTailResult> {
    return this.trpc.files.headTail.query({ id: this.sandboxId, path, lines, head: false });
  }
  search(path: string, pattern: string): Promise<SearchResult> {
    return this.trpc.files.search.query({ id: this.sandboxId, path, pattern });
  }
  compress(path: string, format: ArchiveFormat = 'tar.gz'): Promise<ArchiveResult> {
    return this.trpc.files.compress.mutate({ id: this.sandboxId, path, format });
  }
  extract(archive: string, dest: string): Promise<ExtractResult> {
    return this.trpc.files.extract.mutate({ id: this.sandboxId, archive, dest });
  }

  /**
   * File events under `path` as an async iterator (break out of the loop to stop), or with a
   * callback: `watch(path, cb)` returns a function that stops watching.
   */
  watch(path: string, options?: { recursive?: boolean; ignoreHidden?: boolean }): AsyncGenerator<WatchMessage>;
  watch(path: string, callback: (event: WatchMessage) => void, options?: { recursive?: boolean; ignoreHidden?: boolean }): () => void;
  watch(
    path: string,
    callbackOrOptions?: ((event: WatchMessage) => void) | { recursive?: boolean; ignoreHidden?: boolean },
    maybeOptions: { recursive?: boolean; ignoreHidden?: boolean } = {},
  ): AsyncGenerator<WatchMessage> | (() => void) {
    const options = typeof callbackOrOptions === 'function' ? maybeOptions : (callbackOrOptions ?? {});
    const input = { id: this.sandboxId, path, recursive: options.recursive ?? false, ignoreHidden: options.ignoreHidden ?? true };
    if (typeof callbackOrOptions === 'function') {
      const sub = this.trpc.files.watch.subscribe(input, { onData: (e) => callbackOrOptions(e.data) });
      return () => sub.unsubscribe();
    }
    const trpc = this.trpc;
    return (async function* () {
      for await (const e of iterateSubscription<{ id: string; data: WatchMessage }>((h) => trpc.files.watch.subscribe(input, h))) yield e.data;
    })();
  }
}

/** A finished node:http response as a fetch Response (for the shared error mapping). */
async function toFetchResponse(res: IncomingMessage): Promise<Response> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  return new Response(Buffer.concat(chunks), { status: res.statusCode ?? 500, headers: { 'content-type': String(res.headers['content-type'] ?? '') } });
}

/** One tar header block (ustar); a name over 100 bytes goes in a PAX header before it. */
function tarHeader(name: string, size: number, type: '0' | 'x'): Buffer {
  const block = Buffer.alloc(512);
  block.write(name.length <= 100 ? name : name.slice(0, 100), 0, 100, 'utf8');
  block.write('0000644\0', 100, 'ascii');
  block.write('0000000\0', 108, 'ascii');
  block.write('0000000\0', 116, 'ascii');
  block.write(`${size.toString(8).padStart(11, '0')}\0`, 124, 'ascii');
  block.write(`${Math.floor(Date.now() / 1000).toString(8).padStart(11, '0')}\0`, 136, 'ascii');
  block.write('        ', 148, 'ascii');
  block.write(type, 156, 'ascii');
  block.write('ustar\0', 257, 'ascii');
  block.write('00', 263, 'ascii');
  let sum = 0;
  for (const b of block) sum += b;
  block.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'ascii');
  return block;
}

/** Zero bytes that pad `size` to a whole 512-byte block. */
function padding(size: number): Buffer {
  return Buffer.alloc((512 - (size % 512)) % 512);
}

/** A PAX record `<len> path=<name>\n`, whose length counts itself. */
function paxPath(name: string): Buffer {
  const rest = ` path=${name}\n`;
  let len = Buffer.byteLength(rest) + 1;
  while (String(len).length + Buffer.byteLength(rest) !== len) len = String(len).length + Buffer.byteLength(rest);
  return Buffer.from(`${len}${rest}`);
}

/** An uncompressed tar stream of regular files, in memory. */
function tarOf(entries: Array<[string, string | Uint8Array]>): Buffer {
  const parts: Buffer[] = [];
  for (const [name, content] of entries) {
    const data = typeof content === 'string' ? Buffer.from(content) : Buffer.from(content.buffer, content.byteOffset, content.byteLength);
    if (Buffer.byteLength(name) > 100) {
      const pax = paxPath(name);
      parts.push(tarHeader('PaxHeader', pax.length, 'x'), pax, padding(pax.length));
    }
    parts.push(tarHeader(name, data.length, '0'), data, padding(data.length));
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}
