import type { Readable } from 'node:stream';
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
import { FileNotFoundError } from './errors.js';
import { nodeModules } from './runtime.js';
import { fetchGet, nodeGet, postBytes, transportFor, type Transport } from './transfer.js';
import { iterateSubscription } from '../shared/subscription-iterator.js';

/** What `files` needs to reach the raw byte routes. */
export interface RawHttp {
  baseUrl: string;
  headers: Record<string, string>;
  /** Transfers go through this `fetch` (and never through node:http) when given. */
  fetch?: typeof globalThis.fetch;
}

/**
 * What an upload sends. Everywhere: a string (UTF-8), bytes (`Uint8Array`, Node's `Buffer`,
 * `ArrayBuffer`), a `Blob`/`File`, a fetch `Response` (its body), a `ReadableStream` or any async
 * iterable of bytes. Where Node's modules exist, also a Node `Readable` and `{ path }`, a local file.
 */
export type UploadSource = Buffer | Uint8Array | ArrayBuffer | string | Blob | Response | ReadableStream<Uint8Array> | Readable | AsyncIterable<Uint8Array> | { path: string };

/**
 * The files of one sandbox. Bytes go through the raw upload/download routes as streams (nothing
 * is held whole in memory); everything else through the typed tRPC router.
 */
export class SandboxFiles {
  readonly #transport: Transport;

  constructor(
    private readonly trpc: TRPCClient<AppRouter>,
    private readonly raw: RawHttp,
    private readonly sandboxId: string,
  ) {
    this.#transport = transportFor(raw.fetch);
  }

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

  /**
   * A file's content: a Buffer where the runtime has Buffer (Node, Bun, Deno), else a Uint8Array
   * (streamed, then joined; use `download`/`downloadStream` for big files).
   */
  async read(path: string): Promise<Buffer> {
    if (this.#transport.kind === 'fetch') {
      const bytes = new Uint8Array(await (await fetchGet(this.#transport.fetch, this.#url('files/download', path), this.raw.headers)).arrayBuffer());
      return (typeof Buffer === 'function' ? Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength) : bytes) as Buffer;
    }
    const chunks: Buffer[] = [];
    for await (const chunk of await this.download(path)) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  }

  /** A file's content as text (UTF-8). */
  async readText(path: string): Promise<string> {
    return new TextDecoder().decode(await this.read(path));
  }

  /** Writes a whole file (replacing it atomically); parent directories are created. */
  write(path: string, data: UploadSource): Promise<UploadResult> {
    return this.upload(path, data);
  }

  /** Streams data into a file; the file appears only when all of it arrived. */
  async upload(path: string, source: UploadSource): Promise<UploadResult> {
    return postBytes<UploadResult>(this.#transport, this.#url('files/upload', path), this.raw.headers, source);
  }

  /** The sandbox's raw route `route` with `?path=`. */
  #url(route: string, path: string): URL {
    return new URL(`${this.raw.baseUrl}/api/sandboxes/${this.sandboxId}/${route}?path=${encodeURIComponent(path)}`);
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
    return postBytes<UploadTarResult>(this.#transport, this.#url('files/upload-tar', dir), this.raw.headers, tar);
  }

  /** A file's bytes as a Node stream (Node, Bun, Deno; in a browser use `downloadStream`). */
  async download(path: string): Promise<Readable> {
    if (this.#transport.kind === 'node') return nodeGet(this.#transport.node, this.#url('files/download', path), this.raw.headers);
    const node = nodeModules();
    if (!node) throw new TypeError('download() gives a Node stream, and this runtime has none: use downloadStream()');
    const body = (await fetchGet(this.#transport.fetch, this.#url('files/download', path), this.raw.headers)).body;
    return body ? node.stream.Readable.fromWeb(body as never) : node.stream.Readable.from([]);
  }

  /** A file's bytes as a web `ReadableStream`, fetched (every runtime, browsers too). */
  async downloadStream(path: string): Promise<ReadableStream<Uint8Array>> {
    const fetchFn = this.#transport.kind === 'fetch' ? this.#transport.fetch : globalThis.fetch;
    const res = await fetchGet(fetchFn, this.#url('files/download', path), this.raw.headers);
    return res.body ?? new Blob([]).stream();
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

const utf8 = new TextEncoder();

/** One tar header block (ustar); a name over 100 bytes goes in a PAX header before it. */
function tarHeader(name: string, size: number, type: '0' | 'x'): Uint8Array {
  const block = new Uint8Array(512);
  const put = (text: string, offset: number, max = text.length) => block.set(utf8.encode(text).subarray(0, max), offset);
  put(name, 0, 100);
  put('0000644\0', 100);
  put('0000000\0', 108);
  put('0000000\0', 116);
  put(`${size.toString(8).padStart(11, '0')}\0`, 124);
  put(`${Math.floor(Date.now() / 1000).toString(8).padStart(11, '0')}\0`, 136);
  put('        ', 148);
  put(type, 156);
  put('ustar\0', 257);
  put('00', 263);
  let sum = 0;
  for (const b of block) sum += b;
  put(`${sum.toString(8).padStart(6, '0')}\0 `, 148);
  return block;
}

/** Zero bytes that pad `size` to a whole 512-byte block. */
function padding(size: number): Uint8Array {
  return new Uint8Array((512 - (size % 512)) % 512);
}

/** A PAX record `<len> path=<name>\n`, whose length counts itself. */
function paxPath(name: string): Uint8Array {
  const rest = utf8.encode(` path=${name}\n`).byteLength;
  let len = rest + 1;
  while (String(len).length + rest !== len) len = String(len).length + rest;
  return utf8.encode(`${len} path=${name}\n`);
}

/** An uncompressed tar stream of regular files, in memory. */
function tarOf(entries: Array<[string, string | Uint8Array]>): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const [name, content] of entries) {
    const data = typeof content === 'string' ? utf8.encode(content) : content;
    if (utf8.encode(name).byteLength > 100) {
      const pax = paxPath(name);
      parts.push(tarHeader('PaxHeader', pax.length, 'x'), pax, padding(pax.length));
    }
    parts.push(tarHeader(name, data.length, '0'), data, padding(data.length));
  }
  parts.push(new Uint8Array(1024));
  const tar = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let offset = 0;
  for (const p of parts) {
    tar.set(p, offset);
    offset += p.byteLength;
  }
  return tar;
}
