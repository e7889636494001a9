import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { mkdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { AgentFiles } from '../../agent-client/agent-bundle.js';
import { ensureAgentRuntime, type AgentRuntime, type AgentRuntimeSources } from './agent-runtime.js';
import { mountedAt } from './mounts.js';
import { repoRoot } from '../../repo-root.js';

/** Where the helpers' C sources are (beside this module's TypeScript source; the compiled server has none of its own). */
const sourceDir = join(repoRoot, 'server', 'hypervisor', 'container');
/** The host-side cache of boot files: the static helpers and the agent runtime images. */
export const BOOT_FILES_DIR = join(repoRoot, 'dist', 'container-init');
const gccArgs = ['-static', '-O2', '-Wall', '-Werror'];

/**
 * What a container sandbox boots from besides its image: all of it packed into the agent runtime
 * (a read-only image mounted once per host), so nothing the tenant writes into its root
 * filesystem runs in PID 1 or in the agent, and no host path shows in the sandbox's mounts.
 */
export interface ContainerBootFiles {
  /** The mounted runtime the sandbox binds /opt/voidrun and /etc/ld.so.preload from. */
  runtime: AgentRuntime;
  /** Run on the host: sets a running sandbox's per-user-namespace sysctls (`userns-limits.c`). */
  usernsLimits: string;
}

/** The host programs built from this directory's C sources, statically linked. */
export interface StaticHelpers {
  /** The sandboxes' PID 1 (`init.c`), copied into the agent runtime. */
  init: string;
  usernsLimits: string;
}

let helpers: Promise<StaticHelpers> | null = null;
let runtime: Promise<ContainerBootFiles> | null = null;

/**
 * Builds the two programs under `dist/container-init/` on first use, each named after a hash of
 * its source, so a changed `.c` file is picked up at the next start. Rejects with a one-line
 * reason when they cannot be made (gcc or libc.a missing).
 */
export function ensureStaticHelpers(): Promise<StaticHelpers> {
  helpers ??= (async () => {
    await mkdir(BOOT_FILES_DIR, { recursive: true });
    return { init: await buildStatic('init.c', 'voidrun-init'), usernsLimits: await buildStatic('userns-limits.c', 'voidrun-userns-limits') };
  })().catch((err: Error) => {
    helpers = null; // a later call tries again (e.g. after `npm run setup`)
    throw err;
  });
  return helpers;
}

/**
 * The boot files for sandboxes of this agent: the static helpers, and the agent runtime (init,
 * node with the host's loader and the libraries it and node-pty link against, the agent bundle,
 * node-pty) built and mounted on first use. Made again when the runtime was unmounted meanwhile
 * (a host reboot, or another server's cleanup), so every boot gets a mounted runtime.
 */
export async function ensureContainerBootFiles(agent: AgentFiles): Promise<ContainerBootFiles> {
  const current = runtime;
  const ready = current && (await current.catch(() => null));
  if (ready && mountedAt(ready.runtime.dir)) return ready;
  if (runtime !== current && runtime) return runtime; // another caller is making it again
  runtime = (async () => {
    const { usernsLimits } = await ensureStaticHelpers();
    return { runtime: await ensureAgentRuntime(await agentRuntimeSources(agent), BOOT_FILES_DIR), usernsLimits };
  })().catch((err: Error) => {
    runtime = null;
    throw err;
  });
  return runtime;
}

/** What the agent runtime is made from: the init, this agent's files, and the libraries node and node-pty link against. */
export async function agentRuntimeSources(agent: AgentFiles): Promise<AgentRuntimeSources> {
  const { init } = await ensureStaticHelpers();
  const nativeModule = join(agent.nodeModules, 'node-pty', 'build', 'Release', 'pty.node');
  const libraries = await agentLibraries([agent.nodeBinary, ...(existsSync(nativeModule) ? [nativeModule] : [])]);
  return { init, nodeBinary: agent.nodeBinary, bundle: agent.bundle, nodeModules: agent.nodeModules, libraries };
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
  const source = join(sourceDir, file);
  const hash = createHash('sha256').update(readFileSync(source)).update(gccArgs.join(' ')).digest('hex').slice(0, 16);
  const binary = join(BOOT_FILES_DIR, `${name}-${hash}`);
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

/** The dynamic loader (as `ld.so`) and the shared libraries the files link against, by real path; empty when static. */
async function agentLibraries(files: string[]): Promise<Map<string, string>> {
  const { loader, libs } = await sharedLibraries(files);
  if (!loader) return new Map();
  return new Map([['ld.so', realpathSync(loader)], ...[...libs].map(([name, path]): [string, string] => [name, realpathSync(path)])]);
}
