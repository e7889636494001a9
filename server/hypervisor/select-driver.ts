import { join } from 'node:path';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { AgentFiles } from '../agent-client/agent-bundle.js';
import { ContainerDriver } from './container/driver.js';
import { ensureContainerBootFiles } from './container/boot-files.js';
import type { IdMapping } from './container/oci-spec.js';
import { probeAccelerator, type AcceleratorChoice } from './qemu/accelerator-probe.js';
import { QemuDriver } from './qemu/driver.js';
import type { IpLeaseRepository } from '../store/types.js';
import { CloudHypervisorDriver } from './cloud-hypervisor/driver.js';
import { findLink, tapNameFor } from './network/host-network.js';
import { bridgeVmNetwork } from './network/vm-network.js';
import { IpPool } from './network/ip-pool.js';
import { chooseSandboxNetwork, type SandboxNetworkChoice } from './network/sandbox-net.js';
import { noFirewall, type SandboxFirewall, type SandboxNetworking } from './network/types.js';
import type { SandboxDriver } from './types.js';
import { createOverlay, writeConfigDisk } from './vm/instance-files.js';
import { vmBootImage, type VmImages } from './vm/vm-images.js';

export interface DriverChoice {
  driver: SandboxDriver | null;
  /** Why no driver (or why this one), in one line. */
  reason: string;
  /** qemu only. */
  accelerator?: AcceleratorChoice['accel'];
  /** What SANDBOX_NETWORK resolved to (container sandboxes on the bridge, or loopback only). */
  network: Omit<SandboxNetworkChoice, 'networking'>;
}

export interface DriverDeps {
  agent: AgentFiles;
  idMap: IdMapping;
  vmImages: VmImages;
  /** Where guest addresses on the bridge are leased (cloud-hypervisor). */
  ipLeases: IpLeaseRepository;
  /** Enforces sandboxes' egress policies on the bridge (container veths and VM TAPs); none filters nothing. */
  firewall?: SandboxFirewall;
  log: Logger;
}

/**
 * The driver `SANDBOX_DRIVER` asks for, or with `auto` the best one available here:
 * cloud-hypervisor (binary present and KVM usable) → qemu with KVM → container. `qemu` chosen
 * explicitly also runs on TCG (software emulation: slower, but a real VM boundary).
 */
export async function selectDriver(config: Config, deps: DriverDeps): Promise<DriverChoice> {
  const network = await chooseNetwork(config, deps);
  return { ...(await selectFor(config, deps, network.networking)), network: { mode: network.mode, reason: network.reason, ...(network.bridgeUnavailable ? { bridgeUnavailable: network.bridgeUnavailable } : {}) } };
}

/** SANDBOX_NETWORK resolved, with the bridge set up (setup-net) when it resolves to `bridge`. */
function chooseNetwork(config: Config, deps: DriverDeps): Promise<SandboxNetworkChoice> {
  return chooseSandboxNetwork({
    requested: config.SANDBOX_NETWORK,
    bridge: config.BRIDGE_NAME,
    gatewayCidr: config.GATEWAY_IP,
    networkCidr: config.NETWORK_CIDR,
    pool: new IpPool({ networkCidr: config.NETWORK_CIDR, gatewayCidr: config.GATEWAY_IP, leases: deps.ipLeases }),
    leases: deps.ipLeases,
    linkPrefix: config.TAP_PREFIX ?? config.NET_PREFIX,
    ...(deps.firewall ? { firewall: deps.firewall } : {}),
    log: deps.log,
  });
}

async function selectFor(config: Config, deps: DriverDeps, networking: SandboxNetworking | null): Promise<Omit<DriverChoice, 'network'>> {
  const container = new ContainerDriver({
    instancesDir: config.INSTANCES_DIR,
    runcRoot: config.RUNC_ROOT,
    idMap: deps.idMap,
    pidsLimit: config.SANDBOX_PIDS_LIMIT,
    bootFiles: () => ensureContainerBootFiles(deps.agent),
    agentReadyTimeoutMs: agentReadyTimeoutMs(config),
    networking,
    log: deps.log,
  });
  let accelerator: Promise<AcceleratorChoice> | null = null;
  const probe = () =>
    (accelerator ??= deps.vmImages
      .ensure(vmBootImage(config.SANDBOX_DEFAULT_IMAGE))
      .then((image) => probeAccelerator({ qemu: config.QEMU_BINARY, image, cacheFile: join(config.BASE_IMAGES_DIR, 'kvm-probe.json'), log: deps.log }))
      .catch((err: Error) => {
        accelerator = null; // a later call tries again (e.g. once the image can be built)
        throw err;
      }));
  // VMs' TAPs on the bridge: cloud-hypervisor's only NIC; qemu's second one, with SANDBOX_NETWORK=bridge.
  const linkPrefix = config.TAP_PREFIX ?? config.NET_PREFIX;
  const vmNetwork = bridgeVmNetwork({
    bridge: config.BRIDGE_NAME,
    pool: new IpPool({ networkCidr: config.NETWORK_CIDR, gatewayCidr: config.GATEWAY_IP, leases: deps.ipLeases }),
    firewall: deps.firewall ?? noFirewall,
    tapNameFor: (id) => tapNameFor(id, linkPrefix),
    tapPattern: new RegExp(`^${linkPrefix}[0-9a-f]{12}$`),
  });
  const qemu = new QemuDriver({
    binary: config.QEMU_BINARY,
    instancesDir: config.INSTANCES_DIR,
    images: deps.vmImages,
    agent: deps.agent,
    // A VM boots in seconds under KVM but takes several under TCG before its agent answers.
    agentReadyTimeoutMs: Math.max(agentReadyTimeoutMs(config), 60_000),
    kernelCmdline: config.SANDBOX_KERNEL_CMDLINE,
    accelerator: probe,
    network: networking ? vmNetwork : null,
    log: deps.log,
  });
  const cloudHypervisor = new CloudHypervisorDriver({
    binary: config.CLOUD_HYPERVISOR_BINARY,
    instancesDir: config.INSTANCES_DIR,
    // KERNEL_PATH (the original's variable) names the uncompressed kernel; the image builder writes it there by default.
    // INITRD_PATH, set, replaces the image's initramfs.
    image: async (name, lowerDirs) => ({ ...(await deps.vmImages.ensure(name, lowerDirs)), vmlinux: config.KERNEL_PATH, ...(config.INITRD_PATH ? { initrd: config.INITRD_PATH } : {}) }),
    agentDisk: () => deps.vmImages.ensureAgentDisk(deps.agent, vmBootImage(config.SANDBOX_DEFAULT_IMAGE)),
    network: vmNetwork,
    writeConfigDisk,
    createOverlay,
    agentReadyTimeoutMs: Math.max(agentReadyTimeoutMs(config), 30_000),
    kernelCmdline: config.SANDBOX_KERNEL_CMDLINE,
    log: deps.log,
  });
  /** The binary and /dev/kvm, and the bridge setup-net makes. */
  const cloudHypervisorAvailable = async (): Promise<{ ok: boolean; reason?: string }> => {
    const a = await cloudHypervisor.available();
    if (!a.ok) return a;
    if (!(await findLink(config.BRIDGE_NAME).catch(() => null))) return { ok: false, reason: `bridge ${config.BRIDGE_NAME} does not exist (npm run setup-net creates it)` };
    return { ok: true };
  };

  switch (config.SANDBOX_DRIVER) {
    case 'container': {
      const a = await container.available();
      return a.ok ? { driver: container, reason: 'SANDBOX_DRIVER=container' } : { driver: null, reason: `container driver unavailable: ${a.reason}` };
    }
    case 'qemu': {
      const a = await qemu.available();
      if (!a.ok) return { driver: null, reason: `qemu driver unavailable: ${a.reason}` };
      try {
        const choice = await probe();
        return { driver: qemu, reason: `SANDBOX_DRIVER=qemu; ${choice.reason}`, accelerator: choice.accel };
      } catch (err) {
        return { driver: null, reason: `qemu driver unavailable: ${(err as Error).message}` };
      }
    }
    case 'cloud-hypervisor': {
      const a = await cloudHypervisorAvailable();
      return a.ok ? { driver: cloudHypervisor, reason: 'SANDBOX_DRIVER=cloud-hypervisor' } : { driver: null, reason: `cloud-hypervisor driver unavailable: ${a.reason}` };
    }
    case 'auto': {
      const skipped: string[] = [];
      const ch = await cloudHypervisorAvailable();
      if (!ch.ok) skipped.push(`cloud-hypervisor: ${ch.reason}`);
      else if ((await qemu.available()).ok && (await deps.vmImages.isReady(vmBootImage(config.SANDBOX_DEFAULT_IMAGE))) && (await probe()).accel !== 'kvm') {
        skipped.push(`cloud-hypervisor: ${(await probe()).reason.replace(/: TCG.*$/, '')}`);
      } else return { driver: cloudHypervisor, reason: 'auto: cloud-hypervisor (binary present, /dev/kvm usable, bridge up)' };
      const q = await qemu.available();
      if (!q.ok) skipped.push(`qemu: ${q.reason}`);
      else if (!(await deps.vmImages.isReady(vmBootImage(config.SANDBOX_DEFAULT_IMAGE)))) skipped.push('qemu: the VM image is not built (npm run image:build -- debian --vm)');
      else {
        const choice = await probe();
        if (choice.accel === 'kvm') return { driver: qemu, reason: `auto: qemu with KVM (${choice.reason})`, accelerator: 'kvm' };
        skipped.push(`qemu would run on TCG only (${choice.reason}); choose SANDBOX_DRIVER=qemu for that`);
      }
      const c = await container.available();
      if (c.ok) return { driver: container, reason: `auto: container (runc); ${skipped.join('; ')}` };
      return { driver: null, reason: `no sandbox driver can run here: container: ${c.reason}; ${skipped.join('; ')}` };
    }
  }
}

/** How long a create waits for the agent: AGENT_READY_TIMEOUT_MS, else the original's SANDBOX_SYNC_TIMEOUT_SEC. */
export function agentReadyTimeoutMs(config: Config): number {
  return config.AGENT_READY_TIMEOUT_MS ?? config.SANDBOX_SYNC_TIMEOUT_SEC * 1000;
}
