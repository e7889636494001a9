import type { Logger } from 'pino';
import { ensureAgentBundle } from '../server/agent-client/agent-bundle.js';
import type { Config } from '../server/config.js';
import { LayerStore } from '../server/hypervisor/images/layer-store.js';
import { RootfsImages } from '../server/hypervisor/images/rootfs-images.js';
import { isSystemRecipeImage, systemRecipeImages } from '../server/hypervisor/images/system-recipes.js';
import { VmImages } from '../server/hypervisor/vm/vm-images.js';
import type { Recipe } from '../shared/schemas/images.js';
import { createImageBuilds } from '../server/services/image-build-setup.js';

/**
 * Builds image `name` into BASE_IMAGES_DIR unless it is there (the root filesystem the container
 * driver uses), and with `vm` also its bootable microVM image and the agent disk. A system recipe
 * image (`code`) is built by the recipe builder into layers on its system base, in build
 * sandboxes of a container driver made here (no server needed). Progress goes to `log` and one
 * line per result to `say`. Used by `npm run image:build` and by the tests' global setup.
 */
export async function prepareImages(config: Config, name: string, opts: { vm: boolean; log: Logger; say: (line: string) => void }): Promise<void> {
  const { log, say } = opts;
  const { rootfs } = imageStores(config, log);
  if (isSystemRecipeImage(name)) {
    const started = Date.now();
    const layers = await buildRecipeLayers(config, systemRecipeImages[name].recipe, log, (line) => log.info({ image: name }, line));
    say(`image ${name} is built: ${layers.length} layer${layers.length === 1 ? '' : 's'} on ${systemRecipeImages[name].recipe.base} (${Math.round((Date.now() - started) / 1000)} s)`);
    if (opts.vm) say(`the VM image of ${name} is built by the VM driver on first use`);
    return;
  }
  if (rootfs.isReady(name)) say(`image ${name} is already built at ${rootfs.rootfsPath(name)}`);
  else say(`image ${name} built at ${await rootfs.ensure(name)}`);
  if (!opts.vm) return;
  const vmImages = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: config.SANDBOX_UID_BASE, log });
  const already = await vmImages.isReady(name);
  const paths = await vmImages.ensure(name);
  say(`vm image ${name} ${already ? 'is already built' : 'built'}: ${paths.baseDisk}, ${paths.kernel}, ${paths.initrd}, ${paths.vmlinux}`);
  say(`agent disk: ${await vmImages.ensureAgentDisk(await ensureAgentBundle(), name)}`);
}

/**
 * Builds `recipe` (on a system base) into the layer store without a server, or finds every layer
 * in the cache; resolves to the layer ids, bottom first.
 */
export async function buildRecipeLayers(config: Config, recipe: Recipe & { base: string }, log: Logger, onLine: (line: string) => void = () => {}): Promise<string[]> {
  const { rootfs, layers } = imageStores(config, log);
  const setup = await createImageBuilds({ config, layers, rootfs, log });
  try {
    return await setup.builds.buildLayers(recipe, onLine);
  } finally {
    await setup.close();
  }
}

function imageStores(config: Config, log: Logger): { rootfs: RootfsImages; layers: LayerStore } {
  const layers = new LayerStore({ baseImagesDir: config.BASE_IMAGES_DIR, log });
  const rootfs = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap: { hostId: config.SANDBOX_UID_BASE, size: 65536 }, mirror: config.DEBIAN_MIRROR, log, layers });
  return { rootfs, layers };
}
