import type { Logger } from 'pino';
import { countsOomKills, listsPorts, type SandboxDriver } from '../hypervisor/types.js';
import type { SandboxEventRecord, SandboxRepository } from '../store/types.js';
import type { SandboxEventSink } from './sandbox-events.js';
import { forEachLimit } from './for-each-limit.js';

/** What the poller last read of one running sandbox; null until its first read (a baseline, reported as nothing). */
interface Watched {
  orgId: string;
  paused: boolean;
  ports: number[] | null;
  oomKills: number | null;
}

export interface HostEventPollerDeps {
  driver: SandboxDriver;
  sandboxes: SandboxRepository;
  events: SandboxEventSink;
  /** Registers a listener for every stored event (how the poller learns which sandboxes run). */
  onWritten(listener: (event: SandboxEventRecord) => void): void;
  /** EVENTS_POLL_INTERVAL_SEC, in ms. */
  intervalMs: number;
  concurrency: number;
  log: Logger;
}

/**
 * `port.opened` / `port.closed` and `sandbox.oom_killed` for running sandboxes, from what the
 * host reads every `intervalMs`: the listening TCP ports of the sandbox's network namespace
 * (`/proc/<init pid>/net/tcp{,6}`) and its cgroup's OOM-kill counter — never from its agent. A
 * sandbox is followed from its `sandbox.started` (ports and counter from nothing, so a port opened
 * right after the start is reported) or, for those running when the server starts, from a first
 * read taken as the baseline (so a restart reports nothing twice, and misses what changed while
 * the server was down). A port that opens and closes between two reads is not seen. A sandbox
 * whose read fails while its record says it no longer runs (its stop or delete event was dropped)
 * is followed no more.
 */
export class HostEventPoller {
  readonly #watched = new Map<string, Watched>();
  #timer: NodeJS.Timeout | undefined;
  #pass: Promise<void> | null = null;

  constructor(private readonly deps: HostEventPollerDeps) {}

  async start(): Promise<void> {
    const driver = this.deps.driver;
    if (!listsPorts(driver) && !countsOomKills(driver)) return;
    this.deps.onWritten((e) => this.#follow(e));
    for (const r of await this.deps.sandboxes.listAll()) {
      if (r.orgId && (r.status === 'running' || r.status === 'paused') && !this.#watched.has(r.id)) this.#watched.set(r.id, { orgId: r.orgId, paused: r.status === 'paused', ports: null, oomKills: null });
    }
    this.#timer = setInterval(() => void this.poll(), this.deps.intervalMs);
    this.#timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.#timer);
    await this.#pass;
  }

  /** One read of every followed sandbox; overlapping calls share the pass under way. */
  poll(): Promise<void> {
    this.#pass ??= this.#readAll().finally(() => (this.#pass = null));
    return this.#pass;
  }

  #follow(e: SandboxEventRecord): void {
    switch (e.type) {
      case 'sandbox.started':
        this.#watched.set(e.sandboxId, { orgId: e.orgId, paused: false, ports: [], oomKills: 0 });
        break;
      case 'sandbox.paused':
      case 'sandbox.resumed': {
        const w = this.#watched.get(e.sandboxId);
        if (w) w.paused = e.type === 'sandbox.paused';
        break;
      }
      case 'sandbox.stopped':
      case 'sandbox.error':
      case 'sandbox.deleted':
        this.#watched.delete(e.sandboxId);
        break;
    }
  }

  async #readAll(): Promise<void> {
    await forEachLimit([...this.#watched.keys()], this.deps.concurrency, (id) => this.#read(id).catch((err: Error) => this.#readFailed(id, err)));
  }

  /**
   * A read failed: the sandbox's record decides. Gone, or no longer running or paused (its
   * `sandbox.deleted`/`stopped` event was dropped or never came), it is followed no more, quietly;
   * else the failure is logged.
   */
  async #readFailed(id: string, err: Error): Promise<void> {
    const w = this.#watched.get(id);
    if (!w) return;
    const record = await this.deps.sandboxes.findById(w.orgId, id).catch(() => undefined);
    if (record === null || (record && record.status !== 'running' && record.status !== 'paused')) {
      if (this.#watched.get(id) === w) this.#watched.delete(id);
      return;
    }
    this.deps.log.warn({ sandbox: id, err: err.message }, 'could not read sandbox ports or OOM kills');
  }

  async #read(id: string): Promise<void> {
    const w = this.#watched.get(id);
    if (!w || w.paused) return;
    const driver = this.deps.driver;
    const [ports, oomKills] = await Promise.all([listsPorts(driver) ? driver.listeningPorts(id) : null, countsOomKills(driver) ? driver.oomKills(id) : null]);
    // Stopped, deleted or started again meanwhile: what was read belongs to no followed run.
    if (this.#watched.get(id) !== w) return;
    const emit = (type: 'port.opened' | 'port.closed' | 'sandbox.oom_killed', data: Record<string, unknown>) => this.deps.events.emit({ sandboxId: id, orgId: w.orgId, type, data });
    if (ports) {
      if (w.ports) {
        const before = new Set(w.ports);
        const now = new Set(ports);
        for (const port of ports) if (!before.has(port)) emit('port.opened', { port });
        for (const port of w.ports) if (!now.has(port)) emit('port.closed', { port });
      }
      w.ports = ports;
    }
    if (oomKills !== null) {
      if (w.oomKills !== null && oomKills > w.oomKills) emit('sandbox.oom_killed', { kills: oomKills - w.oomKills, total: oomKills });
      w.oomKills = oomKills;
    }
  }
}
