import { join } from 'node:path';
import type { Readable } from 'node:stream';
import type { Logger } from 'pino';
import type { Image } from '../../shared/index.js';
import { PayloadTooLargeError, TooManyRequestsError } from '../errors.js';
import type { LayerStore } from '../hypervisor/images/layer-store.js';
import { importOciArchive } from '../hypervisor/images/oci-import.js';
import type { Principal } from './auth-service.js';
import type { ImageService } from './image-service.js';

/**
 * `POST /images/import`: an OCI image layout or `docker save` archive, streamed, becomes an org
 * image of one layer (oci-import.ts) with the image config's env and working directory.
 */
export class ImageImports {
  /** Orgs with an import in flight: one at a time each, so concurrent uploads cannot spool past the org's disk quota together. */
  readonly #importing = new Set<string>();

  constructor(
    private readonly deps: {
      images: ImageService;
      layers: LayerStore;
      baseImagesDir: string;
      /** SANDBOX_UID_BASE: the sandbox's root on the host. */
      uidBase: number;
      /** IMAGE_IMPORT_MAX_BYTES and IMAGE_IMPORT_MAX_FILES. */
      maxBytes: number;
      maxFiles: number;
      log: Logger;
    },
  ) {}

  /** Where uploads are spooled: beside the layers (one filesystem), in a dir of its own. */
  get spoolDir(): string {
    return join(this.deps.baseImagesDir, 'import-spool');
  }

  /** `declaredBytes`: the request's Content-Length, when it has one (past the bound: a 413 before anything is read). */
  async import(principal: Principal, input: { name: string; version?: string }, body: Readable, declaredBytes?: number): Promise<Image> {
    const { images, layers, uidBase, maxBytes, maxFiles, log } = this.deps;
    if (declaredBytes !== undefined && declaredBytes > maxBytes) throw new PayloadTooLargeError(`The image archive (${declaredBytes} bytes) is larger than IMAGE_IMPORT_MAX_BYTES (${maxBytes} bytes)`);
    if (this.#importing.has(principal.orgId)) throw new TooManyRequestsError('Your organization is already importing an image: wait for that import to finish, then send this one');
    this.#importing.add(principal.orgId);
    try {
      const diskLeft = await images.prepareImport(principal, input.name);
      // The org's disk left bounds the import while it is applied and before its layer is
      // committed: a refused import leaves no layer behind (none to wait for the layer GC).
      const quota = {
        bytes: diskLeft,
        refuse: (bytes: number) => new TooManyRequestsError(`Org quota exceeded: image ${input.name} takes ${bytes} bytes or more and your organization has ${diskLeft} left under ORG_MAX_DISK_MB`),
      };
      const imported = await importOciArchive(body, { layers, uidBase, maxBytes, maxFiles, spoolDir: this.spoolDir, log, description: `OCI import ${input.name}`, quota });
      return await images.recordImport(principal, { ...input, layerId: imported.layerId, sizeBytes: imported.bytes, ...imported.config });
    } finally {
      this.#importing.delete(principal.orgId);
    }
  }
}
