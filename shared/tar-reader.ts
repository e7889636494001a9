/**
 * A streaming tar reader for archives from untrusted senders (the agent's tar uploads, the server's
 * OCI image imports): headers are checked (checksum, octal or GNU base-256 numbers), PAX and GNU
 * long names are applied, and nothing beyond the current header or body chunk is held in memory.
 * It only reads: what an entry may be and where it may go is the caller's policy.
 */

/** The largest PAX or GNU long-name header accepted (bytes). */
const MAX_META_BYTES = 64 * 1024;
/**
 * Metadata headers (PAX, global PAX, GNU long names) before one entry: real tars write one or two;
 * past this a stream of them (which are never entries, so no entry count sees them) is refused.
 */
const MAX_META_HEADERS = 16;
const BLOCK = 512;

/** Makes the error a malformed stream is reported with (each side's 400). */
export type TarFail = (message: string) => Error;

/** One entry's header, with PAX and GNU long names and PAX numbers already applied. */
export interface TarEntry {
  name: string;
  /** The link target of a symbolic or hard link ('' for other entries). */
  linkName: string;
  /** The typeflag character: '0'/'\0'/'7' file, '5' directory, '2' symlink, '1' hard link, '3'/'4' devices, 'S' GNU sparse, … */
  type: string;
  /** The body's size as declared; not read yet when the entry is handed out. */
  size: number;
  /** Permission bits with setuid/setgid/sticky (0o7777). */
  mode: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch (PAX may give a fraction). */
  mtime: number;
  /** The entry's own PAX records (empty when it had none). */
  pax: ReadonlyMap<string, string>;
}

/** A regular file's typeflag: '0', '\0' (old tars) or '7' (contiguous file, read as a regular one). */
export function isTarFileType(type: string): boolean {
  return type === '0' || type === '\0' || type === '7';
}

/** Reads a stream as exact byte counts, chunk by chunk (nothing beyond what is asked is held). */
class ByteReader {
  readonly #it: AsyncIterator<Buffer>;
  readonly #fail: TarFail;
  readonly #max: number;
  readonly #limit: string;
  #buf: Buffer = Buffer.alloc(0);
  #done = false;
  /** Bytes taken from the stream so far (headers, bodies read or skipped, padding). */
  pulled = 0;

  constructor(stream: AsyncIterable<Buffer>, fail: TarFail, max: number, limit: string) {
    this.#it = stream[Symbol.asyncIterator]();
    this.#fail = fail;
    this.#max = max;
    this.#limit = limit;
  }

  async #fill(): Promise<boolean> {
    if (this.#done) return false;
    const next = await this.#it.next();
    if (next.done) {
      this.#done = true;
      return false;
    }
    this.pulled += next.value.length;
    if (this.pulled > this.#max) throw this.#fail(`The tar stream is longer than ${this.#max} bytes (headers, metadata and bodies together${this.#limit ? `; ${this.#limit}` : ''}); refusing it`);
    this.#buf = this.#buf.length === 0 ? next.value : Buffer.concat([this.#buf, next.value]);
    return true;
  }

  #truncated(): Error {
    return this.#fail('The tar stream ended in the middle of an entry (a truncated upload?)');
  }

  /** Exactly `n` bytes, or null at a clean end before any of them. */
  async exactly(n: number): Promise<Buffer | null> {
    while (this.#buf.length < n) {
      if (!(await this.#fill())) {
        if (this.#buf.length === 0) return null;
        throw this.#truncated();
      }
    }
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }

  /** Up to `max` bytes available now (at least one). */
  async some(max: number): Promise<Buffer> {
    if (this.#buf.length === 0 && !(await this.#fill())) throw this.#truncated();
    const n = Math.min(max, this.#buf.length);
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }

  /** Drops `n` bytes, reading (not holding) them. */
  async skip(n: number): Promise<void> {
    for (let left = n; left > 0; ) left -= (await this.some(Math.min(left, 1024 * 1024))).length;
  }

  /** Reads what is left of the stream and drops it (the sender then reads the answer, not a reset). */
  async drain(): Promise<void> {
    this.#buf = Buffer.alloc(0);
    while (!this.#done) {
      const next = await this.#it.next().catch(() => ({ done: true as const, value: undefined }));
      if (next.done) this.#done = true;
    }
  }
}

function cstring(block: Buffer, start: number, length: number): string {
  const field = block.subarray(start, start + length);
  const end = field.indexOf(0);
  return field.subarray(0, end === -1 ? field.length : end).toString('utf8');
}

/** PAX records (`<len> key=value\n`) as a map. */
function paxRecords(data: Buffer, fail: TarFail): Map<string, string> {
  const out = new Map<string, string>();
  let i = 0;
  while (i < data.length) {
    const space = data.indexOf(0x20, i);
    if (space === -1) break;
    const len = Number(data.subarray(i, space).toString('ascii'));
    if (!Number.isInteger(len) || len <= 0 || i + len > data.length) throw fail('Malformed PAX header in the tar stream');
    const record = data.subarray(space + 1, i + len - 1).toString('utf8');
    const eq = record.indexOf('=');
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    i += len;
  }
  return out;
}

/**
 * Reads a tar stream entry by entry: `next()` hands out each header (metadata entries — PAX, GNU
 * long names — are applied, not handed out), `read()` the current entry's body; whatever of a body
 * is not read is skipped by the next `next()`. Errors are made by `fail`, so each caller reports a
 * malformed archive as its own 400.
 */
export class TarReader {
  readonly #bytes: ByteReader;
  readonly #fail: TarFail;
  /** Body bytes of the current entry not read yet, then its padding. */
  #left = 0;
  #padding = 0;

  /**
   * `maxBytes`: the most the reader takes from `stream` (every byte: headers, metadata, bodies read
   * or skipped); past it the stream is refused. A gzip stream unpacked into `stream` is then bounded
   * in what it costs to unpack, not only in what was sent. `limit` says where the bound comes from (in the refusal).
   */
  constructor(stream: AsyncIterable<Buffer>, fail: TarFail, opts: { maxBytes?: number; limit?: string } = {}) {
    this.#bytes = new ByteReader(stream, fail, opts.maxBytes ?? Infinity, opts.limit ?? '');
    this.#fail = fail;
  }

  /** Bytes taken from the stream so far. */
  get bytesRead(): number {
    return this.#bytes.pulled;
  }

  /** A numeric header field: octal text, or GNU base-256 (sizes over 8 GiB). */
  #numeric(block: Buffer, start: number, length: number): number {
    if (block[start]! & 0x80) {
      let value = 0;
      for (let i = start + 1; i < start + length; i++) value = value * 256 + block[i]!;
      return value;
    }
    const text = cstring(block, start, length).trim();
    if (!/^[0-7]*$/.test(text)) throw this.#fail(`Not a tar stream: a header field holds ${JSON.stringify(text.slice(0, 20))} where an octal number belongs`);
    return text ? parseInt(text, 8) : 0;
  }

  #checksumOk(block: Buffer): boolean {
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : block[i]!;
    return sum === this.#numeric(block, 148, 8);
  }

  /** A PAX number (`size`, `uid`, `mtime` may be fractional) or the header's. */
  #paxNumber(pax: Map<string, string>, key: string, fallback: number, fraction = false): number {
    const text = pax.get(key);
    if (text === undefined) return fallback;
    const value = Number(text);
    if (!(fraction ? /^-?\d+(\.\d+)?$/ : /^\d+$/).test(text) || !Number.isSafeInteger(Math.trunc(value))) throw this.#fail(`Malformed tar header: PAX ${key}=${JSON.stringify(text.slice(0, 30))} is not a number`);
    return value;
  }

  /** The next entry's header, or null at the end of the archive (or a bare end of the stream). */
  async next(): Promise<TarEntry | null> {
    await this.#bytes.skip(this.#left + this.#padding);
    this.#left = this.#padding = 0;
    let longName: string | undefined;
    let longLink: string | undefined;
    let pax = new Map<string, string>();
    for (let meta = 0; ; meta++) {
      const header = await this.#bytes.exactly(BLOCK);
      if (!header || header.every((b) => b === 0)) return null; // the end-of-archive blocks (or a bare end)
      if (!this.#checksumOk(header)) throw this.#fail('Not a tar stream: a header block has a wrong checksum (send an uncompressed tar)');
      const type = String.fromCharCode(header[156]!);
      const size = this.#paxNumber(pax, 'size', this.#numeric(header, 124, 12));
      if (!Number.isSafeInteger(size) || size < 0) throw this.#fail('Malformed tar header: bad entry size');
      const padded = Math.ceil(size / BLOCK) * BLOCK;
      if (type === 'x' || type === 'g' || type === 'L' || type === 'K') {
        if (meta >= MAX_META_HEADERS) throw this.#fail(`More than ${MAX_META_HEADERS} metadata headers (PAX or GNU long names) in a row, before one entry; refusing the stream`);
        if (size > MAX_META_BYTES) throw this.#fail(`A tar metadata header of ${size} bytes is larger than ${MAX_META_BYTES}`);
        const data = (await this.#bytes.exactly(padded)) ?? Buffer.alloc(0);
        const body = data.subarray(0, size);
        if (type === 'x') pax = paxRecords(body, this.#fail);
        else if (type === 'L') longName = cstring(body, 0, body.length);
        else if (type === 'K') longLink = cstring(body, 0, body.length);
        continue; // 'g' (global PAX) holds nothing a reader here needs
      }
      const prefix = header.subarray(257, 262).toString('ascii') === 'ustar' ? cstring(header, 345, 155) : '';
      const name = pax.get('path') ?? longName ?? (prefix ? `${prefix}/${cstring(header, 0, 100)}` : cstring(header, 0, 100));
      this.#left = size;
      this.#padding = padded - size;
      return {
        name,
        linkName: pax.get('linkpath') ?? longLink ?? cstring(header, 157, 100),
        type,
        size,
        mode: this.#numeric(header, 100, 8) & 0o7777,
        uid: this.#paxNumber(pax, 'uid', this.#numeric(header, 108, 8)),
        gid: this.#paxNumber(pax, 'gid', this.#numeric(header, 116, 8)),
        mtime: this.#paxNumber(pax, 'mtime', this.#numeric(header, 136, 12), true),
        pax,
      };
    }
  }

  /** Up to `max` bytes of the current entry's body (at least one), or null once it was read whole. */
  async read(max = 1024 * 1024): Promise<Buffer | null> {
    if (this.#left === 0) return null;
    const chunk = await this.#bytes.some(Math.min(max, this.#left));
    this.#left -= chunk.length;
    return chunk;
  }

  /** Reads what is left of the stream and drops it (the sender then reads the answer, not a reset). */
  drain(): Promise<void> {
    this.#left = this.#padding = 0;
    return this.#bytes.drain();
  }
}
