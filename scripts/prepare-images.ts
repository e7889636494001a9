import type { Logger } from 'pino';
import { ensureAgentBundle } from '../server/agent-client/agent-bundle.js';
import type { Config } from '../server/config.js';
import { RootfsImages } from '../server/hypervisor/images/rootfs-images.js';
import { VmImages } from '../server/hypervisor/vm/vm-images.js';

/**
 * Builds image `name` into BASE_IMAGES_DIR unless it is there (the root filesystem the container
 * driver uses), and with `vm` also its bootable microVM image and the agent disk. Progress goes
 * to `log` and one line per result to `say`. Used by `npm run image:build` and by the tests'
 * global setup.
 */
export async function prepareImages(config: Config, name: string, opts: { vm: boolean; log: Logger; say: (line: string) => void }): Promise<void> {
  const { log, say } = opts;
  const rootfs = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap: { hostId: config.SANDBOX_UID_BASE, size: 65536 }, mirror: config.DEBIAN_MIRROR, log });
  if (rootfs.isReady(name)) say(`image ${name} is already built at ${rootfs.rootfsPath(name)}`);
  else say(`image ${name} built at ${await rootfs.ensure(name)}`);
  if (!opts.vm) return;
  const vmImages = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: config.SANDBOX_UID_BASE, log });
  const already = await vmImages.isReady(name);
  const paths = await vmImages.ensure(name);
  say(`vm image ${name} ${already ? 'is already built' : 'built'}: ${paths.baseDisk}, ${paths.kernel}, ${paths.initrd}, ${paths.vmlinux}`);
  say(`agent disk: ${await vmImages.ensureAgentDisk(await ensureAgentBundle(), name)}`);
}
