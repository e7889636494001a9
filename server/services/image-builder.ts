import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, rm, stat } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { basename, join } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Logger } from 'pino';
import type { Recipe, RecipeFile } from '../../shared/schemas/images.js';
import type { NetworkPolicy } from '../../shared/schemas/network.js';
import { AgentUploadReply } from '../../shared/schemas/agent-replies.js';
import { readAgentError, readAgentJson } from '../agent-client/agent-http.js';
import { fromAgentCode, fromAgentError, type AgentClients } from '../agent-client/agent-clients.js';
import { agentProcessStream } from '../agent-client/process-stream.js';
import type { AptFetch, InstallOp } from '../hypervisor/images/apt-fetch.js';
import type { LayerStore } from '../hypervisor/images/layer-store.js';
import type { RootfsImages } from '../hypervisor/images/rootfs-images.js';
import type { SandboxDriver, SandboxSpec, SnapshottingDriver } from '../hypervisor/types.js';
import { newId } from '../store/ids.js';

/** Part of every step's cache key: bumped when how a step is built changes, so old layers are not reused. */
const BUILDER_VERSION = 'voidrun-recipe-1';

/**
 * What the host adds to IMAGE_BUILD_STEP_TIMEOUT_SEC before it stops waiting for a step's command
 * itself: the agent in the build sandbox kills the command at the timeout, but it is tenant code
 * and may never say so (a step can stop or starve it), so the host's own deadline destroys the
 * build sandbox.
 */
export const STEP_DEADLINE_GRACE_MS = 15_000;

/** Where the packages step puts the downloaded .debs inside the build sandbox (removed before its snapshot). */
const DEBS_DIR = '/var/cache/voidrun-debs';

/** One step of a recipe build; each becomes one layer. */
export type BuildStep =
  | { kind: 'packages'; packages: string[] }
  | { kind: 'files'; files: RecipeFile[]; workdir: string | null }
  | { kind: 'run'; command: string; env: Record<string, string>; workdir: string | null };

/** What a recipe is built on: a system rootfs and the layers above it (an image's `base` and `layers`). */
export interface BuildParent {
  base: string;
  layers: readonly string[];
  env: Record<string, string>;
  workdir: string | null;
}

export interface BuildProgress {
  step: number;
  steps: number;
  message: string;
}

export interface BuildRequest {
  recipe: Recipe;
  parent: BuildParent;
  /** Each log line of the build (the builder's own and the build sandbox's output). */
  onLine(line: string): void;
  onProgress?(progress: BuildProgress): void;
  /** Aborting stops the step running (its sandbox is destroyed) and fails the build. */
  signal?: AbortSignal;
  /** Each layer this build made (not found in the cache), as soon as it is committed. */
  onBuilt?(layerId: string): void;
  /** Called after each step with the bytes of the layers so far above the parent's; throwing (a BuildFailedError) ends the build there. */
  afterStep?(sizeBytes: number): Promise<void>;
}

export interface BuildResult {
  /** The image's layers: the parent's, then one per step. */
  layers: string[];
  /** Bytes of the layers above the parent's. */
  sizeBytes: number;
  env: Record<string, string>;
  workdir: string | null;
  /** Steps that ran (the rest came from the layer cache). */
  built: number;
}

/** A build that failed in a way the recipe's author can act on; the message is one line without host paths. */
export class BuildFailedError extends Error {
  override name = 'BuildFailedError';
}

export interface ImageBuilderOptions {
  driver: SandboxDriver & SnapshottingDriver;
  agents: AgentClients;
  layers: LayerStore;
  rootfs: RootfsImages;
  apt: AptFetch;
  /** The build sandbox's shape: the default sandbox cpu/memory, IMAGE_BUILD_DISK_MB, the server's default network policy. */
  sandbox: { cpu: number; memMb: number; diskMb: number; network?: NetworkPolicy };
  /** IMAGE_BUILD_STEP_TIMEOUT_SEC in ms: a run step (or the package install) past it is killed and fails the build. */
  stepTimeoutMs: number;
  /** A root-only directory for snapshot archives while they become layers. */
  scratchDir: string;
  log: Logger;
}

/** The steps of `recipe` in build order. Pure. */
export function planSteps(recipe: Recipe, parent: BuildParent): BuildStep[] {
  const env = { ...parent.env, ...recipe.env };
  const workdir = recipe.workdir ?? parent.workdir;
  const steps: BuildStep[] = [];
  const packages = [...new Set(recipe.packages ?? [])].sort();
  if (packages.length) steps.push({ kind: 'packages', packages });
  if (recipe.files?.length || recipe.workdir) steps.push({ kind: 'files', files: recipe.files ?? [], workdir: recipe.workdir ?? null });
  for (const command of recipe.run ?? []) steps.push({ kind: 'run', command, env, workdir });
  return steps;
}

/**
 * The layer id of `step` built on the stack whose key is `parentKey`: sha256 of both, so the same
 * step on the same stack is the same layer (the layer cache) and any change below it is not.
 */
export function stepLayerId(parentKey: string, step: BuildStep): string {
  return createHash('sha256').update(JSON.stringify([BUILDER_VERSION, parentKey, step])).digest('hex');
}

/** The cache key of a stack: its top layer (whose id already covers everything below), or the system rootfs. */
export function stackKey(rootfsDir: string, layers: readonly string[]): string {
  return layers.length ? layers[layers.length - 1]! : `rootfs:${rootfsDir.split('/').slice(-2).join('/')}`;
}

/** A one-line description of a step for progress and logs. */
export function describeStep(step: BuildStep): string {
  if (step.kind === 'packages') return `install ${step.packages.length} package${step.packages.length === 1 ? '' : 's'} (${clip(step.packages.join(' '), 120)})`;
  if (step.kind === 'files') return `write ${step.files.length} file${step.files.length === 1 ? '' : 's'}${step.workdir ? ` and ${step.workdir}` : ''}`;
  return `run ${clip(JSON.stringify(step.command), 120)}`;
}

/**
 * Runs recipe builds confined like any sandbox: every step that is not in the layer cache runs in
 * a fresh build sandbox of the server's container driver (no store record; startup removes such
 * orphans), on the stack built so far, through its agent. The sandbox is then stopped, its
 * snapshot (the upper dir: what the step changed, whiteouts included) becomes the step's layer,
 * and it is destroyed. The host downloads packages (AptFetch) but never unpacks them, runs a
 * maintainer script, or follows a path in what a step produced.
 */
export class ImageBuilder {
  constructor(private readonly opts: ImageBuilderOptions) {}

  /** The layer ids the recipe would produce and whether each exists already; computes without building. */
  async plan(recipe: Recipe, parent: BuildParent): Promise<Array<{ step: BuildStep; layerId: string; cached: boolean }>> {
    const rootfsDir = parent.base ? this.opts.rootfs.rootfsPath(parent.base) : '';
    let key = stackKey(rootfsDir, parent.layers);
    return planSteps(recipe, parent).map((step) => {
      const layerId = stepLayerId(key, step);
      key = layerId;
      return { step, layerId, cached: this.opts.layers.has(layerId) };
    });
  }

  async build(req: BuildRequest): Promise<BuildResult> {
    const { recipe, parent, onLine, signal } = req;
    const plan = await this.plan(recipe, parent);
    const steps = plan.length;
    const layers = [...parent.layers];
    let sizeBytes = 0;
    let built = 0;
    const baseRootfs = parent.base ? await this.opts.rootfs.ensure(parent.base) : '';
    if (!baseRootfs && plan.some((p) => p.step.kind === 'packages')) {
      // Dependencies are resolved against a system base's dpkg status (a file this server built); an imported image has none it can trust.
      throw new BuildFailedError('packages can be installed only on an image built on a system base (debian); on an imported image install them with a run step (e.g. apt-get install -y …)');
    }
    onLine(`building ${steps} step${steps === 1 ? '' : 's'} on ${parent.base || 'an imported image'}${parent.layers.length ? ` (+${parent.layers.length} layers)` : ''}`);
    for (const [i, { step, layerId }] of plan.entries()) {
      if (signal?.aborted) throw new BuildFailedError('the build was cancelled');
      const label = `step ${i + 1}/${steps}: ${describeStep(step)}`;
      req.onProgress?.({ step: i + 1, steps, message: describeStep(step) });
      // Checked again now: an identical build elsewhere may have made it meanwhile.
      const cached = await this.opts.layers.info(layerId);
      if (cached) {
        onLine(`${label} (cached)`);
        layers.push(layerId);
        sizeBytes += cached.bytes;
        await req.afterStep?.(sizeBytes);
        continue;
      }
      onLine(label);
      const started = Date.now();
      const info = await this.#runStep(step, layerId, label, { base: parent.base, baseRootfs, layers: [...layers] }, onLine, signal);
      built++;
      req.onBuilt?.(layerId);
      layers.push(layerId);
      sizeBytes += info.bytes;
      onLine(`${label}: done in ${((Date.now() - started) / 1000).toFixed(1)} s, layer ${layerId.slice(0, 12)} (${formatBytes(info.bytes)})`);
      await req.afterStep?.(sizeBytes);
    }
    onLine(built ? `built ${built} of ${steps} steps (${steps - built} from the cache)` : `every step came from the cache`);
    return { layers, sizeBytes, env: { ...parent.env, ...recipe.env }, workdir: recipe.workdir ?? parent.workdir, built };
  }

  /** Builds one step's layer in a fresh build sandbox on `stack`; the sandbox is gone afterwards whatever happens. */
  async #runStep(step: BuildStep, layerId: string, label: string, stack: { base: string; baseRootfs: string; layers: string[] }, onLine: (line: string) => void, signal?: AbortSignal) {
    const { driver, agents, sandbox } = this.opts;
    // Bottom first: the system rootfs (none under an imported image), then the layers.
    const lowers = await this.opts.rootfs.lowerDirs({ base: stack.base, layers: stack.layers });
    // Downloads first (no sandbox is held while the mirror is slow); the .debs are ours, in BASE_IMAGES_DIR/apt.
    const debs = step.kind === 'packages' ? await this.opts.apt.download(step.packages, stack.baseRootfs, onLine, signal) : null;
    const id = newId();
    const spec: SandboxSpec = {
      id,
      name: `build-${id.slice(-12)}`,
      rootfs: lowers[0]!,
      layers: lowers.slice(1),
      image: 'debian',
      cpu: sandbox.cpu,
      memMb: sandbox.memMb,
      diskMb: sandbox.diskMb,
      envVars: {},
      ...(sandbox.network ? { network: sandbox.network } : {}),
    };
    const snapshot = join(this.opts.scratchDir, `${id}.tar.gz`);
    // The host's own bound on the step's work in the sandbox (see STEP_DEADLINE_GRACE_MS), with the build's cancel.
    const deadline = new AbortController();
    const stepSignal = signal ? AbortSignal.any([signal, deadline.signal]) : deadline.signal;
    // Awaited before the cleanup below destroys the sandbox (the driver also runs them one at a time).
    let stopping: Promise<void> | undefined;
    const onAbort = () => void (stopping = driver.stop(id).catch(() => {}));
    const timedOut = () => new BuildFailedError(`${label} timed out after ${Math.round(this.opts.stepTimeoutMs / 1000)} s (IMAGE_BUILD_STEP_TIMEOUT_SEC)`);
    let deadlineTimer: NodeJS.Timeout | undefined;
    try {
      await driver.create(spec).catch((err: Error) => {
        throw new BuildFailedError(`${label}: the build sandbox did not start (${scrub(err.message)})`);
      });
      stepSignal.addEventListener('abort', onAbort, { once: true });
      deadlineTimer = setTimeout(() => deadline.abort(), this.opts.stepTimeoutMs + STEP_DEADLINE_GRACE_MS);
      if (step.kind === 'packages') {
        if (debs!.files.length) {
          await this.#upload(id, debs!, stepSignal).catch(rethrowAs(`${label}: copying the packages into the build sandbox`));
          onLine(`installing ${debs!.files.length} packages with dpkg in the build sandbox`);
          await this.#exec(id, installCommand(debs!.order), { DEBIAN_FRONTEND: 'noninteractive', PATH: SYSTEM_PATH }, null, label, onLine, stepSignal, step.packages);
        }
      } else if (step.kind === 'files') {
        await this.#writeFiles(id, step, label, stepSignal);
      } else {
        await this.#exec(id, step.command, { PATH: SYSTEM_PATH, HOME: '/root', ...step.env }, step.workdir, label, onLine, stepSignal);
      }
      clearTimeout(deadlineTimer);
      if (signal?.aborted) throw new BuildFailedError('the build was cancelled');
      if (deadline.signal.aborted) throw timedOut();
      await agents.drop(id);
      await driver.stop(id);
      await mkdir(this.opts.scratchDir, { recursive: true, mode: 0o700 });
      // Bounded by the build disk: the upper cannot hold more than the sandbox's disk.
      await driver.snapshot(id, snapshot, { maxBytes: sandbox.diskMb * 1024 * 1024 * 2 });
      return await this.opts.layers.fromSnapshot(snapshot, layerId, label);
    } catch (err) {
      if (signal?.aborted) throw new BuildFailedError('the build was cancelled');
      if (deadline.signal.aborted) {
        onLine(`${label}: no exit after ${Math.round((this.opts.stepTimeoutMs + STEP_DEADLINE_GRACE_MS) / 1000)} s; the build sandbox was destroyed`);
        throw timedOut();
      }
      throw err;
    } finally {
      clearTimeout(deadlineTimer);
      stepSignal.removeEventListener('abort', onAbort);
      await stopping;
      await agents.drop(id).catch(() => {});
      await driver.destroy(id).catch((err: Error) => this.opts.log.error({ sandbox: id, err: err.message }, 'could not remove a build sandbox'));
      await rm(snapshot, { force: true });
      if (debs) await rm(debs.dir, { recursive: true, force: true });
    }
  }

  /** Streams each downloaded .deb into the build sandbox through its agent (a PUT of our own file). */
  async #upload(id: string, debs: { dir: string; files: string[] }, signal?: AbortSignal): Promise<void> {
    for (const file of debs.files) {
      const path = join(debs.dir, file);
      const size = (await stat(path)).size;
      await this.#put(id, `${DEBS_DIR}/${basename(file)}`, createReadStream(path), size, signal);
    }
  }

  async #writeFiles(id: string, step: Extract<BuildStep, { kind: 'files' }>, label: string, signal: AbortSignal): Promise<void> {
    const ref = { id, orgId: '' };
    if (step.workdir) await this.opts.agents.call(ref, (a) => a.files.mkdir.mutate({ path: step.workdir! })).catch(rethrowAs(label));
    for (const file of step.files) {
      signal.throwIfAborted();
      const body = Buffer.from(file.content, 'utf8');
      await this.#put(id, file.path, body, body.length, signal).catch(rethrowAs(label));
      const mode = (file.mode ?? '0644').padStart(4, '0');
      await this.opts.agents.call(ref, (a) => a.files.chmod.mutate({ path: file.path, mode })).catch(rethrowAs(label));
    }
  }

  /** A PUT to the agent's file route; the answer is bounded and parsed. */
  async #put(id: string, path: string, body: Readable | Buffer, size: number, signal?: AbortSignal): Promise<void> {
    const req = this.opts.agents.request(id, { method: 'PUT', path: `/files/content?path=${encodeURIComponent(path)}`, headers: { 'content-length': size }, ...(signal ? { signal } : {}) });
    const answered = new Promise<IncomingMessage>((resolve, reject) => {
      req.once('response', resolve);
      req.once('error', reject);
    });
    try {
      if (Buffer.isBuffer(body)) req.end(body);
      else await pipeline(body, req);
      const res = await answered;
      if (res.statusCode !== 200) {
        const { code, message } = await readAgentError(res, id);
        throw fromAgentCode(code, message) ?? new Error(message);
      }
      await readAgentJson(res, AgentUploadReply, id, 'a build upload');
    } catch (err) {
      req.destroy();
      throw fromAgentError(err);
    }
  }

  /**
   * Runs `command` (sh -c) in the build sandbox as its root, each output line to `onLine`; a
   * non-zero exit, a signal or the step timeout fails the build with a message saying which.
   */
  async #exec(id: string, command: string, env: Record<string, string>, cwd: string | null, label: string, onLine: (line: string) => void, signal?: AbortSignal, packages?: readonly string[]): Promise<void> {
    const lines = { stdout: '', stderr: '' };
    // dpkg's "X depends on Y; however: Package Y is not installed." lines of a package install.
    const missing = new Map<string, string>();
    const flush = (stream: 'stdout' | 'stderr', final: boolean) => {
      const parts = lines[stream].split('\n');
      lines[stream] = final ? '' : parts.pop()!;
      for (const line of final ? parts.filter((l, i) => l || i < parts.length - 1) : parts) {
        const text = line.replace(/\r/g, '');
        const dep = packages && missing.size < 20 ? /^\s*(\S+) (?:pre-)?depends on ([a-z0-9][a-z0-9+.-]+)/.exec(text) : null;
        if (dep) missing.set(dep[2]!, dep[1]!.split(':')[0]!);
        onLine(text);
      }
    };
    const timeoutMs = this.opts.stepTimeoutMs;
    let exit: { exitCode: number; signal: string | null; timedOut: boolean } | null = null;
    try {
      const call = { start: { command, env, ...(cwd ? { cwd } : {}), timeoutMs } };
      for await (const line of agentProcessStream(this.opts.agents, id, call, signal)) {
        if (line.type === 'stdout' || line.type === 'stderr') {
          lines[line.type] += line.data;
          flush(line.type, false);
          // One line is never held past the log's own bound.
          if (lines[line.type].length > 64 * 1024) flush(line.type, true);
        } else if (line.type === 'gap') {
          onLine(`[${line.droppedBytes} bytes of output dropped]`);
        } else if (line.type === 'exit') {
          exit = line;
          break;
        }
      }
    } catch (err) {
      if (signal?.aborted) throw new BuildFailedError('the build was cancelled');
      const mapped = fromAgentError(err);
      throw new BuildFailedError(`${label}: ${scrub(mapped instanceof Error ? mapped.message : String(mapped))}`);
    } finally {
      flush('stdout', true);
      flush('stderr', true);
    }
    if (!exit) throw new BuildFailedError(`${label}: the build sandbox ended the command without an exit status`);
    if (exit.timedOut) throw new BuildFailedError(`${label} timed out after ${Math.round(timeoutMs / 1000)} s (IMAGE_BUILD_STEP_TIMEOUT_SEC)`);
    if (exit.signal) throw new BuildFailedError(`${label} was killed by ${exit.signal}; see the build log`);
    if (exit.exitCode !== 0 && packages && missing.size) throw new BuildFailedError(missingDependencies(label, packages, missing));
    if (exit.exitCode !== 0) throw new BuildFailedError(`${label} failed with exit code ${exit.exitCode}; see the build log`);
  }
}

const SYSTEM_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/**
 * Installs the uploaded .debs offline as the sandbox's root with dpkg, in apt's order (unpacks and
 * configures interleaved so Pre-Depends are configured first, which one `dpkg -i` of them all does
 * not do), with services kept from starting (there is no init in a build); the files go afterwards.
 */
export function installCommand(order: readonly InstallOp[]): string {
  const quote = (s: string) => `'${s.replace(/'/g, "'\\''")}'`;
  const dpkg = 'dpkg --force-confdef --force-confold';
  return [
    'set -e',
    "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d",
    'chmod 755 /usr/sbin/policy-rc.d',
    ...order.map((op) => (op.op === 'unpack' ? `${dpkg} --unpack ${op.files.map((f) => quote(`${DEBS_DIR}/${f}`)).join(' ')}` : `${dpkg} --configure ${op.packages.map(quote).join(' ')}`)),
    `${dpkg} --configure -a`,
    'rm -f /usr/sbin/policy-rc.d',
    `rm -rf ${DEBS_DIR}`,
  ].join('\n');
}

/**
 * The error of a package install dpkg refused for dependencies the image lacks: the host resolves
 * dependencies against the system base's package list (it never reads a tenant's dpkg status), so
 * a package the image's own steps removed is not fetched. Says which, and how to install instead.
 */
export function missingDependencies(label: string, packages: readonly string[], missing: ReadonlyMap<string, string>): string {
  const names = [...missing.entries()].slice(0, 5).map(([dep, by]) => `${dep} (needed by ${by})`);
  return `${label}: this image lacks ${names.join(', ')}${missing.size > 5 ? ', …' : ''}: packages are resolved against the system base's package list, not this image's, so what this image removed is not fetched; install them with a run step instead (apt-get update && apt-get install -y ${packages.join(' ')}), or build on the system base`;
}

/** Wraps an agent failure of a build step as one line for the image's error. */
function rethrowAs(label: string): (err: unknown) => never {
  return (err) => {
    if (err instanceof BuildFailedError) throw err;
    throw new BuildFailedError(`${label}: ${scrub(err instanceof Error ? err.message : String(err))}`);
  };
}

/** Host paths out of a message a user will read (driver errors can name instance directories). */
export function scrub(message: string): string {
  return message.replace(/\/(?:var|tmp|run|home|root|srv|opt|data|work|mnt)\/[^\s:'"|)]*/g, '<host path>').split('\n')[0]!.slice(0, 500);
}

function clip(s: string, max: number): string {
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

export function formatBytes(n: number): string {
  if (n < 1024 * 1024) return `${Math.round(n / 1024)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}
