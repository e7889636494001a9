import { existsSync } from 'node:fs';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { RECIPE_KEYS, type CreateImageInput, type Image, type ImageLog, type Recipe } from '../../shared/index.js';
import { ConflictError, ForbiddenError, ImageNotReadyError, InvalidInputError, NotFoundError, TooManyRequestsError } from '../errors.js';
import type { LayerInfo, LayerStore } from '../hypervisor/images/layer-store.js';
import { MAX_IMAGE_LAYERS } from '../hypervisor/images/layer-store.js';
import { imageRecipes, isBuildableImage, vmImageKey, type RootfsImages } from '../hypervisor/images/rootfs-images.js';
import { isSystemRecipeImage, systemRecipeImages, type SystemRecipeImage } from '../hypervisor/images/system-recipes.js';
import { isObjectIdHex, newId } from '../store/ids.js';
import type { ImagePatch, ImageRecord, ImageRepository, NewImageRecord, SandboxRepository } from '../store/types.js';
import type { Principal } from './auth-service.js';
import { planSteps } from './image-builder.js';
import type { SandboxQuotas } from './sandbox-quotas.js';
import { SandboxLocks } from './sandbox-locks.js';

/** The recipe build queue (image-builds.ts) as this service uses it. */
export interface ImageBuildQueue {
  /** Queues the build of `image` (status 'building') on `parent`; returns at once. */
  enqueue(image: ImageRecord, parent: ImageRecord): void;
  cancel(imageId: string): Promise<void>;
  readLog(imageId: string): Promise<{ text: string; truncated: boolean }>;
  followLog(imageId: string, signal: AbortSignal): AsyncIterable<string>;
  /** The layers of a system recipe image (`code`), built first if missing. */
  ensureSystemImage(name: SystemRecipeImage): Promise<string[]>;
}

/** What a sandbox of an image is made of: the bottom dir, the lower dirs above it (bottom first), and the VM drivers' image key. */
export interface ImageFilesystem {
  rootfs: string;
  layers: string[];
  vmImage: string;
}

export interface ImageServiceDeps {
  images: ImageRepository;
  rootfs: RootfsImages;
  /** Absent: only images without layers (debian and its aliases) exist here. */
  layers?: LayerStore;
  /** Every sandbox record (pool members too), for the in-use check of a delete. */
  sandboxes?: SandboxRepository;
  defaultImage: string;
  /** IMAGE_BUILDS_PER_ORG: builds one org may have queued or running. */
  maxBuildsPerOrg?: number;
  /** IMAGE_LAYER_CACHE_TTL_SEC in ms: an unreferenced layer younger than this is kept (the layer cache). */
  layerCacheTtlMs?: number;
  /** INSTANCES_DIR: the layers each container instance mounts (its `lower` file) stay through a GC. */
  instancesDir?: string;
  /** SNAPSHOTS_DIR: a kept snapshot counts as a user of the image it was taken on (its `.image.json`). */
  snapshotsDir?: string;
  /** A fleet host's node id: images it makes layers for are its own (`ImageRecord.hostId`). */
  hostId?: string;
  /** false on a fleet API node: it runs no sandboxes, so an alias's root filesystem is not built there (each host builds its own on first use). */
  prepareRootfs?: boolean;
  log: Logger;
}

/** Where a snapshot records the image it was taken on (a dot name: listings and the snapshot quota skip it). */
export function snapshotImageFile(snapshotDir: string, snapId: string): string {
  return join(snapshotDir, `.${snapId}.image.json`);
}

/** Records the image a snapshot was taken on, beside its archive. */
export async function writeSnapshotImage(snapshotDir: string, snapId: string, image: { id: string; layers: readonly string[] }): Promise<void> {
  await writeFile(snapshotImageFile(snapshotDir, snapId), JSON.stringify({ imageId: image.id, layers: image.layers }), { mode: 0o600 });
}

/** The image a snapshot was taken on, as recorded (null for a snapshot from before images were recorded, or an unreadable record). */
export async function readSnapshotImage(snapshotDir: string, snapId: string): Promise<{ imageId: string; layers: string[] } | null> {
  try {
    const parsed = JSON.parse(await readFile(snapshotImageFile(snapshotDir, snapId), 'utf8')) as { imageId?: unknown; layers?: unknown };
    if (typeof parsed.imageId !== 'string' || !isObjectIdHex(parsed.imageId)) return null;
    const layers = Array.isArray(parsed.layers) ? parsed.layers.filter((l): l is string => typeof l === 'string') : [];
    return { imageId: parsed.imageId, layers };
  } catch {
    return null;
  }
}

/** A 400 naming MAX_IMAGE_LAYERS when `parent` plus `adding` layers would pass it (sandboxes could not mount the result). */
function assertStackable(parent: ImageRecord, adding: number, what: string): void {
  if (parent.layers.length + adding <= MAX_IMAGE_LAYERS) return;
  throw new InvalidInputError(
    `${what} would stack ${parent.layers.length + adding} layers (${parent.name} has ${parent.layers.length}, this adds ${adding}), more than the ${MAX_IMAGE_LAYERS} a sandbox can mount (MAX_IMAGE_LAYERS): merge run steps into fewer commands, or build on an image with fewer layers (an image made from a sandbox of it has one more layer, not fewer)`,
  );
}

/** Up to five of `items` by name, `…` for the rest: a conflict names what is in the way without growing with it. */
function someOf<T>(items: readonly T[], name: (item: T) => string): string {
  return `${items.slice(0, 5).map(name).join(', ')}${items.length > 5 ? ', …' : ''}`;
}

const GC_INTERVAL_MS = 60 * 60 * 1000;

/**
 * Image records (system images every org sees, plus each org's own) and what their sandboxes are
 * made of: a system root filesystem at the bottom (`base`, never a host path) and read-only layers
 * above it. Org images are made by a recipe build (image-builds.ts), from a sandbox's filesystem,
 * or by an OCI import; an alias (`{name, path}`) names a system image under another name.
 */
export class ImageService {
  #builds: ImageBuildQueue | null = null;
  #quotas: SandboxQuotas | null = null;
  #gcTimer: NodeJS.Timeout | null = null;
  #gcRunning: Promise<void> | null = null;
  readonly #systemBuilds = new Map<string, Promise<ImageRecord>>();
  readonly #orgLocks = new SandboxLocks();

  constructor(private readonly deps: ImageServiceDeps) {}

  /** The recipe build queue; until it is set, a recipe is refused (this server cannot build). */
  useBuilds(builds: ImageBuildQueue): void {
    this.#builds = builds;
  }

  /** The org quotas images count against (ORG_MAX_DISK_MB). */
  useQuotas(quotas: SandboxQuotas): void {
    this.#quotas = quotas;
  }

  /**
   * Creates the system image records on first start: the debootstrap rootfses (`imageRecipes`)
   * and the recipe images on them (`systemRecipeImages`, built on first use). A recipe image whose
   * recipe changed since it was recorded forgets its layers, so its next use builds the new recipe.
   */
  async seedSystemImages(systemUserId: string): Promise<void> {
    const seed = async (image: NewImageRecord) => {
      const existing = await this.deps.images.findByName(null, image.name);
      if (existing) {
        if (image.recipe && JSON.stringify(existing.recipe) !== JSON.stringify(image.recipe)) {
          await this.deps.images.update(existing.id, { recipe: image.recipe, env: image.env, workdir: image.workdir, description: image.description, layers: [], sizeBytes: 0 });
        }
        return;
      }
      try {
        await this.deps.images.create(image);
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err; // another server process seeded it
      }
    };
    const system = { tag: 'latest', orgId: null, isSystem: true, createdBy: systemUserId, source: 'system' } as const;
    for (const [name, recipe] of Object.entries(imageRecipes)) await seed({ ...system, name, description: recipe.description, base: name });
    for (const [name, { description, recipe }] of Object.entries(systemRecipeImages)) {
      await seed({ ...system, name, description, base: recipe.base, recipe, env: { ...recipe.env }, workdir: null });
    }
  }

  async list(principal: Principal): Promise<Image[]> {
    return (await this.deps.images.listVisible(principal.orgId)).map((r) => this.#toImage(r));
  }

  async get(principal: Principal, id: string): Promise<Image> {
    return this.#toImage(await this.#visible(principal, id));
  }

  async getByName(principal: Principal, name: string): Promise<Image> {
    const image = await this.deps.images.findByName(principal.orgId, name);
    if (!image) throw new NotFoundError(`Image ${name} not found`, { code: 'IMAGE_NOT_FOUND' });
    return this.#toImage(image);
  }

  /**
   * `{name, version?, path?}` registers an alias of a system image, as the original VoidRun does;
   * any recipe field makes it a recipe build, recorded `building` and queued.
   */
  async create(principal: Principal, input: CreateImageInput): Promise<Image> {
    const recipeKeys = RECIPE_KEYS.filter((k) => input[k] !== undefined);
    if (recipeKeys.length === 0) return this.#createAlias(principal, input);
    if (input.path !== undefined) throw new InvalidInputError(`path registers an alias and cannot be combined with a recipe (${recipeKeys.join(', ')}); name the image to build on with base`);
    const recipe: Recipe = Object.fromEntries(recipeKeys.map((k) => [k, input[k]]));
    await this.#assertNameFree(principal, input.name);
    const parent = await this.#baseOf(principal, recipe.base ?? 'debian');
    const steps = planSteps(recipe, parent).length;
    assertStackable(parent, steps, `Image ${input.name}`);
    this.#assertLayersHere(parent, 'build on it');
    const fields: NewImageRecord = {
      name: input.name,
      tag: input.version ?? 'latest',
      description: `Built from a recipe on ${parent.name}`,
      base: parent.base,
      orgId: principal.orgId,
      isSystem: false,
      createdBy: principal.userId,
      source: 'recipe',
      // The parent's stack until the build ends, so its layers stay referenced (layer GC) meanwhile.
      layers: parent.layers,
      parentId: parent.id,
      recipe,
      env: { ...parent.env, ...recipe.env },
      workdir: recipe.workdir ?? parent.workdir,
    };
    // Only config (env): nothing to build, ready at once, on its parent's layers (and host).
    if (steps === 0) return this.#toImage(await this.deps.images.create({ ...fields, status: 'ready', hostId: parent.hostId }));
    const builds = this.#builds;
    if (!builds) throw new ConflictError('This server cannot build images: recipe builds run in a container sandbox and the container driver is not available here');
    // One org's checks and record writes one at a time, so concurrent requests cannot pass the cap together.
    return this.#orgLocks.run(principal.orgId, async () => {
      const building = (await this.deps.images.listVisible(principal.orgId)).filter((i) => i.orgId === principal.orgId && i.status === 'building');
      const max = this.deps.maxBuildsPerOrg ?? 2;
      if (building.length >= max) {
        throw new TooManyRequestsError(`Your organization already has ${building.length} image builds queued or running (IMAGE_BUILDS_PER_ORG ${max}): wait for ${building.map((i) => i.name).join(', ')} to finish, or delete one`);
      }
      await this.#quotas?.imageBudget(principal.orgId, `image ${input.name}`);
      const record = await this.deps.images.create({ ...fields, status: 'building', progress: { step: 0, steps, message: 'queued' }, hostId: this.deps.hostId ?? null });
      try {
        builds.enqueue(record, parent);
      } catch (err) {
        await this.deps.images.delete(record.id); // never a record left 'building' that no build will end
        throw err;
      }
      return this.#toImage(record);
    });
  }

  async #createAlias(principal: Principal, input: CreateImageInput): Promise<Image> {
    const base = input.path ?? input.name;
    if (!isBuildableImage(base)) {
      throw new InvalidInputError(`Cannot build image ${JSON.stringify(base)} here; images this server builds: ${Object.keys(imageRecipes).join(', ')}`);
    }
    await this.#assertNameFree(principal, input.name);
    const record = await this.deps.images.create({
      name: input.name,
      tag: input.version ?? 'latest',
      description: imageRecipes[base].description,
      base,
      orgId: principal.orgId,
      isSystem: false,
      createdBy: principal.userId,
      source: 'alias',
    });
    // Build in the background so the first sandbox on it starts sooner; failures surface there.
    if (this.deps.prepareRootfs !== false) this.deps.rootfs.ensure(base).catch((err: Error) => this.deps.log.error({ image: base, err: err.message }, 'image build failed'));
    return this.#toImage(record);
  }

  /**
   * The image a recipe builds on: visible to the caller (404 as for any other image of another
   * org) and ready. A base still building is refused rather than waited for: the build queue runs
   * one build at a time, so waiting would hold the queue on another build's outcome; the caller
   * retries once GET shows it `ready`.
   */
  async #baseOf(principal: Principal, ref: string): Promise<ImageRecord> {
    const parent = await this.#lookup(principal, ref);
    if (!parent) throw new NotFoundError(`Base image ${ref} not found; GET /api/images lists the images you can build on`, { code: 'IMAGE_NOT_FOUND' });
    this.#assertReady(parent, 'build on it');
    // Its layers are not known until it is built (on its first use): building on it now would build on its base alone.
    if (this.#unbuiltSystemRecipe(parent)) {
      throw new ImageNotReadyError(`Image ${parent.name} is built on its first use and is not built on this server yet: create a sandbox from it (or run npm run image:build -- ${parent.name}), then build on it`, { details: 'unbuilt' });
    }
    return parent;
  }

  async #assertNameFree(principal: Principal, name: string): Promise<void> {
    const existing = await this.deps.images.findByName(principal.orgId, name);
    if (existing && existing.orgId === principal.orgId) throw new ConflictError(`Your organization already has an image named ${name}`);
  }

  /** Checks `name` is free for a new image of the caller's org (409 otherwise), before work that makes one starts. */
  assertNameFree(principal: Principal, name: string): Promise<void> {
    return this.#assertNameFree(principal, name);
  }

  /**
   * Before an OCI import reads its upload: the name is free (409) and the org has disk left (429);
   * resolves to the bytes left under ORG_MAX_DISK_MB (Infinity without quotas), the import's bound.
   */
  async prepareImport(principal: Principal, name: string): Promise<number> {
    await this.#assertNameFree(principal, name);
    return (await this.#quotas?.imageBudget(principal.orgId, `image ${name}`)) ?? Infinity;
  }

  /** Records an imported image (oci-import.ts made its one layer): ready at once, nothing below it. */
  async recordImport(
    principal: Principal,
    input: { name: string; version?: string; layerId: string; sizeBytes: number; env: Record<string, string>; workdir: string | null },
  ): Promise<Image> {
    await this.#assertNameFree(principal, input.name);
    const record = await this.deps.images.create({
      name: input.name,
      tag: input.version ?? 'latest',
      description: 'Imported from an OCI image archive',
      base: '',
      orgId: principal.orgId,
      isSystem: false,
      createdBy: principal.userId,
      source: 'import',
      status: 'ready',
      layers: [input.layerId],
      parentId: null,
      recipe: null,
      env: input.env,
      workdir: input.workdir,
      sizeBytes: input.sizeBytes,
      hostId: this.deps.hostId ?? null,
    });
    this.deps.layers?.settle([input.layerId]);
    return this.#toImage(record);
  }

  /**
   * Deletes one of the caller's org's images: 403 for a system image, 409 while any sandbox
   * record (whatever its status, warm-pool members too) uses it. A building image's build is
   * cancelled. Its layers go at the next layer GC, unless another image shares them.
   */
  async delete(principal: Principal, id: string): Promise<{ id: string; deleted: true }> {
    const image = await this.#visible(principal, id);
    if (image.orgId !== principal.orgId) throw new ForbiddenError(`Image ${image.name} is a system image and cannot be deleted`);
    // Check and delete under the sandbox admission lock, so no create records a sandbox on it in between.
    const exclusive = this.#quotas ? this.#quotas.exclusive.bind(this.#quotas) : <T>(fn: () => Promise<T>) => fn();
    await exclusive(async () => {
      const users = ((await this.deps.sandboxes?.listAll()) ?? []).filter((s) => s.imageId === id);
      if (users.length) {
        const names = someOf(users, (s) => (s.orgId ? s.name : `${s.name} (warm pool)`));
        throw new ConflictError(`Image ${image.name} is used by ${users.length} sandbox${users.length === 1 ? '' : 'es'} (${names}): delete them first`);
      }
      const snapshots = (await this.#keptSnapshots(image.orgId!)).filter((s) => s.imageId === id);
      if (snapshots.length) {
        const refs = someOf(snapshots, (s) => s.ref);
        throw new ConflictError(`Image ${image.name} is used by ${snapshots.length} snapshot${snapshots.length === 1 ? '' : 's'} (${refs}), which restore onto it: delete them (or their sandboxes without keepSnapshots) first`);
      }
      await this.deps.images.delete(id);
    });
    // A recipe image's build (if one is still running) and its build log go with it.
    if (image.source === 'recipe') await this.#builds?.cancel(id);
    this.collectLayers().catch((err: Error) => this.deps.log.warn({ err: err.message }, 'layer GC failed'));
    return { id, deleted: true };
  }

  /** Every snapshot of `orgId` (all orgs' for null; of existing and deleted sandboxes) with the image it recorded, as `<sandboxId>/<snapId>`. */
  async #keptSnapshots(orgId: string | null): Promise<Array<{ ref: string; imageId: string; layers: string[] }>> {
    const root = this.deps.snapshotsDir;
    if (!root) return [];
    if (orgId === null) {
      const orgs = (await readdir(root).catch(() => [] as string[])).filter(isObjectIdHex);
      return (await Promise.all(orgs.map((o) => this.#keptSnapshots(o)))).flat();
    }
    const orgDir = join(root, orgId);
    const found: Array<{ ref: string; imageId: string; layers: string[] }> = [];
    for (const sandbox of await readdir(orgDir).catch(() => [] as string[])) {
      for (const name of await readdir(join(orgDir, sandbox)).catch(() => [] as string[])) {
        const snapId = /^(snap-[0-9a-f]{24})\.tar\.gz$/.exec(name)?.[1];
        if (!snapId) continue;
        const recorded = await readSnapshotImage(join(orgDir, sandbox), snapId);
        if (recorded) found.push({ ref: `${sandbox}/${snapId}`, ...recorded });
      }
    }
    return found;
  }

  /**
   * Layers the container instances in INSTANCES_DIR mount (each instance's `lower` file, written
   * at boot): a running or stopped sandbox keeps its layers even when no record names them any
   * more (a system recipe image whose recipe changed forgets its old layers).
   */
  async #instanceLayers(): Promise<string[]> {
    const dir = this.deps.instancesDir;
    const layers = this.deps.layers;
    if (!dir || !layers || !existsSync(dir)) return [];
    const ids: string[] = [];
    for (const instance of await readdir(dir).catch(() => [] as string[])) {
      const text = await readFile(join(dir, instance, 'lower'), 'utf8').catch(() => '');
      for (const line of text.slice(0, 1_000_000).split('\n')) {
        const id = layers.idOf(line.trim());
        if (id) ids.push(id);
      }
    }
    return ids;
  }

  /** The build log of an image (its tail when long); '' for images that were not built from a recipe. */
  async logs(principal: Principal, id: string): Promise<ImageLog> {
    const image = await this.#visible(principal, id);
    const log = image.source === 'recipe' && this.#builds ? await this.#builds.readLog(id) : { text: '', truncated: false };
    return { id, status: image.status, log: log.text, truncated: log.truncated };
  }

  /** The build log's lines so far, then live ones until the build ends (`GET /images/{id}/logs/stream`, `images.logs`). */
  async followLogs(principal: Principal, id: string, signal: AbortSignal): Promise<AsyncIterable<string>> {
    const image = await this.#visible(principal, id);
    if (image.source !== 'recipe' || !this.#builds) return (async function* () {})();
    return this.#builds.followLog(id, signal);
  }

  /** The image a new sandbox runs: `templateId` (an image id or name) or, when absent or empty, the default. */
  async resolve(principal: Principal, templateId: string | undefined): Promise<ImageRecord> {
    const ref = templateId || this.deps.defaultImage;
    const image = await this.#lookup(principal, ref);
    if (!image) throw new NotFoundError(`Image ${ref} not found; GET /api/images lists the images you can use`, { code: 'IMAGE_NOT_FOUND' });
    return image;
  }

  /**
   * 409 when the image's layers are another fleet host's (an API node routes its sandboxes, builds
   * and deletes to that host; this is the host's own check).
   */
  #assertLayersHere(image: ImageRecord, what: string): void {
    if (image.hostId && image.hostId !== this.deps.hostId) {
      throw new ConflictError(`Image ${image.name}'s layers are on fleet host ${image.hostId}, not this one: ${what} through an API node, which sends it there`);
    }
  }

  /** The sandbox-side form of the check above: the image a sandbox of this host is made from holds its layers here. */
  assertRunsHere(image: ImageRecord): void {
    this.#assertLayersHere(image, 'create its sandboxes');
  }

  /** 409 when image `id` was deleted since it was resolved (checked when a sandbox record is inserted). */
  async assertExists(id: string): Promise<void> {
    if (!(await this.deps.images.findById(id))) throw new ConflictError(`Image ${id} was deleted while the sandbox was being created; create it again with another image`);
  }

  /** An image id or name as the caller sees it: its org's own, or a system image; null for anything else. */
  async #lookup(principal: Principal, ref: string): Promise<ImageRecord | null> {
    const image = isObjectIdHex(ref) ? await this.deps.images.findById(ref) : await this.deps.images.findByName(principal.orgId, ref);
    return image && (image.orgId === null || image.orgId === principal.orgId) ? image : null;
  }

  /** Builds the default image's root filesystem if it is not built yet. */
  async prepareDefault(): Promise<void> {
    const image = await this.deps.images.findByName(null, this.deps.defaultImage);
    if (image) await this.rootfsFor(image);
  }

  /**
   * What a sandbox of `image` mounts: its system rootfs (built first if this is its first use)
   * and its layers, and the key of the VM image built from the same stack. 409 IMAGE_NOT_READY
   * for an image still building or failed.
   */
  async rootfsFor(image: ImageRecord): Promise<ImageFilesystem> {
    this.#assertReady(image, 'create sandboxes from it');
    const ready = this.#unbuiltSystemRecipe(image) ? await this.#systemBuild(image) : image;
    const dirs = await this.deps.rootfs.lowerDirs({ base: ready.base, layers: ready.layers });
    const [rootfs, ...layers] = dirs as [string, ...string[]];
    // A system rootfs alone keeps its own VM image key (e.g. `debian`); any stack gets a chain key.
    return { rootfs, layers, vmImage: layers.length === 0 && ready.base ? ready.base : vmImageKey(dirs) };
  }

  /** A system recipe image (`code`) whose layers are not built (or not recorded) yet. */
  #unbuiltSystemRecipe(image: ImageRecord): boolean {
    return image.isSystem && isSystemRecipeImage(image.name) && (image.layers.length === 0 || !image.layers.every((id) => this.deps.layers?.has(id)));
  }

  /** A system recipe image: built into the layer store on first use (the build queue shares one build), then its layers recorded. */
  #systemBuild(image: ImageRecord): Promise<ImageRecord> {
    const builds = this.#builds;
    const name = image.name;
    if (!builds || !isSystemRecipeImage(name)) return Promise.reject(new ConflictError(`Image ${name} is built by a recipe and this server cannot build images`));
    let running = this.#systemBuilds.get(image.id);
    if (!running) {
      running = (async () => {
        const layers = await builds.ensureSystemImage(name);
        return (await this.deps.images.update(image.id, { layers })) ?? { ...image, layers };
      })().finally(() => this.#systemBuilds.delete(image.id));
      this.#systemBuilds.set(image.id, running);
    }
    return running;
  }

  /** 409 IMAGE_NOT_READY unless sandboxes can be created from `image` (it is not building or failed). */
  assertUsable(image: ImageRecord): void {
    this.#assertReady(image, 'create sandboxes from it');
  }

  #assertReady(image: ImageRecord, toDo: string): void {
    if (image.status === 'building') {
      const at = image.progress ? ` (step ${image.progress.step} of ${image.progress.steps})` : '';
      throw new ImageNotReadyError(`Image ${image.name} is still building${at}: wait until GET /api/images/${image.id} shows status ready, then ${toDo}`, { details: 'building' });
    }
    if (image.status === 'failed') {
      throw new ImageNotReadyError(`Image ${image.name} failed to build (${image.error ?? 'see its log'}): fix the recipe and create it again`, { details: 'failed' });
    }
  }

  /**
   * Records an image made from a sandbox's filesystem: the sandbox image's stack plus `layer`
   * (already in the layer store). Refused (429) when the layer passes what is left of ORG_MAX_DISK_MB
   * (`imageFromSnapshot` then removes the layer at once).
   */
  async recordFromSandbox(principal: Principal, input: { name: string; version?: string; parent: ImageRecord; sandboxName: string; layer: LayerInfo }): Promise<Image> {
    await this.#assertFits(principal.orgId, input.layer.bytes, `image ${input.name}`);
    const { parent } = input;
    const record = await this.deps.images.create({
      name: input.name,
      tag: input.version ?? 'latest',
      description: `Made from sandbox ${input.sandboxName} (on ${parent.name})`,
      base: parent.base,
      orgId: principal.orgId,
      isSystem: false,
      createdBy: principal.userId,
      status: 'ready',
      source: 'sandbox',
      layers: [...parent.layers, input.layer.id],
      parentId: parent.id,
      hostId: this.deps.hostId ?? null,
      env: parent.env,
      workdir: parent.workdir,
      sizeBytes: input.layer.bytes,
    });
    this.deps.layers?.settle([input.layer.id]);
    return this.#toImage(record);
  }

  /** An image from a sandbox's snapshot archive `file` (its writable layer): the archive becomes a layer, then `recordFromSandbox`. */
  async imageFromSnapshot(principal: Principal, input: { name: string; version?: string; parent: ImageRecord; sandboxName: string; file: string }): Promise<Image> {
    const layers = this.deps.layers;
    if (!layers) throw new ConflictError('This server has no layer store, so it cannot make images from sandboxes');
    assertStackable(input.parent, 1, `An image of sandbox ${input.sandboxName}`);
    const layer = await layers.fromSnapshot(input.file, newId(), `sandbox ${input.sandboxName}`);
    try {
      return await this.recordFromSandbox(principal, { ...input, layer });
    } catch (err) {
      // A fresh id no record names: refused (over quota, name taken meanwhile), it goes at once.
      await layers.remove(layer.id).catch((e: Error) => this.deps.log.warn({ layer: layer.id, err: e.message }, 'could not remove the layer of a refused image'));
      throw err;
    }
  }

  /** Bytes of ORG_MAX_DISK_MB the org has left for a new image (429 when none): an import's or a snapshot's upper bound. */
  async diskBudget(orgId: string, what: string): Promise<number> {
    return this.#quotas ? this.#quotas.imageBudget(orgId, what) : Number.MAX_SAFE_INTEGER;
  }

  async #assertFits(orgId: string, bytes: number, what: string): Promise<void> {
    const left = await this.diskBudget(orgId, what);
    if (bytes > left) {
      throw new TooManyRequestsError(`Org quota exceeded: ${what} is ${Math.ceil(bytes / 2 ** 20)} MB and only ${Math.floor(left / 2 ** 20)} MB of ORG_MAX_DISK_MB is left (it counts sandboxes' diskMb, snapshots and images)`);
    }
  }

  /**
   * The image repository as the build queue writes to it: a build that ends `ready` larger than
   * what is left of the org's ORG_MAX_DISK_MB ends `failed` instead, saying so (its layers stay
   * unreferenced and go at the next GC).
   */
  repositoryForBuilds(): ImageRepository {
    const images = this.deps.images;
    return {
      ...bindAll(images),
      update: async (id: string, patch: ImagePatch) => {
        if (patch.status === 'ready' && patch.sizeBytes !== undefined) {
          const image = await images.findById(id);
          if (image?.orgId) {
            const left = await this.diskBudget(image.orgId, `image ${image.name}`).catch(() => 0);
            if (patch.sizeBytes > left) {
              const parent = image.parentId ? await images.findById(image.parentId) : null;
              return images.update(id, {
                status: 'failed',
                progress: null,
                layers: parent?.layers ?? [],
                sizeBytes: 0,
                error: `The built image is ${Math.ceil(patch.sizeBytes / 2 ** 20)} MB and only ${Math.floor(left / 2 ** 20)} MB of the org's disk quota (ORG_MAX_DISK_MB) is left: delete images, snapshots or sandboxes, or install less`,
              });
            }
          }
        }
        const updated = await images.update(id, patch);
        if (patch.status === 'ready' && patch.layers) this.deps.layers?.settle(patch.layers);
        return updated;
      },
    };
  }

  /** Removes layers no image uses (older than IMAGE_LAYER_CACHE_TTL_SEC); after a delete and hourly. One pass at a time. */
  collectLayers(): Promise<void> {
    const layers = this.deps.layers;
    if (!layers) return Promise.resolve();
    this.#gcRunning ??= (async () => {
      const all = await this.deps.images.listAll();
      // A build's finished steps are in no record until it ends: no pass while one runs here (the
      // next hourly one collects). Another fleet host's builds write to its own layer store.
      if (this.#systemBuilds.size || all.some((i) => i.status === 'building' && (i.hostId ?? null) === (this.deps.hostId ?? null))) return;
      // Layers records name, layers sandboxes mount (a system recipe changed under them), layers kept snapshots were taken on.
      const snapshotLayers = (await this.#keptSnapshots(null)).flatMap((s) => s.layers);
      const keep = new Set([...all.flatMap((i) => i.layers), ...(await this.#instanceLayers()), ...snapshotLayers]);
      const removed = await layers.gc(keep, this.deps.layerCacheTtlMs ?? 86_400_000);
      if (removed.length) this.deps.log.info({ layers: removed.length }, `layer GC removed ${removed.length} unused layer(s)`);
    })().finally(() => {
      this.#gcRunning = null;
    });
    return this.#gcRunning;
  }

  /** Runs the layer GC hourly until `stop`. */
  start(): void {
    this.#gcTimer ??= setInterval(() => this.collectLayers().catch((err: Error) => this.deps.log.warn({ err: err.message }, 'layer GC failed')), GC_INTERVAL_MS);
    this.#gcTimer.unref();
  }

  stop(): void {
    if (this.#gcTimer) clearInterval(this.#gcTimer);
    this.#gcTimer = null;
  }

  async #visible(principal: Principal, id: string): Promise<ImageRecord> {
    const image = await this.deps.images.findById(id);
    if (!image || (image.orgId !== null && image.orgId !== principal.orgId)) throw new NotFoundError(`Image ${id} not found`, { code: 'IMAGE_NOT_FOUND' });
    return image;
  }

  #toImage(r: ImageRecord): Image {
    return {
      _id: r.id,
      id: r.id,
      name: r.name,
      tag: r.tag,
      description: r.description,
      system: r.isSystem,
      orgId: r.orgId,
      base: r.base,
      ready: r.status === 'ready' && (r.base === '' || this.deps.rootfs.isReady(r.base)) && !this.#unbuiltSystemRecipe(r),
      status: r.status,
      source: r.source,
      parentId: r.parentId,
      layerCount: r.layers.length,
      sizeBytes: r.sizeBytes,
      progress: r.progress,
      error: r.error,
      env: r.env,
      workdir: r.workdir,
      recipe: r.recipe,
      createdAt: r.createdAt.toISOString(),
      createdBy: r.createdBy,
    };
  }
}

/** `repo`'s methods bound to it, so a spread copy of it still works. */
function bindAll(repo: ImageRepository): ImageRepository {
  return {
    create: (image) => repo.create(image),
    findById: (id) => repo.findById(id),
    findByName: (orgId, name) => repo.findByName(orgId, name),
    listVisible: (orgId) => repo.listVisible(orgId),
    listAll: () => repo.listAll(),
    update: (id, patch) => repo.update(id, patch),
    delete: (id) => repo.delete(id),
  };
}
