import { appendFile, mkdir, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
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
  readonly #queue: Array<() => Promise<void>> = [];
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
  enqueue(image: ImageRecord, parent: Pick<ImageRecord, 'base' | 'layers' | 'env' | 'workdir'>): void {
    if (this.#active.has(image.id)) return;
    this.checkCapacity(image.orgId);
    const build = this.#newBuild(image, parent);
    this.#active.set(image.id, build);
    this.#schedule(() => this.#run(build));
  }

  /** Stops a queued or running build (its image is being deleted); its log goes too. */
  async cancel(imageId: string): Promise<void> {
    const build = this.#active.get(imageId);
    if (build && !build.done) {
      build.abort.abort();
      // One still queued ends now (its turn finds it done); a running one once its sandbox is gone.
      if (!build.started) await this.#end(build, null);
      await build.ended;
    }
    await this.#writeQueue;
    await rm(this.#logFile(imageId), { force: true });
  }

  /** Builds still marked 'building' (the server stopped during them) are queued again; cached layers make it quick. */
  async resume(): Promise<void> {
    const building = (await this.deps.images.listAll()).filter((r) => r.status === 'building' && r.recipe);
    for (const image of building) {
      if (this.#active.has(image.id)) continue; // queued or running here already
      const parent = image.parentId ? await this.deps.images.findById(image.parentId) : null;
      if (!parent || parent.status !== 'ready') {
        await this.#finish(image, { status: 'failed', error: 'the image it was built on is gone or not ready; create it again', progress: null });
        continue;
      }
      const file = this.#logFile(image.id);
      await appendFile(file, 'the server restarted during this build; building again (finished steps come from the layer cache)\n').catch(() => {});
      try {
        this.enqueue(image, parent);
      } catch {
        // Past the org's cap (several builds were interrupted): built one after another instead.
        const build = this.#newBuild(image, parent);
        this.#active.set(image.id, build);
        this.#schedule(() => this.#run(build));
      }
    }
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
      build = this.#enqueueTask(async () => (await this.deps.builder.build({ recipe: recipe as Recipe, parent, onLine })).layers).finally(() => this.#system.delete(name));
      this.#system.set(name, build);
    }
    return build;
  }

  /**
   * Builds `recipe` on a system base into layers only (no record), through the queue: test setup
   * and system images use it.
   */
  buildLayers(recipe: Recipe & { base: string }, onLine: (line: string) => void = () => {}): Promise<string[]> {
    return this.#enqueueTask(async () => (await this.deps.builder.build({ recipe, parent: { base: recipe.base, layers: [], env: {}, workdir: null }, onLine })).layers);
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

  #newBuild(image: ImageRecord, parent: Pick<ImageRecord, 'base' | 'layers' | 'env' | 'workdir'>): ActiveBuild {
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

  #enqueueTask<T>(task: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => this.#schedule(() => task().then(resolve, reject)));
  }

  #schedule(task: () => Promise<void>): void {
    this.#queue.push(task);
    void this.#drain();
  }

  async #drain(): Promise<void> {
    if (this.#running) return;
    this.#running = true;
    try {
      while (this.#queue.length && !this.#closed) await this.#queue.shift()!().catch((err: Error) => this.deps.log.error({ err: err.message }, 'image build task failed'));
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
    try {
      const result = await this.deps.builder.build({
        recipe: image.recipe!,
        parent: build.parent,
        onLine: line,
        onProgress: (progress) => {
          progressed = progressed.then(() => this.deps.images.update(image.id, { progress })).catch((err: Error) => this.deps.log.warn({ image: image.id, err: err.message }, 'could not record build progress'));
        },
        signal: build.abort.signal,
      });
      await progressed;
      line(`image ${image.name}:${image.tag} is ready (${result.layers.length} layer${result.layers.length === 1 ? '' : 's'}) after ${Math.round((Date.now() - started) / 1000)} s`);
      await this.#end(build, { status: 'ready', layers: result.layers, sizeBytes: result.sizeBytes, env: result.env, workdir: result.workdir, error: null, progress: null });
    } catch (err) {
      await progressed;
      if (this.#closed && build.abort.signal.aborted) {
        // The server is stopping: the record stays 'building' and resume() builds it again.
        line('the server stopped during this build');
        return this.#end(build, null);
      }
      const message = build.abort.signal.aborted
        ? 'the build was cancelled'
        : err instanceof BuildFailedError || (err instanceof Error && 'code' in err && (err as { code?: unknown }).code === 'INVALID_INPUT') ? (err as Error).message : `the build failed: ${scrub((err as Error).message ?? String(err))}`;
      if (!(err instanceof BuildFailedError)) this.deps.log.warn({ image: image.id, err: (err as Error).message }, 'image build failed');
      line(`build failed: ${message}`);
      await this.#end(build, { status: 'failed', error: message, progress: null });
    }
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
