import { lastLogLines, runHostCommand } from '../host-process.js';
import { existsSync, readFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { chown, link, mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { createServer as createNetServer, connect as netConnect, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { DriverAvailability, DriverStatus, PausableDriver, SandboxDriver, SandboxSpec, SnapshottingDriver } from '../types.js';
import { buildOciSpec, type IdMapping } from './oci-spec.js';
import { Runc } from './runc.js';

export interface ContainerDriverOptions {
  instancesDir: string;
  runcRoot: string;
  idMap: IdMapping;
  pidsLimit: number;
  /** Host files the agent runs from, mounted read-only into every sandbox. */
  agent: { nodeBinary: string; bundle: string; nodeModules: string };
  /** How long `create`/`start` wait for the agent to accept connections. */
  agentReadyTimeoutMs: number;
  log: Logger;
}

/**
 * Instance layout: INSTANCES_DIR/<id>/{config.json, upper/, work/, rootfs/, agent.sock, sandbox.log}.
 * The directory belongs to host root and is not mounted into the sandbox, so the sandbox can't
 * replace `agent.sock` with a link to somewhere else.
 */
function layout(instancesDir: string, id: string) {
  const dir = join(instancesDir, id);
  return {
    dir,
    upper: join(dir, 'upper'),
    work: join(dir, 'work'),
    rootfs: join(dir, 'rootfs'),
    socket: join(dir, 'agent.sock'),
    log: join(dir, 'sandbox.log'),
    lowerFile: join(dir, 'lower'),
  };
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

function isMounted(path: string): boolean {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[1] === path);
}

/**
 * Sandboxes as Linux containers run by runc: user-namespaced (sandbox root is an unprivileged host
 * uid), overlayfs copy-on-write over the image, cgroup v1 limits, own network namespace with only
 * loopback. Works on any Linux host with runc; no KVM needed.
 */
export class ContainerDriver implements SandboxDriver, PausableDriver, SnapshottingDriver {
  readonly name = 'container' as const;
  readonly snapshotKind = 'filesystem' as const;
  readonly #runc: Runc;

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

  async create(spec: SandboxSpec): Promise<void> {
    try {
      await this.#prepareDirs(spec.id);
      await this.#boot(spec);
    } catch (err) {
      await this.destroy(spec.id).catch(() => {});
      throw err;
    }
  }

  async restore(spec: SandboxSpec, file: string): Promise<void> {
    const p = layout(this.opts.instancesDir, spec.id);
    try {
      await this.#prepareDirs(spec.id);
      await exec('tar', ['-xzf', file, '-C', p.upper, '--numeric-owner', '--xattrs', '--xattrs-include=trusted.overlay.*', '-p']);
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

  async #prepareDirs(id: string): Promise<void> {
    const p = layout(this.opts.instancesDir, id);
    const { hostId } = this.opts.idMap;
    // Traversable (not readable) by the sandbox's mapped root, which runc resolves the mounts as.
    await mkdir(p.dir, { recursive: true, mode: 0o711 });
    for (const d of [p.upper, p.work, p.rootfs]) await mkdir(d, { recursive: true });
    // Root inside the sandbox (hostId outside) owns its root directory.
    await chown(p.upper, hostId, hostId);
  }

  async #boot(spec: SandboxSpec): Promise<void> {
    const p = layout(this.opts.instancesDir, spec.id);
    if (!isMounted(p.rootfs)) {
      await exec('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${spec.rootfs},upperdir=${p.upper},workdir=${p.work}`, p.rootfs]);
    }
    await writeFile(p.lowerFile, spec.rootfs);
    const config = buildOciSpec({
      spec,
      paths: { rootfs: p.rootfs, nodeBinary: this.opts.agent.nodeBinary, agentBundle: this.opts.agent.bundle, nodeModules: this.opts.agent.nodeModules },
      idMap: this.opts.idMap,
      pidsLimit: this.opts.pidsLimit,
      cgroupsPath: `/voidrun/${this.#cid(spec.id)}`,
    });
    await writeFile(join(p.dir, 'config.json'), JSON.stringify(config));
    const socket = await listeningSocket(p.socket);
    try {
      await this.#runc.runDetached(this.#cid(spec.id), p.dir, p.log, socket.fd).catch((err: Error) => {
        throw new Error(`${err.message}: ${lastLogLines(p.log)}`);
      });
    } finally {
      socket.close(); // the agent has its own copy now
    }
    await this.#waitForAgent(spec.id);
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

  async stop(id: string): Promise<void> {
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
    if (isMounted(p.rootfs)) await exec('umount', [p.rootfs]).catch(() => exec('umount', ['-l', p.rootfs]));
  }

  async destroy(id: string): Promise<void> {
    const cid = this.#cid(id);
    const p = layout(this.opts.instancesDir, id);
    if (await this.#runc.state(cid)) await this.#runc.delete(cid);
    if (isMounted(p.rootfs)) await exec('umount', [p.rootfs]).catch(() => exec('umount', ['-l', p.rootfs]));
    await rm(p.dir, { recursive: true, force: true });
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

  /** The sandbox's root filesystem as the host sees it: its overlay mount, while mounted. */
  hostRoot(id: string): string | null {
    const p = layout(this.opts.instancesDir, id);
    return isMounted(p.rootfs) ? p.rootfs : null;
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
   */
  async snapshot(id: string, file: string): Promise<void> {
    const cid = this.#cid(id);
    const p = layout(this.opts.instancesDir, id);
    const wasRunning = (await this.#runc.state(cid))?.status === 'running';
    if (wasRunning) await this.#runc.pause(cid);
    try {
      await exec('tar', ['-czf', file, '-C', p.upper, '--numeric-owner', '--xattrs', '--xattrs-include=trusted.overlay.*', '.'], 600_000);
    } finally {
      if (wasRunning) await this.#runc.resume(cid);
    }
  }
}

/** Whether an HTTP GET /ready on the socket answers 200 within `timeoutMs`. */
function agentAnswers(socketPath: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = httpRequest({ socketPath, path: '/ready', timeout: timeoutMs }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.once('timeout', () => {
      req.destroy();
      resolve(false);
    });
    req.once('error', () => resolve(false));
    req.end();
  });
}

