import { randomBytes } from 'node:crypto';
import { closeSync, lstatSync, mkdirSync, openSync, renameSync, rmSync, symlinkSync, writeSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import { basename, dirname, join, normalize } from 'node:path';
import { isTarFileType, TarReader } from '../../../shared/tar-reader.js';
import { AgentError, fsError } from '../../errors.js';
import { checkEntries } from './archive.js';
import { resolveInSandbox } from './paths.js';

/** The most entries one tar upload may hold. */
export const TAR_UPLOAD_MAX_ENTRIES = 200_000;
/** The longest entry name or link target accepted (bytes). */
const MAX_NAME_BYTES = 4096;

/** What a tar upload wrote. */
export interface TarUploadResult {
  path: string;
  files: number;
  directories: number;
  symlinks: number;
  size: number;
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
  const reader = new TarReader(req as AsyncIterable<Buffer>, (message) => new AgentError('BAD_REQUEST', message));
  try {
    return await extractEntries(reader, dest);
  } catch (err) {
    await reader.drain();
    throw err;
  }
}

async function extractEntries(reader: TarReader, dest: string): Promise<TarUploadResult> {
  const result: TarUploadResult = { path: dest, files: 0, directories: 0, symlinks: 0, size: 0 };
  const madeDirs = new Set<string>([dest]);
  let entries = 0;
  for (let entry = await reader.next(); entry; entry = await reader.next()) {
    if (++entries > TAR_UPLOAD_MAX_ENTRIES) throw new AgentError('BAD_REQUEST', `The tar upload has more than ${TAR_UPLOAD_MAX_ENTRIES} entries; split it`);
    const { name, linkName: target, type, size } = entry;
    if (Buffer.byteLength(name) > MAX_NAME_BYTES || Buffer.byteLength(target) > MAX_NAME_BYTES) {
      throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(name.slice(0, 200))} has a name or link target over ${MAX_NAME_BYTES} bytes; refusing to extract`);
    }
    const kind = isTarFileType(type) ? 'file' : type === '5' ? 'dir' : type === '2' ? 'symlink' : type === '1' ? 'hardlink' : 'other';
    if (kind === 'hardlink') throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(name)} is a hard link; refusing to extract (send the file itself)`);
    checkEntries([{ name, type: kind, target }], dest);
    const path = normalize(join(dest, name));
    const mode = entry.mode & 0o777;
    if (kind === 'dir') {
      if (path !== dest) ensureDir(path, madeDirs, name, mode || 0o755);
      result.directories++;
    } else if (kind === 'symlink') {
      ensureDir(dirname(path), madeDirs, name);
      replaceWith(path, name, (temp) => symlinkSync(target, temp));
      result.symlinks++;
    } else {
      ensureDir(dirname(path), madeDirs, name);
      await writeEntry(reader, path, name, mode || 0o644);
      result.files++;
      result.size += size;
    }
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

/** Writes the current entry's content from `reader` to `path` (temporary file, then rename). */
async function writeEntry(reader: TarReader, path: string, entry: string, mode: number): Promise<void> {
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
      for (let chunk = await reader.read(); chunk; chunk = await reader.read()) {
        for (let off = 0; off < chunk.length; ) off += writeSync(fd, chunk, off, chunk.length - off);
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
