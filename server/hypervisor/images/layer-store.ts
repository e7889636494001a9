import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, chown, lstat, mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
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

/**
 * Layers committed in this process that no image record names yet (an import or an image from a
 * sandbox between its commit and its record; a build's steps until it ends), with when: gc keeps
 * them whatever IMAGE_LAYER_CACHE_TTL_SEC says, until `settle` (the record exists or the attempt
 * ended) or PENDING_MAX_MS has passed (a caller that never settles cannot pin a layer for ever).
 */
const pending = new Map<string, number>();
const PENDING_MAX_MS = 15 * 60 * 1000;

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

  constructor(private readonly opts: { baseImagesDir: string; log: Logger; /** SANDBOX_UID_BASE: the group that may traverse layers/ (absent: the dir's own group). */ uidBase?: number }) {
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
          pending.set(id, Date.now());
          await discard();
          return existing;
        }
        // The layer's root is the sandbox's `/` (or a dir under it): never writable by anyone but its owner.
        await chmod(path, (await lstat(path)).mode & 0o755);
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
          pending.set(id, Date.now());
          await discard();
          return winner;
        }
        done = true;
        inUse.delete(dir);
        pending.set(id, Date.now());
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
    await this.#ensureRoot();
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
      const since = pending.get(name);
      if (since !== undefined && now - since < PENDING_MAX_MS) continue;
      pending.delete(name);
      const marker = await stat(join(path, 'layer.json')).catch(() => null);
      const age = now - (marker ?? (await lstat(path))).mtimeMs;
      if (age < minAgeMs) continue;
      if ((await this.#trash(path)) && marker) removed.push(name);
    }
    if (removed.length) this.opts.log.info({ layers: removed }, `removed ${removed.length} unused image layer(s)`);
    return removed;
  }

  /**
   * Removes complete layer `id` now, whatever its age (a layer made for an attempt that was
   * refused or failed, which no record names: it must not wait for the layer GC); false when absent.
   */
  async remove(id: string): Promise<boolean> {
    pending.delete(id);
    return this.#trash(this.#dir(id));
  }

  /** Marks layers as named by an image record now (or their attempt as over): gc treats them by age again. */
  settle(ids: Iterable<string>): void {
    for (const id of ids) pending.delete(id);
  }

  /** The layer's id when `dir` is its fs/ path in this store (a sandbox's lower dir), else null. */
  idOf(dir: string): string | null {
    const prefix = `${this.#root}/`;
    if (!dir.startsWith(prefix) || !dir.endsWith('/fs')) return null;
    const id = dir.slice(prefix.length, -'/fs'.length);
    return isLayerId(id) ? id : null;
  }

  /** The layer's bytes without counting as a use (quota accounting); null when it is not in the store. */
  async bytesOf(id: string): Promise<number | null> {
    return (await this.#read(id))?.bytes ?? null;
  }

  /** Renames `path` (a layer dir) to a trash name, then removes it; false when it was already gone. */
  async #trash(path: string): Promise<boolean> {
    const trash = join(this.#root, `${TRASH}${process.pid}-${randomBytes(6).toString('hex')}`);
    inUse.add(trash);
    try {
      await rename(path, trash);
      await rm(trash, { recursive: true, force: true });
      return true;
    } catch (err) {
      // Another server sharing BASE_IMAGES_DIR removed it first.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    } finally {
      inUse.delete(trash);
    }
  }

  #dir(id: string): string {
    assertLayerId(id);
    return join(this.#root, id);
  }

  async #ensureRoot(): Promise<void> {
    // Traversable (not listable) by the sandboxes' mapped root, whose group is the uid base's;
    // not by other host users, who could otherwise reach a predictable (content-addressed) layer
    // id and write into its world-writable dirs (tmp/), changing a layer every org's images share.
    // (Without the uid base, e.g. a script's store, it stays as it is, or 0711 when new.)
    const gid = this.opts.uidBase;
    await mkdir(this.#root, { recursive: true, mode: gid === undefined ? 0o711 : 0o710 });
    if (gid === undefined) return;
    const st = await lstat(this.#root);
    if (st.gid !== gid || (st.mode & 0o777) !== 0o710) {
      await chown(this.#root, st.uid, gid);
      await chmod(this.#root, 0o710);
    }
  }
}

/**
 * Entries, distinct inodes and allocated bytes under `root`, walked with lstat (links are counted,
 * never followed; each inode's blocks once, so hard links and sparse files cost what the host
 * allocated, not what they claim). Refuses device nodes other than overlayfs whiteouts (0/0
 * character devices): no layer may hand a sandbox a real device; `devices: 'count'` for a merged
 * system tree (debian's /dev). Past `maxBytes` it throws `tooBig(bytes)` at once.
 */
export async function measureTree(
  root: string,
  opts: { devices?: 'refuse' | 'count'; maxBytes?: number; tooBig?: (bytes: number) => Error } = {},
): Promise<{ bytes: number; files: number; inodes: number }> {
  const seen = new Set<string>();
  let bytes = 0;
  let files = 0;
  const stack = [root];
  while (stack.length) {
    const path = stack.pop()!;
    const st = await lstat(path, { bigint: true });
    if (path !== root) files++;
    if (opts.devices !== 'count' && (st.isBlockDevice() || (st.isCharacterDevice() && st.rdev !== 0n))) {
      // The path inside the layer (a tenant's name: quoted and cut short), never the host's.
      const inside = path.slice(root.length);
      throw new InvalidInputError(`The layer holds a device node, ${JSON.stringify(inside.length > 200 ? `${inside.slice(0, 200)}…` : inside)}: only whiteouts (0/0 character devices) are allowed`);
    }
    const key = `${st.dev}:${st.ino}`;
    if (!seen.has(key)) {
      seen.add(key);
      bytes += Number(st.blocks) * 512;
      // Stops the walk as soon as the bound is passed (a tree as big as the disk is not walked to its end).
      if (opts.maxBytes !== undefined && bytes > opts.maxBytes) throw (opts.tooBig ?? ((b: number) => new InvalidInputError(`The tree takes more than ${b} bytes`)))(bytes);
    }
    if (st.isDirectory()) for (const entry of await readdir(path)) stack.push(join(path, entry));
  }
  return { bytes, files, inodes: seen.size };
}
