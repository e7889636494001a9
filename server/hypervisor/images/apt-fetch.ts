import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chown, copyFile, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { APT_PACKAGE_NAME } from '../../../shared/schemas/images.js';
import { InvalidInputError } from '../../errors.js';

/** Package lists older than this are fetched again before a download. */
const LISTS_MAX_AGE_MS = 24 * 60 * 60 * 1000;

/** How many seconds an update waits for another process's update of the same lists. */
const LOCK_RETRIES = 600;

/** One apt call's bound (an update or a download of a recipe's packages). */
const APT_TIMEOUT_MS = 30 * 60 * 1000;

/** The keyring debootstrap and apt on a Debian host verify the archive with. */
const ARCHIVE_KEYRING = '/usr/share/keyrings/debian-archive-keyring.gpg';

/** What a download hands back: the .deb files (in `dir`, ours), the order to install them in, and the directory to remove when done. */
export interface DownloadedPackages {
  dir: string;
  files: string[];
  bytes: number;
  /**
   * apt's own order (its simulation of the install): unpack these files, configure these
   * packages, … — Pre-Depends are configured before what needs them.
   */
  order: InstallOp[];
}

export type InstallOp = { op: 'unpack'; files: string[] } | { op: 'configure'; packages: string[] };

/**
 * Downloads Debian packages on the host with a private apt state under `BASE_IMAGES_DIR/apt`:
 * its own configuration (APT_CONFIG, so the host's apt.conf.d and sources never apply), sources
 * (`DEBIAN_MIRROR bookworm main`), lists and caches. Dependencies are resolved against a copy of
 * a system base's dpkg status (a file this server built with debootstrap, never one a sandbox
 * wrote), so only what the base lacks is fetched. The host only downloads: nothing here unpacks a
 * package or runs a maintainer script; the build sandbox installs them.
 */
export class AptFetch {
  readonly #dir: string;
  /** One apt run at a time in this process (apt's own locks would fail the second, not queue it). */
  #queue: Promise<unknown> = Promise.resolve();

  /** The package names of the lists, read once per `apt-get update` (keyed by its marker's mtime). */
  #names: { updatedAt: number; names: Set<string> } | null = null;

  /** `maxBytes`: the build sandbox's disk (IMAGE_BUILD_DISK_MB); packages needing more to download and unpack are refused before the download. */
  constructor(private readonly opts: { baseImagesDir: string; mirror: string; log: Logger; maxBytes?: number }) {
    this.#dir = join(opts.baseImagesDir, 'apt');
  }

  /**
   * Downloads `packages` and what they depend on that the system base (its rootfs at `baseRootfs`)
   * does not have, into a fresh directory the caller removes. A name apt does not know fails with
   * an InvalidInputError naming it.
   */
  download(packages: readonly string[], baseRootfs: string, onLine: (line: string) => void = () => {}, signal?: AbortSignal): Promise<DownloadedPackages> {
    for (const name of packages) {
      if (!APT_PACKAGE_NAME.test(name)) return Promise.reject(new InvalidInputError(`Package name ${JSON.stringify(name)} is not a valid apt package name (lowercase letters, digits, "+", "-", ".")`));
    }
    const run = this.#queue.then(() => {
      signal?.throwIfAborted();
      return this.#download(packages, baseRootfs, onLine, signal);
    });
    this.#queue = run.catch(() => {});
    return run;
  }

  async #download(packages: readonly string[], baseRootfs: string, onLine: (line: string) => void, signal?: AbortSignal): Promise<DownloadedPackages> {
    await this.#prepare(onLine, signal);
    const dir = join(this.#dir, 'downloads', `${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`);
    await mkdir(join(dir, 'partial'), { recursive: true });
    // Its own copy per download: apt locks the status file's directory, and other processes
    // sharing BASE_IMAGES_DIR (a test setup, another server) download at the same time.
    await mkdir(join(dir, 'state'));
    const status = join(dir, 'state', 'status');
    await copyFile(join(baseRootfs, 'var', 'lib', 'dpkg', 'status'), status);
    await this.#forApt(dir, join(dir, 'partial'));
    try {
      await this.#assertExact(packages, signal);
      await this.#assertFits(packages, { status, archives: dir }, signal);
      onLine(`downloading ${packages.join(' ')} and their dependencies from ${this.opts.mirror}`);
      await this.#apt(['install', '--download-only', '-y', '-q', '--no-install-recommends', ...packages], { status, archives: dir }, onLine, { signal }).catch((err: Error) => {
        throw notFound(err.message, this.opts.mirror) ?? err;
      });
      const simulated: string[] = [];
      await this.#apt(['install', '-s', '-q', '--no-install-recommends', ...packages], { status, archives: dir }, () => {}, { signal, stdoutLines: simulated });
      const files = (await readdir(dir)).filter((f) => f.endsWith('.deb')).sort();
      let bytes = 0;
      for (const f of files) bytes += (await stat(join(dir, f))).size;
      onLine(files.length ? `downloaded ${files.length} packages (${Math.round(bytes / 1024)} KiB)` : 'every package is in the base image already');
      for (const leftover of ['partial', 'state', 'lock']) await rm(join(dir, leftover), { recursive: true, force: true });
      return { dir, files, bytes, order: installOrder(simulated, files) };
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * Refuses names that are not exact package names in the lists (apt would read one with `.` or
   * `+` as a regex: `texlive-lang.+` is 122 packages), naming them.
   */
  async #assertExact(packages: readonly string[], signal?: AbortSignal): Promise<void> {
    const updatedAt = await stat(join(this.#dir, 'lists', '.updated')).then((s) => s.mtimeMs).catch(() => 0);
    if (!this.#names || this.#names.updatedAt !== updatedAt) {
      const lines: string[] = [];
      await this.#apt(['--all-names', 'pkgnames'], {}, () => {}, { signal, stdoutLines: lines, program: 'apt-cache' });
      this.#names = { updatedAt, names: new Set(lines.map((l) => l.trim()).filter(Boolean)) };
    }
    const unknown = packages.filter((p) => !this.#names!.names.has(p));
    if (unknown.length) {
      throw new InvalidInputError(`package ${unknown.join(', ')} not found in DEBIAN_MIRROR (${this.opts.mirror} bookworm main)${unknown.some((n) => /[.+]/.test(n)) ? '; names must be exact package names (no patterns)' : ''}`);
    }
  }

  /** Refuses, before any download, packages whose archives plus installed size (apt's own figures) pass `maxBytes`. */
  async #assertFits(packages: readonly string[], paths: { status: string; archives: string }, signal?: AbortSignal): Promise<void> {
    const max = this.opts.maxBytes;
    if (!max) return;
    const lines: string[] = [];
    await this.#apt(['install', '--print-uris', '-q', '-y', '--no-install-recommends', ...packages], paths, () => {}, { signal, stdoutLines: lines }).catch((err: Error) => {
      throw notFound(err.message, this.opts.mirror) ?? err;
    });
    const { download, installed } = aptSizes(lines);
    if (download + installed > max) {
      const mb = (n: number) => Math.ceil(n / 2 ** 20);
      throw new InvalidInputError(
        `packages ${packages.join(' ').slice(0, 200)} need ${mb(download)} MB to download and ${mb(installed)} MB installed, more than the build sandbox's disk (IMAGE_BUILD_DISK_MB, ${mb(max)} MB): install fewer packages per image (build images on each other) or ask the operator to raise IMAGE_BUILD_DISK_MB`,
      );
    }
  }

  /** The private configuration, rewritten every time; `apt-get update` when the lists are missing, stale or for another mirror. */
  async #prepare(onLine: (line: string) => void, signal?: AbortSignal): Promise<void> {
    const d = this.#dir;
    for (const sub of ['apt.conf.d', 'sources.list.d', 'preferences.d', 'trusted.gpg.d', 'lists/partial', 'cache', 'log', 'state']) await mkdir(join(d, sub), { recursive: true });
    const arch = process.arch === 'arm64' ? 'arm64' : 'amd64';
    const conf = [
      `Dir::Etc::main "/dev/null";`,
      `Dir::Etc::parts "${d}/apt.conf.d";`,
      `Dir::Etc::sourcelist "${d}/sources.list";`,
      `Dir::Etc::sourceparts "${d}/sources.list.d";`,
      `Dir::Etc::preferences "${d}/preferences";`,
      `Dir::Etc::preferencesparts "${d}/preferences.d";`,
      `Dir::Etc::trusted "${d}/trusted.gpg";`,
      `Dir::Etc::trustedparts "${d}/trusted.gpg.d";`,
      `Dir::State "${d}/state";`,
      `Dir::State::lists "${d}/lists";`,
      `Dir::Cache "${d}/cache";`,
      `Dir::Log "${d}/log";`,
      `APT::Architecture "${arch}";`,
      `APT::Architectures { "${arch}"; };`,
      `APT::Install-Recommends "false";`,
      `Acquire::Languages "none";`,
      `Acquire::Retries "3";`,
    ].join('\n');
    await writeFile(join(d, 'apt.conf'), `${conf}\n`);
    const sources = `deb [signed-by=${ARCHIVE_KEYRING}] ${this.opts.mirror} bookworm main\n`;
    const sourcesFile = join(d, 'sources.list');
    const previous = await readFile(sourcesFile, 'utf8').catch(() => '');
    if (previous !== sources) await writeFile(sourcesFile, sources);
    const marker = join(d, 'lists', '.updated');
    const updatedAt = await stat(marker).then((s) => s.mtimeMs).catch(() => 0);
    if (previous === sources && Date.now() - updatedAt < LISTS_MAX_AGE_MS) return;
    if (!existsSync(ARCHIVE_KEYRING)) throw new Error(`${ARCHIVE_KEYRING} is missing (npm run setup installs debian-archive-keyring)`);
    onLine(`updating the package lists from ${this.opts.mirror} (bookworm main)`);
    await this.#forApt(join(d, 'lists', 'partial'));
    // Another process sharing the lists may be updating them: wait for it, then use its lists.
    for (let attempt = 0; ; attempt++) {
      try {
        await this.#apt(['update', '-q'], {}, onLine, { signal });
        break;
      } catch (err) {
        if (signal?.aborted || !/Could not get lock/.test((err as Error).message) || attempt >= LOCK_RETRIES) throw err;
        await new Promise((r) => setTimeout(r, 1000));
        const now = await stat(marker).then((st) => st.mtimeMs).catch(() => 0);
        if (now > updatedAt && Date.now() - now < LISTS_MAX_AGE_MS) return;
      }
    }
    await writeFile(marker, new Date().toISOString());
  }

  /** apt fetches as its unprivileged `_apt` user where the host has one: it must be able to write these. */
  async #forApt(...dirs: string[]): Promise<void> {
    const uid = await aptUid();
    if (uid !== null) for (const dir of dirs) await chown(dir, uid, 0).catch(() => {});
  }

  #apt(args: string[], paths: { status?: string; archives?: string }, onLine: (line: string) => void, opts: { signal?: AbortSignal | undefined; stdoutLines?: string[]; program?: 'apt-get' | 'apt-cache' } = {}): Promise<void> {
    const { signal, stdoutLines, program = 'apt-get' } = opts;
    const options = [
      ...(paths.status ? ['-o', `Dir::State::status=${paths.status}`] : []),
      ...(paths.archives ? ['-o', `Dir::Cache::archives=${paths.archives}`] : []),
    ];
    return new Promise((resolve, reject) => {
      execFile(
        program,
        [...options, ...args],
        { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', APT_CONFIG: join(this.#dir, 'apt.conf'), LC_ALL: 'C', DEBIAN_FRONTEND: 'noninteractive' }, timeout: APT_TIMEOUT_MS, maxBuffer: 16 * 1024 * 1024, ...(signal ? { signal } : {}) },
        (err, stdout, stderr) => {
          if (signal?.aborted) return reject(new Error('the download was cancelled'));
          if (stdoutLines) stdoutLines.push(...`${stdout}`.split('\n'));
          for (const line of `${stdout}`.split('\n')) if (/^(Get:|Fetched|Need to get|E:|W:)/.test(line)) onLine(line.trim());
          if (!err) return resolve();
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') return reject(new Error('apt-get is not installed on this host (image builds need a Debian host with apt)'));
          const errors = `${stderr}`.split('\n').filter((l) => l.startsWith('E:'));
          for (const line of errors) onLine(line);
          reject(new Error(errors.map((l) => l.slice(2).trim()).join('; ') || `${program} ${args[0]} failed`));
        },
      );
    });
  }
}

/**
 * The install order from apt's simulation (`Inst <pkg> …` / `Conf <pkg> …` lines), as runs of
 * unpacks (the downloaded file of each package) and configures. Pure.
 */
export function installOrder(simulation: readonly string[], files: readonly string[]): InstallOp[] {
  const byPackage = new Map(files.map((f) => [f.split('_')[0]!, f]));
  const ops: InstallOp[] = [];
  for (const line of simulation) {
    const m = /^(Inst|Conf) (\S+)/.exec(line);
    if (!m) continue;
    const name = m[2]!.split(':')[0]!;
    const last = ops[ops.length - 1];
    if (m[1] === 'Inst') {
      const file = byPackage.get(name);
      if (!file) continue;
      if (last?.op === 'unpack') last.files.push(file);
      else ops.push({ op: 'unpack', files: [file] });
    } else if (last?.op === 'configure') last.packages.push(name);
    else ops.push({ op: 'configure', packages: [name] });
  }
  return ops;
}

/**
 * Bytes apt would download (the sum of `--print-uris` lines: `'uri' file size hash`) and the disk
 * the install adds ("After this operation, 19.0 MB of additional disk space will be used."). Pure.
 */
export function aptSizes(lines: readonly string[]): { download: number; installed: number } {
  let download = 0;
  let installed = 0;
  const units: Record<string, number> = { B: 1, kB: 1e3, MB: 1e6, GB: 1e9, TB: 1e12 };
  for (const line of lines) {
    const uri = /^'[^']*' \S+ (\d+) /.exec(line);
    if (uri) download += Number(uri[1]);
    const after = /After this operation, ([\d.,]+) (B|kB|MB|GB|TB) of additional disk space/.exec(line);
    if (after) installed = Math.ceil(Number(after[1]!.replace(/,/g, '')) * units[after[2]!]!);
  }
  return { download, installed };
}

/** The error for packages the mirror does not have, from apt's message; null for other failures. */
function notFound(message: string, mirror: string): InvalidInputError | null {
  const names = [...message.matchAll(/Unable to locate package (\S+)|Package '?([^' ]+)'? has no installation candidate|Couldn't find any package by (?:glob|regex) '([^']+)'/g)].map((m) => m[1] ?? m[2] ?? m[3]);
  if (!names.length) return null;
  const unique = [...new Set(names)];
  return new InvalidInputError(`package ${unique.join(', ')} not found in DEBIAN_MIRROR (${mirror} bookworm main)`);
}

let aptUidCache: Promise<number | null> | null = null;
function aptUid(): Promise<number | null> {
  return (aptUidCache ??= readFile('/etc/passwd', 'utf8')
    .then((text) => {
      const line = text.split('\n').find((l) => l.startsWith('_apt:'));
      return line ? Number(line.split(':')[2]) : null;
    })
    .catch(() => null));
}
