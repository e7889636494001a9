import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { lstatSync } from 'node:fs';
import { lstat, mkdir, rename, rm } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize, resolve } from 'node:path';
import type { ArchiveFormat } from '../../../shared/schemas/files.js';
import { AgentError, fsError } from '../../errors.js';
import { isInside, resolveInSandbox } from './paths.js';

const extensions: Record<ArchiveFormat, string> = { tar: '.tar', 'tar.gz': '.tar.gz', 'tar.bz2': '.tar.bz2', zip: '.zip' };

/** Runs a tool inside the sandbox; rejects with its last stderr line. */
function run(cmd: string, args: string[], cwd: string): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    child.once('error', (e) => reject(new AgentError('PRECONDITION_FAILED', `${cmd} is not available in this sandbox (${e.message})`)));
    child.once('close', (code) => {
      if (code === 0) resolvePromise(Buffer.concat(out).toString('utf8'));
      else reject(new AgentError('BAD_REQUEST', `${cmd} failed: ${Buffer.concat(err).toString('utf8').trim().split('\n').pop() ?? `exit ${code}`}`));
    });
  });
}

/** Archives `path` (a file or directory) into `<path>.<format>` next to it; returns the archive's path. */
export async function compress(input: string, format: ArchiveFormat): Promise<{ path: string; archive: string }> {
  const path = resolveInSandbox(input);
  if (path === '/') throw new AgentError('BAD_REQUEST', 'Cannot archive / into itself');
  await lstat(path).catch((err) => {
    throw fsError(err, path);
  });
  const archive = path + extensions[format];
  const cwd = dirname(path);
  const name = basename(path);
  // Built beside the target and renamed into place: a failed run leaves no half-written archive,
  // and an existing archive is replaced (zip would otherwise add to it).
  const temp = join(cwd, `.${basename(archive)}.${randomBytes(6).toString('hex')}${extensions[format]}`);
  try {
    if (format === 'zip') await run('zip', ['-q', '-r', '-y', temp, name], cwd);
    else await run('tar', [format === 'tar.gz' ? '-czf' : format === 'tar.bz2' ? '-cjf' : '-cf', temp, '--exclude', basename(temp), '--', name], cwd);
    await rename(temp, archive);
  } catch (err) {
    await rm(temp, { force: true });
    throw err instanceof AgentError ? err : fsError(err, archive);
  }
  return { path, archive };
}

interface Entry {
  name: string;
  type: 'file' | 'dir' | 'symlink' | 'hardlink' | 'other';
  target?: string;
}

function formatOf(archive: string): ArchiveFormat {
  if (/\.(tar\.gz|tgz)$/.test(archive)) return 'tar.gz';
  if (/\.(tar\.bz2|tbz2?)$/.test(archive)) return 'tar.bz2';
  if (archive.endsWith('.tar')) return 'tar';
  if (archive.endsWith('.zip')) return 'zip';
  throw new AgentError('BAD_REQUEST', `Unknown archive format: ${archive} (expected .tar, .tar.gz, .tgz, .tar.bz2 or .zip)`);
}

/** Decodes one `--quoting-style=c` string starting at `s[i]` (a quote); returns it and the index after it. */
function cString(s: string, i: number): [string, number] {
  let out = '';
  let j = i + 1;
  const bytes: number[] = [];
  const flush = () => {
    if (bytes.length) out += Buffer.from(bytes.splice(0)).toString('utf8');
  };
  while (j < s.length && s[j] !== '"') {
    if (s[j] === '\\') {
      const n = s[j + 1]!;
      if (/[0-7]/.test(n)) {
        bytes.push(parseInt(s.slice(j + 1, j + 4), 8));
        j += 4;
        continue;
      }
      flush();
      out += ({ n: '\n', t: '\t', '\\': '\\', '"': '"', r: '\r', a: '\x07', b: '\b', f: '\f', v: '\v' } as Record<string, string>)[n] ?? n;
      j += 2;
      continue;
    }
    flush();
    out += s[j];
    j++;
  }
  flush();
  return [out, j + 1];
}

async function listTar(archive: string, cwd: string): Promise<Entry[]> {
  const listing = await run('tar', ['-tvf', archive, '--quoting-style=c'], cwd);
  return listing
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const q = line.indexOf('"');
      const [name, after] = cString(line, q);
      const kind = line[0];
      const rest = line.slice(after);
      const targetAt = rest.indexOf('"');
      const target = targetAt >= 0 ? cString(rest, targetAt)[0] : undefined;
      const type = kind === 'd' ? 'dir' : kind === 'l' ? 'symlink' : kind === 'h' ? 'hardlink' : kind === '-' ? 'file' : 'other';
      return { name, type, target } as Entry;
    });
}

async function listZip(archive: string, cwd: string): Promise<Entry[]> {
  // `unzip -Z` prints, per entry: mode, version, system, size, type, method, date, time, name —
  // name and type from the same line, whatever system made the entry.
  const lines = (await run('unzip', ['-Z', archive], cwd)).split('\n');
  const entries: Entry[] = [];
  for (const line of lines) {
    const m = /^(\S{7,10})\s+\S+\s+\S+\s+\d+\s+\S+\s+\S+\s+\S+\s+\S+\s(.*)$/.exec(line);
    if (!m) continue; // the header and the summary
    const name = m[2]!;
    if (m[1]!.startsWith('l')) {
      // A zip stores a symlink's target as the entry's content.
      const target = await run('unzip', ['-p', archive, name.replace(/[[\]*?\\]/g, '\\$&')], cwd);
      entries.push({ name, type: 'symlink', target });
    } else entries.push({ name, type: name.endsWith('/') ? 'dir' : 'file' });
  }
  return entries;
}

/**
 * Whether a path inside `dest` goes through a symbolic link — one the archive creates, or one
 * already on disk — before its last component. A link to follow could lead anywhere, so such
 * paths are refused rather than reasoned about.
 */
function throughLink(dest: string, rel: string, archiveLinks: Set<string>): string | null {
  // Walked as written: normalising first would fold "link/.." away without following the link.
  const parts = rel.split('/').filter((p) => p && p !== '.');
  const stack: string[] = [];
  for (const part of parts.slice(0, -1)) {
    if (part === '..') {
      if (stack.length === 0) return null; // above dest: the inside-dest checks refuse it
      stack.pop();
      continue;
    }
    stack.push(part);
    const sofar = stack.join('/');
    if (archiveLinks.has(sofar)) return sofar;
    try {
      if (lstatSync(join(dest, sofar)).isSymbolicLink()) return sofar;
    } catch {
      // doesn't exist yet
    }
  }
  return null;
}

/**
 * Refuses an archive with any entry that would land outside `dest`: absolute names, `..`
 * components, and links whose targets resolve outside `dest`.
 */
export function checkEntries(entries: Entry[], dest: string): void {
  const archiveLinks = new Set(entries.filter((e) => e.type === 'symlink' || e.type === 'hardlink').map((e) => normalize(e.name).replace(/\/$/, '')));
  for (const e of entries) {
    const via = throughLink(dest, e.name, archiveLinks);
    if (via) throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(e.name)} would be written through the symbolic link ${via}; refusing to extract`);
    if (isAbsolute(e.name)) throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(e.name)} has an absolute path; refusing to extract`);
    const target = normalize(join(dest, e.name));
    if (e.name.split('/').includes('..') || !isInside(dest, target)) {
      throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(e.name)} would be written outside ${dest}; refusing to extract`);
    }
    if (e.type === 'symlink' && e.target !== undefined) {
      const resolved = isAbsolute(e.target) ? normalize(e.target) : resolve(dirname(target), e.target);
      const linkDir = dirname(normalize(e.name));
      const chained = !isAbsolute(e.target) && throughLink(dest, `${linkDir === '.' ? '' : `${linkDir}/`}${e.target}/x`, archiveLinks);
      if (!isInside(dest, resolved) || chained) {
        throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(e.name)} is a symbolic link to ${e.target}, which leads outside ${dest}; refusing to extract`);
      }
    }
    if (e.type === 'hardlink' && e.target !== undefined && (isAbsolute(e.target) || !isInside(dest, normalize(join(dest, e.target))))) {
      throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(e.name)} links to ${e.target}, outside ${dest}; refusing to extract`);
    }
    if (e.type === 'other') throw new AgentError('BAD_REQUEST', `Archive entry ${JSON.stringify(e.name)} is a device or other special file; refusing to extract`);
  }
}

/** Extracts `archive` into `dest` (created if missing) after checking every entry stays inside it. */
export async function extract(archiveInput: string, destInput: string): Promise<{ path: string; entries: number }> {
  const archive = resolveInSandbox(archiveInput);
  const dest = resolveInSandbox(destInput);
  const st = await lstat(archive).catch((err) => {
    throw fsError(err, archive);
  });
  if (st.isDirectory()) throw new AgentError('BAD_REQUEST', `Is a directory, not an archive: ${archive}`);
  const format = formatOf(archive);
  await mkdir(dest, { recursive: true }).catch((err) => {
    throw fsError(err, dest);
  });
  const entries = format === 'zip' ? await listZip(archive, dest) : await listTar(archive, dest);
  checkEntries(entries, dest);
  if (format === 'zip') await run('unzip', ['-o', '-q', archive, '-d', dest], dest);
  else await run('tar', ['-xf', archive, '-C', dest, '--no-overwrite-dir'], dest);
  return { path: dest, entries: entries.length };
}
