/**
 * `npm run image:build -- [name] [--vm]`: builds a sandbox image into BASE_IMAGES_DIR (the debian
 * image by default), printing progress. Without `--vm`, the root filesystem the container driver
 * uses; with `--vm`, also the bootable microVM image (kernel, vmlinux, initramfs,
 * `<name>-base.qcow2`) and the agent disk. A no-op for whatever is already built.
 */
import { pino } from 'pino';
import { ensureAgentBundle } from '../server/agent-client/agent-bundle.js';
import { loadConfig } from '../server/config.js';
import { imageRecipes, isBuildableImage, RootfsImages } from '../server/hypervisor/images/rootfs-images.js';
import { VmImages } from '../server/hypervisor/vm/vm-images.js';

const args = process.argv.slice(2);
const vm = args.includes('--vm');
const name = args.find((a) => !a.startsWith('--')) ?? 'debian';
if (!isBuildableImage(name)) {
  console.error(`Unknown image ${name}; images this server builds: ${Object.keys(imageRecipes).join(', ')}`);
  process.exit(2);
}
const config = loadConfig();
const log = pino({ level: 'info', base: undefined, timestamp: false });
const rootfs = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap: { hostId: config.SANDBOX_UID_BASE, size: 65536 }, mirror: config.DEBIAN_MIRROR, log });
if (rootfs.isReady(name)) console.log(`image ${name} is already built at ${rootfs.rootfsPath(name)}`);
else console.log(`image ${name} built at ${await rootfs.ensure(name)}`);

if (vm) {
  const vmImages = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: config.SANDBOX_UID_BASE, log });
  const already = await vmImages.isReady(name);
  const paths = await vmImages.ensure(name);
  console.log(`vm image ${name} ${already ? 'is already built' : 'built'}: ${paths.baseDisk}, ${paths.kernel}, ${paths.initrd}, ${paths.vmlinux}`);
  console.log(`agent disk: ${await vmImages.ensureAgentDisk(await ensureAgentBundle(), name)}`);
}
