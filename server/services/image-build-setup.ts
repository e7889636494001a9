import { join } from 'node:path';
import type { Logger } from 'pino';
import type { NetworkPolicy } from '../../shared/schemas/network.js';
import { ensureAgentBundle } from '../agent-client/agent-bundle.js';
import { AgentClients } from '../agent-client/agent-clients.js';
import type { Config } from '../config.js';
import { ensureContainerBootFiles } from '../hypervisor/container/boot-files.js';
import { ContainerDriver } from '../hypervisor/container/driver.js';
import { AptFetch } from '../hypervisor/images/apt-fetch.js';
import type { LayerStore } from '../hypervisor/images/layer-store.js';
import type { RootfsImages } from '../hypervisor/images/rootfs-images.js';
import { agentReadyTimeoutMs } from '../hypervisor/select-driver.js';
import type { SandboxDriver, SnapshottingDriver } from '../hypervisor/types.js';
import type { ImageRecord, ImageRepository } from '../store/types.js';
import { ImageBuilder } from './image-builder.js';
import { ImageBuilds } from './image-builds.js';

/** The largest agent message a build reads (process output lines are bounded by the stream reader). */
const BUILD_AGENT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

export interface ImageBuildsSetup {
  config: Config;
  layers: LayerStore;
  rootfs: RootfsImages;
  log: Logger;
  /**
   * The server's container driver and agent gateway, when it runs containers (build sandboxes then
   * share its network, firewall and orphan cleanup). Without them (a VM driver, a script) the
   * builds get their own container driver with loopback-only sandboxes.
   */
  container?: { driver: SandboxDriver & SnapshottingDriver; agents: AgentClients; network?: NetworkPolicy };
  /** The image records builds report to; a script building system images only passes none. */
  images?: ImageRepository;
  /** A fleet host's node id (its builds are of its own images). */
  hostId?: string;
  onLine?: (image: ImageRecord, line: string) => void;
  /** Bytes of ORG_MAX_DISK_MB an org has left for images (ImageService.diskBudget): a build passing it fails at that step. */
  budget?: (orgId: string) => Promise<number>;
}

/** Where build sandboxes of the builds' own container driver live (not the server's instances: no other driver lists them). */
export function buildInstancesDir(config: Pick<Config, 'INSTANCES_DIR'>): string {
  return join(config.INSTANCES_DIR, '.image-builds');
}

/**
 * The recipe builder and its queue, made from the config: IMAGE_BUILD_DISK_MB, IMAGE_BUILD_STEP_TIMEOUT_SEC,
 * IMAGE_BUILD_LOG_MAX_BYTES, IMAGE_BUILDS_PER_ORG, logs in DATA_DIR/image-logs.
 */
export async function createImageBuilds(setup: ImageBuildsSetup): Promise<{
  builds: ImageBuilds;
  builder: ImageBuilder;
  /** The container driver and agent gateway build sandboxes run on. */
  container: { driver: SandboxDriver & SnapshottingDriver; agents: AgentClients };
  close(): Promise<void>;
}> {
  const { config, log } = setup;
  let own: AgentClients | null = null;
  let container = setup.container;
  if (!container) {
    const agent = await ensureAgentBundle();
    const driver = new ContainerDriver({
      instancesDir: buildInstancesDir(config),
      runcRoot: config.RUNC_ROOT,
      idMap: { hostId: config.SANDBOX_UID_BASE, size: 65536 },
      pidsLimit: config.SANDBOX_PIDS_LIMIT,
      bootFiles: () => ensureContainerBootFiles(agent),
      agentReadyTimeoutMs: agentReadyTimeoutMs(config),
      networking: null,
      log,
    });
    const available = await driver.available();
    if (!available.ok) throw new Error(`image builds need the container driver: ${available.reason}`);
    own = new AgentClients(driver, { maxMessageBytes: BUILD_AGENT_MAX_MESSAGE_BYTES });
    container = { driver, agents: own };
    // No store record names a build sandbox and no other driver lists these: any here were left by a
    // server (or script) killed mid-build, with their disks and mounts. Nothing of them is reused.
    for (const id of await driver.list()) {
      await driver.destroy(id).then(
        () => log.info({ sandbox: id }, 'removed a build sandbox a stopped server left'),
        (err: Error) => log.error({ sandbox: id, err: err.message }, 'could not remove a leftover build sandbox'),
      );
    }
  }
  const builder = new ImageBuilder({
    driver: container.driver,
    agents: container.agents,
    layers: setup.layers,
    rootfs: setup.rootfs,
    apt: new AptFetch({ baseImagesDir: config.BASE_IMAGES_DIR, mirror: config.DEBIAN_MIRROR, log, maxBytes: config.IMAGE_BUILD_DISK_MB * 1024 * 1024 }),
    sandbox: { cpu: config.SANDBOX_DEFAULT_VCPUS, memMb: config.SANDBOX_DEFAULT_MEMORY_MB, diskMb: config.IMAGE_BUILD_DISK_MB, ...(container.network ? { network: container.network } : {}) },
    stepTimeoutMs: config.IMAGE_BUILD_STEP_TIMEOUT_SEC * 1000,
    scratchDir: join(config.BASE_IMAGES_DIR, 'build-scratch'),
    log,
  });
  const builds = new ImageBuilds({
    images: setup.images ?? noImages,
    builder,
    logsDir: join(config.DATA_DIR, 'image-logs'),
    log,
    maxPerOrg: config.IMAGE_BUILDS_PER_ORG,
    logMaxBytes: config.IMAGE_BUILD_LOG_MAX_BYTES,
    buildTimeoutMs: config.IMAGE_BUILD_TIMEOUT_SEC * 1000,
    ...(setup.onLine ? { onLine: setup.onLine } : {}),
    ...(setup.budget ? { budget: setup.budget } : {}),
    ...(setup.hostId ? { hostId: setup.hostId } : {}),
    ...(setup.images ? { discardLayers: (ids: string[]) => discardUnnamed(setup.layers, setup.images!, ids, log) } : {}),
  });
  return {
    builds,
    builder,
    container,
    async close() {
      await builds.close();
      await own?.closeAll();
    },
  };
}

/**
 * Removes layers a failed or cancelled build made, except those an image record names (another
 * build of the same step on this stack may have ended ready meanwhile). They are this build's own
 * content-addressed steps: kept, they would sit on the host for IMAGE_LAYER_CACHE_TTL_SEC counted
 * against nobody's quota. A retry of the recipe builds them again.
 */
async function discardUnnamed(layers: LayerStore, images: ImageRepository, ids: string[], log: Logger): Promise<void> {
  const named = new Set((await images.listAll()).flatMap((r) => r.layers));
  const gone = ids.filter((id) => !named.has(id));
  for (const id of gone) await layers.remove(id);
  if (gone.length) log.info({ layers: gone }, `removed ${gone.length} layer(s) of a build that did not end ready`);
}

/** The repository of a builder without a store: it only builds layers (system images, test setup). */
const noImages: ImageRepository = {
  create: () => Promise.reject(new Error('no image store')),
  findById: async () => null,
  findByName: async () => null,
  listVisible: async () => [],
  listAll: async () => [],
  update: async () => null,
  delete: async () => false,
};
