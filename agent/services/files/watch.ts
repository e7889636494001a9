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
 * How long a deletion or creation waits for its counterpart (same file, another path, either
 * order), so the pair is reported as one rename.
 */
const RENAME_WINDOW_MS = 30;
/** Events held for a reader before the oldest are dropped (and counted in an `overflow` event). */
const MAX_QUEUED = 10_000;
const FLUSH_MS = 5;

/** What identifies a file across a rename: its inode, and its birth time where the filesystem keeps one. */
interface FileIdentity {
  ino: number;
  /** 0 where the filesystem records none. */
  birthtimeMs: number;
}

interface Pending {
  message: WatchMessage;
  /** Deletions are held back until the rename window closes or a matching creation arrives. */
  ready: boolean;
  file?: FileIdentity;
  timer?: NodeJS.Timeout;
}

/**
 * Whether two sightings are the same file: the same inode, and the same birth time where both
 * have one — a new file can get the inode of one deleted moments ago, but not its birth time.
 */
function sameFile(a: FileIdentity, b: FileIdentity): boolean {
  return a.ino === b.ino && (a.birthtimeMs === 0 || b.birthtimeMs === 0 || a.birthtimeMs === b.birthtimeMs);
}

/**
 * Watches a path with chokidar and delivers FileEvents in order: created, modified, chmod (mode
 * changed, content not), deleted, and renamed (a deletion and a creation of the same file under
 * another path within 30 ms, in either order; never a path renamed to itself). A file created and
 * deleted quickly is reported as `created` then `deleted`; one gone before the watcher could see
 * it is not reported at all, never half. Writes to a file whose `created` is not delivered yet
 * are part of creating it (one `created`, its size updated); repeated modifications of one path
 * between deliveries are coalesced. Past 10,000 queued events the oldest are dropped and an
 * `overflow` event says how many.
 */
export class FileWatch {
  readonly #queue: Pending[] = [];
  readonly #known = new Map<string, FileIdentity & { mode: number; size: number; mtimeMs: number }>();
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
    if (st) this.#known.set(path, { ino: st.ino, birthtimeMs: st.birthtimeMs, mode: st.mode, size: st.size, mtimeMs: st.mtimeMs });
  }

  #onAdd(path: string, st: Stats | undefined, isDir: boolean): void {
    this.#remember(path, st);
    if (!this.#ready || path === this.root) return;
    const size = isDir || !st ? {} : { size: st.size };
    const file = st ? { ino: st.ino, birthtimeMs: st.birthtimeMs } : undefined;
    // The same file deleted under another path moments ago: this is the other half of a rename.
    const pair = file ? this.#unpaired('deleted', file, path) : undefined;
    if (pair) {
      this.#settle(pair, { type: 'renamed', path, oldPath: (pair.message as { path: string }).path, ...size, timestamp: new Date().toISOString() });
      return;
    }
    this.#hold({ type: 'created', path, ...size, timestamp: new Date().toISOString() }, file);
  }

  /** A held `type` event of the same file under another path than `path`, if any. */
  #unpaired(type: 'created' | 'deleted', file: FileIdentity, path: string): Pending | undefined {
    return this.#queue.find((q) => !q.ready && q.file && sameFile(q.file, file) && q.message.type === type && (q.message as { path: string }).path !== path);
  }

  /** Queues an event that may turn out to be half of a rename. */
  #hold(message: WatchMessage, file: FileIdentity | undefined): void {
    const pending: Pending = { message, ready: file === undefined, file };
    if (!pending.ready) {
      pending.timer = setTimeout(() => {
        pending.ready = true;
        this.#scheduleFlush();
      }, RENAME_WINDOW_MS);
    }
    this.#enqueue(pending);
  }

  /** Makes a held event deliverable, as `message` (the rename it completes, or itself). */
  #settle(pending: Pending, message: WatchMessage): void {
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
    // The same file created under another path moments ago: this is the other half of a rename.
    const pair = known ? this.#unpaired('created', known, path) : undefined;
    if (pair) {
      const created = pair.message as { path: string; size?: number };
      this.#settle(pair, { type: 'renamed', path: created.path, oldPath: path, ...(created.size !== undefined ? { size: created.size } : {}), timestamp: new Date().toISOString() });
      return;
    }
    // Its own creation still held (it lived only moments): that is delivered as it is, first.
    const created = this.#queue.find((q) => !q.ready && q.message.type === 'created' && q.message.path === path);
    if (created) this.#settle(created, created.message);
    this.#hold({ type: 'deleted', path, timestamp: new Date().toISOString() }, known);
  }

  #push(message: WatchMessage): void {
    // Coalesce: writing a file just created is part of creating it (one `created`, its size
    // updated) — the newest queued event of that path, so not a creation it has since been deleted after.
    if (message.type === 'modified') {
      const latest = this.#queue.findLast((q) => 'path' in q.message && q.message.path === message.path);
      if (latest?.message.type === 'created') {
        latest.message.size = message.size;
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
