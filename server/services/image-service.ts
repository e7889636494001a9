import type { Logger } from 'pino';
import type { CreateImageInput, Image } from '../../shared/index.js';
import { ConflictError, ForbiddenError, InvalidInputError, NotFoundError } from '../errors.js';
import { imageRecipes, isBuildableImage, type RootfsImages } from '../hypervisor/images/rootfs-images.js';
import { isObjectIdHex } from '../store/ids.js';
import type { ImageRecord, ImageRepository } from '../store/types.js';
import type { Principal } from './auth-service.js';

/**
 * Image records (system images every org sees, plus each org's own) and their root filesystems.
 * Only images this server can build are offered: an image is always a name for a recipe in
 * `imageRecipes`, never a host path.
 */
export class ImageService {
  constructor(
    private readonly deps: { images: ImageRepository; rootfs: RootfsImages; defaultImage: string; log: Logger },
  ) {}

  /** Creates the system image records on first start. */
  async seedSystemImages(systemUserId: string): Promise<void> {
    for (const [name, recipe] of Object.entries(imageRecipes)) {
      if (await this.deps.images.findByName(null, name)) continue;
      try {
        await this.deps.images.create({ name, tag: 'latest', description: recipe.description, base: name, orgId: null, isSystem: true, createdBy: systemUserId });
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err; // another server process seeded it
      }
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

  async create(principal: Principal, input: CreateImageInput): Promise<Image> {
    const base = input.path ?? input.name;
    if (!isBuildableImage(base)) {
      throw new InvalidInputError(`Cannot build image ${JSON.stringify(base)} here; images this server builds: ${Object.keys(imageRecipes).join(', ')}`);
    }
    const existing = await this.deps.images.findByName(principal.orgId, input.name);
    if (existing && existing.orgId === principal.orgId) throw new ConflictError(`Your organization already has an image named ${input.name}`);
    const record = await this.deps.images.create({
      name: input.name,
      tag: input.version ?? 'latest',
      description: imageRecipes[base].description,
      base,
      orgId: principal.orgId,
      isSystem: false,
      createdBy: principal.userId,
    });
    // Build in the background so the first sandbox on it starts sooner; failures surface there.
    this.deps.rootfs.ensure(base).catch((err: Error) => this.deps.log.error({ image: base, err: err.message }, 'image build failed'));
    return this.#toImage(record);
  }

  async delete(principal: Principal, id: string): Promise<{ id: string; deleted: true }> {
    const image = await this.#visible(principal, id);
    if (image.orgId !== principal.orgId) throw new ForbiddenError(`Image ${image.name} is a system image and cannot be deleted`);
    await this.deps.images.delete(id);
    return { id, deleted: true };
  }

  /** The image a new sandbox runs: `templateId` (an image id or name) or, when absent or empty, the default. */
  async resolve(principal: Principal, templateId: string | undefined): Promise<ImageRecord> {
    const ref = templateId || this.deps.defaultImage;
    const image = isObjectIdHex(ref) ? await this.deps.images.findById(ref) : await this.deps.images.findByName(principal.orgId, ref);
    if (!image || (image.orgId !== null && image.orgId !== principal.orgId)) {
      throw new NotFoundError(`Image ${ref} not found; GET /api/images lists the images you can use`, { code: 'IMAGE_NOT_FOUND' });
    }
    return image;
  }

  /** Builds the default image's root filesystem if it is not built yet. */
  async prepareDefault(): Promise<void> {
    const image = await this.deps.images.findByName(null, this.deps.defaultImage);
    if (image) await this.rootfsFor(image);
  }

  /** The root filesystem of an image, built first if this is its first use. */
  rootfsFor(image: ImageRecord): Promise<string> {
    return this.deps.rootfs.ensure(image.base);
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
      ready: r.status === 'ready' && (r.base === '' || this.deps.rootfs.isReady(r.base)),
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
