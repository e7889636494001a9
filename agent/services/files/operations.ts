import { createReadStream, type Stats } from 'node:fs';
import { chmod, cp, lstat, mkdir, open, opendir, readdir, readlink, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { createInterface } from 'node:readline';
import type { DiskUsage, FileInfo, FileStats, FileType } from '../../../shared/schemas/files.js';
import { AgentError, fsError } from '../../errors.js';
import { globToRegExp, humanSize, modeString, resolveInSandbox } from './paths.js';

const MAX_SEARCH_MATCHES = 10_000;

function info(path: string, st: Stats): FileInfo {
  return {
    name: basename(path) || '/',
    path,
    size: st.size,
    mode: modeString(st.mode),
    isDir: st.isDirectory(),
    isSymlink: st.isSymbolicLink(),
    modTime: st.mtime.toISOString(),
  };
}

/** Runs a filesystem call, turning its errno into an AgentError that names `path`. */
async function fsCall<T>(path: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw fsError(err, path);
  }
}

export async function listDir(input: string): Promise<FileInfo[]> {
  const path = resolveInSandbox(input);
  const st = await fsCall(path, () => stat(path));
  if (!st.isDirectory()) throw new AgentError('BAD_REQUEST', `Not a directory: ${path}`);
  const names = await fsCall(path, () => readdir(path));
  const entries = await Promise.all(
    names.map(async (name) => {
      const full = join(path, name);
      try {
        return info(full, await lstat(full));
      } catch {
        return null; // vanished between readdir and lstat
      }
    }),
  );
  return entries.filter((e): e is FileInfo => e !== null).sort((a, b) => a.name.localeCompare(b.name));
}

/**
 * A path's stats. A path under a regular file (ENOTDIR) does not exist: FILE_NOT_FOUND, as for
 * a missing one, so `exists` answers false for it.
 */
export async function statPath(input: string): Promise<FileStats> {
  const path = resolveInSandbox(input);
  const st = await lstat(path).catch((err: NodeJS.ErrnoException) => {
    throw err.code === 'ENOTDIR' ? new AgentError('NOT_FOUND', `No such file or directory: ${path}`) : fsError(err, path);
  });
  return { ...info(path, st), uid: st.uid, gid: st.gid, linkTarget: st.isSymbolicLink() ? await readlink(path) : null, type: fileType(st) };
}

/** The file's type as `stat -c %F` names it. */
function fileType(st: Stats): FileType {
  if (st.isFile()) return st.size === 0 ? 'regular empty file' : 'regular file';
  if (st.isDirectory()) return 'directory';
  if (st.isSymbolicLink()) return 'symbolic link';
  if (st.isFIFO()) return 'fifo';
  if (st.isSocket()) return 'socket';
  return st.isCharacterDevice() ? 'character special file' : 'block special file';
}

export async function removePath(input: string): Promise<string> {
  const path = resolveInSandbox(input);
  if (path === '/') throw new AgentError('BAD_REQUEST', 'Refusing to delete /');
  await fsCall(path, () => lstat(path));
  await fsCall(path, () => rm(path, { recursive: true, force: false }));
  return path;
}

export async function makeDir(input: string): Promise<string> {
  const path = resolveInSandbox(input);
  const existing = await lstat(path).catch(() => null);
  if (existing && !existing.isDirectory()) throw new AgentError('CONFLICT', `A file (not a directory) already exists at ${path}`);
  await fsCall(path, () => mkdir(path, { recursive: true }));
  return path;
}

export async function createFile(input: string, content: string): Promise<string> {
  const path = resolveInSandbox(input);
  await fsCall(path, () => writeFile(path, content));
  return path;
}

export async function copyPath(fromInput: string, toInput: string): Promise<string> {
  const from = resolveInSandbox(fromInput);
  const to = resolveInSandbox(toInput);
  await fsCall(from, () => lstat(from));
  await fsCall(to, () => cp(from, to, { recursive: true, force: true, errorOnExist: false, verbatimSymlinks: true, preserveTimestamps: true }));
  return to;
}

export async function movePath(fromInput: string, toInput: string): Promise<string> {
  const from = resolveInSandbox(fromInput);
  const to = resolveInSandbox(toInput);
  await fsCall(from, () => lstat(from));
  try {
    await rename(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw fsError(err, to);
    // Across filesystems (e.g. into /tmp on another mount): copy, then remove the source.
    await fsCall(to, () => cp(from, to, { recursive: true, verbatimSymlinks: true, preserveTimestamps: true }));
    await fsCall(from, () => rm(from, { recursive: true }));
  }
  return to;
}

export async function changeMode(input: string, mode: string): Promise<string> {
  const path = resolveInSandbox(input);
  await fsCall(path, () => chmod(path, parseInt(mode, 8)));
  return path;
}

/** Disk usage as `du -s` counts it: allocated blocks of every file under `path`, hard links once. */
export async function diskUsage(input: string): Promise<DiskUsage> {
  const path = resolveInSandbox(input);
  const seen = new Set<string>();
  let total = 0;
  const walk = async (p: string): Promise<void> => {
    let st: Stats;
    try {
      st = await lstat(p);
    } catch (err) {
      if (p === path) throw fsError(err, path);
      return;
    }
    const key = `${st.dev}:${st.ino}`;
    if (seen.has(key)) return;
    seen.add(key);
    total += st.blocks * 512;
    if (st.isDirectory()) {
      const dir = await opendir(p).catch(() => null);
      if (dir) for await (const e of dir) await walk(join(p, e.name));
    }
  };
  await walk(path);
  return { path, size: total, humanReadable: humanSize(total) };
}

/** The first or last `lines` lines of a file, read without loading the whole file. */
export async function headTail(input: string, lines: number, head: boolean): Promise<{ path: string; content: string; lines: number }> {
  const path = resolveInSandbox(input);
  const st = await fsCall(path, () => stat(path));
  if (st.isDirectory()) throw new AgentError('BAD_REQUEST', `Is a directory: ${path}`);
  if (head) {
    const out: string[] = [];
    const input = createReadStream(path);
    const rl = createInterface({ input, crlfDelay: Infinity });
    try {
      for await (const line of rl) {
        out.push(line);
        if (out.length >= lines) break;
      }
    } finally {
      rl.close();
      input.destroy();
    }
    return { path, content: out.length ? out.join('\n') + '\n' : '', lines: out.length };
  }
  // Tail: read backwards in blocks until enough newlines are seen.
  const fh = await fsCall(path, () => open(path, 'r'));
  try {
    const block = 64 * 1024;
    let pos = st.size;
    let chunks: Buffer[] = [];
    let newlines = 0;
    const trailing = st.size > 0 ? 1 : 0; // a final newline ends the last line, it doesn't start one
    while (pos > 0 && newlines <= lines - 1 + trailing) {
      const size = Math.min(block, pos);
      pos -= size;
      const buf = Buffer.alloc(size);
      await fh.read(buf, 0, size, pos);
      chunks = [buf, ...chunks];
      for (const b of buf) if (b === 10) newlines++;
    }
    const text = Buffer.concat(chunks).toString('utf8');
    const all = text.endsWith('\n') ? text.slice(0, -1).split('\n') : text.split('\n');
    const last = all.slice(-lines).filter((_, i, arr) => !(arr.length === 1 && arr[0] === ''));
    return { path, content: last.length ? last.join('\n') + '\n' : '', lines: last.length };
  } finally {
    await fh.close();
  }
}

/** Files and directories under `path` whose names match the glob, at most 10,000. */
export async function searchFiles(input: string, pattern: string): Promise<{ path: string; matches: string[]; truncated: boolean }> {
  const path = resolveInSandbox(input);
  const st = await fsCall(path, () => stat(path));
  if (!st.isDirectory()) throw new AgentError('BAD_REQUEST', `Not a directory: ${path}`);
  let re: RegExp;
  try {
    re = globToRegExp(pattern);
  } catch {
    throw new AgentError('BAD_REQUEST', `Invalid pattern ${JSON.stringify(pattern)}: use *, ? and [...] (e.g. *.log)`);
  }
  const matches: string[] = [];
  let truncated = false;
  const walk = async (dir: string): Promise<void> => {
    const handle = await opendir(dir).catch(() => null);
    if (!handle) return;
    for await (const e of handle) {
      if (matches.length >= MAX_SEARCH_MATCHES) {
        truncated = true;
        return;
      }
      const full = join(dir, e.name);
      if (re.test(e.name)) matches.push(full);
      if (e.isDirectory()) await walk(full);
    }
  };
  await walk(path);
  return { path, matches: matches.sort(), truncated };
}

