import type { Stats } from 'node:fs';
import { stat } from 'node:fs/promises';
import { basename } from 'node:path';
import { watch as chokidarWatch } from 'chokidar';
import type { WatchMessage } from '../../../shared/schemas/files.js';
import { fsError } from '../../errors.js';
import { resolveInSandbox } from './paths.js';

export interface WatchSpec {
  path: string;
  recursive: boolean;
  ignoreHidden: boolean;
}

/**
 * How long a deletion or creation waits for its counterpart (same inode, either order), so the
 * pair is reported as one rename.
 */
const RENAME_WINDOW_MS = 30;
/** Events held for a reader before the oldest are dropped (and counted in an `overflow` event). */
const MAX_QUEUED = 10_000;
const FLUSH_MS = 5;

interface Pending {
  message: WatchMessage;
  /** Deletions are held back until the rename window closes or a matching creation arrives. */
  ready: boolean;
  ino?: number;
  timer?: NodeJS.Timeout;
}

/**
 * Watches a path with chokidar and delivers FileEvents in order: created, modified, chmod (mode
 * changed, content not), deleted, and renamed (a deletion and creation of the same inode within
 * 30 ms, in either order). Repeated modifications of one path between deliveries are coalesced; past 10,000 queued
 * events the oldest are dropped and an `overflow` event says how many.
 */
export class FileWatch {
  readonly #queue: Pending[] = [];
  readonly #known = new Map<string, { ino: number; mode: number; size: number; mtimeMs: number }>();
  #dropped = 0;
  #flushTimer: NodeJS.Timeout | undefined;
  readonly #watcher: ReturnType<typeof chokidarWatch>;
  #ready = false;

  private constructor(
    readonly root: string,
    spec: WatchSpec,
    private readonly deliver: (messages: WatchMessage[]) => void,
  ) {
    this.#watcher = chokidarWatch(root, {
      ignoreInitial: false, // the initial scan learns inodes and modes (for rename and chmod); its events are not reported
      alwaysStat: true,
      depth: spec.recursive ? undefined : 0,
      ignored: spec.ignoreHidden ? (p: string) => p !== root && basename(p).startsWith('.') : undefined,
      persistent: true,
      // chokidar's atomic mode delays deletions by 100 ms; rename pairing here does that job.
      atomic: false,
    });
    this.#watcher.on('ready', () => (this.#ready = true));
    this.#watcher.on('add', (p, st) => this.#onAdd(p, st, false));
    this.#watcher.on('addDir', (p, st) => this.#onAdd(p, st, true));
    this.#watcher.on('change', (p, st) => this.#onChange(p, st));
    this.#watcher.on('unlink', (p) => this.#onUnlink(p));
    this.#watcher.on('unlinkDir', (p) => this.#onUnlink(p));
    this.#watcher.on('error', () => {});
  }

  /** Starts watching `spec.path`, which must exist; resolves once the initial scan is done. */
  static async start(spec: WatchSpec, deliver: (messages: WatchMessage[]) => void): Promise<FileWatch> {
    const root = resolveInSandbox(spec.path);
    await stat(root).catch((err) => {
      throw fsError(err, root);
    });
    const w = new FileWatch(root, spec, deliver);
    await new Promise<void>((resolve) => w.#watcher.once('ready', () => resolve()));
    return w;
  }

  #remember(path: string, st: Stats | undefined): void {
    if (st) this.#known.set(path, { ino: st.ino, mode: st.mode, size: st.size, mtimeMs: st.mtimeMs });
  }

  #onAdd(path: string, st: Stats | undefined, isDir: boolean): void {
    this.#remember(path, st);
    if (!this.#ready || path === this.root) return;
    const size = isDir || !st ? {} : { size: st.size };
    // A deletion of the same inode moments ago: this is the other half of a rename.
    const pair = st ? this.#queue.find((q) => !q.ready && q.ino === st.ino && q.message.type === 'deleted') : undefined;
    if (pair) {
      this.#completeRename(pair, { type: 'renamed', path, oldPath: (pair.message as { path: string }).path, ...size, timestamp: new Date().toISOString() });
      return;
    }
    this.#hold({ type: 'created', path, ...size, timestamp: new Date().toISOString() }, st?.ino);
  }

  /** Queues an event that may turn out to be half of a rename. */
  #hold(message: WatchMessage, ino: number | undefined): void {
    const pending: Pending = { message, ready: ino === undefined, ino };
    if (!pending.ready) {
      pending.timer = setTimeout(() => {
        pending.ready = true;
        this.#scheduleFlush();
      }, RENAME_WINDOW_MS);
    }
    this.#enqueue(pending);
  }

  #completeRename(pending: Pending, message: WatchMessage): void {
    clearTimeout(pending.timer);
    pending.message = message;
    pending.ready = true;
    this.#scheduleFlush();
  }

  #onChange(path: string, st: Stats | undefined): void {
    const before = this.#known.get(path);
    this.#remember(path, st);
    if (!this.#ready) return;
    const chmodOnly = before && st && before.mode !== st.mode && before.size === st.size && before.mtimeMs === st.mtimeMs;
    this.#push({ type: chmodOnly ? 'chmod' : 'modified', path, ...(st ? { size: st.size } : {}), timestamp: new Date().toISOString() });
  }

  #onUnlink(path: string): void {
    const known = this.#known.get(path);
    this.#known.delete(path);
    if (!this.#ready) return;
    // A creation of the same inode moments ago: this is the other half of a rename.
    const pair = known ? this.#queue.find((q) => !q.ready && q.ino === known.ino && q.message.type === 'created') : undefined;
    if (pair) {
      const created = pair.message as { path: string; size?: number };
      this.#completeRename(pair, { type: 'renamed', path: created.path, oldPath: path, ...(created.size !== undefined ? { size: created.size } : {}), timestamp: new Date().toISOString() });
      return;
    }
    this.#hold({ type: 'deleted', path, timestamp: new Date().toISOString() }, known?.ino);
  }

  #push(message: WatchMessage): void {
    // Coalesce: writing a file just created is part of creating it (one `created`, its size updated).
    if (message.type === 'modified') {
      const created = this.#queue.find((q) => q.message.type === 'created' && q.message.path === message.path);
      if (created) {
        (created.message as { size?: number }).size = message.size;
        return;
      }
    }
    // Coalesce: a modification of a path already waiting as the newest event replaces it.
    const last = this.#queue.at(-1);
    if (last?.ready && message.type === 'modified' && last.message.type === 'modified' && last.message.path === message.path) {
      last.message = message;
      return;
    }
    this.#enqueue({ message, ready: true });
  }

  #enqueue(p: Pending): void {
    this.#queue.push(p);
    while (this.#queue.length > MAX_QUEUED) {
      const dropped = this.#queue.shift()!;
      clearTimeout(dropped.timer);
      this.#dropped++;
    }
    this.#scheduleFlush();
  }

  #scheduleFlush(): void {
    this.#flushTimer ??= setTimeout(() => {
      this.#flushTimer = undefined;
      this.#flush();
    }, FLUSH_MS);
  }

  #flush(): void {
    const out: WatchMessage[] = [];
    if (this.#dropped) {
      out.push({ type: 'overflow', dropped: this.#dropped, timestamp: new Date().toISOString() });
      this.#dropped = 0;
    }
    while (this.#queue[0]?.ready) out.push(this.#queue.shift()!.message);
    if (out.length) this.deliver(out);
  }

  async close(): Promise<void> {
    clearTimeout(this.#flushTimer);
    for (const p of this.#queue) clearTimeout(p.timer);
    await this.#watcher.close();
  }
}
