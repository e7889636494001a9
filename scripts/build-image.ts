/**
 * `npm run image:build -- [name]`: builds a sandbox image's root filesystem into BASE_IMAGES_DIR
 * (the debian image by default), printing progress. A no-op when it is already built.
 */
import { pino } from 'pino';
import { loadConfig } from '../server/config.js';
import { imageRecipes, isBuildableImage, RootfsImages } from '../server/hypervisor/images/rootfs-images.js';

const name = process.argv[2] ?? 'debian';
if (!isBuildableImage(name)) {
  console.error(`Unknown image ${name}; images this server builds: ${Object.keys(imageRecipes).join(', ')}`);
  process.exit(2);
}
const config = loadConfig();
const log = pino({ level: 'info', base: undefined, timestamp: false });
const images = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap: { hostId: config.SANDBOX_UID_BASE, size: 65536 }, mirror: config.DEBIAN_MIRROR, log });
if (images.isReady(name)) {
  console.log(`image ${name} is already built at ${images.rootfsPath(name)}`);
} else {
  const path = await images.ensure(name);
  console.log(`image ${name} built at ${path}`);
}
