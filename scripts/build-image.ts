/**
 * `npm run image:build -- [name] [--vm]`: builds a sandbox image into BASE_IMAGES_DIR (the debian
 * image by default), printing progress. Without `--vm`, the root filesystem the container driver
 * uses; with `--vm`, also the bootable microVM image (kernel, vmlinux, initramfs,
 * `<name>-base.qcow2`) and the agent disk. A system recipe image (`code`) is built into layers by
 * the recipe builder (build sandboxes: root and runc needed). A no-op for whatever is already built.
 */
import { pino } from 'pino';
import { loadConfig } from '../server/config.js';
import { imageRecipes, isBuildableImage } from '../server/hypervisor/images/rootfs-images.js';
import { isSystemRecipeImage, systemRecipeImages } from '../server/hypervisor/images/system-recipes.js';
import { prepareImages } from './prepare-images.js';

const args = process.argv.slice(2);
const vm = args.includes('--vm');
const name = args.find((a) => !a.startsWith('--')) ?? 'debian';
if (!isBuildableImage(name) && !isSystemRecipeImage(name)) {
  console.error(`Unknown image ${name}; images this server builds: ${[...Object.keys(imageRecipes), ...Object.keys(systemRecipeImages)].join(', ')}`);
  process.exit(2);
}
const log = pino({ level: 'info', base: undefined, timestamp: false });
await prepareImages(loadConfig(), name, { vm, log, say: (line) => console.log(line) });
