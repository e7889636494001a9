import { agentHttpStatus } from '../../agent-client/agent-http.js';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { connect as netConnect } from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { AgentFiles } from '../../agent-client/agent-bundle.js';
import { hostnameFor } from '../container/oci-spec.js';
import type { GuestConfig } from '../../../shared/guest-protocol.js';
import { lowerDirsOf } from '../types.js';
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
import { macForSandbox } from '../cloud-hypervisor/vm-config.js';
import type { NetworkBytes } from '../network/types.js';
import { VM_DEFAULT_POLICY, type VmAttachment, type VmHostNetwork } from '../network/vm-network.js';
import { vmInstancePaths, type VmImagePaths } from '../vm/guest.js';
import { agentHandshake, createOverlay, reidentifyGuest, writeConfigDisk } from '../vm/instance-files.js';
import type { VmImages } from '../vm/vm-images.js';
import { freeLoopbackPort, lastLogLines, processAlive, processUsage, runHostCommand, signalQuietly, waitForExit } from '../host-process.js';
import type { AcceleratorChoice } from './accelerator-probe.js';
import { qemuGuestNetwork, qemuNicArgs, type TapNic } from './nics.js';
import { withQmp } from './qmp-client.js';

export interface QemuDriverOptions {
  binary: string;
  instancesDir: string;
  images: VmImages;
  agent: AgentFiles;
  agentReadyTimeoutMs: number;
  /** Kernel parameters appended to the guest's command line (SANDBOX_KERNEL_CMDLINE). */
  kernelCmdline?: string;
  /** KVM or TCG, decided once (see accelerator-probe.ts). */
  accelerator: () => Promise<AcceleratorChoice>;
  /**
   * Bridge networking: sandboxes whose policy's mode is not `none` get a second NIC on a TAP on
   * the bridge. Without it every sandbox has the user-mode NIC only (which reaches nothing).
   */
  network?: VmHostNetwork | null;
  log: Logger;
}

/** What a running instance needs to be reached again, also after a server restart (root-only file). */
interface InstanceState {
  token: string;
  /** Host loopback port QEMU forwards to the agent's port in the guest. */
  port: number;
  image: string;
  agentDisk: string;
  cpu: number;
  memMb: number;
  /**
   * The TAP NIC's MAC when the VM has one (bridge mode): derived from the sandbox's id. A VM
   * restored from a snapshot has that NIC too (QEMU's migration stream needs the same devices) and
   * its guest is told to take the new sandbox's MAC, so two VMs never share one on the bridge.
   */
  bridgeMac?: string;
}


const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Sandboxes as QEMU virtual machines: the debian VM image's kernel and initramfs, a qcow2 overlay
 * over its base disk, the shared read-only agent disk and a per-sandbox config disk. KVM where it
 * can run an ordinary guest, TCG (software emulation) otherwise. The agent is reached through
 * QEMU's user-mode network (`restrict=on`: that NIC reaches nothing but the host's forward)
 * forwarding a host loopback port to the agent's port in the guest, behind the sandbox's token.
 * In bridge mode a second virtio NIC sits on a TAP on the bridge (`network`) with the leased
 * address and the default route, behind the egress firewall and the TAP's source check.
 * Pause/resume are QMP `stop`/`cont`; a snapshot is QEMU's migration stream (memory and devices)
 * plus the overlay, so a restored VM continues running.
 *
 * Instance layout: INSTANCES_DIR/<id>/{overlay.qcow2, config.img, qmp.sock, vm.log, qemu.log,
 * vm.pid, instance.json}.
 */
export class QemuDriver
  implements SandboxDriver, PausableDriver, SnapshottingDriver, UsageReportingDriver, AddressingDriver, NetworkCountingDriver, HostReconcilingDriver
{
  readonly name = 'qemu' as const;
  readonly snapshotKind = 'memory+filesystem' as const;
  readonly #states = new Map<string, InstanceState>();

  constructor(private readonly opts: QemuDriverOptions) {}

  async available(): Promise<DriverAvailability> {
    try {
      await runHostCommand(this.opts.binary, ['--version'], 10_000);
      await runHostCommand('qemu-img', ['--version'], 10_000);
    } catch {
      return { ok: false, reason: `${this.opts.binary} or qemu-img is not installed (npm run setup installs qemu-system-x86 and qemu-utils)` };
    }
    return { ok: true };
  }

  #paths(id: string) {
    const p = vmInstancePaths(this.opts.instancesDir, id);
    return { ...p, state: join(p.dir, 'instance.json'), qemuLog: join(p.dir, 'qemu.log'), memory: join(p.dir, 'memory.bin') };
  }

  async #state(id: string): Promise<InstanceState> {
    let state = this.#states.get(id);
    if (!state) {
      state = JSON.parse(await readFile(this.#paths(id).state, 'utf8')) as InstanceState;
      this.#states.set(id, state);
    }
    return state;
  }

  async #saveState(id: string, state: InstanceState): Promise<void> {
    // Atomically: the token and port must survive a crash mid-write.
    const file = this.#paths(id).state;
    await writeFile(`${file}.tmp`, JSON.stringify(state), { mode: 0o600 });
    await rename(`${file}.tmp`, file);
    this.#states.set(id, state);
  }

  /**
   * The pid of this sandbox's QEMU, if it runs. `vm.pid` outlives a killed QEMU and pids get
   * reused, so the process must also be ours: its command line names the sandbox.
   */
  async #pid(id: string): Promise<number | null> {
    const pid = Number((await readFile(this.#paths(id).pid, 'utf8').catch(() => '')).trim());
    if (!(pid > 0) || !processAlive(pid)) return null;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    return cmdline.split('\0').includes(`voidrun-${id}`) ? pid : null;
  }


  async create(spec: SandboxSpec): Promise<void> {
    const p = this.#paths(spec.id);
    await mkdir(this.opts.instancesDir, { recursive: true });
    await mkdir(p.dir, { mode: 0o700 });
    try {
      const image = await this.opts.images.ensure(spec.image, lowerDirsOf(spec));
      const agentDisk = await this.opts.images.ensureAgentDisk(this.opts.agent, spec.image);
      await createOverlay(image.baseDisk, p.overlay, spec.diskMb);
      const state: InstanceState = { token: randomBytes(24).toString('hex'), port: 0, image: spec.image, agentDisk, cpu: spec.cpu, memMb: spec.memMb };
      if (this.opts.network && spec.network?.mode !== 'none') state.bridgeMac = macForSandbox(spec.id);
      const attachment = await this.#attach(spec, state);
      await writeConfigDisk(p.configDisk, this.#guestConfig(spec, state, attachment));
      await this.#boot(spec.id, state, image, attachment);
    } catch (err) {
      await this.destroy(spec.id).catch(() => {});
      throw err;
    }
  }

  /** The instance's VM image files; the spec's layers build a chain image that is gone again (its key is the instance's). */
  #image(state: InstanceState, spec: SandboxSpec): Promise<VmImagePaths> {
    return this.opts.images.ensure(state.image, state.image === spec.image ? lowerDirsOf(spec) : undefined);
  }

  /** Puts the VM's TAP on the bridge (before it boots) when it has a TAP NIC. */
  async #attach(spec: SandboxSpec, state: InstanceState): Promise<VmAttachment | null> {
    if (!state.bridgeMac) return null;
    if (!this.opts.network) throw new Error('this sandbox has a NIC on the bridge, and this server runs without bridge networking (SANDBOX_NETWORK=none)');
    return this.opts.network.attach(spec.id, { mac: state.bridgeMac, policy: spec.network ?? VM_DEFAULT_POLICY });
  }

  /** The guest's config disk: its name, token, environment and NICs (nics.ts). */
  #guestConfig(spec: SandboxSpec, state: InstanceState, attachment: VmAttachment | null): GuestConfig {
    return {
      hostname: hostnameFor(spec.name),
      token: state.token,
      env: spec.envVars,
      agentSettings: { ...spec.agentSettings, VOIDRUN_SANDBOX_ID: spec.id },
      growRootFs: true,
      ...qemuGuestNetwork(tapNic(state, attachment)),
    };
  }

  /** Starts QEMU for an instance whose files exist (and whose TAP is attached, with one), and waits for its agent. */
  async #boot(id: string, state: InstanceState, image: VmImagePaths, attachment: VmAttachment | null, incoming?: string): Promise<void> {
    const p = this.#paths(id);
    const { accel } = await this.opts.accelerator();
    await rm(p.qmpSocket, { force: true });
    state.port = await freeLoopbackPort();
    await this.#saveState(id, state);
    const args = [
      '-name', `voidrun-${id}`,
      '-M', 'pc', '-accel', accel, ...(accel === 'kvm' ? ['-cpu', 'host'] : []),
      '-smp', String(state.cpu), '-m', String(state.memMb),
      '-nodefaults', '-display', 'none', '-no-reboot',
      '-kernel', image.kernel, '-initrd', image.initrd, '-append', ['console=ttyS0 panic=-1 quiet', ...(this.opts.kernelCmdline ? [this.opts.kernelCmdline] : [])].join(' '),
      '-drive', `file=${p.overlay},if=virtio,format=qcow2`,
      '-drive', `file=${state.agentDisk},if=virtio,format=raw,readonly=on`,
      '-drive', `file=${p.configDisk},if=virtio,format=raw,readonly=on`,
      ...qemuNicArgs(state.port, tapNic(state, attachment)),
      '-device', 'virtio-rng-pci',
      '-chardev', `file,id=serial0,path=${p.log},append=on`, '-serial', 'chardev:serial0',
      '-qmp', `unix:${p.qmpSocket},server=on,wait=off`,
      '-pidfile', p.pid,
      // QEMU's seccomp filter: no obsolete syscalls, no setuid/privilege changes, no affinity or
      // scheduler games. Spawning stays allowed: snapshots stream through `exec:`.
      '-sandbox', 'on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny',
      ...(incoming ? ['-incoming', `exec:cat ${incoming}`] : []),
    ];
    const logFd = openSync(p.qemuLog, 'a');
    try {
      // Detached: VMs outlive a server restart and are re-adopted from their instance files.
      const child = spawn(this.opts.binary, args, { detached: true, stdio: ['ignore', logFd, logFd] });
      child.unref();
      await new Promise<void>((resolve, reject) => {
        child.once('error', reject);
        child.once('spawn', () => resolve());
      });
      await writeFile(p.pid, String(child.pid));
    } finally {
      closeSync(logFd);
    }
    if (incoming) await this.#continueAfterIncoming(id);
    await this.#waitForAgent(id);
  }

  /**
   * A VM restored from a migration stream comes up paused when it was paused while saved (as
   * snapshots are): wait for the stream to be loaded, then let it run.
   */
  async #continueAfterIncoming(id: string): Promise<void> {
    const p = this.#paths(id);
    const deadline = Date.now() + this.opts.agentReadyTimeoutMs;
    for (;;) {
      const progress = await withQmp(p.qmpSocket, async (q) => ({
        migration: (await q.execute<{ status?: string }>('query-migrate')).status,
        run: (await q.execute<{ status: string }>('query-status')).status,
      })).catch(() => null);
      if (progress?.migration === 'failed') throw new Error(`QEMU could not load the snapshot: ${await this.#logTail(id)}`);
      if (progress && progress.run !== 'inmigrate' && (progress.migration === 'completed' || progress.migration === undefined)) {
        if (progress.run !== 'running') await withQmp(p.qmpSocket, (q) => q.execute('cont'));
        return;
      }
      if (!(await this.#pid(id))) throw new Error(`QEMU exited while loading the snapshot: ${await this.#logTail(id)}`);
      if (Date.now() > deadline) throw new Error('QEMU did not finish loading the snapshot in time');
      await sleep(100);
    }
  }

  async #waitForAgent(id: string): Promise<void> {
    const deadline = Date.now() + this.opts.agentReadyTimeoutMs;
    while (Date.now() < deadline) {
      if (await this.#agentAnswers(id)) return;
      if (!(await this.#pid(id))) throw new Error(`the VM stopped while starting: ${await this.#logTail(id)}`);
      await sleep(200);
    }
    throw new Error(`the sandbox agent did not start within ${this.opts.agentReadyTimeoutMs} ms: ${await this.#logTail(id)}`);
  }

  async #agentAnswers(id: string): Promise<boolean> {
    return this.#agentRequest(id, 'GET', '/ready', 2000)
      .then((status) => status === 200)
      .catch(() => false);
  }

  async #agentRequest(id: string, method: string, path: string, timeoutMs: number): Promise<number> {
    return agentHttpStatus(await this.connect(id), method, path, { timeoutMs });
  }


  async #logTail(id: string): Promise<string> {
    const p = this.#paths(id);
    // Only the ends of the logs: the guest can make its console log as large as it likes.
    return [lastLogLines(p.log), lastLogLines(p.qemuLog)].filter((t) => t !== '(no log)' && t !== '(no output)').join(' | ') || '(no output)';
  }

  async connect(id: string): Promise<Duplex> {
    const state = await this.#state(id);
    const socket = await new Promise<Duplex>((resolve, reject) => {
      const s = netConnect(state.port, '127.0.0.1');
      s.once('connect', () => {
        s.off('error', reject);
        resolve(s);
      });
      s.once('error', reject);
    });
    return agentHandshake(socket, state.token);
  }

  async start(spec: SandboxSpec): Promise<void> {
    if (await this.#pid(spec.id)) return;
    const state = await this.#state(spec.id);
    try {
      const attachment = await this.#attach(spec, state);
      // Settings may have changed while it was stopped (env vars are per sandbox record).
      await writeConfigDisk(this.#paths(spec.id).configDisk, this.#guestConfig(spec, state, attachment));
      await this.#boot(spec.id, state, await this.#image(state, spec), attachment);
    } catch (err) {
      // Not left half-started: a live QEMU whose agent never answered would look running.
      const pid = await this.#pid(spec.id);
      if (pid) {
        signalQuietly(pid, 'SIGKILL');
        await waitForExit(pid, 5000);
      }
      await this.#detach(spec.id);
      throw err;
    }
  }

  /** A clean power-off through the agent (it syncs first); QMP quit, then SIGKILL, if that fails. */
  async stop(id: string): Promise<void> {
    const pid = await this.#pid(id);
    if (!pid) return;
    const p = this.#paths(id);
    const status = await withQmp(p.qmpSocket, (q) => q.execute<{ status: string }>('query-status')).catch(() => null);
    if (status?.status === 'paused' || status?.status === 'postmigrate') await withQmp(p.qmpSocket, (q) => q.execute('cont')).catch(() => {});
    await this.#agentRequest(id, 'POST', '/poweroff', 2000).catch(() => 0);
    if (!(await waitForExit(pid, 10_000))) {
      await withQmp(p.qmpSocket, (q) => q.execute('quit')).catch(() => {});
      if (!(await waitForExit(pid, 3000))) {
        signalQuietly(pid, 'SIGKILL');
        await waitForExit(pid, 3000);
      }
    }
    await this.#detach(id);
  }

  /** Takes the VM's TAP (and its rules) off the bridge; the address stays leased. */
  async #detach(id: string): Promise<void> {
    await this.opts.network?.detach(id).catch((err: Error) => this.opts.log.warn({ sandbox: id, err: err.message }, 'taking the TAP off the bridge failed'));
  }

  async destroy(id: string): Promise<void> {
    const pid = await this.#pid(id);
    if (pid) {
      signalQuietly(pid, 'SIGKILL');
      await waitForExit(pid, 5000);
    }
    this.#states.delete(id);
    await this.opts.network?.release(id).catch((err: Error) => this.opts.log.warn({ sandbox: id, err: err.message }, 'freeing the TAP and address failed'));
    await rm(this.#paths(id).dir, { recursive: true, force: true });
  }

  /** The guest's leased address on the bridge; null without a TAP NIC. */
  async addressOf(id: string): Promise<string | null> {
    return (await this.opts.network?.leaseOf(id)) ?? null;
  }

  /** Bytes through the VM's TAP, counted by the host; null without one (or while it is stopped). */
  async networkBytes(id: string): Promise<NetworkBytes | null> {
    return (await this.opts.network?.bytesOf(id)) ?? null;
  }

  /** TAPs are kept for VMs whose QEMU runs (they outlive the server), addresses for every sandbox with a record; the rest go. */
  async reconcileHost(known: ReadonlySet<string>): Promise<string[]> {
    const network = this.opts.network;
    if (!network) return [];
    const attached = new Set<string>();
    for (const id of known) if (await this.#pid(id)) attached.add(id);
    return network.reconcile({ attached, leased: known });
  }

  /** The QEMU process's CPU time and resident memory, as the host sees them. */
  async hostUsage(id: string): Promise<HostUsage | null> {
    const pid = await this.#pid(id);
    if (!pid) return null;
    const [usage, network] = await Promise.all([processUsage(pid), this.networkBytes(id)]);
    return usage && network ? { ...usage, network } : usage;
  }

  async inspect(id: string): Promise<DriverStatus> {
    const p = this.#paths(id);
    if (!existsSync(p.dir)) return 'missing';
    if (!(await this.#pid(id))) return 'stopped';
    const status = await withQmp(p.qmpSocket, (q) => q.execute<{ status: string }>('query-status')).catch(() => null);
    if (!status) return 'running'; // alive but QMP busy (e.g. mid-migration): not stopped
    switch (status.status) {
      case 'paused':
      case 'postmigrate':
      case 'io-error': // e.g. the host disk is full: QEMU paused the VM rather than lose writes
        return 'paused';
      case 'shutdown':
      case 'guest-panicked':
      case 'internal-error':
        return 'stopped';
      default:
        return 'running';
    }
  }

  async list(): Promise<string[]> {
    if (!existsSync(this.opts.instancesDir)) return [];
    const entries = await readdir(this.opts.instancesDir);
    return entries.filter((e) => existsSync(join(this.opts.instancesDir, e, 'instance.json')));
  }

  async pause(id: string): Promise<void> {
    await withQmp(this.#paths(id).qmpSocket, (q) => q.execute('stop'));
  }

  async resume(id: string): Promise<void> {
    await withQmp(this.#paths(id).qmpSocket, (q) => q.execute('cont'));
  }

  /**
   * Pauses the VM, writes QEMU's migration stream (memory + device state) to a file, copies the
   * overlay while nothing can write it, packs both with the instance state, and resumes.
   */
  async snapshot(id: string, file: string): Promise<void> {
    const p = this.#paths(id);
    const state = await this.#state(id);
    const work = `${file}.parts`;
    await mkdir(work, { recursive: true });
    try {
      await withQmp(p.qmpSocket, async (q) => {
        const { status } = await q.execute<{ status: string }>('query-status');
        const wasRunning = status === 'running';
        if (wasRunning) await q.execute('stop');
        try {
          await q.execute('migrate', { uri: `exec:cat > ${join(work, 'memory.bin')}` });
          for (;;) {
            const info = await q.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
            if (info.status === 'completed') break;
            if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`QEMU could not save the VM: ${info['error-desc'] ?? info.status}`);
            await sleep(50);
          }
          await runHostCommand('cp', ['--sparse=always', p.overlay, join(work, 'overlay.qcow2')], 600_000);
        } finally {
          // `cont` after a completed migration takes the disks back; the VM carries on. A VM that
          // was paused is paused again after that, so a second snapshot finds its disks active.
          await q.execute('cont');
          if (!wasRunning) await q.execute('stop');
        }
      });
      await writeFile(join(work, 'instance.json'), JSON.stringify({ ...state, port: 0 }));
      await runHostCommand('tar', ['-czf', file, '-C', work, 'memory.bin', 'overlay.qcow2', 'instance.json'], 600_000);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }

  /** A new VM that continues from the snapshot: same memory, same disk, running processes included. */
  async restore(spec: SandboxSpec, file: string): Promise<void> {
    const p = this.#paths(spec.id);
    await mkdir(this.opts.instancesDir, { recursive: true });
    await mkdir(p.dir, { mode: 0o700 });
    try {
      await runHostCommand('tar', ['-xzf', file, '-C', p.dir, 'memory.bin', 'overlay.qcow2', 'instance.json'], 600_000);
      const state = JSON.parse(await readFile(join(p.dir, 'instance.json'), 'utf8')) as InstanceState;
      if (!existsSync(state.agentDisk)) throw new Error(`the snapshot needs the agent disk it was taken with, which is gone (${state.agentDisk.split('/').pop()})`);
      // The overlay still names the exact base image version it was made over.
      const image = await this.#image(state, spec);
      // The snapshot's NICs are the restored VM's; its TAP NIC takes this sandbox's MAC (the TAP
      // admits only that one) once the guest hears its new identity.
      const snapshotMac = state.bridgeMac;
      if (snapshotMac) state.bridgeMac = macForSandbox(spec.id);
      const attachment = await this.#attach(spec, state);
      // The guest already read its config at boot; the device must exist and match in size.
      await writeConfigDisk(p.configDisk, this.#guestConfig(spec, state, attachment));
      await this.#boot(spec.id, state, image, attachment, p.memory);
      await rm(p.memory, { force: true });
      const nic = qemuGuestNetwork(tapNic(state, attachment)).network;
      const network = attachment && nic ? { ...nic, ...(snapshotMac ? { replacesMac: snapshotMac } : {}) } : undefined;
      await reidentifyGuest(await this.connect(spec.id), { hostname: hostnameFor(spec.name), sandboxId: spec.id, ...(network ? { network } : {}) });
    } catch (err) {
      await this.destroy(spec.id).catch(() => {});
      throw err;
    }
  }
}

/** The instance's TAP NIC once its TAP is attached; null without one. */
function tapNic(state: InstanceState, attachment: VmAttachment | null): TapNic | null {
  return attachment && state.bridgeMac ? { tap: attachment.tap, mac: state.bridgeMac, address: attachment.address } : null;
}
