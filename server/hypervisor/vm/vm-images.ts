import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants, existsSync } from 'node:fs';
import { chmod, copyFile, cp, lstat, mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { gzipSync } from 'node:zlib';
import type { Logger } from 'pino';
import type { AgentFiles } from '../../agent-client/agent-bundle.js';
import { DomainError, ErrorCode } from '../../errors.js';
import { runLogged } from '../images/logged-command.js';
import { isBuildableImage, isChainImageKey, remapOwnership, vmImageKey, type RootfsImages } from '../images/rootfs-images.js';
import { measureTree } from '../images/layer-store.js';
import { mountedAt } from '../container/mounts.js';
import { cpioArchive, type CpioEntry } from './cpio-archive.js';
import { agentDiskInit, GUEST_AGENT_DIR, initramfsInit } from './guest-boot-files.js';
import { vmImagePaths, type VmImagePaths } from './guest.js';
import { extractLz4Legacy } from './lz4-legacy.js';

/** Modules the guest needs, by name; their dependencies are found in the modules themselves. */
const GUEST_MODULES = ['virtio_pci', 'virtio_blk', 'virtio_net', 'virtio-rng', 'vmw_vsock_virtio_transport'];
const KERNEL_PACKAGE = 'linux-image-cloud-amd64';
/** The system image whose kernel, initramfs and busybox chain images boot. */
const BOOT_IMAGE = 'debian';

/**
 * The VM image whose boot files (kernel, initramfs, busybox) a sandbox of image `name` uses: its
 * own for a debootstrap image, debian's for any other (a chain key, or a system image built as
 * layers such as `code`, whose root disk is a chain image).
 */
export function vmBootImage(name: string): string {
  return isBuildableImage(name) ? name : BOOT_IMAGE;
}
/** Bumped when what the builder produces changes; part of the marker, so old builds are redone. */
const VM_IMAGE_VERSION = 3;

export interface VmImagesOptions {
  baseImagesDir: string;
  rootfs: RootfsImages;
  /** First host uid of the container images' range: VM disks are owned by plain uids again. */
  containerUidBase: number;
  /** The largest root disk an image's files may need, in MiB (default VM_ROOT_MAX_MB); a larger stack is refused before anything is copied. */
  maxRootMb?: number;
  /** INSTANCES_DIR: a chain image backing a sandbox's disk there is never pruned. */
  instancesDir?: string;
  log: Logger;
}

/** Default bound on a VM root disk built from an image's files (MiB). */
export const VM_ROOT_MAX_MB = 64 * 1024;

/**
 * Bootable VM images under BASE_IMAGES_DIR, made from the same debian rootfs the container driver
 * uses: Debian's cloud kernel (`<image>-vmlinuz`, plus the uncompressed `vmlinux` cloud-hypervisor
 * boots), a busybox initramfs with the virtio modules (`<image>-initrd.img`) and an ext4 root disk
 * as a qcow2 base (`<image>-base.qcow2`, the original VoidRun's name). The agent is not in the
 * image: it comes on a separate read-only disk (`agent/agent-<hash>.img`) rebuilt whenever the
 * agent changes, so images never need rebuilding for a new agent.
 *
 * An image with layers has a chain key (`vmImageKey` of its lower dirs, `chain-<hex>`): only its
 * root disk is its own (`<key>-base.qcow2`, built from the merged lower dirs on first use); kernel,
 * initramfs and busybox are the debian image's.
 */
export class VmImages {
  readonly #building = new Map<string, Promise<VmImagePaths>>();

  constructor(private readonly opts: VmImagesOptions) {}

  paths(name: string): VmImagePaths {
    const own = vmImagePaths(this.opts.baseImagesDir, name);
    return isChainImageKey(name) ? { ...vmImagePaths(this.opts.baseImagesDir, BOOT_IMAGE), baseDisk: own.baseDisk } : own;
  }

  #marker(name: string): string {
    return join(this.opts.baseImagesDir, `${name}-vm.json`);
  }

  async isReady(name: string): Promise<boolean> {
    try {
      const marker = JSON.parse(await readFile(this.#marker(name), 'utf8')) as { version?: number };
      return marker.version === VM_IMAGE_VERSION;
    } catch {
      return false;
    }
  }

  /**
   * The image's VM files, building them first if needed; concurrent callers share one build. A
   * chain key is built from `lowerDirs` (the sandbox's `[rootfs, ...layers]`, which must be the
   * stack the key names).
   */
  ensure(name: string, lowerDirs?: readonly string[]): Promise<VmImagePaths> {
    let build = this.#building.get(name);
    if (!build) {
      build = (async () => {
        if (await this.isReady(name)) return this.paths(name);
        return isChainImageKey(name) ? this.#buildChain(name, lowerDirs) : this.#build(name);
      })().finally(() => this.#building.delete(name));
      this.#building.set(name, build);
    }
    return build;
  }

  /**
   * A chain image's root disk. Its layers are tenant files, so the host writes nothing into them
   * and follows none of their links: what the guest needs (socat and the libraries the stack
   * lacks, the agent's mount point, the hostname) goes into a clean directory of its own, stacked
   * on top; the stack is merged by a read-only overlay mounted in a private directory (the kernel
   * applies the layers' whiteouts and opaque directories) and copied with `cp -a` (links copied as
   * links), then made a disk as a system image's.
   */
  async #buildChain(name: string, lowerDirs: readonly string[] | undefined): Promise<VmImagePaths> {
    if (!lowerDirs?.length) throw new DomainError(ErrorCode.INVALID_INPUT, `The VM image ${name} is not built here and this request does not name its layers: create the sandbox again`);
    if (vmImageKey(lowerDirs) !== name) throw new DomainError(ErrorCode.INVALID_INPUT, `The VM image ${name} is not the image of these layers`);
    await this.ensure(BOOT_IMAGE);
    await this.#pruneChains();
    const { log, baseImagesDir } = this.opts;
    const work = await mkdtemp(join(baseImagesDir, `.vm-${name}-`));
    const merged = join(work, 'merged');
    const started = Date.now();
    const step = (message: string) => log.info({ image: name }, `vm image ${name}: ${message}`);
    try {
      await mkdir(merged);
      // The stack's dpkg database decides which of socat's libraries the guest files must bring.
      const status = await withReadOnlyOverlay(work, lowerDirs, (view) => readInTree(view, 'var/lib/dpkg/status', 64 * 1024 * 1024));
      step('adding socat (the guest end of the vsock bridge), the agent mount point and the hostname in a layer of their own');
      const guest = join(work, 'guest');
      await this.#guestFiles(work, guest, status ?? '');
      step(`merging ${lowerDirs.length} lower dirs with a read-only overlay and copying them`);
      const root = join(work, 'root');
      await withReadOnlyOverlay(work, [...lowerDirs, guest], async (view) => {
        // Measured (blocks, each inode once) and bounded before anything is copied.
        await this.#measureRoot(name, view);
        await runLogged('cp', ['-a', view, root], log);
      });
      step('giving the root filesystem plain ownership');
      await this.#plainOwnership(root);
      const rootMb = await this.#diskFromRoot(name, work, root, step);
      await this.#placeBaseDisk(name, work);
      await this.#writeMarker(name, { lowerDirs, rootMb });
    } catch (err) {
      if (err instanceof DomainError && err.code === ErrorCode.INVALID_INPUT) throw err;
      throw new DomainError(ErrorCode.DRIVER_FAILURE, `Building the VM image ${name} failed: ${(err as Error).message}`, { cause: err });
    } finally {
      if (mountedAt(merged)) await runLogged('umount', ['-l', merged], log).catch(() => {});
      await rm(work, { recursive: true, force: true }).catch(() => {});
    }
    log.info({ image: name, seconds: Math.round((Date.now() - started) / 1000) }, `vm image ${name} is ready`);
    return this.paths(name);
  }

  /**
   * Removes the chain images one of whose lower dirs is gone (its layers were collected: no image
   * and so no sandbox uses them any more). Runs before each chain build, so they never pile up.
   */
  async #pruneChains(): Promise<void> {
    const { baseImagesDir, log } = this.opts;
    let inUse: Set<string> | undefined;
    for (const entry of await readdir(baseImagesDir)) {
      const key = /^(chain-[0-9a-f]{16})-vm\.json$/.exec(entry)?.[1];
      if (!key) continue;
      const marker = (await readFile(join(baseImagesDir, entry), 'utf8').then((t) => JSON.parse(t) as { lowerDirs?: unknown }).catch(() => null)) ?? {};
      const dirs = Array.isArray(marker.lowerDirs) ? marker.lowerDirs.filter((d): d is string => typeof d === 'string') : [];
      if (dirs.length && dirs.every((d) => existsSync(d))) continue;
      // A sandbox's disk is an overlay on this chain's base: it stays while that sandbox exists.
      // Read once per prune (every instance's overlay header), on the first chain whose layers are gone.
      inUse ??= await this.#chainsInUse();
      if (inUse.has(key)) continue;
      // Marker first: from then on the image counts as unbuilt.
      await rm(join(baseImagesDir, entry), { force: true });
      for (const file of await readdir(baseImagesDir)) if (file.startsWith(`${key}-base`)) await rm(join(baseImagesDir, file), { force: true });
      log.info({ image: key }, `vm image ${key} removed: its layers are gone`);
    }
  }

  /**
   * Chain keys whose base disk backs an instance's overlay in INSTANCES_DIR: the backing file name
   * (`<key>-base-v<n>.qcow2`) read from each overlay's qcow2 header (written by qemu-img on the
   * host; the guest never sees the header), bounded.
   */
  async #chainsInUse(): Promise<Set<string>> {
    const keys = new Set<string>();
    const dir = this.opts.instancesDir;
    if (!dir || !existsSync(dir)) return keys;
    for (const id of await readdir(dir)) {
      const backing = await qcow2BackingFile(join(dir, id, 'overlay.qcow2')).catch(() => null);
      const key = backing && /^(chain-[0-9a-f]{16})-base/.exec(basename(backing))?.[1];
      if (key) keys.add(key);
    }
    return keys;
  }

  /**
   * The files a guest needs on its root disk besides its image, in `dir` (a new directory): socat
   * with whatever packages `dpkgStatus` (the image's dpkg database) lacks, unpacked with merged
   * /usr (top-level bin, sbin and lib* moved under usr/, as the image has them), the agent's
   * mount point and /etc/hostname.
   */
  async #guestFiles(work: string, dir: string, dpkgStatus: string): Promise<void> {
    const debs = join(work, 'guest-debs');
    await mkdir(debs);
    await mkdir(join(dir, GUEST_AGENT_DIR.slice(1)), { recursive: true });
    const needed = await missingPackages(['socat'], dpkgStatus);
    if (needed.length) await aptDownload(needed, debs, this.opts.log);
    for (const deb of await readdir(debs)) await runLogged('dpkg-deb', ['-x', join(debs, deb), dir], this.opts.log);
    for (const top of ['bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32']) {
      if ((await lstat(join(dir, top)).catch(() => null))?.isDirectory()) await moveInto(join(dir, top), join(dir, 'usr', top));
    }
    await mkdir(join(dir, 'etc'), { recursive: true });
    await writeFile(join(dir, 'etc', 'hostname'), 'sandbox\n', { mode: 0o644 });
  }

  async #build(name: string): Promise<VmImagePaths> {
    const { log, baseImagesDir } = this.opts;
    const rootfs = await this.opts.rootfs.ensure(name);
    const paths = this.paths(name);
    const work = await mkdtemp(join(baseImagesDir, `.vm-${name}-`));
    const started = Date.now();
    const step = (message: string) => log.info({ image: name }, `vm image ${name}: ${message}`);
    try {
      step(`downloading ${KERNEL_PACKAGE} and busybox-static with apt`);
      const debs = join(work, 'debs');
      const unpacked = join(work, 'unpacked');
      await mkdir(debs, { recursive: true });
      await mkdir(unpacked);
      const kernelPackage = await resolveKernelPackage(log);
      await aptDownload([kernelPackage, 'busybox-static'], debs, log);
      for (const deb of await readdir(debs)) await runLogged('dpkg-deb', ['-x', join(debs, deb), unpacked], log);
      const kernelVersion = kernelPackage.replace(/^linux-image-/, '');

      step('building the initramfs (busybox + virtio modules)');
      const modulesDir = join(unpacked, 'lib', 'modules', kernelVersion);
      const modules = await resolveModules(modulesDir, GUEST_MODULES);
      const entries: CpioEntry[] = [
        ...['bin', 'dev', 'lib', 'lib/modules', 'newroot', 'proc', 'sys'].map((path) => ({ path, type: 'dir' as const, mode: 0o755 })),
        { path: 'bin/busybox', type: 'file', mode: 0o755, data: await readFile(join(unpacked, 'bin', 'busybox')) },
        { path: 'init', type: 'file', mode: 0o755, data: initramfsInit(modules.map((m) => m.name)) },
      ];
      for (const m of modules) entries.push({ path: `lib/modules/${m.name}.ko`, type: 'file', mode: 0o644, data: await readFile(m.file) });
      await writeFile(join(work, 'initrd.img'), gzipSync(cpioArchive(entries)));

      step('extracting the uncompressed vmlinux for cloud-hypervisor');
      const vmlinuz = join(unpacked, 'boot', `vmlinuz-${kernelVersion}`);
      await writeFile(join(work, 'vmlinux'), extractLz4Legacy(await readFile(vmlinuz)));

      step('copying the root filesystem with plain ownership (the container copy is uid-shifted)');
      const root = join(work, 'root');
      // cp -a: the rootfs has device nodes, which fs.cp cannot copy.
      await runLogged('cp', ['-a', rootfs, root], log);
      await this.#plainOwnership(root);
      await mkdir(join(root, GUEST_AGENT_DIR.slice(1)), { recursive: true });
      await writeFile(join(root, 'etc', 'hostname'), 'sandbox\n');

      // socat bridges cloud-hypervisor's vsock to the agent's TCP port in the guest (Node has no
      // AF_VSOCK). Unpacked with whatever libraries it needs that the image lacks.
      step('adding socat (the guest end of the vsock bridge)');
      const extra = join(work, 'extra-debs');
      await mkdir(extra);
      const needed = await missingPackages(['socat'], await readFile(join(root, 'var', 'lib', 'dpkg', 'status'), 'utf8'));
      if (needed.length) await aptDownload(needed, extra, log);
      for (const deb of await readdir(extra)) await extractDebInto(join(extra, deb), root);
      const rootMb = await this.#diskFromRoot(name, work, root, step);

      // Into place: files first, the marker last (a crash in between leaves a build to redo).
      await copyFile(vmlinuz, `${paths.kernel}.tmp`);
      await rename(`${paths.kernel}.tmp`, paths.kernel);
      await rename(join(work, 'initrd.img'), paths.initrd);
      await rename(join(work, 'vmlinux'), paths.vmlinux);
      await this.#placeBaseDisk(name, work);
      await copyFile(join(unpacked, 'bin', 'busybox'), this.#busyboxPath(name));
      await this.#writeMarker(name, { kernel: kernelVersion, modules: modules.map((m) => m.name), rootMb });
    } catch (err) {
      throw new DomainError(ErrorCode.DRIVER_FAILURE, `Building the VM image ${name} failed: ${(err as Error).message}`, { cause: err });
    } finally {
      await rm(work, { recursive: true, force: true }).catch(() => {});
    }
    log.info({ image: name, seconds: Math.round((Date.now() - started) / 1000) }, `vm image ${name} is ready`);
    return paths;
  }

  /** The container copy is uid-shifted; a VM's disk has plain owners again (links and all, never followed). */
  #plainOwnership(root: string): Promise<void> {
    const base = this.opts.containerUidBase;
    return remapOwnership(root, (id) => (id >= base && id < base + 65536 ? id - base : id));
  }

  /** `root` as ext4 in `work/base.qcow2`; resolves to the disk's size in MiB. */
  async #diskFromRoot(name: string, work: string, root: string, step: (message: string) => void): Promise<number> {
    const { log } = this.opts;
    step(`making the ext4 root disk of ${name} and converting it to qcow2`);
    // Sized to what the files take plus room; the guest grows it to the sandbox's disk size at boot.
    const { rootMb, inodes } = await this.#measureRoot(name, root);
    const raw = join(work, 'root.ext4');
    await runLogged('mkfs.ext4', ['-q', '-F', '-L', 'voidrun-root', '-N', String(inodes), '-d', root, raw, `${rootMb}M`], log);
    await runLogged('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, join(work, 'base.qcow2')], log);
    return rootMb;
  }

  /**
   * The root disk `root`'s files need: their allocated blocks, each inode once (a hard link or a
   * sparse file costs what the host allocated, never what it claims), plus a tenth and 512 MiB for
   * ext4's own metadata and room, and inodes for every file. Refused (400 naming the bound) past
   * `maxRootMb`, before mkfs is asked for a disk that size.
   */
  async #measureRoot(name: string, root: string): Promise<{ rootMb: number; inodes: number }> {
    const maxMb = this.opts.maxRootMb ?? VM_ROOT_MAX_MB;
    const headroomMb = 512;
    const tooBig = (bytes: number) =>
      new DomainError(ErrorCode.INVALID_INPUT, `The files of VM image ${name} take more than ${Math.floor(bytes / 2 ** 20)} MiB, past the ${maxMb} MiB a VM root disk may have on this server: make the image smaller (fewer or smaller files)`);
    const maxBytes = Math.max(0, Math.floor(((maxMb - headroomMb) * 2 ** 20) / 1.1));
    const measured = await measureTree(root, { devices: 'count', maxBytes, tooBig });
    return { rootMb: Math.ceil((measured.bytes * 1.1) / 2 ** 20) + headroomMb, inodes: measured.inodes + 16_384 };
  }

  /**
   * Overlays name their base by path, so each version of the base is its own file and never
   * changes under a sandbox made from it; `<image>-base.qcow2` points at the newest.
   */
  async #placeBaseDisk(name: string, work: string): Promise<void> {
    const baseDisk = vmImagePaths(this.opts.baseImagesDir, name).baseDisk;
    const versionedBase = join(this.opts.baseImagesDir, `${name}-base-v${VM_IMAGE_VERSION}.qcow2`);
    // A base of this version that exists is complete (renamed into place whole) and may back
    // sandboxes: keep it rather than replace it.
    if (!existsSync(versionedBase)) await rename(join(work, 'base.qcow2'), versionedBase);
    await rm(`${baseDisk}.tmp`, { force: true });
    await symlink(basename(versionedBase), `${baseDisk}.tmp`);
    await rename(`${baseDisk}.tmp`, baseDisk);
  }

  /** Last: the image counts as built once its marker is in place (a crash before leaves a build to redo). */
  async #writeMarker(name: string, details: Record<string, unknown>): Promise<void> {
    await writeFile(`${this.#marker(name)}.tmp`, JSON.stringify({ name, version: VM_IMAGE_VERSION, ...details, builtAt: new Date().toISOString() }));
    await rename(`${this.#marker(name)}.tmp`, this.#marker(name));
  }

  /**
   * The read-only disk every VM mounts at /opt/voidrun: the host's node, the agent bundle,
   * node-pty, busybox and the guest's init. Named by a hash of its contents, so a new agent gets a
   * new disk and running VMs keep theirs.
   */
  async ensureAgentDisk(agent: AgentFiles, image: string = BOOT_IMAGE): Promise<string> {
    image = vmBootImage(image);
    await this.ensure(image);
    const busybox = await readFile(this.#busyboxPath(image));
    const nodePty = join(agent.nodeModules, 'node-pty');
    const hash = createHash('sha256');
    hash.update(await readFile(agent.bundle)).update(process.version).update(agentDiskInit()).update(busybox);
    hash.update(await readFile(join(nodePty, 'package.json')));
    const disk = join(this.opts.baseImagesDir, 'agent', `agent-${hash.digest('hex').slice(0, 16)}.img`);
    if (existsSync(disk)) return disk;

    await mkdir(join(this.opts.baseImagesDir, 'agent'), { recursive: true });
    const work = await mkdtemp(join(this.opts.baseImagesDir, 'agent', '.build-'));
    try {
      const dir = join(work, 'files');
      await mkdir(join(dir, 'node_modules'), { recursive: true });
      await copyFile(agent.nodeBinary, join(dir, 'node'));
      await copyFile(agent.bundle, join(dir, 'agent.cjs'));
      await writeFile(join(dir, 'busybox'), busybox, { mode: 0o755 });
      await writeFile(join(dir, 'init'), agentDiskInit(), { mode: 0o755 });
      // Only what node-pty loads at run time: its JS and the compiled addon.
      await cp(join(nodePty, 'package.json'), join(dir, 'node_modules', 'node-pty', 'package.json'));
      await cp(join(nodePty, 'lib'), join(dir, 'node_modules', 'node-pty', 'lib'), { recursive: true });
      await cp(join(nodePty, 'build', 'Release'), join(dir, 'node_modules', 'node-pty', 'build', 'Release'), { recursive: true });
      await chmod(join(dir, 'node'), 0o755);
      const mb = Math.ceil((await directorySize(dir)) / 1024 / 1024 * 1.1) + 16;
      const tmp = join(work, 'agent.img');
      await runLogged('mkfs.ext4', ['-q', '-F', '-L', 'voidrun-agent', '-d', dir, tmp, `${mb}M`], this.opts.log);
      await rename(tmp, disk);
      this.opts.log.info({ disk: basename(disk) }, 'vm agent disk built');
      return disk;
    } finally {
      await rm(work, { recursive: true, force: true }).catch(() => {});
    }
  }

  /** The static busybox the image was built with (its initramfs has the same one). */
  #busyboxPath(image: string): string {
    return join(this.opts.baseImagesDir, `${image}-busybox`);
  }
}

/** The backing file named in a qcow2 image's header (null without one); reads at most 4 KiB of it. */
async function qcow2BackingFile(path: string): Promise<string | null> {
  const file = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const head = Buffer.alloc(4096);
    const { bytesRead } = await file.read(head, 0, head.length, 0);
    if (bytesRead < 20 || head.readUInt32BE(0) !== 0x514649fb) return null;
    const offset = Number(head.readBigUInt64BE(8));
    const size = head.readUInt32BE(16);
    if (!offset || !size || size > 1023 || offset + size > bytesRead) return null;
    return head.toString('utf8', offset, offset + size);
  } finally {
    await file.close();
  }
}

async function directorySize(root: string): Promise<number> {
  let total = 0;
  const stack = [root];
  while (stack.length) {
    const dir = stack.pop()!;
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) stack.push(path);
      else if (entry.isFile()) total += (await stat(path)).size;
    }
  }
  return total;
}

/**
 * Calls `fn` with a read-only view of `lowerDirs` (bottom first): the dir itself when there is one,
 * else an overlay mounted at `work/merged` (an empty directory) for the call. The overlay's option
 * strings are relative (`work/lowers/<n>` symlinks), so no layer path has to be free of its separators.
 */
async function withReadOnlyOverlay<T>(work: string, lowerDirs: readonly string[], fn: (view: string) => Promise<T>): Promise<T> {
  if (lowerDirs.length === 1) return fn(lowerDirs[0]!);
  const lowers = join(work, 'lowers');
  await rm(lowers, { recursive: true, force: true });
  await mkdir(lowers);
  for (const [i, dir] of lowerDirs.entries()) await symlink(dir, join(lowers, String(i)));
  await runInDir(work, 'mount', ['-t', 'overlay', 'overlay', '-o', `ro,lowerdir=${lowerDirs.map((_, i) => `lowers/${i}`).reverse().join(':')}`, 'merged']);
  try {
    return await fn(join(work, 'merged'));
  } finally {
    await runInDir(work, 'umount', ['merged']).catch(() => runInDir(work, 'umount', ['-l', 'merged']));
  }
}

/**
 * The regular file `rel` under `root` (a tree a tenant made), read without following a link on
 * the way: null when a component is not a directory or the file is not a regular file.
 */
async function readInTree(root: string, rel: string, maxBytes: number): Promise<string | null> {
  const parts = rel.split('/');
  let path = root;
  for (const [i, part] of parts.entries()) {
    path = join(path, part);
    const st = await lstat(path).catch(() => null);
    if (!st || (i < parts.length - 1 ? !st.isDirectory() : !st.isFile())) return null;
  }
  const file = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    if ((await file.stat()).size > maxBytes) throw new Error(`${rel} in the image is larger than ${maxBytes} bytes`);
    return await file.readFile('utf8');
  } finally {
    await file.close();
  }
}

/** Moves the entries of directory `from` into `to` (merging directories), then removes `from`; for trees the host made. */
async function moveInto(from: string, to: string): Promise<void> {
  await mkdir(to, { recursive: true });
  for (const entry of await readdir(from, { withFileTypes: true })) {
    const target = join(to, entry.name);
    const existing = await lstat(target).catch(() => null);
    if (entry.isDirectory() && existing?.isDirectory()) await moveInto(join(from, entry.name), target);
    else await rename(join(from, entry.name), target);
  }
  await rm(from, { recursive: true, force: true });
}

/** Runs a host command in `cwd` (its paths relative to it), logging nothing but failures. */
function runInDir(cwd: string, cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) =>
    execFile(cmd, args, { cwd, timeout: 60_000 }, (err, _stdout, stderr) => (err ? reject(new Error(`${cmd} failed: ${(stderr || err.message).trim().split('\n').pop()}`)) : resolve())),
  );
}

/** The versioned kernel package the `linux-image-cloud-amd64` metapackage depends on. */
async function resolveKernelPackage(log: Logger): Promise<string> {
  const depends = () =>
    new Promise<string>((resolve, reject) =>
      execFile('apt-cache', ['depends', '--no-recommends', KERNEL_PACKAGE], (err, stdout) => (err ? reject(err) : resolve(stdout))),
    );
  let out = await depends().catch(() => '');
  if (!/Depends: linux-image-/.test(out)) {
    log.info('apt lists do not know the kernel package yet; running apt-get update');
    await runLogged('apt-get', ['update', '-qq'], log);
    out = await depends().catch((err: Error) => {
      throw new Error(`apt-cache cannot resolve ${KERNEL_PACKAGE} (a Debian host with apt is needed to build VM images): ${err.message}`);
    });
  }
  const match = /Depends: (linux-image-\S+)/.exec(out);
  if (!match) throw new Error(`${KERNEL_PACKAGE} does not depend on a versioned kernel package`);
  return match[1]!;
}

async function aptDownload(packages: string[], dir: string, log: Logger): Promise<void> {
  // apt drops privileges to _apt for downloads; it must be able to write the directory.
  await chmod(dir, 0o777);
  await new Promise<void>((resolve, reject) => {
    const child = spawn('apt-get', ['download', '-qq', ...packages], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.once('error', reject);
    child.once('close', (code) => (code === 0 ? resolve() : reject(new Error(`apt-get download ${packages.join(' ')} failed: ${stderr.trim().split('\n').pop()}`))));
  });
  log.debug({ packages }, 'downloaded');
}

/**
 * Unpacks a .deb over a merged-/usr root filesystem. (`dpkg-deb -x` would replace the `/lib` →
 * `usr/lib` symlink with a directory, breaking every program's dynamic loader.)
 */
async function extractDebInto(deb: string, root: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const dpkg = spawn('dpkg-deb', ['--fsys-tarfile', deb], { stdio: ['ignore', 'pipe', 'pipe'] });
    const tar = spawn('tar', ['-x', '--keep-directory-symlink', '-C', root], { stdio: ['pipe', 'ignore', 'pipe'] });
    dpkg.stdout.pipe(tar.stdin);
    let stderr = '';
    dpkg.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    tar.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    dpkg.once('error', reject);
    tar.once('error', reject);
    const dpkgExit = new Promise<number | null>((r) => dpkg.once('close', r));
    tar.once('close', (code) =>
      void dpkgExit.then((dpkgCode) => (code === 0 && dpkgCode === 0 ? resolve() : reject(new Error(`unpacking ${basename(deb)} failed: ${stderr.trim()}`)))),
    );
  });
}

/** `packages` and what they depend on, less what a dpkg database (the text of its `status` file) already has. */
async function missingPackages(packages: string[], dpkgStatus: string): Promise<string[]> {
  const out = await new Promise<string>((resolve, reject) =>
    execFile(
      'apt-cache',
      ['depends', '--recurse', '--no-recommends', '--no-suggests', '--no-conflicts', '--no-breaks', '--no-replaces', '--no-enhances', ...packages],
      { maxBuffer: 4 * 1024 * 1024 },
      (err, stdout) => (err ? reject(err) : resolve(stdout)),
    ),
  );
  const installed = new Set([...dpkgStatus.matchAll(/^Package: (\S+)$/gm)].map((m) => m[1]!));
  // Top-level lines are package names; indented ones are their relations; <virtual> ones have no .deb.
  const all = new Set(out.split('\n').filter((line) => line && !line.startsWith(' ') && !line.startsWith('<')));
  return [...all].filter((name) => !installed.has(name));
}

/** `wanted` modules and everything they depend on (from each module's modinfo), dependencies first. */
async function resolveModules(modulesDir: string, wanted: string[]): Promise<{ name: string; file: string }[]> {
  const files = new Map<string, string>();
  const stack = [join(modulesDir, 'kernel')];
  while (stack.length) {
    const dir = stack.pop()!;
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) stack.push(path);
      else if (entry.name.endsWith('.ko')) files.set(entry.name.slice(0, -3), path);
    }
  }
  // Module names use _ and - interchangeably.
  const find = (name: string) => files.get(name) ?? files.get(name.replace(/_/g, '-')) ?? files.get(name.replace(/-/g, '_'));
  const ordered: { name: string; file: string }[] = [];
  const seen = new Set<string>();
  const visit = async (name: string) => {
    const file = find(name);
    if (!file) return; // built into the kernel
    const key = basename(file, '.ko');
    if (seen.has(key)) return;
    seen.add(key);
    const content = await readFile(file);
    const at = content.indexOf('depends=');
    const depends = at >= 0 ? content.toString('latin1', at + 8, content.indexOf(0, at)).split(',').filter(Boolean) : [];
    for (const dep of depends) await visit(dep);
    ordered.push({ name: key, file });
  };
  for (const name of wanted) {
    if (!find(name)) throw new Error(`kernel module ${name} not found in ${modulesDir}`);
    await visit(name);
  }
  return ordered;
}
