import { createHash } from 'node:crypto';
import type { SandboxSpec } from '../types.js';
import type { VmImagePaths, VmInstancePaths } from '../vm/guest.js';

/*
 * The subset of cloud-hypervisor's API schema (`VmConfig` and friends in its OpenAPI description)
 * that this driver sends. Field names are the API's own (snake_case), so a body built here goes on
 * the wire unchanged; test/cloud-hypervisor-contract.test.ts validates them against the published
 * schema.
 */

export interface PayloadConfig {
  kernel: string;
  initramfs?: string;
  cmdline: string;
}

export interface CpusConfig {
  boot_vcpus: number;
  max_vcpus: number;
}

export interface MemoryConfig {
  /** Bytes. */
  size: number;
  mergeable?: boolean;
}

export type ImageType = 'Qcow2' | 'Raw';

export interface DiskConfig {
  path: string;
  readonly?: boolean;
  image_type?: ImageType;
  /** cloud-hypervisor refuses qcow2 backing files unless this is set. */
  backing_files?: boolean;
  id?: string;
}

export interface NetConfig {
  tap: string;
  mac: string;
  id?: string;
}

export type ConsoleMode = 'Off' | 'Pty' | 'Tty' | 'File' | 'Socket' | 'Null';

export interface SerialConfig {
  mode: ConsoleMode;
  file?: string;
}

export interface VsockConfig {
  cid: number;
  socket: string;
  id?: string;
}

/** The body of `PUT /api/v1/vm.create`. */
export interface VmConfig {
  payload: PayloadConfig;
  cpus: CpusConfig;
  memory: MemoryConfig;
  disks: DiskConfig[];
  net?: NetConfig[];
  rng: { src: string };
  serial: SerialConfig;
  console: SerialConfig;
  vsock: VsockConfig;
}

/** The body of `PUT /api/v1/vm.snapshot`. */
export interface VmSnapshotConfig {
  destination_url: string;
}

/** The body of `PUT /api/v1/vm.restore`. */
export interface RestoreConfig {
  source_url: string;
}

/** The guest's static address on eth0 and the TAP device carrying it. */
export interface VmNetwork {
  tap: string;
  address: string;
  prefixLength: number;
  gateway: string;
}

export interface VmConfigInput {
  spec: SandboxSpec;
  image: VmImagePaths;
  instance: VmInstancePaths;
  /** The shared read-only agent disk (node, the agent bundle, node-pty). */
  agentDisk: string;
  /** The TAP NIC; none for a sandbox with network mode `none` (the agent is on vsock either way). */
  network?: VmNetwork;
  /** Where the guest's serial console is written. */
  serialLog: string;
  /** Kernel parameters appended to ours (SANDBOX_KERNEL_CMDLINE); later parameters win. */
  extraCmdline?: string;
}

/**
 * The guest's vsock context id. With hybrid vsock the host reaches each guest through that VM's own
 * unix socket, so the CID never routes anything on the host and every guest can have the same one;
 * 3 is the first id not reserved (0 hypervisor, 1 local, 2 host).
 */
export const GUEST_CID = 3;

/** The dotted netmask of an IPv4 prefix length (22 → 255.255.252.0). */
export function netmaskFromPrefix(prefixLength: number): string {
  if (!Number.isInteger(prefixLength) || prefixLength < 0 || prefixLength > 32) throw new Error(`invalid IPv4 prefix length ${prefixLength}`);
  const bits = prefixLength === 0 ? 0 : (0xffffffff << (32 - prefixLength)) >>> 0;
  return [24, 16, 8, 0].map((shift) => (bits >>> shift) & 0xff).join('.');
}

/**
 * A MAC address that is the same every time for the same sandbox (a restarted VM keeps its
 * neighbours' ARP entries valid) and never collides with a vendor's: the first octet has the
 * locally-administered bit set and the multicast bit clear.
 */
export function macForSandbox(id: string): string {
  const digest = createHash('sha256').update(id).digest();
  const octets = [0x02, digest[0]!, digest[1]!, digest[2]!, digest[3]!, digest[4]!];
  return octets.map((o) => o.toString(16).padStart(2, '0')).join(':');
}

/**
 * The kernel command line: root on the overlay (/dev/vda), console on the serial port (so boot
 * and init messages land in the serial log a failed create quotes), predictable `eth0`, and the
 * static address as the original VoidRun passes it (`ip=<client>::<gateway>:<netmask>::eth0:off`).
 * Our initramfs mounts /dev/vda itself and the agent configures eth0 from the config disk
 * (vm/guest-boot-files.ts, agent/guest-system.ts), so these only take effect with a kernel that
 * has virtio_net and IP autoconfiguration built in; with one, the agent's own `ip addr add` just
 * finds the address already there. The hostname field stays empty: the agent sets it.
 */
export function kernelCmdline(network: Pick<VmNetwork, 'address' | 'gateway' | 'prefixLength'> | undefined, extra?: string): string {
  const ip = network ? [`ip=${network.address}::${network.gateway}:${netmaskFromPrefix(network.prefixLength)}::eth0:off`] : [];
  return ['console=ttyS0', 'root=/dev/vda', 'rootfstype=ext4', 'rw', 'net.ifnames=0', 'biosdevname=0', ...ip, ...(extra ? [extra] : [])].join(' ');
}

/**
 * The `vm.create` body for one sandbox. Pure: spawns nothing, reads nothing.
 *
 * Disk order is the guest's contract (see vm/guest.ts): /dev/vda the sandbox's qcow2 overlay over
 * the image, /dev/vdb the shared agent disk (read-only: every VM has it open), /dev/vdc the config
 * disk. Image types are explicit so cloud-hypervisor never guesses a raw disk's format.
 */
export function buildVmConfig(input: VmConfigInput): VmConfig {
  const { spec, image, instance, network } = input;
  if (!Number.isInteger(spec.cpu) || spec.cpu < 1) throw new Error(`cpu must be a whole number ≥ 1, got ${spec.cpu}`);
  if (!Number.isInteger(spec.memMb) || spec.memMb < 1) throw new Error(`memMb must be a whole number ≥ 1, got ${spec.memMb}`);
  return {
    payload: { kernel: image.vmlinux, initramfs: image.initrd, cmdline: kernelCmdline(network, input.extraCmdline) },
    cpus: { boot_vcpus: spec.cpu, max_vcpus: spec.cpu },
    // Mergeable: KSM may share identical pages between sandboxes booted from the same image.
    memory: { size: spec.memMb * 1024 * 1024, mergeable: true },
    disks: [
      { id: 'root', path: instance.overlay, readonly: false, image_type: 'Qcow2', backing_files: true },
      { id: 'agent', path: input.agentDisk, readonly: true, image_type: 'Raw' },
      { id: 'config', path: instance.configDisk, readonly: true, image_type: 'Raw' },
    ],
    ...(network ? { net: [{ id: 'eth0', tap: network.tap, mac: macForSandbox(spec.id) }] } : {}),
    rng: { src: '/dev/urandom' },
    serial: { mode: 'File', file: input.serialLog },
    console: { mode: 'Off' },
    vsock: { cid: GUEST_CID, socket: instance.vsockSocket },
  };
}

/** The config a snapshot was taken with, as cloud-hypervisor wrote it (its full `VmConfig`). */
export type SnapshotVmConfig = Partial<VmConfig> & Record<string, unknown>;

export interface RebaseTarget {
  instance: VmInstancePaths;
  agentDisk: string;
  /** The new sandbox's TAP; none when the snapshot's VM had no NIC. */
  tap?: string;
  serialLog: string;
}

/**
 * A snapshot's `config.json` pointed at a new instance: cloud-hypervisor restores devices from the
 * paths recorded at snapshot time, which belong to the sandbox the snapshot was taken from. The
 * disks keep their order (vda overlay, vdb agent disk, vdc config disk); everything else
 * (memory size, vCPUs, MAC) stays as captured, because the restored guest's memory already
 * depends on it. Pure.
 */
export function rebaseSnapshotConfig(config: SnapshotVmConfig, target: RebaseTarget): SnapshotVmConfig {
  const disks = config.disks ?? [];
  if (disks.length !== 3) throw new Error(`the snapshot has ${disks.length} disks; a VoidRun VM has 3 (overlay, agent, config)`);
  const paths = [target.instance.overlay, target.agentDisk, target.instance.configDisk];
  const net = config.net ?? [];
  if (net.length > 1) throw new Error(`the snapshot has ${net.length} network devices; a VoidRun VM has at most 1`);
  if (net.length === 1 && !target.tap) throw new Error('the snapshot has a network device, and the new sandbox has no TAP for it');
  if (!config.vsock) throw new Error('the snapshot has no vsock device, so its agent would be unreachable');
  return {
    ...config,
    disks: disks.map((disk, i) => ({ ...disk, path: paths[i]! })),
    ...(net.length ? { net: [{ ...net[0]!, tap: target.tap! }] } : {}),
    vsock: { ...config.vsock, socket: target.instance.vsockSocket },
    serial: config.serial?.mode === 'File' ? { ...config.serial, file: target.serialLog } : config.serial,
  };
}
