import { appendFile, mkdir, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { Recipe } from '../../shared/schemas/images.js';
import { TooManyRequestsError } from '../errors.js';
import { systemRecipeImages, type SystemRecipeImage } from '../hypervisor/images/system-recipes.js';
import { isObjectIdHex } from '../store/ids.js';
import type { ImageRecord, ImageRepository } from '../store/types.js';
import { BuildFailedError, scrub, type BuildParent, type ImageBuilder } from './image-builder.js';

/** What a log file starts with once its head was dropped to keep it under the cap. */
const TRUNCATED_MARK = '[earlier lines of this build log were dropped]\n';

export interface ImageBuildsOptions {
  images: ImageRepository;
  builder: ImageBuilder;
  /** DATA_DIR/image-logs: one `<imageId>.log` per recipe build. */
  logsDir: string;
  log: Logger;
  /** IMAGE_BUILDS_PER_ORG: builds one org may have queued or running. */
  maxPerOrg: number;
  /** IMAGE_BUILD_LOG_MAX_BYTES: a log past it keeps its tail. */
  logMaxBytes: number;
  /** Called with each log line of a build (e.g. to emit `image.build` org events); failures are ignored. */
  onLine?: (image: ImageRecord, line: string) => void;
  /** IMAGE_BUILD_TIMEOUT_SEC in ms: a build running longer fails (its queue wait does not count). */
  buildTimeoutMs?: number;
  /** Bytes of ORG_MAX_DISK_MB org `orgId` has left for images; a build whose layers pass it fails at that step. */
  budget?: (orgId: string) => Promise<number>;
  /** Removes layers a build made that ended failed or cancelled (those no image record names), so they do not sit on disk uncounted. */
  discardLayers?: (layerIds: string[]) => Promise<void>;
  /** A fleet host's node id: only builds of its own images (`ImageRecord.hostId`) are resumed here. */
  hostId?: string;
}

/** The queue lane of system image builds (`code`, test setup): served before any org's builds. */
const SYSTEM_LANE = Symbol('system');

interface QueuedTask {
  /** The org a build is for (round-robin between orgs), or the system lane. */
  lane: string | typeof SYSTEM_LANE;
  run: () => Promise<void>;
}

/** A build in this server: queued or running, with its live log lines for followers. */
interface ActiveBuild {
  image: ImageRecord;
  parent: BuildParent;
  abort: AbortController;
  /** The tail of the log (bounded like the file), numbered from `dropped`. */
  lines: string[];
  bytes: number;
  dropped: number;
  waiters: Set<() => void>;
  done: boolean;
  /** Its turn in the queue came. */
  started: boolean;
  /** Resolves once the build is over (record written) or dropped. */
  ended: Promise<void>;
  markEnded(): void;
}

/**
 * Recipe builds of this server: a queue (one build at a time: a build takes the host's CPU and
 * disk, and builds of one recipe share layers, so the second reuses the first's), each build's
 * log in `logsDir` (capped, keeping the tail) and its status, progress and result on the image
 * record (`images.update`; the builder is each building image's only writer). System recipe images
 * (`code`) are built through the same queue, into layers only.
 */
export class ImageBuilds {
  readonly #active = new Map<string, ActiveBuild>();
  readonly #queue: QueuedTask[] = [];
  /** When each org's build last got its turn (a counter): the org served longest ago goes next. */
  readonly #served = new Map<string, number>();
  #turns = 0;
  #running = false;
  readonly #system = new Map<string, Promise<string[]>>();
  #closed = false;

  constructor(private readonly deps: ImageBuildsOptions) {}

  /** Throws the 429 when `orgId` has IMAGE_BUILDS_PER_ORG builds queued or running (call before recording a new build). */
  checkCapacity(orgId: string | null): void {
    const count = [...this.#active.values()].filter((b) => !b.done && b.image.orgId === orgId).length;
    if (count >= this.deps.maxPerOrg) {
      throw new TooManyRequestsError(`Your organization has ${count} image builds queued or running (IMAGE_BUILDS_PER_ORG is ${this.deps.maxPerOrg}); wait for one to finish`);
    }
  }

  /**
   * Queues the build of record `image` (status 'building', its recipe set) on `parent` (a ready
   * image: its base, layers, env and workdir); returns at once. 429 past the org's cap.
   */
  enqueue(image: ImageRecord, parent: BuildParent): void {
    if (this.#active.has(image.id)) return;
    this.checkCapacity(image.orgId);
    const build = this.#newBuild(image, parent);
    this.#active.set(image.id, build);
    this.#schedule(image.orgId ?? '', () => this.#run(build));
  }

  /** Stops a queued or running build (its image is being deleted); its log goes too. A no-op but for the log when none is in flight. */
  async cancel(imageId: string): Promise<void> {
    const build = this.#active.get(imageId);
    if (build && !build.done) {
      build.abort.abort();
      // One still queued ends now (its turn finds it done); a running one once its sandbox is gone.
      if (!build.started) await this.#end(build, null);
      await build.ended;
    }
    await this.removeLog(imageId);
  }

  /** Removes the build log of image `imageId` (deleted); call after its build ended or was cancelled. */
  async removeLog(imageId: string): Promise<void> {
    if (!isObjectIdHex(imageId)) return;
    await this.#writeQueue;
    await rm(this.#logFile(imageId), { force: true });
  }

  /** Removes build logs whose image has no record (deleted while this server was down, or by an older server); resolves to how many. */
  async pruneLogs(): Promise<number> {
    const names = await readdir(this.deps.logsDir).catch(() => [] as string[]);
    if (!names.length) return 0;
    const known = new Set((await this.deps.images.listAll()).map((r) => r.id));
    let removed = 0;
    for (const name of names) {
      const id = name.endsWith('.log') ? name.slice(0, -4) : '';
      if (!isObjectIdHex(id) || known.has(id) || this.#active.has(id)) continue;
      await rm(join(this.deps.logsDir, name), { force: true });
      removed++;
    }
    return removed;
  }

  /**
   * Builds still marked 'building' (the server stopped during them) are queued again, on the stack
   * recorded when they were asked for (their record's base and layers: what their parent was then,
   * not what it is now: a system image whose recipe changed since has other layers, or none yet);
   * cached layers make it quick. Logs of images without a record are removed first.
   */
  async resume(): Promise<void> {
    const pruned = await this.pruneLogs().catch((err: Error) => (this.deps.log.warn({ err: err.message }, 'could not prune build logs'), 0));
    if (pruned) this.deps.log.info({ logs: pruned }, `removed ${pruned} build log(s) of deleted images`);
    // In a fleet each host resumes its own (another's build, and its layers, are that host's).
    const building = (await this.deps.images.listAll()).filter((r) => r.status === 'building' && r.recipe && (r.hostId ?? null) === (this.deps.hostId ?? null));
    for (const image of building) {
      if (this.#active.has(image.id)) continue; // queued or running here already
      const parent = image.parentId ? await this.deps.images.findById(image.parentId) : null;
      const stack = this.#recordedStack(image, parent);
      if (typeof stack === 'string') {
        await this.#finish(image, { status: 'failed', error: stack, progress: null });
        continue;
      }
      const file = this.#logFile(image.id);
      await appendFile(file, 'the server restarted during this build; building again (finished steps come from the layer cache)\n').catch(() => {});
      try {
        this.enqueue(image, stack);
      } catch {
        // Past the org's cap (several builds were interrupted): built one after another instead.
        const build = this.#newBuild(image, stack);
        this.#active.set(image.id, build);
        this.#schedule(image.orgId ?? '', () => this.#run(build));
      }
    }
  }

  /**
   * What an interrupted build builds on: its record's own base and layers (the parent's stack when
   * it was asked for; the record keeps them referenced for the layer GC) and config (its env and
   * workdir merge the parent's and the recipe's, so merging the recipe's again changes nothing).
   * A string says why it cannot.
   */
  #recordedStack(image: ImageRecord, parent: ImageRecord | null): BuildParent | string {
    if (image.layers.length || image.base) return { base: image.base, layers: image.layers, env: image.env, workdir: image.workdir };
    if (!parent || parent.status !== 'ready') return 'the image it was built on is gone or not ready; create it again';
    return { base: parent.base, layers: parent.layers, env: parent.env, workdir: parent.workdir };
  }

  /**
   * The layers of system recipe image `name` (systemRecipeImages), building what is missing
   * first; concurrent callers share one build. Works without a store (npm run image:build).
   */
  ensureSystemImage(name: SystemRecipeImage, onLine: (line: string) => void = (l) => this.deps.log.info({ image: name }, l)): Promise<string[]> {
    let build = this.#system.get(name);
    if (!build) {
      const { recipe } = systemRecipeImages[name];
      const parent: BuildParent = { base: recipe.base, layers: [], env: {}, workdir: null };
      build = this.#enqueueTask(SYSTEM_LANE, async () => (await this.deps.builder.build({ recipe: recipe as Recipe, parent, onLine })).layers).finally(() => this.#system.delete(name));
      this.#system.set(name, build);
    }
    return build;
  }

  /**
   * Builds `recipe` on a system base into layers only (no record), through the queue: test setup
   * and system images use it.
   */
  buildLayers(recipe: Recipe & { base: string }, onLine: (line: string) => void = () => {}): Promise<string[]> {
    return this.#enqueueTask(SYSTEM_LANE, async () => (await this.deps.builder.build({ recipe, parent: { base: recipe.base, layers: [], env: {}, workdir: null }, onLine })).layers);
  }

  /** The build log (its tail when longer than IMAGE_BUILD_LOG_MAX_BYTES); empty before a build wrote any. */
  async readLog(imageId: string): Promise<{ text: string; truncated: boolean }> {
    if (!isObjectIdHex(imageId)) return { text: '', truncated: false };
    const text = await readFile(this.#logFile(imageId), 'utf8').catch(() => '');
    return text.startsWith(TRUNCATED_MARK) ? { text: text.slice(TRUNCATED_MARK.length), truncated: true } : { text, truncated: false };
  }

  /** The log's lines so far, then (while the build is queued or running here) each new line until it ends. */
  async *followLog(imageId: string, signal: AbortSignal): AsyncIterable<string> {
    const build = this.#active.get(imageId);
    if (!build || build.done) {
      const { text } = await this.readLog(imageId);
      for (const line of text.split('\n')) if (line) yield line;
      return;
    }
    let next = build.dropped;
    while (!signal.aborted) {
      if (next < build.dropped) next = build.dropped;
      while (next < build.dropped + build.lines.length) {
        yield build.lines[next - build.dropped]!;
        next++;
      }
      if (build.done) return;
      await new Promise<void>((resolve) => {
        const wake = () => {
          build.waiters.delete(wake);
          signal.removeEventListener('abort', wake);
          resolve();
        };
        build.waiters.add(wake);
        signal.addEventListener('abort', wake, { once: true });
      });
    }
  }

  /** Ends queued builds (they are resumed at the next start) and waits for the running one to stop. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#queue.length = 0;
    for (const build of this.#active.values()) build.abort.abort();
    while (this.#running) await new Promise((r) => setTimeout(r, 20));
    for (const build of [...this.#active.values()]) await this.#end(build, null);
    await this.#writeQueue;
  }

  #newBuild(image: ImageRecord, parent: BuildParent): ActiveBuild {
    let markEnded = () => {};
    const ended = new Promise<void>((resolve) => (markEnded = resolve));
    return {
      ended,
      markEnded,
      started: false,
      image,
      parent: { base: parent.base, layers: [...parent.layers], env: { ...parent.env }, workdir: parent.workdir },
      abort: new AbortController(),
      lines: [],
      bytes: 0,
      dropped: 0,
      waiters: new Set(),
      done: false,
    };
  }

  #enqueueTask<T>(lane: QueuedTask['lane'], task: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => this.#schedule(lane, () => task().then(resolve, reject)));
  }

  #schedule(lane: QueuedTask['lane'], run: () => Promise<void>): void {
    this.#queue.push({ lane, run });
    void this.#drain();
  }

  /**
   * The next task: a system image build first (sandbox creates of `code` wait on it), else the
   * oldest queued build of the org whose build got its turn longest ago (round-robin: one org's
   * queued builds never hold another org's behind them all).
   */
  #next(): QueuedTask {
    let best = this.#queue.findIndex((t) => t.lane === SYSTEM_LANE);
    if (best < 0) {
      best = 0;
      let bestTurn = Infinity;
      for (const [i, task] of this.#queue.entries()) {
        const turn = this.#served.get(task.lane as string) ?? -1;
        if (turn < bestTurn) [best, bestTurn] = [i, turn];
      }
    }
    const [task] = this.#queue.splice(best, 1);
    if (task!.lane !== SYSTEM_LANE) this.#served.set(task!.lane, ++this.#turns);
    return task!;
  }

  async #drain(): Promise<void> {
    if (this.#running) return;
    this.#running = true;
    try {
      while (this.#queue.length && !this.#closed) await this.#next().run().catch((err: Error) => this.deps.log.error({ err: err.message }, 'image build task failed'));
    } finally {
      this.#running = false;
    }
  }

  async #run(build: ActiveBuild): Promise<void> {
    const { image } = build;
    if (build.done) return;
    build.started = true;
    await mkdir(this.deps.logsDir, { recursive: true, mode: 0o700 });
    if (build.abort.signal.aborted) return this.#end(build, { status: 'failed', error: 'the build was cancelled', progress: null }, !this.#closed);
    const line = (text: string) => this.#line(build, text);
    // Progress writes in order, all before the final one (which clears it).
    let progressed: Promise<unknown> = Promise.resolve();
    const started = Date.now();
    line(`build of image ${image.name}:${image.tag} (${image.id}) started ${new Date().toISOString()}`);
    // Layers this build made (not from the cache): removed again if it does not end ready.
    const made: string[] = [];
    const limitMs = this.deps.buildTimeoutMs;
    let overTime = false;
    const timer = limitMs ? setTimeout(() => ((overTime = true), build.abort.abort()), limitMs) : undefined;
    const { budget } = this.deps;
    const orgId = image.orgId;
    try {
      const result = await this.deps.builder.build({
        recipe: image.recipe!,
        parent: build.parent,
        onLine: line,
        onProgress: (progress) => {
          progressed = progressed.then(() => this.deps.images.update(image.id, { progress })).catch((err: Error) => this.deps.log.warn({ image: image.id, err: err.message }, 'could not record build progress'));
        },
        signal: build.abort.signal,
        onBuilt: (id) => made.push(id),
        ...(budget && orgId
          ? {
              afterStep: async (bytes: number) => {
                const left = await budget(orgId).catch(() => 0);
                if (bytes > left) {
                  throw new BuildFailedError(`the image's layers so far take ${Math.ceil(bytes / 2 ** 20)} MB and only ${Math.floor(left / 2 ** 20)} MB of the org's disk quota (ORG_MAX_DISK_MB) is left: delete images, snapshots or sandboxes, or install less`);
                }
              },
            }
          : {}),
      });
      clearTimeout(timer);
      await progressed;
      line(`image ${image.name}:${image.tag} is ready (${result.layers.length} layer${result.layers.length === 1 ? '' : 's'}) after ${Math.round((Date.now() - started) / 1000)} s`);
      await this.#end(build, { status: 'ready', layers: result.layers, sizeBytes: result.sizeBytes, env: result.env, workdir: result.workdir, error: null, progress: null });
      // The repository may still have refused it (over the org's quota at the end): then its layers go too.
      const recorded = await this.deps.images.findById(image.id).catch(() => null);
      if (recorded && recorded.status !== 'ready') await this.#discard(image, made);
    } catch (err) {
      clearTimeout(timer);
      await progressed;
      if (this.#closed && build.abort.signal.aborted && !overTime) {
        // The server is stopping: the record stays 'building' and resume() builds it again (its layers with it).
        line('the server stopped during this build');
        return this.#end(build, null);
      }
      const message = overTime
        ? `the build ran past IMAGE_BUILD_TIMEOUT_SEC (${Math.round(limitMs! / 1000)} s): make its steps faster, or split it into images built on each other`
        : build.abort.signal.aborted
          ? 'the build was cancelled'
          : err instanceof BuildFailedError || (err instanceof Error && 'code' in err && (err as { code?: unknown }).code === 'INVALID_INPUT') ? (err as Error).message : `the build failed: ${scrub((err as Error).message ?? String(err))}`;
      if (!(err instanceof BuildFailedError)) this.deps.log.warn({ image: image.id, err: (err as Error).message }, 'image build failed');
      line(`build failed: ${message}`);
      await this.#end(build, { status: 'failed', error: message, progress: null });
      await this.#discard(image, made);
    }
  }

  /** Hands the layers a build made that did not end ready to `discardLayers` (which keeps any a record names). */
  async #discard(image: ImageRecord, layerIds: string[]): Promise<void> {
    if (!layerIds.length || !this.deps.discardLayers) return;
    await this.deps.discardLayers(layerIds).catch((err: Error) => this.deps.log.warn({ image: image.id, err: err.message }, 'could not remove the layers of a failed build'));
  }

  async #end(build: ActiveBuild, patch: Parameters<ImageRepository['update']>[1] | null, write = true): Promise<void> {
    try {
      // The log is complete on disk before the record says the build ended.
      await this.#writeQueue;
      if (patch && write) await this.#finish(build.image, patch);
    } finally {
      build.done = true;
      for (const wake of [...build.waiters]) wake();
      this.#active.delete(build.image.id);
      build.markEnded();
    }
  }

  async #finish(image: ImageRecord, patch: Parameters<ImageRepository['update']>[1]): Promise<void> {
    // A record no longer building was ended by someone else — in a fleet, the API nodes' sweep
    // when this host was declared lost (its builds fail then): that word stands, a late "ready"
    // from a host that was fenced meanwhile does not undo it (its new layers are unreferenced: GC).
    const current = await this.deps.images.findById(image.id).catch(() => undefined);
    if (current && current.status !== 'building') {
      this.deps.log.warn({ image: image.id, status: current.status }, 'an image build ended after its record was ended elsewhere; the record is kept as it is');
      return;
    }
    await this.deps.images.update(image.id, patch).catch((err: Error) => this.deps.log.error({ image: image.id, err: err.message }, 'could not record the end of an image build'));
  }

  /** Appends a line to the build's log file and live tail, both capped at IMAGE_BUILD_LOG_MAX_BYTES (the head goes). */
  #line(build: ActiveBuild, raw: string): void {
    const max = this.deps.logMaxBytes;
    const text = raw.length > 16 * 1024 ? `${raw.slice(0, 16 * 1024)}…` : raw;
    build.lines.push(text);
    build.bytes += Buffer.byteLength(text) + 1;
    while (build.bytes > max && build.lines.length > 1) {
      build.bytes -= Buffer.byteLength(build.lines.shift()!) + 1;
      build.dropped++;
    }
    for (const wake of [...build.waiters]) wake();
    this.deps.onLine?.(build.image, text);
    // Lines that arrive while a write is in flight go out together in the next one.
    const pending = this.#pending.get(build.image.id);
    if (pending) {
      pending.push(text);
      return;
    }
    const batch = [text];
    this.#pending.set(build.image.id, batch);
    this.#writeQueue = this.#writeQueue
      .then(() => {
        this.#pending.delete(build.image.id);
        return this.#append(build.image.id, `${batch.join('\n')}\n`);
      })
      .catch((err: Error) => this.deps.log.warn({ image: build.image.id, err: err.message }, 'could not write to a build log'));
  }

  /** Every log write, in order; awaited before a build's end is recorded. */
  #writeQueue: Promise<void> = Promise.resolve();
  /** Per image, the lines waiting for the next write. */
  readonly #pending = new Map<string, string[]>();

  /** Appends to the log file; past the cap it is rewritten with the last ¾ of the cap (from a line start) behind the mark. */
  async #append(imageId: string, text: string): Promise<void> {
    const file = this.#logFile(imageId);
    await appendFile(file, text, { mode: 0o600 });
    const max = this.deps.logMaxBytes;
    const size = (await stat(file)).size;
    if (size <= max) return;
    const keep = Math.floor((max * 3) / 4);
    const fh = await open(file, 'r');
    let tail: Buffer;
    try {
      tail = Buffer.alloc(keep);
      const { bytesRead } = await fh.read(tail, 0, keep, size - keep);
      tail = tail.subarray(0, bytesRead);
    } finally {
      await fh.close();
    }
    const nl = tail.indexOf(10);
    await writeFile(file, Buffer.concat([Buffer.from(TRUNCATED_MARK), nl >= 0 ? tail.subarray(nl + 1) : tail]), { mode: 0o600 });
  }

  /** Image ids are store ids (24 hex), never a path: anything else names no log. */
  #logFile(imageId: string): string {
    if (!isObjectIdHex(imageId)) throw new Error(`not an image id: ${JSON.stringify(imageId.slice(0, 40))}`);
    return join(this.deps.logsDir, `${imageId}.log`);
  }
}
