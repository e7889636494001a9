import { agentHttpStatus } from '../../agent-client/agent-http.js';
import { lastLogLines, runHostCommand } from '../host-process.js';
import { execFile, spawn } from 'node:child_process';
import { createWriteStream, existsSync, readFileSync } from 'node:fs';
import { chown, link, mkdir, open, readdir, readlink, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { createServer as createNetServer, connect as netConnect, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { Transform, type Duplex } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Logger } from 'pino';
import { PayloadTooLargeError } from '../../errors.js';
import { lowerDirsOf, SnapshotLimitError, type DriverAvailability, type DriverStatus, type PausableDriver, type SandboxDriver, type SandboxSpec, type SnapshotOptions, type SnapshottingDriver, type HostUsage, type UsageReportingDriver, type PortListingDriver } from '../types.js';
import type { AddressingDriver, HostReconcilingDriver, NetworkCountingDriver, OomCountingDriver, RenamingDriver } from '../types.js';
import type { NetworkBytes, NetworkPolicy, SandboxNetworking } from '../network/types.js';
import { cgroupOomKills, cgroupUsage } from './cgroup-usage.js';
import { containerListeningPorts } from './listening-ports.js';
import { setContainerHostname } from './uts-name.js';
import { buildOciSpec, type ContainerNetwork, type IdMapping } from './oci-spec.js';
import { Runc } from './runc.js';
import { limitSandboxKernelLimits, raiseHostKernelLimits } from './kernel-limits.js';
import type { ContainerBootFiles } from './boot-files.js';
import { loopDevicesOf, mountedAt } from './mounts.js';
import { SandboxLocks } from '../../services/sandbox-locks.js';

export interface ContainerDriverOptions {
  instancesDir: string;
  runcRoot: string;
  idMap: IdMapping;
  pidsLimit: number;
  /**
   * What sandboxes boot from: the mounted agent runtime (their init, node with its loader and
   * libraries, the agent, node-pty) and the host's inotify helper. Called at every boot; cheap
   * while the runtime stays mounted.
   */
  bootFiles: () => Promise<ContainerBootFiles>;
  /** How long `create`/`start` wait for the agent to accept connections. */
  agentReadyTimeoutMs: number;
  /**
   * Bridge networking (SANDBOX_NETWORK=bridge): sandboxes whose policy's mode is not `none` join a
   * namespace on the bridge. Without it every sandbox has loopback only.
   */
  networking?: SandboxNetworking | null;
  log: Logger;
}

/**
 * Instance layout: INSTANCES_DIR/<id>/{config.json, disk.img, disk/{upper,work}/, image | lowers/,
 * lower, rootfs/, agent.sock, sandbox.log}. `disk.img` is a sparse ext4 image of `diskMb` (with an
 * inode count derived from it), loop-mounted on `disk/`, which holds the overlay's upper and work
 * directories: the sandbox's writes end with ENOSPC there, never on the host's filesystem. `image`
 * is a symlink to the image's rootfs (an image without layers), `lowers/<n>` symlinks to each lower
 * dir of an image with layers (`0` the rootfs, then its layers bottom first), so the overlay is
 * mounted with relative option strings only (the kernel shows them as given in the sandbox's
 * /proc/self/mountinfo). `lower` lists the lower dirs, bottom first, one a line. The directory
 * belongs to host root and is not mounted into the sandbox, so the sandbox can't replace
 * `agent.sock` with a link to somewhere else.
 */
function layout(instancesDir: string, id: string) {
  const dir = join(instancesDir, id);
  // Instances made before disk images existed keep their upper layer in <id>/upper.
  const legacy = !existsSync(join(dir, 'disk.img')) && existsSync(join(dir, 'upper'));
  const upperRel = legacy ? 'upper' : 'disk/upper';
  const workRel = legacy ? 'work' : 'disk/work';
  return {
    dir,
    diskImage: join(dir, 'disk.img'),
    disk: join(dir, 'disk'),
    legacy,
    upperRel,
    workRel,
    upper: join(dir, upperRel),
    work: join(dir, workRel),
    lowerLink: join(dir, 'image'),
    lowersDir: join(dir, 'lowers'),
    rootfs: join(dir, 'rootfs'),
    socket: join(dir, 'agent.sock'),
    log: join(dir, 'sandbox.log'),
    lowerFile: join(dir, 'lower'),
  };
}

/** One inode per 16 KiB of disk (ext4's default ratio), at least 4096: bounds the file count with the size. */
export function diskInodes(diskMb: number): number {
  return Math.max(4096, diskMb * 64);
}

/** Runs a host command in `cwd`, so paths in its arguments can be relative. */
function execIn(cwd: string, cmd: string, args: string[], timeoutMs = 60_000): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { cwd, timeout: timeoutMs }, (err, _stdout, stderr) => {
      if (err) reject(new Error(`${cmd} failed: ${(stderr || err.message).trim().split('\n').pop()}`));
      else resolve();
    });
  });
}

/**
 * A unix socket listening at `path`, for the agent to inherit: bound under a temporary name and
 * hard-linked to `path`, so closing this process's copy (which unlinks the temporary name) leaves
 * `path` bound to the socket the agent keeps listening on.
 */
async function listeningSocket(path: string): Promise<{ fd: number; close: () => void }> {
  const temp = `${path}.${process.pid}.${Date.now()}`;
  await rm(path, { force: true });
  const server = createNetServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(temp, () => resolve());
  });
  await link(temp, path);
  // The only way to hand a listening socket to a child: its descriptor (Node has no public accessor).
  const fd = (server as unknown as { _handle: { fd: number } })._handle.fd;
  return { fd, close: () => server.close() };
}

const exec = (cmd: string, args: string[], timeoutMs = 60_000) => runHostCommand(cmd, args, timeoutMs);

/**
 * Sandboxes as Linux containers run by runc: user-namespaced (sandbox root is an unprivileged host
 * uid), overlayfs copy-on-write over the image, cgroup v1 limits, and a network namespace: on the
 * bridge (`networking`, network/sandbox-net.ts) while the sandbox runs, or its own with loopback
 * only. Works on any Linux host with runc; no KVM needed.
 */
export class ContainerDriver
  implements SandboxDriver, PausableDriver, SnapshottingDriver, UsageReportingDriver, PortListingDriver, AddressingDriver, NetworkCountingDriver, HostReconcilingDriver, OomCountingDriver, RenamingDriver
{
  readonly name = 'container' as const;
  readonly snapshotKind = 'filesystem' as const;
  readonly #runc: Runc;
  readonly #snapshotSlots = new Slots(SNAPSHOT_SLOTS);
  readonly #lifecycle = new SandboxLocks();

  constructor(private readonly opts: ContainerDriverOptions) {
    this.#runc = new Runc(opts.runcRoot);
  }

  async available(): Promise<DriverAvailability> {
    if (process.platform !== 'linux') return { ok: false, reason: 'the container driver needs Linux' };
    if (process.getuid?.() !== 0) return { ok: false, reason: 'the container driver needs root (it mounts overlays and maps uid ranges)' };
    try {
      await this.#runc.version();
    } catch {
      return { ok: false, reason: 'runc is not installed: run `npm run setup` (installs runc and debootstrap with apt)' };
    }
    if (!readFileSync('/proc/filesystems', 'utf8').includes('overlay')) return { ok: false, reason: 'the kernel has no overlayfs' };
    // The agent makes itself non-dumpable by changing its egid, which sets the kernel's
    // suid_dumpable value: 1 would leave it open to ptrace, /proc/<pid>/mem and pidfd_getfd.
    if (readFileSync('/proc/sys/fs/suid_dumpable', 'utf8').trim() === '1') {
      return { ok: false, reason: 'fs.suid_dumpable is 1, which lets sandbox commands inspect the agent: set it to 0 (sysctl -w fs.suid_dumpable=0)' };
    }
    try {
      await this.opts.bootFiles();
    } catch (err) {
      return { ok: false, reason: (err as Error).message };
    }
    raiseHostKernelLimits(this.opts.log);
    // runc resolves the sandbox's mounts as the sandbox's root (an unprivileged host uid), so every
    // directory above the instances must be searchable by others.
    await mkdir(this.opts.instancesDir, { recursive: true, mode: 0o711 });
    for (let dir = this.opts.instancesDir; dir !== dirname(dir); dir = dirname(dir)) {
      if (!((await stat(dir)).mode & 0o001)) return { ok: false, reason: `INSTANCES_DIR must be reachable by the sandbox uid range: run chmod o+x ${dir}` };
    }
    return { ok: true };
  }

  #cid(id: string): string {
    return `vr-${id}`;
  }

  #cgroupsPath(id: string): string {
    return `/voidrun/${this.#cid(id)}`;
  }

  /** What the sandbox's cgroup has used (CPU time, working-set memory) and its link's bytes; read on the host, never from the agent. */
  async hostUsage(id: string): Promise<HostUsage | null> {
    const [usage, network] = await Promise.all([cgroupUsage(this.#cgroupsPath(id)), this.networkBytes(id)]);
    return usage && network ? { ...usage, network } : usage;
  }

  /** The sandbox's leased address on the bridge; empty for a loopback-only sandbox (also one that had an address under an earlier SANDBOX_NETWORK). */
  async addressOf(id: string): Promise<string | null> {
    return (await this.opts.networking?.leaseOf(id)) ?? '';
  }

  /** Bytes through the host end of the sandbox's veth since it last started; null without one. */
  async networkBytes(id: string): Promise<NetworkBytes | null> {
    return (await this.opts.networking?.bytesOf(id)) ?? null;
  }

  /**
   * Network namespaces and links are kept for sandboxes that run or are paused (they kept running
   * while the server was down), addresses for every sandbox with a record; the rest go.
   */
  async reconcileHost(known: ReadonlySet<string>): Promise<string[]> {
    const networking = this.opts.networking;
    if (!networking) return [];
    const attached = new Set<string>();
    for (const id of known) {
      const state = await this.#runc.state(this.#cid(id)).catch(() => null);
      if (state?.status === 'running' || state?.status === 'paused') attached.add(id);
    }
    return networking.reconcile({ attached, leased: known });
  }

  /** OOM kills in the sandbox's cgroup since it started (host-side; see cgroupOomKills). */
  oomKills(id: string): Promise<number | null> {
    return cgroupOomKills(this.#cgroupsPath(id));
  }

  listeningPorts(id: string): Promise<number[] | null> {
    return containerListeningPorts(join(layout(this.opts.instancesDir, id).dir, 'init.pid'), this.#cid(id));
  }

  /** See setContainerHostname: host-side, in the sandbox's UTS namespace only. */
  setHostname(id: string, name: string): Promise<void> {
    return setContainerHostname(join(layout(this.opts.instancesDir, id).dir, 'init.pid'), this.#cid(id), name);
  }

  async create(spec: SandboxSpec): Promise<void> {
    try {
      await this.#prepareDirs(spec.id, spec.diskMb);
      await this.#boot(spec);
    } catch (err) {
      await this.destroy(spec.id).catch(() => {});
      throw err;
    }
  }

  async restore(spec: SandboxSpec, file: string): Promise<void> {
    const p = layout(this.opts.instancesDir, spec.id);
    try {
      await this.#prepareDirs(spec.id, spec.diskMb);
      // Extracted onto the sandbox's own disk, so a snapshot can never take more than diskMb.
      await exec('tar', ['-xzf', file, '-C', p.upper, '--numeric-owner', '--xattrs', '--xattrs-include=trusted.overlay.*', '-p']).catch((err: Error) => {
        if (/No space left on device|Disk quota exceeded/.test(err.message)) {
          throw new PayloadTooLargeError(`The snapshot does not fit the new sandbox's disk (diskMb ${spec.diskMb}): no space left on the sandbox's disk`, { cause: err });
        }
        throw err;
      });
      await this.#boot(spec);
    } catch (err) {
      await this.destroy(spec.id).catch(() => {});
      throw err;
    }
  }

  async start(spec: SandboxSpec): Promise<void> {
    const cid = this.#cid(spec.id);
    const state = await this.#runc.state(cid);
    if (state && state.status !== 'stopped') return;
    if (state) await this.#runc.delete(cid);
    await this.#boot(spec);
  }

  /**
   * A new instance directory with its disk: a sparse file of `diskMb` (host blocks are used only as
   * the sandbox writes), ext4 with a bounded inode count and no reserved blocks, mounted on `disk/`.
   * mkfs on a file skips zeroing the inode tables (discarding a file zeroes it), so it takes ~10 ms
   * and ~3 MB of host disk whatever the size; the journal keeps the disk consistent over a host crash.
   */
  async #prepareDirs(id: string, diskMb: number): Promise<void> {
    const dir = join(this.opts.instancesDir, id);
    // Traversable (not readable) by the sandbox's mapped root, which runc resolves the mounts as.
    await mkdir(dir, { recursive: true, mode: 0o711 });
    const image = await open(join(dir, 'disk.img'), 'wx', 0o600);
    try {
      await image.truncate(diskMb * 1024 * 1024);
    } finally {
      await image.close();
    }
    const p = layout(this.opts.instancesDir, id);
    // No resize inode (disks are never grown online): halves mkfs's time.
    await exec('mkfs.ext4', ['-q', '-F', '-m', '0', '-N', String(diskInodes(diskMb)), '-O', '^resize_inode', '-E', 'lazy_itable_init=1,lazy_journal_init=1', '-L', 'sandbox', p.diskImage]);
    for (const d of [p.disk, p.rootfs]) await mkdir(d, { recursive: true });
    await this.#mountDisk(p);
    for (const d of [p.upper, p.work]) await mkdir(d, { recursive: true });
    // Root inside the sandbox (hostId outside) owns its root directory.
    const { hostId } = this.opts.idMap;
    await chown(p.upper, hostId, hostId);
  }

  /** Mounts the sandbox's disk image (again after a host reboot or a stop); a no-op while mounted. */
  async #mountDisk(p: ReturnType<typeof layout>): Promise<void> {
    if (p.legacy || mountedAt(p.disk)) return;
    // `-o loop` sets autoclear: unmounting the filesystem detaches the loop device.
    await execIn(p.dir, 'mount', ['-t', 'ext4', '-o', 'loop', 'disk.img', 'disk']);
    // Direct I/O to the image: without it every block is cached twice (in the sandbox's filesystem
    // and in the image file's), which made a 1 GiB write + sync 5× slower. Where the host's
    // filesystem cannot do direct I/O the device stays buffered.
    for (const device of loopDevicesOf(p.diskImage)) await exec('losetup', ['--direct-io=on', device]).catch(() => {});
  }

  /**
   * The sandbox's root: its disk, then an overlay of the image's lower dirs (through the `image`
   * symlink, or the `lowers/` symlinks for an image with layers) with the disk's upper layer. Every
   * path in the overlay's options is relative to the instance directory, so the sandbox's
   * /proc/self/mountinfo names no host directory.
   */
  async #mountLayers(spec: SandboxSpec): Promise<void> {
    const p = layout(this.opts.instancesDir, spec.id);
    await this.#mountDisk(p);
    const lowers = lowerDirsOf(spec);
    let lowerdir = 'image';
    if (lowers.length === 1) {
      await pointLink(p.lowerLink, spec.rootfs);
    } else {
      await mkdir(p.lowersDir, { recursive: true, mode: 0o700 });
      for (const [i, dir] of lowers.entries()) await pointLink(join(p.lowersDir, String(i)), dir);
      for (const name of await readdir(p.lowersDir)) if (!(Number(name) < lowers.length)) await rm(join(p.lowersDir, name), { force: true });
      // overlayfs takes lower dirs top first.
      lowerdir = lowers.map((_, i) => `lowers/${i}`).reverse().join(':');
    }
    if (!mountedAt(p.rootfs)) {
      await execIn(p.dir, 'mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lowerdir},upperdir=${p.upperRel},workdir=${p.workRel}`, 'rootfs']);
    }
  }

  /** Unmounts the overlay and the disk and detaches the disk's loop device; the files stay. */
  async #unmountLayers(id: string): Promise<void> {
    const p = layout(this.opts.instancesDir, id);
    for (const target of [p.rootfs, p.disk]) {
      if (!mountedAt(target)) continue;
      await exec('umount', [target])
        .catch(() => exec('umount', ['-l', target]))
        .catch((err: Error) => {
          if (mountedAt(target)) throw err; // unmounted meanwhile is what was wanted
        });
    }
    // Autoclear detaches it on unmount; a device left attached (a lazy unmount) is told to go too.
    for (const device of loopDevicesOf(p.diskImage)) await exec('losetup', ['-d', device]).catch(() => {});
  }

  async #boot(spec: SandboxSpec): Promise<void> {
    const p = layout(this.opts.instancesDir, spec.id);
    await this.#mountLayers(spec);
    await writeFile(p.lowerFile, lowerDirsOf(spec).join('\n'));
    const boot = await this.opts.bootFiles();
    const networking = this.opts.networking;
    const attached = networking && spec.network?.mode !== 'none' ? await networking.attach(spec.id, spec.network ?? bridgePolicy) : null;
    try {
      await this.#run(spec, boot, attached);
    } catch (err) {
      if (attached) await networking!.detach(spec.id).catch((e: Error) => this.opts.log.error({ sandbox: spec.id, err: e.message }, 'could not detach a sandbox that failed to boot'));
      throw err;
    }
  }

  /** Writes the runtime spec and runs the container, its agent's socket inherited; resolves once the agent answers. */
  async #run(spec: SandboxSpec, boot: ContainerBootFiles, network: ContainerNetwork | null): Promise<void> {
    const p = layout(this.opts.instancesDir, spec.id);
    const config = buildOciSpec({
      spec,
      paths: { rootfs: p.rootfs, runtime: boot.runtime },
      idMap: this.opts.idMap,
      pidsLimit: this.opts.pidsLimit,
      cgroupsPath: this.#cgroupsPath(spec.id),
      ...(network ? { network } : {}),
    });
    // It holds the sandbox's envVars (secrets, often): root-only.
    await writeFile(join(p.dir, 'config.json'), JSON.stringify(config), { mode: 0o600 });
    const socket = await listeningSocket(p.socket);
    try {
      await this.#runc.runDetached(this.#cid(spec.id), p.dir, p.log, socket.fd).catch((err: Error) => {
        throw new Error(`${err.message}: ${lastLogLines(p.log)}`);
      });
    } finally {
      socket.close(); // the agent has its own copy now
    }
    // Set while the agent starts: no sandbox command runs before the agent is reported ready.
    const initPid = Number(readFileSync(join(p.dir, 'init.pid'), 'utf8'));
    await Promise.all([limitSandboxKernelLimits(boot.usernsLimits, initPid), this.#waitForAgent(spec.id)]);
  }

  /**
   * Resolves once the agent answers `GET /ready`. (Its socket accepts connections from the start:
   * it was listening before the agent ran.)
   */
  async #waitForAgent(id: string): Promise<void> {
    const p = layout(this.opts.instancesDir, id);
    const deadline = Date.now() + this.opts.agentReadyTimeoutMs;
    let delay = 2;
    while (Date.now() < deadline) {
      if (await agentAnswers(p.socket, Math.max(50, Math.min(1000, deadline - Date.now())))) return;
      const state = await this.#runc.state(this.#cid(id));
      if (!state || state.status === 'stopped') throw new Error(`the sandbox stopped while starting: ${lastLogLines(p.log)}`);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 50);
    }
    throw new Error(`the sandbox agent did not start within ${this.opts.agentReadyTimeoutMs} ms: ${lastLogLines(p.log)}`);
  }

  #dial(socketPath: string): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const s = netConnect(socketPath);
      s.once('connect', () => {
        s.off('error', reject);
        resolve(s);
      });
      s.once('error', reject);
    });
  }

  async connect(id: string): Promise<Duplex> {
    return this.#dial(layout(this.opts.instancesDir, id).socket);
  }

  /**
   * Stop and destroy of one sandbox run one at a time (a build step's deadline stops its sandbox
   * while the step's cleanup destroys it): two `runc delete`s or unmounts at once made one fail and
   * left the instance directory behind.
   */
  stop(id: string): Promise<void> {
    return this.#lifecycle.run(id, () => this.#stop(id));
  }

  destroy(id: string): Promise<void> {
    return this.#lifecycle.run(id, () => this.#destroy(id));
  }

  async #stop(id: string): Promise<void> {
    const cid = this.#cid(id);
    const p = layout(this.opts.instancesDir, id);
    const state = await this.#runc.state(cid);
    if (state && state.status !== 'stopped') {
      if (state.status === 'paused') await this.#runc.resume(cid).catch(() => {});
      await this.#runc.kill(cid, 'TERM').catch(() => {});
      const deadline = Date.now() + 3000;
      while (Date.now() < deadline && (await this.#runc.state(cid))?.status === 'running') await new Promise((r) => setTimeout(r, 25));
    }
    if (state) await this.#runc.delete(cid);
    await this.opts.networking?.detach(id);
    await this.#unmountLayers(id);
  }

  async #destroy(id: string): Promise<void> {
    const cid = this.#cid(id);
    const p = layout(this.opts.instancesDir, id);
    if (await this.#runc.state(cid)) await this.#runc.delete(cid);
    await this.opts.networking?.detach(id);
    await this.#unmountLayers(id);
    await rm(p.dir, { recursive: true, force: true });
    // Last: the address is free only once nothing on the host uses it.
    await this.opts.networking?.release(id);
  }

  async inspect(id: string): Promise<DriverStatus> {
    const state = await this.#runc.state(this.#cid(id));
    if (state?.status === 'running' || state?.status === 'paused') return state.status;
    return existsSync(layout(this.opts.instancesDir, id).dir) ? 'stopped' : 'missing';
  }

  async list(): Promise<string[]> {
    if (!existsSync(this.opts.instancesDir)) return [];
    const entries = await readdir(this.opts.instancesDir);
    return entries.filter((e) => existsSync(join(this.opts.instancesDir, e, 'config.json')));
  }

  async pause(id: string): Promise<void> {
    await this.#runc.pause(this.#cid(id));
  }

  async resume(id: string): Promise<void> {
    await this.#runc.resume(this.#cid(id));
  }

  /**
   * Captures the writable layer while every process is frozen, so the archive is consistent.
   * Memory is not captured (CRIU does not work on this kernel): a restored sandbox boots fresh.
   * Holes are kept as holes (`--sparse`), and the archive stops at `maxBytes` with a
   * `SnapshotLimitError` (the caller removes the partial file). A stopped sandbox's disk is mounted
   * for the copy and unmounted after.
   */
  async snapshot(id: string, file: string, options: SnapshotOptions = {}): Promise<void> {
    const cid = this.#cid(id);
    const p = layout(this.opts.instancesDir, id);
    const wasRunning = (await this.#runc.state(cid))?.status === 'running';
    const mountedHere = !p.legacy && !mountedAt(p.disk);
    // Archiving runs on the host's CPU, outside the sandbox's quota: at most SNAPSHOT_SLOTS at a
    // time on this host, at the lowest CPU and I/O priority, so snapshots cannot crowd out sandboxes.
    await this.#snapshotSlots.acquire();
    try {
      if (mountedHere) await this.#mountDisk(p);
      if (wasRunning) await this.#runc.pause(cid);
      try {
        const args = ['-n', '19', 'ionice', '-c', '3', 'tar', '-czf', '-', '--sparse', '-C', p.upper, '--numeric-owner', '--xattrs', '--xattrs-include=trusted.overlay.*', '.'];
        await commandToFile('nice', args, file, options.maxBytes, 600_000);
      } finally {
        if (wasRunning) await this.#runc.resume(cid);
        if (mountedHere) await exec('umount', [p.disk]).catch(() => {});
      }
    } finally {
      this.#snapshotSlots.release();
    }
  }
}

/** Makes `link` a symlink to `target` (replacing one to elsewhere). */
async function pointLink(link: string, target: string): Promise<void> {
  if ((await readlink(link).catch(() => null)) === target) return;
  await rm(link, { force: true });
  await symlink(target, link);
}

/** The policy of a sandbox whose spec has none: on the bridge, unfiltered beyond the firewall's defaults. */
const bridgePolicy: NetworkPolicy = { mode: 'bridge', egress: 'allow', allow: [], deny: [], maxEgressBytes: null, egressCut: false };

/** Snapshots archived at once on one host (each is a host tar + gzip). */
const SNAPSHOT_SLOTS = 2;

/** A counting semaphore: `acquire` waits for a free slot, in arrival order. */
class Slots {
  #free: number;
  readonly #waiting: Array<() => void> = [];
  constructor(count: number) {
    this.#free = count;
  }
  async acquire(): Promise<void> {
    if (this.#free > 0) {
      this.#free--;
      return;
    }
    await new Promise<void>((resolve) => this.#waiting.push(resolve));
  }
  release(): void {
    const next = this.#waiting.shift();
    if (next) next();
    else this.#free++;
  }
}

/**
 * Runs a host command and writes its stdout to `file`, at most `maxBytes` of it: past that the
 * command is killed and the promise rejects with `SnapshotLimitError`.
 */
async function commandToFile(cmd: string, args: string[], file: string, maxBytes: number | undefined, timeoutMs: number): Promise<void> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4096)));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code) => resolve(code));
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  let written = 0;
  const cap = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      written += chunk.length;
      if (maxBytes !== undefined && written > maxBytes) done(new SnapshotLimitError(maxBytes));
      else done(null, chunk);
    },
  });
  try {
    await pipeline(child.stdout, cap, createWriteStream(file, { mode: 0o600 }));
    const code = await exited;
    if (code !== 0) throw new Error(`${cmd} failed: ${stderr.trim().split('\n').pop() ?? `exit ${code}`}`);
  } catch (err) {
    child.kill('SIGKILL');
    await exited.catch(() => {});
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

/** Whether the agent on the socket answers `GET /ready` with 200 within `timeoutMs` (asked through the agent gateway). */
async function agentAnswers(socketPath: string, timeoutMs: number): Promise<boolean> {
  const stream = await new Promise<Socket | null>((resolve) => {
    const s = netConnect(socketPath);
    s.once('connect', () => resolve(s));
    s.once('error', () => resolve(null));
  });
  if (!stream) return false;
  try {
    return (await agentHttpStatus(stream, 'GET', '/ready', { timeoutMs })) === 200;
  } catch {
    return false;
  } finally {
    stream.destroy();
  }
}
