import { join } from 'node:path';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { AgentFiles } from '../agent-client/agent-bundle.js';
import { ContainerDriver } from './container/driver.js';
import type { IdMapping } from './container/oci-spec.js';
import { probeAccelerator, type AcceleratorChoice } from './qemu/accelerator-probe.js';
import { QemuDriver } from './qemu/driver.js';
import type { SandboxDriver } from './types.js';
import type { VmImages } from './vm/vm-images.js';

export interface DriverChoice {
  driver: SandboxDriver | null;
  /** Why no driver (or why this one), in one line. */
  reason: string;
  /** qemu only. */
  accelerator?: AcceleratorChoice['accel'];
}

export interface DriverDeps {
  agent: AgentFiles;
  idMap: IdMapping;
  vmImages: VmImages;
  log: Logger;
}

/**
 * The driver `SANDBOX_DRIVER` asks for, or with `auto` the best one available here:
 * cloud-hypervisor (binary present and KVM usable) → qemu with KVM → container. `qemu` chosen
 * explicitly also runs on TCG (software emulation: slower, but a real VM boundary).
 */
export async function selectDriver(config: Config, deps: DriverDeps): Promise<DriverChoice> {
  const container = new ContainerDriver({
    instancesDir: config.INSTANCES_DIR,
    runcRoot: config.RUNC_ROOT,
    idMap: deps.idMap,
    pidsLimit: config.SANDBOX_PIDS_LIMIT,
    agent: deps.agent,
    agentReadyTimeoutMs: config.AGENT_READY_TIMEOUT_MS,
    log: deps.log,
  });
  let accelerator: Promise<AcceleratorChoice> | null = null;
  const probe = () =>
    (accelerator ??= deps.vmImages.ensure(config.SANDBOX_DEFAULT_IMAGE).then((image) =>
      probeAccelerator({ qemu: config.QEMU_BINARY, image, cacheFile: join(config.BASE_IMAGES_DIR, 'kvm-probe.json'), log: deps.log }),
    ));
  const qemu = new QemuDriver({
    binary: config.QEMU_BINARY,
    instancesDir: config.INSTANCES_DIR,
    images: deps.vmImages,
    agent: deps.agent,
    // A VM boots in seconds under KVM but takes several under TCG before its agent answers.
    agentReadyTimeoutMs: Math.max(config.AGENT_READY_TIMEOUT_MS, 60_000),
    accelerator: probe,
    log: deps.log,
  });

  switch (config.SANDBOX_DRIVER) {
    case 'container': {
      const a = await container.available();
      return a.ok ? { driver: container, reason: 'SANDBOX_DRIVER=container' } : { driver: null, reason: `container driver unavailable: ${a.reason}` };
    }
    case 'qemu': {
      const a = await qemu.available();
      if (!a.ok) return { driver: null, reason: `qemu driver unavailable: ${a.reason}` };
      const choice = await probe();
      return { driver: qemu, reason: `SANDBOX_DRIVER=qemu; ${choice.reason}`, accelerator: choice.accel };
    }
    case 'cloud-hypervisor':
      return { driver: null, reason: 'SANDBOX_DRIVER=cloud-hypervisor is not available in this version; use qemu, container or auto' };
    case 'auto': {
      const skipped: string[] = [];
      const q = await qemu.available();
      if (!q.ok) skipped.push(`qemu: ${q.reason}`);
      else if (!(await deps.vmImages.isReady(config.SANDBOX_DEFAULT_IMAGE))) skipped.push('qemu: the VM image is not built (npm run image:build -- debian --vm)');
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
