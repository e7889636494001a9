import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { chmod, copyFile, cp, mkdir, readFile, readdir, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { processAlive, runHostCommand } from '../host-process.js';
import { loopDevicesOf, mountedAt } from './mounts.js';
import { AGENT_DIR } from './oci-spec.js';

/**
 * Where each agent runtime image is mounted, one directory per content hash, shared by every
 * server process on the host. Traversable (not readable) by the sandbox uid range, which runc
 * resolves the sandboxes' mounts as.
 */
export const AGENT_RUNTIME_MOUNTS = '/run/voidrun/agent-runtime';

/** Bumped when the image's layout changes, so a running host mounts a new image. */
const LAYOUT_VERSION = '1';
/** Read-only once built: no journal, no room to grow. */
const MKFS_ARGS = ['-q', '-F', '-m', '0', '-b', '4096', '-O', '^has_journal,^resize_inode', '-L', 'voidrun-agent'];

/** What goes into an agent runtime image (all host files; copied, never mounted from where they are). */
export interface AgentRuntimeSources {
  /** The sandboxes' PID 1 (static). */
  init: string;
  nodeBinary: string;
  bundle: string;
  nodeModules: string;
  /** soname → host path, plus `ld.so` → the dynamic loader; empty when node is static. */
  libraries: Map<string, string>;
}

/**
 * A mounted agent runtime: `<dir>/agent` is what the sandbox sees at /opt/voidrun (init, node,
 * agent.cjs, openssl.cnf, lib/, node_modules/node-pty) and `<dir>/empty` an empty file (its
 * /etc/ld.so.preload).
 */
export interface AgentRuntime {
  dir: string;
  hash: string;
  /** Whether `agent/lib/ld.so` is there (node is dynamically linked). */
  loader: boolean;
}

/** Only what node-pty loads at run time on Linux: its JS (no tests or maps) and the compiled addon. */
async function stageNodePty(nodeModules: string, dest: string): Promise<void> {
  const src = join(nodeModules, 'node-pty');
  await mkdir(join(dest, 'build'), { recursive: true });
  await copyFile(join(src, 'package.json'), join(dest, 'package.json'));
  await cp(join(src, 'lib'), join(dest, 'lib'), { recursive: true, filter: (f) => !/\.(map|test\.js)$/.test(f) });
  await cp(join(src, 'build', 'Release'), join(dest, 'build', 'Release'), { recursive: true });
}

/** Every file under `dir`, sorted, as paths relative to it. */
async function filesUnder(dir: string, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for (const entry of (await readdir(join(dir, prefix), { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
    const rel = join(prefix, entry.name);
    if (entry.isDirectory()) out.push(...(await filesUnder(dir, rel)));
    else out.push(rel);
  }
  return out;
}

/**
 * The image's name: the contents of everything staged, except node and the libraries (large, from
 * the host's packages), which count by path, size and mtime.
 */
async function runtimeHash(s: AgentRuntimeSources): Promise<string> {
  const hash = createHash('sha256').update(`layout ${LAYOUT_VERSION} ${MKFS_ARGS.join(' ')}\n`);
  for (const path of [s.nodeBinary, ...[...s.libraries].sort().flatMap(([name, p]) => [name, p])]) {
    const st = existsSync(path) ? statSync(path) : null;
    hash.update(`${path} ${st?.size} ${st?.mtimeMs}\n`);
  }
  hash.update(await readFile(s.init)).update(await readFile(s.bundle));
  const pty = join(s.nodeModules, 'node-pty');
  for (const rel of ['package.json', ...(await filesUnder(join(pty, 'lib'))).map((f) => join('lib', f)), ...(await filesUnder(join(pty, 'build', 'Release'))).map((f) => join('build', 'Release', f))]) {
    hash.update(rel).update(await readFile(join(pty, rel)));
  }
  return hash.digest('hex').slice(0, 16);
}

async function directorySize(dir: string): Promise<number> {
  let total = 0;
  for (const rel of await filesUnder(dir)) total += (await stat(join(dir, rel))).size;
  return total;
}

/**
 * Builds `image` (read-only ext4, no journal) from the sources: staged in a private directory and
 * packed with `mkfs.ext4 -d` under a private name, then renamed. Everything is owned by host root and readable by others (the sandbox's
 * uids cannot write any of it, but must read and run it).
 */
async function buildImage(s: AgentRuntimeSources, image: string): Promise<void> {
  const temp = `${image}.${process.pid}.tmp`;
  const stage = `${temp}.d`;
  try {
    const agent = join(stage, 'agent');
    await mkdir(join(agent, 'node_modules', 'node-pty'), { recursive: true, mode: 0o755 });
    await copyFile(s.init, join(agent, 'init'));
    await copyFile(s.nodeBinary, join(agent, 'node'));
    await copyFile(s.bundle, join(agent, 'agent.cjs'));
    await writeFile(join(agent, 'openssl.cnf'), '');
    await writeFile(join(stage, 'empty'), '');
    await stageNodePty(s.nodeModules, join(agent, 'node_modules', 'node-pty'));
    if (s.libraries.size) {
      await mkdir(join(agent, 'lib'), { mode: 0o755 });
      for (const [name, path] of s.libraries) await copyFile(path, join(agent, 'lib', basename(name)));
    }
    for (const rel of await filesUnder(stage)) {
      const executable = /^agent\/(init|node|lib\/ld\.so)$/.test(rel);
      await chmod(join(stage, rel), executable ? 0o755 : 0o644);
    }
    const mb = Math.ceil(((await directorySize(stage)) * 1.1) / 1024 / 1024) + 8;
    await runHostCommand('mkfs.ext4', [...MKFS_ARGS, '-d', stage, temp, `${mb}M`]);
    await rename(temp, image);
  } finally {
    await rm(stage, { recursive: true, force: true });
    await rm(temp, { force: true });
  }
}

/** Whether the lock file names a live process (an unreadable or empty one counts as live for 5 s). */
async function lockHeld(lock: string): Promise<boolean> {
  const [text, st] = await Promise.all([readFile(lock, 'utf8').catch(() => ''), stat(lock).catch(() => null)]);
  if (!st) return false;
  const pid = Number(text);
  return pid > 0 ? processAlive(pid) : Date.now() - st.mtimeMs < 5000;
}

/**
 * Builds `image` if missing and mounts it read-only at `target`, unless it is mounted there
 * already. A lock file (holding its owner's pid) next to the target makes one process do it while
 * the others wait, so servers starting together build the image once and never stack two mounts
 * (two loop devices) on the same directory; a dead owner's lock is taken over.
 */
async function buildAndMountOnce(s: AgentRuntimeSources, image: string, target: string): Promise<void> {
  const lock = `${target}.lock`;
  for (const deadline = Date.now() + 180_000; !mountedAt(target); ) {
    if (Date.now() > deadline) throw new Error(`the agent runtime at ${target} was not mounted within 180 s (its builder holds ${lock})`);
    try {
      await writeFile(lock, String(process.pid), { flag: 'wx' });
    } catch {
      if (await lockHeld(lock)) await new Promise((r) => setTimeout(r, 20));
      else await rm(lock, { force: true });
      continue;
    }
    try {
      if (!mountedAt(target)) {
        if (!existsSync(image)) await buildImage(s, image);
        await mkdir(target, { recursive: true, mode: 0o711 });
        // `loop` sets autoclear: the device goes when the last mount of it (here or in a sandbox) does.
        await runHostCommand('mount', ['-t', 'ext4', '-o', 'loop,ro,nosuid,nodev', image, target]);
      }
    } finally {
      await rm(lock, { force: true });
    }
  }
}

/**
 * `major:minor` of the runtimes running sandboxes use: what is bound at /opt/voidrun in a mount
 * namespace other than this process's. (Other namespaces, e.g. services' private ones, may hold
 * copies of the host's mounts, including a runtime's own mount; those do not count.)
 */
function runtimesInUse(): Set<string> {
  const seen = new Set([readlinkSync('/proc/self/ns/mnt')]);
  const devices = new Set<string>();
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const ns = readlinkSync(`/proc/${pid}/ns/mnt`);
      if (seen.has(ns)) continue;
      seen.add(ns);
      for (const line of readFileSync(`/proc/${pid}/mountinfo`, 'utf8').split('\n')) {
        const f = line.split(' ');
        if (f[4] === AGENT_DIR) devices.add(f[2]!);
      }
    } catch {
      // Exited meanwhile.
    }
  }
  return devices;
}

/**
 * Unmounts the runtimes of other hashes that no sandbox (no other mount namespace) uses, and
 * removes other hashes' images under `imageDir` that no loop device holds. A runtime still used
 * by a running sandbox stays until a later cleanup finds it unused; unmounting it would be safe
 * for that sandbox (its own mounts keep the filesystem), but a server still on that hash mounts
 * it again for its next sandbox.
 */
async function removeOtherRuntimes(keep: string, imageDir: string): Promise<void> {
  const ours = readFileSync('/proc/self/mountinfo', 'utf8').split('\n').map((l) => l.split(' '));
  const inUse = runtimesInUse();
  for (const name of await readdir(AGENT_RUNTIME_MOUNTS).catch(() => [] as string[])) {
    if (name === keep || !/^[0-9a-f]{16}$/.test(name)) continue;
    const target = join(AGENT_RUNTIME_MOUNTS, name);
    const line = ours.find((f) => f[4] === target);
    if (line && inUse.has(line[2]!)) continue;
    if (line) await runHostCommand('umount', [target]).catch(() => {});
    if (!mountedAt(target)) await rmdir(target).catch(() => {});
  }
  for (const name of await readdir(imageDir)) {
    const match = /^agent-runtime-([0-9a-f]{16})\.img$/.exec(name);
    if (match && match[1] !== keep && loopDevicesOf(join(imageDir, name)).length === 0) await rm(join(imageDir, name), { force: true });
  }
}

/**
 * The agent runtime for these sources, mounted: built into `imageDir/agent-runtime-<hash>.img` if
 * missing (~1.5 s, once per content change), mounted once per host under AGENT_RUNTIME_MOUNTS and
 * reused by every server process, and other hashes' unused runtimes removed when this process
 * first mounts one. Sandboxes bind subdirectories of it, so their /proc/self/mountinfo shows a
 * loop device and paths inside the image, never a host path.
 */
export async function ensureAgentRuntime(s: AgentRuntimeSources, imageDir: string): Promise<AgentRuntime> {
  const hash = await runtimeHash(s);
  const image = join(imageDir, `agent-runtime-${hash}.img`);
  const dir = join(AGENT_RUNTIME_MOUNTS, hash);
  await mkdir(AGENT_RUNTIME_MOUNTS, { recursive: true, mode: 0o711 });
  for (const d of [AGENT_RUNTIME_MOUNTS, join(AGENT_RUNTIME_MOUNTS, '..')]) {
    const mode = (await stat(d)).mode;
    if (!(mode & 0o001)) await chmod(d, (mode & 0o777) | 0o001);
  }
  if (!mountedAt(dir)) await buildAndMountOnce(s, image, dir);
  await removeOtherRuntimes(hash, imageDir).catch(() => {});
  return { dir, hash, loader: s.libraries.has('ld.so') };
}
