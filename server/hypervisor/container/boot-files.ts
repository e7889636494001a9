import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { copyFile, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const cacheDir = join(here, '..', '..', '..', 'dist', 'container-init');
const gccArgs = ['-static', '-O2', '-Wall', '-Werror'];

/**
 * Host files a container sandbox boots from besides the agent's own, all mounted read-only, so
 * nothing the tenant writes into its root filesystem runs in PID 1 or in the agent.
 */
export interface ContainerBootFiles {
  /** The sandboxes' PID 1, a static binary built from `init.c`. */
  init: string;
  /** Run on the host: sets a running sandbox's per-user-namespace sysctls (`userns-limits.c`). */
  usernsLimits: string;
  /**
   * The host's dynamic loader (as `ld.so`) and copies of the shared libraries node and the agent's
   * native modules link against; null when node is statically linked.
   */
  libDir: string | null;
  /** An empty file: the sandbox's /etc/ld.so.preload and the agent's OpenSSL config. */
  emptyFile: string;
}

let building: Promise<ContainerBootFiles> | null = null;

/**
 * Prepares the boot files under `dist/container-init/` on first use (the two programs built with
 * gcc, statically linked), each named after a hash of
 * what it is made from, so a changed `init.c` or host library is picked up at the next start.
 * Rejects with a one-line reason when they cannot be made (gcc or libc.a missing).
 */
export function ensureContainerBootFiles(nodeBinary: string, nativeModules: string[]): Promise<ContainerBootFiles> {
  building ??= (async () => {
    await mkdir(cacheDir, { recursive: true });
    const emptyFile = join(cacheDir, 'empty');
    if (!existsSync(emptyFile)) await writeFile(emptyFile, '', { mode: 0o644 });
    return { init: await buildStatic('init.c', 'voidrun-init'), usernsLimits: await buildStatic('userns-limits.c', 'voidrun-userns-limits'), libDir: await copyAgentLibraries([nodeBinary, ...nativeModules.filter((m) => existsSync(m))]), emptyFile };
  })().catch((err: Error) => {
    building = null; // a later call tries again (e.g. after `npm run setup`)
    throw err;
  });
  return building;
}

/** Builds under a private name and renames, so concurrent servers never run a half-written file. */
async function atomically(target: string, make: (temp: string) => Promise<void>): Promise<void> {
  const temp = `${target}.${process.pid}.tmp`;
  try {
    await make(temp);
    await rename(temp, target);
  } catch (err) {
    if (!existsSync(target)) throw err; // another server finished it first: theirs is as good
  } finally {
    await rm(temp, { recursive: true, force: true });
  }
}

async function buildStatic(file: string, name: string): Promise<string> {
  const source = join(here, file);
  const hash = createHash('sha256').update(readFileSync(source)).update(gccArgs.join(' ')).digest('hex').slice(0, 16);
  const binary = join(cacheDir, `${name}-${hash}`);
  if (existsSync(binary)) return binary;
  await atomically(binary, (temp) =>
    new Promise<void>((resolve, reject) => {
      execFile('gcc', [...gccArgs, '-o', temp, source], { timeout: 60_000 }, (err, _stdout, stderr) => {
        if (!err) return resolve();
        const why = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'gcc is not installed' : (stderr.trim().split('\n').pop() ?? err.message);
        reject(new Error(`the sandbox init (${file}) cannot be built (${why}): run \`npm run setup\` (installs gcc and libc6-dev)`));
      });
    }),
  );
  return binary;
}

/** `ldd` of each file: soname → host path, plus the dynamic loader; empty for static binaries. */
async function sharedLibraries(files: string[]): Promise<{ loader: string | null; libs: Map<string, string> }> {
  const libs = new Map<string, string>();
  let loader: string | null = null;
  for (const file of files) {
    const out = await new Promise<string>((resolve) => execFile('ldd', [file], { timeout: 10_000 }, (err, stdout) => resolve(err ? '' : stdout)));
    for (const line of out.split('\n')) {
      const linked = /^\s*(\S+) => (\/\S+) \(/.exec(line);
      if (linked) libs.set(linked[1]!, linked[2]!);
      const interp = /^\s*(\/\S*ld-linux\S*) \(/.exec(line);
      if (interp) loader = interp[1]!;
    }
  }
  return { loader, libs };
}

async function copyAgentLibraries(files: string[]): Promise<string | null> {
  const { loader, libs } = await sharedLibraries(files);
  if (!loader) return null;
  const entries: Array<[string, string]> = [['ld.so', realpathSync(loader)], ...[...libs].map(([name, path]): [string, string] => [name, realpathSync(path)])];
  const hash = createHash('sha256');
  for (const [name, path] of entries) hash.update(`${name} ${path} ${statSync(path).size} ${statSync(path).mtimeMs}\n`);
  const dir = join(cacheDir, `lib-${hash.digest('hex').slice(0, 16)}`);
  if (existsSync(dir)) return dir;
  await atomically(dir, async (temp) => {
    await mkdir(temp, { mode: 0o755 });
    for (const [name, path] of entries) await copyFile(path, join(temp, basename(name)));
  });
  return dir;
}
