import { randomBytes } from 'node:crypto';
import { closeSync, lstatSync, mkdirSync, openSync, renameSync, rmSync, symlinkSync, writeSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import { basename, dirname, join, normalize } from 'node:path';
import { AgentError, fsError } from '../../errors.js';
import { checkEntries } from './archive.js';
import { resolveInSandbox } from './paths.js';

/** The most entries one tar upload may hold. */
export const TAR_UPLOAD_MAX_ENTRIES = 200_000;
/** The longest entry name or link target accepted (bytes). */
const MAX_NAME_BYTES = 4096;
/** The largest PAX or GNU long-name header accepted (bytes). */
const MAX_META_BYTES = 64 * 1024;
const BLOCK = 512;

/** What a tar upload wrote. */
export interface TarUploadResult {
  path: string;
  files: number;
  directories: number;
  symlinks: number;
  size: number;
}

/** Reads a stream as exact byte counts, chunk by chunk (nothing beyond what is asked is held). */
class ByteReader {
  readonly #it: AsyncIterator<Buffer>;
  #buf: Buffer = Buffer.alloc(0);
  #done = false;

  constructor(stream: AsyncIterable<Buffer>) {
    this.#it = stream[Symbol.asyncIterator]();
  }

  async #fill(): Promise<boolean> {
    if (this.#done) return false;
    const next = await this.#it.next();
    if (next.done) {
      this.#done = true;
      return false;
    }
    this.#buf = this.#buf.length === 0 ? next.value : Buffer.concat([this.#buf, next.value]);
    return true;
  }

  /** Exactly `n` bytes, or null at a clean end before any of them. */
  async exactly(n: number): Promise<Buffer | null> {
    while (this.#buf.length < n) {
      if (!(await this.#fill())) {
        if (this.#buf.length === 0) return null;
        throw new AgentError('BAD_REQUEST', 'The tar stream ended in the middle of an entry (a truncated upload?)');
      }
    }
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }

  /** Reads what is left of the stream and drops it (the sender then reads the answer, not a reset). */
  async drain(): Promise<void> {
    this.#buf = Buffer.alloc(0);
    while (!this.#done) {
      const next = await this.#it.next().catch(() => ({ done: true as const, value: undefined }));
      if (next.done) this.#done = true;
    }
  }

  /** Up to `max` bytes available now (at least one), for streaming an entry's content. */
  async some(max: number): Promise<Buffer> {
    if (this.#buf.length === 0 && !(await this.#fill())) throw new AgentError('BAD_REQUEST', 'The tar stream ended in the middle of an entry (a truncated upload?)');
    const n = Math.min(max, this.#buf.length);
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }
}

function cstring(block: Buffer, start: number, length: number): string {
  const field = block.subarray(start, start + length);
  const end = field.indexOf(0);
  return field.subarray(0, end === -1 ? field.length : end).toString('utf8');
}

/** A numeric header field: octal text, or GNU base-256 (sizes over 8 GiB). */
function numeric(block: Buffer, start: number, length: number): number {
  if (block[start]! & 0x80) {
    let value = 0;
    for (let i = start + 1; i < start + length; i++) value = value * 256 + block[i]!;
    return value;
  }
  const text = cstring(block, start, length).trim();
  if (!/^[0-7]*$/.test(text)) throw new AgentError('BAD_REQUEST', `Not a tar stream: a header field holds ${JSON.stringify(text.slice(0, 20))} where an octal number belongs`);
  return text ? parseInt(text, 8) : 0;
}

function checksumOk(block: Buffer): boolean {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : block[i]!;
  return sum === numeric(block, 148, 8);
}

/** PAX records (`<len> key=value\n`) as a map. */
function paxRecords(data: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  let i = 0;
  while (i < data.length) {
    const space = data.indexOf(0x20, i);
    if (space === -1) break;
    const len = Number(data.subarray(i, space).toString('ascii'));
    if (!Number.isInteger(len) || len <= 0 || i + len > data.length) throw new AgentError('BAD_REQUEST', 'Malformed PAX header in the tar stream');
    const record = data.subarray(space + 1, i + len - 1).toString('utf8');
    const eq = record.indexOf('=');
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    i += len;
  }
  return out;
}

/**
 * Extracts a tar stream (the body of `req`) under `destInput`, entry by entry as it arrives:
 * regular files (each written to a temporary file and renamed into place, so each appears whole),
 * directories, and symbolic links that stay inside the destination. Refused with a 400 naming the
 * entry, before anything of it is written: absolute names, `..`, a path through a symbolic link,
 * links leading outside, hard links, devices and other special files, names over 4096 bytes, more
 * than TAR_UPLOAD_MAX_ENTRIES entries. Entries before a refused one stay written.
 */
export async function extractTarUpload(req: IncomingMessage, destInput: string): Promise<TarUploadResult> {
  const dest = resolveInSandbox(destInput);
  try {
    mkdirSync(dest, { recursive: true });
  } catch (err) {
    throw fsError(err, dest);
  }
  const reader = new ByteReader(req as AsyncIterable<Buffer>);
  try {
    return await extractEntries(reader, dest);
  } catch (err) {
    await reader.drain();
    throw err;
  }
}

async function extractEntries(reader: ByteReader, dest: string): Promise<TarUploadResult> {
  const result: TarUploadResult = { path: dest, files: 0, directories: 0, symlinks: 0, size: 0 };
  const madeDirs = new Set<string>([dest]);
  let longName: string | undefined;
  let longLink: string | undefined;
  let pax = new Map<string, string>();
  let entries = 0;
  for (;;) {
    const header = await reader.exactly(BLOCK);
    if (!header || header.every((b) => b === 0)) break; // the end-of-archive blocks (or a bare end)
    if (!checksumOk(header)) throw new AgentError('BAD_REQUEST', 'Not a tar stream: a header block has a wrong checksum (send an uncompressed tar)');
    if (++entries > TAR_UPLOAD_MAX_ENTRIES) throw new AgentError('BAD_REQUEST', `The tar upload has more than ${TAR_UPLOAD_MAX_ENTRIES} entries; split it`);
    const type = String.fromCharCode(header[156]!);
    const size = Number(pax.get('size') ?? numeric(header, 124, 12));
    if (!Number.isSafeInteger(size) || size < 0) throw new AgentError('BAD_REQUEST', 'Malformed tar header: bad entry size');
    const padded = Math.ceil(size / BLOCK) * BLOCK;
    if (type === 'x' || type === 'g' || type === 'L' || type === 'K') {
      if (size > MAX_META_BYTES) throw new AgentError('BAD_REQUEST', `A tar metadata header of ${size} bytes is larger than ${MAX_META_BYTES}`);
      const data = (await reader.exactly(padded)) ?? Buffer.alloc(0);
      const body = data.subarray(0, size);
      if (type === 'x') pax = paxRecords(body);
      else if (type === 'L') longName = cstring(body, 0, body.length);
      else if (type === 'K') longLink = cstring(body, 0, body.length);
      continue; // 'g' (global PAX) holds nothing an upload needs
    }
    const prefix = header.subarray(257, 262).toString('ascii') === 'ustar' ? cstring(header, 345, 155) : '';
    const name = pax.get('path') ?? longName ?? (prefix ? `${prefix}/${cstring(header, 0, 100)}` : cstring(header, 0, 100));
    const target = pax.get('linkpath') ?? longLink ?? cstring(header, 157, 100);
    pax = new Map();
    longName = longLink = undefined;
    if (Buffer.byteLength(name) > MAX_NAME_BYTES || Buffer.byteLength(target) > MAX_NAME_BYTES) {
      throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(name.slice(0, 200))} has a name or link target over ${MAX_NAME_BYTES} bytes; refusing to extract`);
    }
    const kind = type === '0' || type === '\0' || type === '7' ? 'file' : type === '5' ? 'dir' : type === '2' ? 'symlink' : type === '1' ? 'hardlink' : 'other';
    if (kind === 'hardlink') throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(name)} is a hard link; refusing to extract (send the file itself)`);
    checkEntries([{ name, type: kind, target }], dest);
    const path = normalize(join(dest, name));
    const mode = numeric(header, 100, 8) & 0o777;
    if (kind === 'dir') {
      if (path !== dest) ensureDir(path, madeDirs, name, mode || 0o755);
      result.directories++;
    } else if (kind === 'symlink') {
      ensureDir(dirname(path), madeDirs, name);
      replaceWith(path, name, (temp) => symlinkSync(target, temp));
      result.symlinks++;
    } else {
      ensureDir(dirname(path), madeDirs, name);
      await writeEntry(reader, path, name, size, mode || 0o644);
      await reader.exactly(padded - size);
      result.files++;
      result.size += size;
      continue;
    }
    if (padded) await reader.exactly(padded);
  }
  return result;
}

/** Makes `dir` (and its parents) unless this upload already did; a file in the way is the entry's 400. */
function ensureDir(dir: string, made: Set<string>, entry: string, mode = 0o755): void {
  if (made.has(dir)) return;
  try {
    mkdirSync(dir, { recursive: true, mode });
    if (!lstatSync(dir).isDirectory()) throw Object.assign(new Error('not a directory'), { code: 'ENOTDIR' });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' || code === 'ENOTDIR') throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(entry)}: ${dir} exists and is not a directory`);
    throw fsError(err, dir);
  }
  made.add(dir);
}

/** Creates something at a temporary name beside `path` with `make`, then renames it over `path`. */
function replaceWith(path: string, entry: string, make: (temp: string) => void): void {
  const temp = join(dirname(path), `.${basename(path)}.upload-${randomBytes(6).toString('hex')}`);
  try {
    make(temp);
  } catch (err) {
    throw fsError(err, path);
  }
  commit(temp, path, entry);
}

/** Renames a finished temporary file over `path`; on failure removes it, with the entry's error. */
function commit(temp: string, path: string, entry: string): void {
  try {
    renameSync(temp, path);
  } catch (err) {
    rmSync(temp, { force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EISDIR' || code === 'ENOTEMPTY' || code === 'EEXIST') throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(entry)}: ${path} is a directory`);
    throw fsError(err, path);
  }
}

/** Writes an entry's `size` bytes of content from `reader` to `path` (temporary file, then rename). */
async function writeEntry(reader: ByteReader, path: string, entry: string, size: number, mode: number): Promise<void> {
  const temp = join(dirname(path), `.${basename(path)}.upload-${randomBytes(6).toString('hex')}`);
  let fd: number;
  try {
    fd = openSync(temp, 'wx', mode);
  } catch (err) {
    throw fsError(err, path);
  }
  try {
    try {
      // Blocking writes of at most 1 MiB at a time: page-cache writes of microseconds each.
      for (let left = size; left > 0; ) {
        const chunk = await reader.some(Math.min(left, 1024 * 1024));
        for (let off = 0; off < chunk.length; ) off += writeSync(fd, chunk, off, chunk.length - off);
        left -= chunk.length;
      }
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    rmSync(temp, { force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') throw new AgentError('PAYLOAD_TOO_LARGE', `No space left on the sandbox's disk: ${path} does not fit and was not written`);
    throw err instanceof AgentError ? err : fsError(err, path);
  }
  commit(temp, path, entry);
}
