import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, lchown, lstat, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { processAlive } from '../host-process.js';
import { runLogged } from './logged-command.js';
import { DomainError, ErrorCode } from '../../errors.js';
import type { IdMapping } from '../container/oci-spec.js';
import { MAX_IMAGE_LAYERS, type LayerStore } from './layer-store.js';

/** How each image this server can build is made. Only images that can be built here are listed. */
export const imageRecipes = {
  debian: {
    /** Bumped when the recipe changes; each version is its own directory, so running sandboxes keep theirs. */
    version: 2,
    description: 'Debian 12 (bookworm), minimal, with tini, procps, bzip2, zip and unzip',
    suite: 'bookworm',
    variant: 'minbase',
    include: ['tini', 'procps', 'bzip2', 'zip', 'unzip'],
  },
} as const;
export type BuildableImage = keyof typeof imageRecipes;

export function isBuildableImage(name: string): name is BuildableImage {
  return Object.hasOwn(imageRecipes, name);
}


/**
 * Root filesystems under `BASE_IMAGES_DIR/<name>/rootfs-v<version>`, built with debootstrap the first time
 * they are needed (progress in the log) and reused after. Files are owned by the sandbox uid
 * range, so root inside a sandbox owns what root owned in the image.
 */
export class RootfsImages {
  readonly #building = new Map<string, Promise<string>>();

  constructor(
    private readonly opts: { baseImagesDir: string; idMap: IdMapping; mirror: string; log: Logger; layers?: LayerStore },
  ) {}

  /**
   * An image's lower dirs, bottom first: its system rootfs (built first if needed; `base: ''` for
   * none, as an OCI import) and then each of its layers. A layer that is not in the store fails
   * the call (an image whose layers were removed cannot start).
   */
  async lowerDirs(image: { base: string; layers: readonly string[] }): Promise<string[]> {
    if (image.layers.length > MAX_IMAGE_LAYERS) {
      throw new DomainError(ErrorCode.INVALID_INPUT, `The image stacks ${image.layers.length} layers, more than the ${MAX_IMAGE_LAYERS} a sandbox can mount: build it with fewer steps or on a base with fewer layers`);
    }
    const dirs = image.base ? [await this.ensure(image.base)] : [];
    if (image.layers.length && !this.opts.layers) throw new DomainError(ErrorCode.INVALID_INPUT, 'This server has no layer store: images with layers cannot be used here');
    for (const id of image.layers) {
      if (!this.opts.layers!.has(id)) throw new DomainError(ErrorCode.NOT_FOUND, `A layer of this image (${id.slice(0, 12)}) is missing on this server: build or import the image again`);
      dirs.push(this.opts.layers!.fsPath(id));
    }
    if (!dirs.length) throw new DomainError(ErrorCode.INVALID_INPUT, 'The image has neither a base nor layers');
    return dirs;
  }

  rootfsPath(name: string): string {
    const version = isBuildableImage(name) ? imageRecipes[name].version : 0;
    return join(this.opts.baseImagesDir, name, `rootfs-v${version}`);
  }

  /** Built and complete: the marker is written only after the rootfs is in place. */
  isReady(name: string): boolean {
    return existsSync(`${this.rootfsPath(name)}.json`);
  }

  /** The image's rootfs, building it first if needed; concurrent callers share one build. */
  ensure(name: string): Promise<string> {
    if (this.isReady(name)) return Promise.resolve(this.rootfsPath(name));
    if (!isBuildableImage(name)) {
      return Promise.reject(new DomainError(ErrorCode.INVALID_INPUT, `Image ${name} has no root filesystem on this server and cannot be built here`));
    }
    let build = this.#building.get(name);
    if (!build) {
      build = this.#build(name).finally(() => this.#building.delete(name));
      this.#building.set(name, build);
    }
    return build;
  }

  /**
   * Builds under a lock file, so two server processes sharing BASE_IMAGES_DIR never build (and
   * swap in) the same image at once: the second waits for the first's result.
   */
  async #build(name: BuildableImage): Promise<string> {
    await mkdir(this.opts.baseImagesDir, { recursive: true });
    const lock = join(this.opts.baseImagesDir, `.${name}.lock`);
    while (true) {
      try {
        await writeFile(lock, String(process.pid), { flag: 'wx' });
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const holder = Number(await readFile(lock, 'utf8').catch(() => '0'));
        // Our own pid in the lock is a leftover of an earlier run (e.g. PID 1 in a container).
        if (!holder || holder === process.pid || !processAlive(holder)) {
          await rm(lock, { force: true });
          continue;
        }
        this.opts.log.info({ image: name, pid: holder }, `image ${name} is being built by process ${holder}; waiting`);
        while (processAlive(holder) && existsSync(lock) && !this.isReady(name)) await new Promise((r) => setTimeout(r, 500));
        if (this.isReady(name)) return this.rootfsPath(name);
      }
    }
    try {
      if (this.isReady(name)) return this.rootfsPath(name);
      return await this.#debootstrap(name);
    } finally {
      await rm(lock, { force: true });
    }
  }

  async #debootstrap(name: BuildableImage): Promise<string> {
    const recipe = imageRecipes[name];
    const { log, baseImagesDir } = this.opts;
    const target = this.rootfsPath(name);
    const staging = join(baseImagesDir, name, `.building-${process.pid}`);
    await rm(staging, { recursive: true, force: true });
    await mkdir(staging, { recursive: true });
    const started = Date.now();
    log.info({ image: name }, `building image ${name} with debootstrap (${recipe.suite}, ${recipe.variant}); this takes about a minute the first time`);
    try {
      await runLogged(
        'debootstrap',
        [`--variant=${recipe.variant}`, `--include=${recipe.include.join(',')}`, recipe.suite, join(staging, 'rootfs'), this.opts.mirror],
        log.child({ image: name, step: 'debootstrap' }),
        // The steps, not each of the ~100 packages.
        (line) => /^I: (Retrieving (In)?Release|Checking component|Found additional|Installing core|Unpacking required|Configuring required|Configuring the base|Base system)/.test(line) || /^[EW]: /.test(line),
      );
      log.info({ image: name }, `image ${name}: shifting file ownership into the sandbox uid range`);
      await shiftOwnership(join(staging, 'rootfs'), this.opts.idMap.hostId);
      await rm(target, { recursive: true, force: true }); // an unfinished earlier build (no marker)
      await rename(join(staging, 'rootfs'), target);
      await rm(staging, { recursive: true, force: true });
      await writeFile(`${target}.json`, JSON.stringify({ name, ...recipe, builtAt: new Date().toISOString(), uidBase: this.opts.idMap.hostId }));
    } catch (err) {
      await rm(staging, { recursive: true, force: true }).catch(() => {});
      throw new DomainError(ErrorCode.DRIVER_FAILURE, `Building image ${name} failed: ${(err as Error).message}`, { cause: err });
    }
    log.info({ image: name, seconds: Math.round((Date.now() - started) / 1000) }, `image ${name} is ready`);
    return target;
  }
}

/**
 * The VM image key of a stack of lower dirs (bottom first): `chain-` and 16 hex of their sha256, so
 * the same stack always maps to the same `<key>-base.qcow2` and a changed stack to a new one.
 */
export function vmImageKey(lowerDirs: readonly string[]): string {
  return `chain-${createHash('sha256').update(JSON.stringify(lowerDirs)).digest('hex').slice(0, 16)}`;
}

/** Whether a VM image name is a `vmImageKey` (built from lower dirs) rather than a system image. */
export function isChainImageKey(name: string): boolean {
  return /^chain-[0-9a-f]{16}$/.test(name);
}

/** Adds `base` to the owner and group of every file under `root` (not following symlinks). */
export function shiftOwnership(root: string, base: number): Promise<void> {
  return remapOwnership(root, (id) => (id < base ? id + base : id));
}

/** Gives every file under `root` the owner and group `mapId` returns (not following symlinks). */
export async function remapOwnership(root: string, mapId: (id: number) => number): Promise<void> {
  const stack = [root];
  while (stack.length) {
    const path = stack.pop()!;
    const st = await lstat(path);
    const uid = mapId(st.uid);
    const gid = mapId(st.gid);
    if (uid !== st.uid || gid !== st.gid) await lchown(path, uid, gid);
    // lchown clears setuid/setgid bits on some filesystems; restore the mode for non-links.
    if (!st.isSymbolicLink() && st.mode & 0o6000) await chmod(path, st.mode & 0o7777);
    if (st.isDirectory()) for (const entry of await readdir(path)) stack.push(join(path, entry));
  }
}
