import { join } from 'node:path';

/*
 * What every microVM driver (qemu, cloud-hypervisor) shares about a guest: where its files are on
 * the host, how the guest learns its settings, and how the host reaches the agent inside.
 *
 * Guest boot: kernel + initramfs (virtio modules) → ext4 root from `overlay.qcow2` (/dev/vda),
 * the shared read-only agent disk (/dev/vdb: node, the agent bundle, node-pty), the per-sandbox
 * config disk (/dev/vdc: `GuestConfig` as JSON, zero-padded). The guest's init mounts them and
 * starts the agent listening on TCP `GUEST_AGENT_PORT` inside the VM. cloud-hypervisor reaches that
 * port through hybrid vsock (a bridge in the guest forwards vsock port 1024 to it); qemu through a
 * user-mode-network port forward on host loopback.
 *
 * Because a loopback port is reachable by every local user, every connection starts with a
 * challenge–response on the sandbox's token (shared/guest-protocol.ts) before HTTP; the token is
 * random per sandbox and lives only in the config disk (root-only on the host) and the guest.
 */

export { CONFIG_DISK_BYTES, GUEST_AGENT_PORT, type GuestConfig } from '../../../shared/guest-protocol.js';

/** The host files of one VM image under BASE_IMAGES_DIR (the original VoidRun's `<image>-base.qcow2`). */
export interface VmImagePaths {
  /** Compressed kernel (bzImage) for qemu. */
  kernel: string;
  /** Uncompressed ELF kernel for cloud-hypervisor (its KERNEL_PATH). */
  vmlinux: string;
  initrd: string;
  baseDisk: string;
}

export function vmImagePaths(baseImagesDir: string, image: string): VmImagePaths {
  return {
    kernel: join(baseImagesDir, `${image}-vmlinuz`),
    vmlinux: join(baseImagesDir, 'vmlinux'),
    initrd: join(baseImagesDir, `${image}-initrd.img`),
    baseDisk: join(baseImagesDir, `${image}-base.qcow2`),
  };
}

/** The files of one VM under INSTANCES_DIR/<id>/ (the original VoidRun's layout plus ours). */
export interface VmInstancePaths {
  dir: string;
  overlay: string;
  configDisk: string;
  /** cloud-hypervisor's --api-socket. */
  apiSocket: string;
  /** cloud-hypervisor's hybrid vsock socket. */
  vsockSocket: string;
  /** QEMU's QMP socket. */
  qmpSocket: string;
  log: string;
  pid: string;
}

export function vmInstancePaths(instancesDir: string, id: string): VmInstancePaths {
  const dir = join(instancesDir, id);
  return {
    dir,
    overlay: join(dir, 'overlay.qcow2'),
    configDisk: join(dir, 'config.img'),
    apiSocket: join(dir, 'vm.sock'),
    vsockSocket: join(dir, 'vsock.sock'),
    qmpSocket: join(dir, 'qmp.sock'),
    log: join(dir, 'vm.log'),
    pid: join(dir, 'vm.pid'),
  };
}
