import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, lstat, mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import { InvalidInputError } from '../../errors.js';
import { processAlive, runHostCommand } from '../host-process.js';

/** Layer ids: content-addressed sha256 hex (64) for recipe steps, `newId()` (24) for sandbox and import layers. */
export const isLayerId = (s: string) => /^[0-9a-f]{24,64}$/.test(s);

/**
 * Layers one image may stack above its base. overlayfs takes at most 500 lower dirs, and the mount
 * option string (`lowerdir=lowers/<n>:…`) must fit a page; 120 leaves room for both.
 */
export const MAX_IMAGE_LAYERS = 120;

function assertLayerId(id: string): void {
  if (!isLayerId(id)) throw new InvalidInputError(`Layer id ${JSON.stringify(id).slice(0, 80)} is not 24 to 64 lowercase hex characters`);
}

export interface LayerInfo {
  id: string;
  /** Disk the layer's files take on the host (allocated blocks, each inode once): what it costs, not what its files claim. */
  bytes: number;
  /** Entries under its root (files, directories, links, whiteouts). */
  files: number;
  createdAt: string;
  description: string;
}

const layerJson = z.object({
  id: z.string().refine(isLayerId),
  bytes: z.number().int().nonnegative(),
  files: z.number().int().nonnegative(),
  createdAt: z.string(),
  description: z.string(),
});

export interface StagedLayer {
  /** The directory to fill: it becomes the layer's `fs/`. */
  path: string;
  /** Moves the staged tree into place as layer `id`; an existing layer `id` wins and the staged tree is discarded. */
  commit(id: string, description: string): Promise<LayerInfo>;
  discard(): Promise<void>;
}

/**
 * Staging and trash directories this process is using, across every LayerStore in it (test servers
 * share one BASE_IMAGES_DIR in one process): gc never removes one of these, whatever its age.
 */
const inUse = new Set<string>();

const STAGING = '.staging-';
const TRASH = '.trash-';

/**
 * Read-only directory layers of images under `BASE_IMAGES_DIR/layers/<id>/{fs/, layer.json}`, each
 * in overlayfs upper format (whiteouts are 0/0 character devices, opaque directories carry
 * `trusted.overlay.opaque=y`), stacked as lower dirs under a sandbox's writable upper.
 *
 * A layer appears whole or not at all: it is filled in a private staging directory beside the
 * layers, measured, given its `layer.json`, and renamed into place in one step; removal renames it
 * out first. So `layers/<id>` existing with its `layer.json` means complete, and two builders
 * committing the same content-addressed id at once end with one of their trees, intact.
 *
 * Layer trees are tenant files: they are walked with lstat only (no symlink is ever followed) and
 * sized from what the host's filesystem allocated, never from what an archive declared.
 */
export class LayerStore {
  readonly #root: string;

  constructor(private readonly opts: { baseImagesDir: string; log: Logger }) {
    this.#root = join(opts.baseImagesDir, 'layers');
  }

  /** BASE_IMAGES_DIR/layers/<id>/fs; throws for a malformed id, so no id can name a path elsewhere. */
  fsPath(id: string): string {
    return join(this.#dir(id), 'fs');
  }

  /** The layer is complete (its layer.json is in place). */
  has(id: string): boolean {
    return isLayerId(id) && existsSync(join(this.#root, id, 'layer.json'));
  }

  /**
   * The layer's record; reading it counts as using the layer (a build reusing a cached layer asks
   * this), so gc measures a layer's age from its last use, not from when it was made.
   */
  async info(id: string): Promise<LayerInfo | null> {
    const info = await this.#read(id);
    if (info) {
      const now = new Date();
      await utimes(join(this.#root, id, 'layer.json'), now, now).catch(() => {});
    }
    return info;
  }

  async #read(id: string): Promise<LayerInfo | null> {
    if (!isLayerId(id)) return null;
    const text = await readFile(join(this.#root, id, 'layer.json'), 'utf8').catch(() => null);
    if (text === null) return null;
    try {
      const parsed = layerJson.safeParse(JSON.parse(text));
      return parsed.success ? parsed.data : null;
    } catch {
      return null;
    }
  }

  async stage(): Promise<StagedLayer> {
    await this.#ensureRoot();
    // Private while it is filled: nothing else reads a half-written layer.
    const dir = join(this.#root, `${STAGING}${process.pid}-${randomBytes(6).toString('hex')}`);
    await mkdir(dir, { mode: 0o700 });
    inUse.add(dir);
    const path = join(dir, 'fs');
    await mkdir(path, { mode: 0o755 });
    let done = false;
    const discard = async () => {
      done = true;
      await rm(dir, { recursive: true, force: true });
      inUse.delete(dir);
    };
    const commit = async (id: string, description: string): Promise<LayerInfo> => {
      if (done) throw new Error('this staged layer was already committed or discarded');
      try {
        assertLayerId(id);
        const existing = await this.info(id);
        if (existing) {
          await discard();
          return existing;
        }
        const { bytes, files } = await measureTree(path);
        const info: LayerInfo = { id, bytes, files, createdAt: new Date().toISOString(), description };
        await writeFile(join(dir, 'layer.json'), JSON.stringify(info), { mode: 0o644 });
        await chmod(dir, 0o711);
        try {
          await rename(dir, this.#dir(id));
        } catch (err) {
          // Another commit of the same id got there first (rename onto a non-empty directory fails).
          const code = (err as NodeJS.ErrnoException).code;
          const winner = code === 'ENOTEMPTY' || code === 'EEXIST' ? await this.info(id) : null;
          if (!winner) throw err;
          await discard();
          return winner;
        }
        done = true;
        inUse.delete(dir);
        this.opts.log.info({ layer: id, bytes, files }, `layer ${id.slice(0, 12)} committed (${description})`);
        return info;
      } catch (err) {
        if (!done) await discard().catch(() => {});
        throw err;
      }
    };
    return { path, commit, discard };
  }

  /**
   * Extracts a container snapshot (tar.gz of a sandbox's upper dir, ContainerDriver.snapshot) into a
   * new layer as is: numeric owners (already in the sandbox uid range), modes, and the
   * trusted.overlay.* xattrs, so the sandbox's whiteouts and opaque directories stay what they were.
   */
  async fromSnapshot(file: string, id: string, description: string): Promise<LayerInfo> {
    assertLayerId(id);
    const existing = await this.info(id);
    if (existing) return existing;
    const staged = await this.stage();
    try {
      await runHostCommand('tar', ['-xzf', file, '-C', staged.path, '--numeric-owner', '--xattrs', '--xattrs-include=trusted.overlay.*', '-p'], 600_000);
    } catch (err) {
      await staged.discard();
      throw err;
    }
    return staged.commit(id, description);
  }

  /**
   * Removes complete layers not in `keep` last made or used (`info`, a commit of the same id) more
   * than `minAgeMs` ago (a build may hold a layer no image record names yet), and staging or trash
   * directories no live process is filling. Resolves to the removed layer ids.
   */
  async gc(keep: ReadonlySet<string>, minAgeMs: number): Promise<string[]> {
    if (!existsSync(this.#root)) return [];
    const removed: string[] = [];
    const now = Date.now();
    for (const name of await readdir(this.#root)) {
      const path = join(this.#root, name);
      if (name.startsWith(STAGING) || name.startsWith(TRASH)) {
        const pid = Number(name.slice(name.indexOf('-') + 1).split('-')[0]);
        if (!inUse.has(path) && (pid === process.pid || !processAlive(pid))) await rm(path, { recursive: true, force: true });
        continue;
      }
      if (!isLayerId(name) || keep.has(name)) continue;
      const marker = await stat(join(path, 'layer.json')).catch(() => null);
      const age = now - (marker ?? (await lstat(path))).mtimeMs;
      if (age < minAgeMs) continue;
      const trash = join(this.#root, `${TRASH}${process.pid}-${randomBytes(6).toString('hex')}`);
      inUse.add(trash);
      try {
        await rename(path, trash);
        await rm(trash, { recursive: true, force: true });
      } catch (err) {
        // Another server sharing BASE_IMAGES_DIR removed it first.
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      } finally {
        inUse.delete(trash);
      }
      if (marker) removed.push(name);
    }
    if (removed.length) this.opts.log.info({ layers: removed }, `removed ${removed.length} unused image layer(s)`);
    return removed;
  }

  #dir(id: string): string {
    assertLayerId(id);
    return join(this.#root, id);
  }

  async #ensureRoot(): Promise<void> {
    // Traversable, not listable, by the sandbox's mapped root.
    await mkdir(this.#root, { recursive: true, mode: 0o711 });
  }
}

/**
 * Entries and allocated bytes under `root`, walked with lstat (links are counted, never followed;
 * each inode's blocks once). Refuses device nodes other than overlayfs whiteouts (0/0 character
 * devices): no layer may hand a sandbox a real device.
 */
export async function measureTree(root: string): Promise<{ bytes: number; files: number }> {
  const seen = new Set<string>();
  let bytes = 0;
  let files = 0;
  const stack = [root];
  while (stack.length) {
    const path = stack.pop()!;
    const st = await lstat(path, { bigint: true });
    if (path !== root) files++;
    if (st.isBlockDevice() || (st.isCharacterDevice() && st.rdev !== 0n)) {
      // The path inside the layer (a tenant's name: quoted and cut short), never the host's.
      const inside = path.slice(root.length);
      throw new InvalidInputError(`The layer holds a device node, ${JSON.stringify(inside.length > 200 ? `${inside.slice(0, 200)}…` : inside)}: only whiteouts (0/0 character devices) are allowed`);
    }
    const key = `${st.dev}:${st.ino}`;
    if (!seen.has(key)) {
      seen.add(key);
      bytes += Number(st.blocks) * 512;
    }
    if (st.isDirectory()) for (const entry of await readdir(path)) stack.push(join(path, entry));
  }
  return { bytes, files };
}
