import type { Duplex } from 'node:stream';
import type { NetworkPolicy } from '../../shared/schemas/network.js';
import type { NetworkBytes } from './network/types.js';

/** What a driver needs to run one sandbox. */
export interface SandboxSpec {
  id: string;
  /** DNS-1123 name; the sandbox's hostname. */
  name: string;
  /** The image's root filesystem (the bottom read-only lower layer of a container). */
  rootfs: string;
  /** Layer dirs (LayerStore.fsPath) stacked above `rootfs`, bottom first; none for a system image. */
  layers?: string[];
  /**
   * Which VM image a microVM boots: a system recipe name (e.g. "debian"), or a key (`vmImageKey`
   * of the lower dirs) whose qcow2 base is built from `[rootfs, ...layers]` on first use.
   */
  image: string;
  cpu: number;
  memMb: number;
  diskMb: number;
  envVars: Record<string, string>;
  /** Settings for the agent itself (VOIDRUN_*), never seen by the sandbox's commands. */
  agentSettings?: Record<string, string>;
  /** Its network policy; without one a sandbox gets the driver's default (bridge when the driver has networking). */
  network?: NetworkPolicy;
}

/** A spec's lower dirs, bottom first: its rootfs, then its layers. */
export function lowerDirsOf(spec: Pick<SandboxSpec, 'rootfs' | 'layers'>): string[] {
  return [spec.rootfs, ...(spec.layers ?? [])];
}

export type DriverStatus = 'running' | 'paused' | 'stopped' | 'missing';

export interface DriverAvailability {
  ok: boolean;
  /** Why not, in one line a user can act on. */
  reason?: string;
}

export interface DriverInfo {
  name: DriverName;
  /** How it isolates, for /api/version-style reporting. */
  isolation: string;
}

export type DriverName = 'container' | 'qemu' | 'cloud-hypervisor';

/**
 * Runs sandboxes. Every driver starts the same agent inside each sandbox and hands the server a
 * byte stream to it; nothing else about a sandbox's inside is the driver's business.
 */
export interface SandboxDriver {
  readonly name: DriverName;
  available(): Promise<DriverAvailability>;
  /** Boots the sandbox; resolves once the agent inside accepts connections. Leaves nothing behind on failure. */
  create(spec: SandboxSpec): Promise<void>;
  /** Starts a stopped sandbox again with the same filesystem. */
  start(spec: SandboxSpec): Promise<void>;
  /** Stops every process; the filesystem is kept for `start`. */
  stop(id: string): Promise<void>;
  /** Removes the sandbox and everything it had on the host. Idempotent. */
  destroy(id: string): Promise<void>;
  inspect(id: string): Promise<DriverStatus>;
  /** A new byte stream to the sandbox's agent. */
  connect(id: string): Promise<Duplex>;
  /** Ids of sandboxes this driver has on the host (for re-adoption after a restart). */
  list(): Promise<string[]>;
}

/** Optional ability: freeze and thaw every process of a sandbox. */
export interface PausableDriver {
  pause(id: string): Promise<void>;
  resume(id: string): Promise<void>;
}

/** Bounds on one snapshot a driver writes. */
export interface SnapshotOptions {
  /** Drivers that stream the archive stop at this size with `SnapshotLimitError`; the caller checks the rest. */
  maxBytes?: number;
}

/** A snapshot grew past its `maxBytes`; the partial file is the caller's to remove. */
export class SnapshotLimitError extends Error {
  override name = 'SnapshotLimitError';
  constructor(readonly maxBytes: number) {
    super(`the snapshot is larger than ${maxBytes} bytes`);
  }
}

/** Optional ability: capture a sandbox's state into a file and create a sandbox from one. */
export interface SnapshottingDriver {
  /** Writes a snapshot of `id` to `file`; what it captures is `snapshotKind`. */
  snapshot(id: string, file: string, options?: SnapshotOptions): Promise<void>;
  /** Creates sandbox `spec.id` from the snapshot in `file`. */
  restore(spec: SandboxSpec, file: string): Promise<void>;
  readonly snapshotKind: 'filesystem' | 'memory+filesystem';
}

/** Optional ability: sandboxes with their own address on a host network (microVMs on the bridge). */
export interface AddressingDriver {
  addressOf(id: string): Promise<string | null>;
}

/** What the host sees one sandbox use, read from its cgroup or its VMM process — never from its agent. */
export interface HostUsage {
  /** CPU time the sandbox (or its VMM) has used since it started, in seconds. */
  cpuSeconds: number;
  /** Memory in use, without reclaimable file cache where the host can tell, in bytes. */
  memoryBytes: number;
  /** Bytes through its link on the host bridge, when it has one. */
  network?: NetworkBytes;
}

/** Optional ability: a sandbox's host-side usage, cheap enough to read at every metrics scrape. */
export interface UsageReportingDriver {
  /** null when the sandbox has no processes on the host (stopped, gone). */
  hostUsage(id: string): Promise<HostUsage | null>;
}

/** Optional ability: a sandbox's listening TCP ports read host-side, never from its agent. */
export interface PortListingDriver {
  /** Ascending; null when the driver cannot read them now (the sandbox has no live processes). */
  listeningPorts(id: string): Promise<number[] | null>;
}

export function listsPorts(d: SandboxDriver): d is SandboxDriver & PortListingDriver {
  return typeof (d as Partial<PortListingDriver>).listeningPorts === 'function';
}

/** Optional ability: how many of a sandbox's processes the kernel's OOM killer killed, read on the host (its cgroup). */
export interface OomCountingDriver {
  /** Since the sandbox last started; null when it has no cgroup now (stopped, gone). */
  oomKills(id: string): Promise<number | null>;
}

export function countsOomKills(d: SandboxDriver): d is SandboxDriver & OomCountingDriver {
  return typeof (d as Partial<OomCountingDriver>).oomKills === 'function';
}

/** Optional ability: bytes through a sandbox's link on the host (its veth or TAP), read on the host. */
export interface NetworkCountingDriver {
  /** null when the sandbox has no link (network none, not running). */
  networkBytes(id: string): Promise<NetworkBytes | null>;
}

export function countsNetworkBytes(d: SandboxDriver): d is SandboxDriver & NetworkCountingDriver {
  return typeof (d as Partial<NetworkCountingDriver>).networkBytes === 'function';
}

/** Optional ability: sets a running sandbox's hostname without a restart (a claimed warm-pool member takes its new name). */
export interface RenamingDriver {
  setHostname(id: string, name: string): Promise<void>;
}

export function renamesHost(d: SandboxDriver): d is SandboxDriver & RenamingDriver {
  return typeof (d as Partial<RenamingDriver>).setHostname === 'function';
}

/** Optional ability: removes what gone sandboxes left on the host besides their instances (network namespaces, links, leases). */
export interface HostReconcilingDriver {
  /** `known`: every sandbox that has a record. Resolves to one line per change. */
  reconcileHost(known: ReadonlySet<string>): Promise<string[]>;
}

export function reconcilesHost(d: SandboxDriver): d is SandboxDriver & HostReconcilingDriver {
  return typeof (d as Partial<HostReconcilingDriver>).reconcileHost === 'function';
}

export function reportsUsage(d: SandboxDriver): d is SandboxDriver & UsageReportingDriver {
  return typeof (d as Partial<UsageReportingDriver>).hostUsage === 'function';
}

export function hasAddresses(d: SandboxDriver): d is SandboxDriver & AddressingDriver {
  return typeof (d as Partial<AddressingDriver>).addressOf === 'function';
}

export function canPause(d: SandboxDriver): d is SandboxDriver & PausableDriver {
  return typeof (d as Partial<PausableDriver>).pause === 'function' && typeof (d as Partial<PausableDriver>).resume === 'function';
}

export function canSnapshot(d: SandboxDriver): d is SandboxDriver & SnapshottingDriver {
  return typeof (d as Partial<SnapshottingDriver>).snapshot === 'function';
}
