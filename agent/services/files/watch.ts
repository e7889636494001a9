import { lstatSync, statSync, type Stats } from 'node:fs';
import { lstat, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
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
/**
 * How long after chokidar's readdir throttle (1 s) a name seen in a raw event is checked again:
 * by then chokidar has reported it, or never will.
 */
const LATE_CHECK_MS = 1100;

/**
 * Every open watch in this process. Module-level because what it guards is: chokidar shares one
 * fs.watch handle per path among all its watchers in the process.
 */
const openWatches = new Set<FileWatch>();

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

/** Paths remembered for `LATE_CHECK_MS` after they were added. */
class RecentPaths {
  readonly #timers = new Map<string, NodeJS.Timeout>();

  add(path: string): void {
    clearTimeout(this.#timers.get(path));
    this.#timers.set(path, setTimeout(() => this.#timers.delete(path), LATE_CHECK_MS));
  }

  /** Forgets `path`; whether it was remembered. */
  delete(path: string): boolean {
    clearTimeout(this.#timers.get(path));
    return this.#timers.delete(path);
  }

  clear(): void {
    for (const t of this.#timers.values()) clearTimeout(t);
    this.#timers.clear();
  }
}

/** A name a raw event showed in a watched directory that chokidar has not reported (yet). */
interface Unseen {
  /** Its `created`, held in order until chokidar reports the file or it is found gone. */
  placeholder?: Pending;
  timer: NodeJS.Timeout;
  /** Raw rename events of the name: its creation, then its deletion once that has come. */
  renames: number;
}

/** Whether a known path is a directory. */
function isDir(known: { mode: number } | undefined): boolean {
  return ((known?.mode ?? 0) & 0o170000) === 0o040000;
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
 * deleted quickly is reported as `created` then `deleted`, never half. Writes to a file whose
 * `created` is not delivered yet are part of creating it (one `created`, its size updated);
 * repeated modifications of one path between deliveries are coalesced. Past 10,000 queued events
 * the oldest are dropped and an `overflow` event says how many.
 *
 * A file created and deleted before chokidar could stat it is still reported, as `created` then
 * `deleted`: a name a raw fs.watch event showed in a watched directory, that chokidar never
 * reported and that is gone when checked. When the watched directory itself is deleted (or
 * replaced), what it held is reported `deleted` and the watch ends (`onEnd`): its chokidar
 * watcher is closed at once, so no later watch of that path shares its handle on the dead
 * directory.
 */
export class FileWatch {
  readonly #queue: Pending[] = [];
  readonly #known = new Map<string, FileIdentity & { mode: number; size: number; mtimeMs: number }>();
  #dropped = 0;
  #flushTimer: NodeJS.Timeout | undefined;
  readonly #watcher: ReturnType<typeof chokidarWatch>;
  #ready = false;
  #ended = false;
  readonly #unseen = new Map<string, Unseen>();
  /** Paths reported as short-lived whose stale chokidar `add` (and then `unlink`) is not reported again. */
  readonly #reportedShortLived = new RecentPaths();
  readonly #suppressedUnlinks = new RecentPaths();
  /** Known paths whose deletion's raw event has been seen. */
  readonly #deletionSeen = new Set<string>();
  /** Paths chokidar reported deleted before their deletion's raw event came: that event is not a new name. */
  readonly #deletionPending = new RecentPaths();

  private constructor(
    readonly root: string,
    private readonly rootFile: FileIdentity & { isDir: boolean },
    private readonly spec: WatchSpec,
    private readonly deliver: (messages: WatchMessage[]) => void,
    private readonly onEnd: () => void,
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
    this.#watcher.on('raw', (event, name, details) => this.#onRaw(event, name, (details as { watchedPath?: string } | undefined)?.watchedPath));
    this.#watcher.on('error', () => {});
    openWatches.add(this);
  }

  /**
   * Starts watching `spec.path`, which must exist; resolves once the initial scan is done.
   * `onEnd` is called when the watch ends by itself (its directory was deleted).
   */
  static async start(spec: WatchSpec, deliver: (messages: WatchMessage[]) => void, onEnd: () => void = () => {}): Promise<FileWatch> {
    const root = resolveInSandbox(spec.path);
    const st = await stat(root).catch((err) => {
      throw fsError(err, root);
    });
    // A watch whose directory was replaced without it noticing would lend its dead handle.
    for (const w of openWatches) w.#checkRoot();
    const w = new FileWatch(root, { ino: st.ino, birthtimeMs: st.birthtimeMs, isDir: st.isDirectory() }, spec, deliver, onEnd);
    await new Promise<void>((resolve) => w.#watcher.once('ready', () => resolve()));
    return w;
  }

  /** Whether `path` (the root or a known path) is still the file it was when last seen. */
  #isStill(path: string): boolean {
    const was = path === this.root ? this.rootFile : this.#known.get(path);
    try {
      const st = statSync(path);
      return was !== undefined && sameFile(was, { ino: st.ino, birthtimeMs: st.birthtimeMs });
    } catch {
      return false;
    }
  }

  /** Drops the names not reported yet (their placeholders too) and the remembered recent paths. */
  #forgetRecent(): void {
    for (const u of this.#unseen.values()) {
      clearTimeout(u.timer);
      const at = u.placeholder ? this.#queue.indexOf(u.placeholder) : -1;
      if (at >= 0) this.#queue.splice(at, 1);
    }
    this.#unseen.clear();
    this.#reportedShortLived.clear();
    this.#suppressedUnlinks.clear();
    this.#deletionPending.clear();
  }

  /**
   * Ends the watch if its root directory is gone or is another directory now. (chokidar itself
   * follows a watched file that is replaced, as editors do on save.)
   */
  #checkRoot(): void {
    if (this.#ended || !this.rootFile.isDir || this.#isStill(this.root)) return;
    this.#ended = true;
    // Synchronously: chokidar releases its shares of the fs.watch handles before anyone re-adds the path.
    void this.#watcher.close();
    openWatches.delete(this);
    this.#forgetRecent();
    for (const q of this.#queue) if (!q.ready) this.#settle(q, q.message);
    const gone = [...this.#known.keys()].filter((p) => p !== this.root).sort((a, b) => b.length - a.length);
    this.#known.clear();
    for (const path of gone) this.#enqueue({ message: { type: 'deleted', path, timestamp: new Date().toISOString() }, ready: true });
    clearTimeout(this.#flushTimer);
    this.#flushTimer = undefined;
    this.#flush();
    this.onEnd();
  }

  /**
   * A raw fs.watch event. On the root itself: it may have been deleted. A name in a watched
   * directory that chokidar has not reported: held as a `created` until chokidar reports it or it
   * is found gone (a short-lived file chokidar drops).
   */
  #onRaw(event: string, name: string | null, watchedPath: string | undefined): void {
    if (this.#ended || !this.#ready || event !== 'rename' || !name || !watchedPath) return;
    // A directory's own deletion or replacement is reported under its own name, like a child's.
    if (name === basename(watchedPath)) {
      if (watchedPath === this.root) this.#checkRoot();
      if (this.#ended || !this.#isStill(watchedPath)) return;
    }
    const watchedDir = watchedPath === this.root ? this.rootFile.isDir : this.spec.recursive && isDir(this.#known.get(watchedPath));
    if (!watchedDir || (this.spec.ignoreHidden && name.startsWith('.'))) return;
    const path = join(watchedPath, name);
    const known = this.#known.get(path);
    if (known) {
      this.#deletionSeen.add(path);
      if (this.spec.recursive && isDir(known)) this.#checkReplacedDir(path, known);
      return;
    }
    const unseen = this.#unseen.get(path);
    if (unseen) unseen.renames++;
    if (this.#deletionPending.delete(path) || unseen) return;
    const placeholder: Pending = { message: { type: 'created', path, timestamp: new Date().toISOString() }, ready: false };
    this.#enqueue(placeholder);
    this.#unseen.set(path, { placeholder, timer: setTimeout(() => void this.#checkUnseen(path), RENAME_WINDOW_MS), renames: 1 });
  }

  /**
   * A subdirectory replaced by another (`rm -rf d && mkdir d`) between two of chokidar's reads of
   * its parent: chokidar would keep watching the dead one. It and what it held are reported
   * `deleted` (chokidar's own late `unlink`s of them are not reported again), and the new one is
   * watched: its `created` and its contents' follow.
   */
  #checkReplacedDir(path: string, known: FileIdentity): void {
    let st: Stats;
    try {
      st = statSync(path);
    } catch {
      return; // gone: chokidar reports that
    }
    if (!st.isDirectory() || sameFile(known, { ino: st.ino, birthtimeMs: st.birthtimeMs })) return;
    const gone = [...this.#known.keys()].filter((p) => p === path || p.startsWith(`${path}/`)).sort((a, b) => b.length - a.length);
    for (const p of gone) {
      this.#known.delete(p);
      this.#deletionSeen.delete(p);
      this.#suppressedUnlinks.add(p);
      this.#push({ type: 'deleted', path: p, timestamp: new Date().toISOString() });
    }
    this.#watcher.unwatch(path);
    this.#watcher.add(path);
  }

  /** Reports an unseen name that is gone as `created` then `deleted`; one still there is left to chokidar. */
  async #checkUnseen(path: string): Promise<void> {
    const exists = await lstat(path).then(() => true, () => false);
    const unseen = this.#unseen.get(path);
    if (!unseen || this.#ended) return;
    const at = unseen.placeholder ? this.#queue.indexOf(unseen.placeholder) : -1;
    if (exists) {
      // chokidar reports it (then `#onAdd` drops this); checked once more in case it never does.
      if (at >= 0) this.#queue.splice(at, 1);
      if (unseen.placeholder) {
        unseen.placeholder = undefined;
        unseen.timer = setTimeout(() => void this.#checkUnseen(path), LATE_CHECK_MS);
        this.#scheduleFlush();
      } else this.#unseen.delete(path);
      return;
    }
    this.#unseen.delete(path);
    this.#reportedShortLived.add(path);
    // Its deletion's raw event may still be on its way: that is not a new name.
    if (unseen.renames < 2) this.#deletionPending.add(path);
    const deleted: Pending = { message: { type: 'deleted', path, timestamp: new Date().toISOString() }, ready: true };
    if (at >= 0) {
      unseen.placeholder!.ready = true;
      this.#queue.splice(at + 1, 0, deleted);
      this.#scheduleFlush();
    } else {
      this.#enqueue({ message: { type: 'created', path, timestamp: new Date().toISOString() }, ready: true });
      this.#enqueue(deleted);
    }
  }

  /** Whether chokidar's `add` of `path` is stale: the path was reported short-lived and is still gone. */
  #staleAdd(path: string): boolean {
    const unseen = this.#unseen.get(path);
    if (unseen) {
      clearTimeout(unseen.timer);
      if (unseen.placeholder) {
        const at = this.#queue.indexOf(unseen.placeholder);
        if (at >= 0) this.#queue.splice(at, 1);
        this.#scheduleFlush();
      }
      this.#unseen.delete(path);
    }
    if (!this.#reportedShortLived.delete(path)) return false;
    try {
      lstatSync(path);
      return false;
    } catch {
      this.#suppressedUnlinks.add(path);
      return true;
    }
  }

  #remember(path: string, st: Stats | undefined): void {
    if (st) this.#known.set(path, { ino: st.ino, birthtimeMs: st.birthtimeMs, mode: st.mode, size: st.size, mtimeMs: st.mtimeMs });
  }

  #onAdd(path: string, st: Stats | undefined, isDir: boolean): void {
    this.#deletionSeen.delete(path);
    if (this.#ready && this.#staleAdd(path)) return;
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
    if (this.#suppressedUnlinks.delete(path)) return;
    if (!this.#deletionSeen.delete(path) && this.#ready) this.#deletionPending.add(path);
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
    this.#ended = true;
    openWatches.delete(this);
    clearTimeout(this.#flushTimer);
    for (const p of this.#queue) clearTimeout(p.timer);
    this.#forgetRecent();
    await this.#watcher.close();
  }
}
