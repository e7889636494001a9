import { agentHttpStatus } from '../../agent-client/agent-http.js';
import { agentHandshake, reidentifyGuest } from '../vm/instance-files.js';
import { hostnameFor } from '../container/oci-spec.js';
import { lastLogLines, processUsage, runHostCommand, signalQuietly, waitForExit } from '../host-process.js';
import { spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { closeSync, constants as fsConstants, existsSync, openSync, readFileSync } from 'node:fs';
import { access, chmod, mkdir, open, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type {
  AddressingDriver,
  DriverAvailability,
  DriverStatus,
  HostReconcilingDriver,
  HostUsage,
  NetworkCountingDriver,
  PausableDriver,
  SandboxDriver,
  SandboxSpec,
  SnapshottingDriver,
  UsageReportingDriver,
} from '../types.js';
import { lowerDirsOf } from '../types.js';
import type { NetworkBytes } from '../network/types.js';
import { VM_DEFAULT_POLICY, type VmHostNetwork } from '../network/vm-network.js';
import { GUEST_AGENT_PORT, type GuestConfig, type VmImagePaths, type VmInstancePaths, vmInstancePaths } from '../vm/guest.js';
import { CloudHypervisorApi, CloudHypervisorApiError, type VmState } from './api-client.js';
import { buildVmConfig, macForSandbox, rebaseSnapshotConfig, type SnapshotVmConfig, type VmNetwork } from './vm-config.js';
import { connectHybridVsock } from './vsock.js';

export type { GuestAddress, VmAttachment, VmHostNetwork } from '../network/vm-network.js';

export interface CloudHypervisorDriverOptions {
  /** The cloud-hypervisor executable. */
  binary?: string;
  instancesDir: string;
  /**
   * The VM image files (kernel, initramfs, base disk) a sandbox boots: one set for every sandbox,
   * or resolved from `spec.image` and its lower dirs (e.g. `(name, lowerDirs) => vmImages.ensure(name, lowerDirs)`).
   */
  image: VmImagePaths | ((name: string, lowerDirs: readonly string[]) => Promise<VmImagePaths>);
  /** Path of the shared read-only agent disk (built on first use). */
  agentDisk: () => Promise<string>;
  network: VmHostNetwork;
  /** Writes `config` as the guest's config disk (/dev/vdc) at `path`. */
  writeConfigDisk: (path: string, config: GuestConfig) => Promise<void>;
  /** Creates the sandbox's qcow2 overlay over `baseDisk`, `sizeMb` large as the guest sees it. */
  createOverlay: (baseDisk: string, overlayPath: string, sizeMb: number) => Promise<void>;
  /** How long `create`/`start`/`restore` wait for the agent to answer after the VM runs. */
  agentReadyTimeoutMs: number;
  /** Kernel parameters appended to the guest's command line (SANDBOX_KERNEL_CMDLINE). */
  kernelCmdline?: string;
  /** How long the VMM may take to open its API socket after it was spawned. */
  vmmStartTimeoutMs?: number;
  /** How long `stop` waits for the VMM to exit before killing it. */
  stopTimeoutMs?: number;
  log: Logger;
}

export const DEFAULT_CLOUD_HYPERVISOR_BINARY = '/usr/local/bin/cloud-hypervisor';

/** Our files in an instance directory, beside the shared microVM layout of vm/guest.ts. */
function instanceFiles(instancesDir: string, id: string): VmInstancePaths & { token: string; serialLog: string } {
  const p = vmInstancePaths(instancesDir, id);
  return {
    ...p,
    // Root-only: whoever holds it can talk to the agent, so a restarted server can reconnect.
    token: join(p.dir, 'agent.token'),
    // The guest's serial console, apart from vm.log: the VMM's own stderr goes to vm.log, and two
    // writers with their own file offsets on one file would overwrite each other.
    serialLog: join(p.dir, 'serial.log'),
  };
}

const STATUS_OF_STATE: Record<VmState, DriverStatus> = {
  Running: 'running',
  Paused: 'paused',
  // Stopped at a debugger breakpoint: nothing runs, as when paused.
  BreakPoint: 'paused',
  Created: 'stopped',
  Shutdown: 'stopped',
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const exec = (cmd: string, args: string[], timeoutMs = 600_000) => runHostCommand(cmd, args, timeoutMs);

/**
 * Sandboxes as cloud-hypervisor microVMs: one VMM process per sandbox, driven over its API
 * socket, booting the shared guest (vm/guest.ts) with a qcow2 overlay over the image, a TAP on
 * the sandbox bridge with a static address, and the agent reached through hybrid vsock.
 *
 * Instance layout: INSTANCES_DIR/<id>/ (0700) with overlay.qcow2, config.img, agent.token,
 * vm.sock (API), vsock.sock (hybrid vsock), vm.pid, vm.log (VMM output), serial.log (guest console).
 * The VMM runs detached, so sandboxes outlive a server restart; `list` + the pid and token files
 * are how a new server process finds and reaches them again.
 */
export class CloudHypervisorDriver
  implements SandboxDriver, PausableDriver, SnapshottingDriver, UsageReportingDriver, AddressingDriver, NetworkCountingDriver, HostReconcilingDriver
{
  readonly name = 'cloud-hypervisor' as const;
  readonly snapshotKind = 'memory+filesystem' as const;
  readonly #binary: string;
  readonly #tokens = new Map<string, string>();

  constructor(private readonly opts: CloudHypervisorDriverOptions) {
    this.#binary = opts.binary ?? DEFAULT_CLOUD_HYPERVISOR_BINARY;
  }

  /** The guest's address on the bridge (what the sandbox record reports as `ip`). */
  addressOf(id: string): Promise<string | null> {
    return this.opts.network.leaseOf(id);
  }

  /** Bytes through the VM's TAP, counted by the host; null while it has none (stopped). */
  networkBytes(id: string): Promise<NetworkBytes | null> {
    return this.opts.network.bytesOf(id);
  }

  /** TAPs are kept for VMs whose VMM runs (they outlive the server), addresses for every sandbox with a record; the rest go. */
  async reconcileHost(known: ReadonlySet<string>): Promise<string[]> {
    const attached = new Set([...known].filter((id) => this.#vmmPid(id) !== undefined));
    return this.opts.network.reconcile({ attached, leased: known });
  }

  async available(): Promise<DriverAvailability> {
    if (process.platform !== 'linux') return { ok: false, reason: 'the cloud-hypervisor driver needs Linux with KVM' };
    try {
      await access(this.#binary, fsConstants.X_OK);
    } catch {
      return {
        ok: false,
        reason: `cloud-hypervisor is not installed at ${this.#binary} (or not executable): install a release binary from https://github.com/cloud-hypervisor/cloud-hypervisor/releases there`,
      };
    }
    try {
      const kvm = await open('/dev/kvm', 'r+');
      await kvm.close();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? String(err);
      return {
        ok: false,
        reason:
          code === 'ENOENT'
            ? '/dev/kvm does not exist: enable virtualization (VT-x/AMD-V or nested virtualization) and load the kvm module'
            : `/dev/kvm cannot be opened read-write (${code}): run the server as root or add its user to the kvm group`,
      };
    }
    return { ok: true };
  }

  async #image(spec: SandboxSpec): Promise<VmImagePaths> {
    return typeof this.opts.image === 'function' ? this.opts.image(spec.image, lowerDirsOf(spec)) : this.opts.image;
  }

  #files(id: string) {
    return instanceFiles(this.opts.instancesDir, id);
  }

  #api(id: string): CloudHypervisorApi {
    return new CloudHypervisorApi({ socketPath: this.#files(id).apiSocket });
  }

  async create(spec: SandboxSpec): Promise<void> {
    await this.#makeInstanceDir(spec.id);
    try {
      const f = this.#files(spec.id);
      const token = randomBytes(32).toString('hex');
      await writeFile(f.token, token, { mode: 0o600 });
      this.#tokens.set(spec.id, token);
      await this.opts.createOverlay((await this.#image(spec)).baseDisk, f.overlay, spec.diskMb);
      await this.#bootFresh(spec, token);
    } catch (err) {
      await this.destroy(spec.id).catch((e: Error) => this.opts.log.error({ err: e, id: spec.id }, 'cleanup after a failed create failed'));
      throw err;
    }
  }

  /**
   * Boots the instance's existing overlay with a new VMM: TAP on the bridge (firewall and source
   * check in place before the VM runs), config disk, VMM, create, boot, agent. DNS goes to the
   * gateway, where the server's resolver answers by the sandbox's policy. A sandbox with network
   * mode `none` has no NIC at all (its agent is on vsock).
   */
  async #bootFresh(spec: SandboxSpec, token: string): Promise<void> {
    const f = this.#files(spec.id);
    const mac = macForSandbox(spec.id);
    const attachment = spec.network?.mode === 'none' ? null : await this.opts.network.attach(spec.id, { mac, policy: spec.network ?? VM_DEFAULT_POLICY });
    const network: VmNetwork | undefined = attachment
      ? { tap: attachment.tap, address: attachment.address.ip, prefixLength: attachment.address.prefixLength, gateway: attachment.address.gateway }
      : undefined;
    await this.opts.writeConfigDisk(f.configDisk, {
      hostname: hostnameFor(spec.name),
      token,
      env: spec.envVars,
      agentSettings: spec.agentSettings ?? {},
      ...(network ? { network: { address: network.address, prefixLength: network.prefixLength, gateway: network.gateway, mac }, nameservers: [network.gateway] } : {}),
      // A no-op once the filesystem fills the overlay, so every boot may ask.
      growRootFs: true,
    });
    const config = buildVmConfig({ spec, image: await this.#image(spec), instance: f, agentDisk: await this.opts.agentDisk(), ...(network ? { network } : {}), serialLog: f.serialLog, extraCmdline: this.opts.kernelCmdline });
    const api = await this.#startVmm(spec.id);
    await api.createVm(config);
    await api.bootVm();
    await this.#waitForAgent(spec.id);
  }

  async #makeInstanceDir(id: string): Promise<void> {
    await mkdir(this.opts.instancesDir, { recursive: true, mode: 0o711 });
    // Not recursive: an existing directory is another sandbox's, and must not be cleaned up as ours.
    await mkdir(this.#files(id).dir, { mode: 0o700 });
  }

  /**
   * Spawns an empty VMM listening on the instance's API socket and resolves once it answers
   * `vmm.ping`. The process is detached (own session) and unreferenced so it outlives this server.
   */
  async #startVmm(id: string): Promise<CloudHypervisorApi> {
    const f = this.#files(id);
    // Stale sockets from a VMM that died make the new one fail to bind.
    await rm(f.apiSocket, { force: true });
    await rm(f.vsockSocket, { force: true });
    const logFd = openSync(f.log, 'a', 0o600);
    let exit: string | undefined;
    const child = spawn(this.#binary, ['--api-socket', f.apiSocket], { detached: true, stdio: ['ignore', logFd, logFd] });
    closeSync(logFd);
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', (err) => reject(new Error(`cannot start ${this.#binary}: ${err.message}`, { cause: err })));
    });
    child.once('exit', (code, signal) => (exit = signal ? `signal ${signal}` : `code ${code}`));
    child.unref();
    await writeFile(f.pid, String(child.pid), { mode: 0o600 });
    const api = this.#api(id);
    const deadline = Date.now() + (this.opts.vmmStartTimeoutMs ?? 5_000);
    for (;;) {
      if (exit) throw new Error(`cloud-hypervisor exited at start (${exit}): ${lastLogLines(f.log)}`);
      try {
        await api.ping(500);
        return api;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`cloud-hypervisor did not open its API socket within ${this.opts.vmmStartTimeoutMs ?? 5_000} ms: ${lastLogLines(f.log)}`, { cause: err });
      }
      await sleep(10);
    }
  }

  /** The VMM's pid if it still runs — checked against its command line, since pids are reused. */
  #vmmPid(id: string): number | undefined {
    const f = this.#files(id);
    let pid: number;
    try {
      pid = Number.parseInt(readFileSync(f.pid, 'utf8'), 10);
    } catch {
      return undefined;
    }
    if (!Number.isInteger(pid) || pid <= 0) return undefined;
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      return cmdline.includes(f.apiSocket) ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  /** Resolves once `connect` + `GET /ready` answers 200; fails early when the VMM exits. */
  async #waitForAgent(id: string): Promise<void> {
    const f = this.#files(id);
    const deadline = Date.now() + this.opts.agentReadyTimeoutMs;
    let delay = 5;
    let lastError = 'no attempt';
    while (Date.now() < deadline) {
      const left = Math.max(50, Math.min(2000, deadline - Date.now()));
      try {
        const stream = await this.#connectAgent(id, left);
        const status = await agentHttpStatus(stream, 'GET', '/ready', { timeoutMs: left });
        if (status === 200) return;
        lastError = `GET /ready answered ${status}`;
      } catch (err) {
        lastError = (err as Error).message;
      }
      if (this.#vmmPid(id) === undefined) throw new Error(`the VM exited while starting: ${lastLogLines(f.serialLog)} | ${lastLogLines(f.log)}`);
      await sleep(delay);
      delay = Math.min(delay * 2, 200);
    }
    throw new Error(`the sandbox agent did not answer within ${this.opts.agentReadyTimeoutMs} ms (${lastError}): ${lastLogLines(f.serialLog)}`);
  }

  async #token(id: string): Promise<string> {
    const cached = this.#tokens.get(id);
    if (cached) return cached;
    const token = (await readFile(this.#files(id).token, 'utf8')).trim();
    this.#tokens.set(id, token);
    return token;
  }

  /** Hybrid vsock to the agent's port, then the agent's token handshake (vm/guest.ts). */
  async #connectAgent(id: string, timeoutMs: number): Promise<Socket> {
    const token = await this.#token(id);
    const socket = await connectHybridVsock(this.#files(id).vsockSocket, GUEST_AGENT_PORT, { timeoutMs });
    return (await agentHandshake(socket, token, timeoutMs)) as Socket;
  }

  async connect(id: string): Promise<Duplex> {
    return this.#connectAgent(id, 5_000);
  }

  async start(spec: SandboxSpec): Promise<void> {
    const status = await this.inspect(spec.id);
    if (status === 'running' || status === 'paused') return;
    if (status === 'missing') throw new Error(`sandbox ${spec.id} has no instance directory to start`);
    try {
      // A VMM that outlived its VM (after vm.shutdown) is replaced by a fresh one.
      await this.#endVmm(spec.id);
      let token: string;
      try {
        token = await this.#token(spec.id);
      } catch {
        token = randomBytes(32).toString('hex');
        await writeFile(this.#files(spec.id).token, token, { mode: 0o600 });
        this.#tokens.set(spec.id, token);
      }
      await this.#bootFresh(spec, token);
    } catch (err) {
      await this.stop(spec.id).catch((e: Error) => this.opts.log.error({ err: e, id: spec.id }, 'cleanup after a failed start failed'));
      throw err;
    }
  }

  /** Stops the guest at once and ends its VMM; the overlay, token and address are kept for `start`. */
  async stop(id: string): Promise<void> {
    const api = this.#api(id);
    if (this.#vmmPid(id) !== undefined) {
      try {
        const { state } = await api.info(2_000);
        if (state === 'Paused') await api.resumeVm();
        if (state === 'Running' || state === 'Paused') await api.shutdownVm();
      } catch (err) {
        this.opts.log.warn({ err, id }, 'cloud-hypervisor did not shut the VM down; ending its VMM');
      }
    }
    await this.#endVmm(id);
    await this.opts.network.detach(id).catch((err: Error) => this.opts.log.warn({ err, id }, 'taking the TAP off the bridge failed'));
  }

  /** Ends the VMM: `vmm.shutdown`, then SIGTERM, then SIGKILL, each given its time. Removes its pid and sockets. */
  async #endVmm(id: string): Promise<void> {
    const f = this.#files(id);
    const pid = this.#vmmPid(id);
    if (pid !== undefined) {
      const timeoutMs = this.opts.stopTimeoutMs ?? 3_000;
      await this.#api(id)
        .shutdownVmm(timeoutMs)
        .catch(() => {});
      if (!(await waitForExit(pid, timeoutMs))) {
        signalQuietly(pid, 'SIGTERM');
        if (!(await waitForExit(pid, timeoutMs))) {
          signalQuietly(pid, 'SIGKILL');
          await waitForExit(pid, timeoutMs);
        }
      }
    }
    for (const file of [f.pid, f.apiSocket, f.vsockSocket]) await rm(file, { force: true });
  }

  async destroy(id: string): Promise<void> {
    await this.#endVmm(id);
    await this.opts.network.release(id).catch((err: Error) => this.opts.log.warn({ err, id }, 'freeing the TAP and address failed'));
    this.#tokens.delete(id);
    await rm(this.#files(id).dir, { recursive: true, force: true });
  }

  /** The VMM process's CPU time and resident memory, as the host sees them. */
  async hostUsage(id: string): Promise<HostUsage | null> {
    const pid = this.#vmmPid(id);
    if (!pid) return null;
    const [usage, network] = await Promise.all([processUsage(pid), this.networkBytes(id)]);
    return usage && network ? { ...usage, network } : usage;
  }

  async inspect(id: string): Promise<DriverStatus> {
    if (!existsSync(this.#files(id).dir)) return 'missing';
    if (this.#vmmPid(id) === undefined) return 'stopped';
    try {
      return STATUS_OF_STATE[(await this.#api(id).info(2_000)).state] ?? 'running';
    } catch (err) {
      // 404: the VMM runs without a VM (created, never booted, or deleted).
      if (err instanceof CloudHypervisorApiError && err.status === 404) return 'stopped';
      // A live VMM that does not answer: the VM is most likely still running; the agent will tell.
      return 'running';
    }
  }

  async list(): Promise<string[]> {
    if (!existsSync(this.opts.instancesDir)) return [];
    const entries = await readdir(this.opts.instancesDir);
    // A stopped sandbox has no VMM (no pid, no socket) but still its disk.
    return entries.filter((e) => ['vm.pid', 'vm.sock', 'overlay.qcow2'].some((file) => existsSync(join(this.opts.instancesDir, e, file))));
  }

  async pause(id: string): Promise<void> {
    await this.#api(id).pauseVm();
  }

  async resume(id: string): Promise<void> {
    await this.#api(id).resumeVm();
  }

  /**
   * Memory and disk at one instant: the VM is paused for `vm.snapshot` and for copying the
   * overlay (a disk copied after resuming would not match the captured memory), then resumed
   * before the slow part, packing everything into `file` (a gzip tar readable by root only: it
   * holds the guest's memory and its agent token).
   *
   * Archive: vm/ (cloud-hypervisor's config.json, state.json, memory-ranges), overlay.qcow2,
   * config.img, agent.token.
   */
  async snapshot(id: string, file: string): Promise<void> {
    const f = this.#files(id);
    const api = this.#api(id);
    if (this.#vmmPid(id) === undefined) throw new Error(`sandbox ${id} is not running, so it has no memory to snapshot`);
    const staging = join(f.dir, `snapshot-${randomUUID()}`);
    await mkdir(join(staging, 'vm'), { recursive: true, mode: 0o700 });
    try {
      const wasRunning = (await api.info()).state === 'Running';
      if (wasRunning) await api.pauseVm();
      try {
        await api.snapshot(join(staging, 'vm'));
        await exec('cp', ['--reflink=auto', '--sparse=always', f.overlay, join(staging, 'overlay.qcow2')]);
      } finally {
        if (wasRunning) await api.resumeVm();
      }
      await exec('cp', [f.configDisk, f.token, staging]);
      await rm(file, { force: true });
      await writeFile(file, '', { mode: 0o600 });
      await exec('tar', ['-czSf', file, '-C', staging, '.']);
      await chmod(file, 0o600);
    } catch (err) {
      await rm(file, { force: true });
      throw err;
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
  }

  /**
   * A new sandbox `spec.id` running from the snapshot in `file`: its memory, devices and disks as
   * captured, on this instance's paths, TAP and socket (the snapshot's own config is rebased), and
   * the snapshot's agent token (the restored guest's memory holds it).
   *
   * The guest keeps the network configuration that is in its memory (the snapshotted sandbox's
   * address and hostname); the address allocated here is the one its TAP and the host record.
   */
  async restore(spec: SandboxSpec, file: string): Promise<void> {
    await this.#makeInstanceDir(spec.id);
    const f = this.#files(spec.id);
    const staging = join(f.dir, 'restore');
    try {
      await mkdir(staging, { mode: 0o700 });
      await exec('tar', ['-xzf', file, '-C', staging]);
      for (const [from, to] of [
        ['overlay.qcow2', f.overlay],
        ['config.img', f.configDisk],
        ['agent.token', f.token],
      ] as const) {
        if (!existsSync(join(staging, from))) throw new Error(`the snapshot has no ${from}: it was not made by the cloud-hypervisor driver`);
        await rename(join(staging, from), to);
      }
      await chmod(f.token, 0o600);
      const vmDir = join(staging, 'vm');
      const captured = JSON.parse(await readFile(join(vmDir, 'config.json'), 'utf8')) as SnapshotVmConfig;
      // The guest's memory holds its NIC's MAC as captured: the TAP's source check pins that one.
      // A snapshot of a VM without a NIC (network mode none) restores without one.
      const mac = captured.net?.[0]?.mac ?? macForSandbox(spec.id);
      const attachment = captured.net?.length ? await this.opts.network.attach(spec.id, { mac, policy: spec.network ?? VM_DEFAULT_POLICY }) : null;
      const rebased = rebaseSnapshotConfig(captured, { instance: f, agentDisk: await this.opts.agentDisk(), ...(attachment ? { tap: attachment.tap } : {}), serialLog: f.serialLog });
      await writeFile(join(vmDir, 'config.json'), JSON.stringify(rebased));
      const api = await this.#startVmm(spec.id);
      await api.restore(vmDir);
      await api.resumeVm();
      await this.#waitForAgent(spec.id);
      // The guest's memory still holds the saved sandbox's name and address.
      await reidentifyGuest(await this.connect(spec.id), {
        hostname: hostnameFor(spec.name),
        sandboxId: spec.id,
        ...(attachment ? { network: { address: attachment.address.ip, prefixLength: attachment.address.prefixLength, gateway: attachment.address.gateway, mac } } : {}),
      });
      // The memory was copied into the VM; the staged copy is no longer needed.
      await rm(staging, { recursive: true, force: true });
    } catch (err) {
      await this.destroy(spec.id).catch((e: Error) => this.opts.log.error({ err: e, id: spec.id }, 'cleanup after a failed restore failed'));
      throw err;
    }
  }
}




