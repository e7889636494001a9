import type { Logger } from 'pino';
import { reconcilesHost, type SandboxDriver } from '../hypervisor/types.js';
import type { SandboxRepository } from '../store/types.js';
import type { SandboxService } from './sandbox-service.js';
import type { SandboxEventSink } from './sandbox-events.js';
import { forEachLimit } from './for-each-limit.js';

/**
 * Keeps every stored sandbox status true to what the driver runs: once at startup (re-adopting
 * sandboxes that kept running while the server was down, marking dead ones stopped, removing
 * runtime and network leftovers no record owns) and then every `intervalMs`, `concurrency` sandboxes at a time.
 */
export class HealthMonitor {
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | null = null;

  constructor(
    private readonly deps: {
      sandboxes: SandboxRepository;
      service: SandboxService;
      driver: SandboxDriver;
      intervalMs: number;
      concurrency: number;
      log: Logger;
      /** Where a create cut short by a restart is reported (`sandbox.error`). */
      events?: SandboxEventSink;
    },
  ) {}

  start(): void {
    this.#timer = setInterval(() => void this.check(), this.deps.intervalMs);
    this.#timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.#timer);
    await this.#running;
  }

  /** One pass over every sandbox; overlapping calls share the pass in progress. */
  check(): Promise<void> {
    this.#running ??= this.#pass().finally(() => (this.#running = null));
    return this.#running;
  }

  /** Startup: a check, plus removal of driver instances that no record owns. */
  async adopt(): Promise<void> {
    const records = await this.deps.sandboxes.listAll();
    const known = new Set(records.map((r) => r.id));
    for (const id of await this.deps.driver.list()) {
      if (known.has(id)) continue;
      this.deps.log.warn({ sandbox: id }, 'removing a sandbox instance that no record owns');
      await this.deps.driver.destroy(id).catch((err: Error) => this.deps.log.error({ sandbox: id, err: err.message }, 'could not remove orphan'));
    }
    // A create interrupted by the restart never finished: its record and leftovers go.
    for (const r of records.filter((r) => r.status === 'creating')) {
      this.deps.log.warn({ sandbox: r.id }, 'sandbox was still being created when the server stopped; marking it error');
      await this.deps.driver.destroy(r.id).catch(() => {});
      await this.deps.sandboxes.update(r.orgId, r.id, { status: 'error' });
      if (r.orgId) this.deps.events?.emit({ sandboxId: r.id, orgId: r.orgId, type: 'sandbox.error', data: { from: 'creating', reason: 'the server stopped while it was being created' } });
    }
    // Network namespaces, links and addresses of sandboxes that are gone (or no longer run).
    if (reconcilesHost(this.deps.driver)) {
      const changes = await this.deps.driver.reconcileHost(known).catch((err: Error) => [`could not reconcile host networking: ${err.message}`]);
      for (const change of changes) this.deps.log.warn(`startup reconcile: ${change}`);
    }
    await this.check();
    const adopted = (await this.deps.sandboxes.listAll()).filter((r) => r.status === 'running').length;
    this.deps.log.info({ running: adopted, total: records.length }, 'sandboxes reconciled with the driver');
  }

  async #pass(): Promise<void> {
    const records = await this.deps.sandboxes.listAll();
    await forEachLimit(records, this.deps.concurrency, async (record) => {
      await this.deps.service.reconcile(record).catch((err: Error) => this.deps.log.warn({ sandbox: record.id, err: err.message }, 'health check failed'));
    });
  }
}
