import type { SandboxDriver } from '../hypervisor/types.js';
import { reportsUsage, type HostUsage } from '../hypervisor/types.js';
import type { SandboxRepository, SandboxRecord } from '../store/types.js';
import { forEachLimit } from './for-each-limit.js';

/** One sandbox as the metrics see it at a scrape. */
export interface SandboxSample {
  record: SandboxRecord;
  /** Host-side usage of a sandbox that should have processes (running, paused); null when unreadable. */
  usage: HostUsage | null | undefined;
}

export interface SandboxUsageOptions {
  sandboxes: Pick<SandboxRepository, 'listAll'>;
  driver: SandboxDriver | null;
  /** Sandboxes whose usage is read at once (METRICS_CONCURRENCY). */
  concurrency: number;
}

/**
 * What a metrics scrape reads: every sandbox record on this server, and for each running or paused
 * one its host-side usage from the driver (cgroup or VMM process files; never the agent, which is
 * tenant code and may stall or lie). Calls made while one sampling is under way share it, so
 * several gauges (and several scrapers) cost one store listing and one read per sandbox.
 */
export function sandboxSampler(opts: SandboxUsageOptions): () => Promise<SandboxSample[]> {
  let inFlight: Promise<SandboxSample[]> | null = null;
  const { driver } = opts;
  const usageOf = driver && reportsUsage(driver) ? (id: string) => driver.hostUsage(id).catch(() => null) : null;

  async function sample(): Promise<SandboxSample[]> {
    const records = await opts.sandboxes.listAll();
    const samples: SandboxSample[] = records.map((record) => ({ record, usage: undefined }));
    const pending = usageOf ? samples.filter((s) => s.record.status === 'running' || s.record.status === 'paused') : [];
    await forEachLimit(pending, opts.concurrency, async (s) => {
      s.usage = await usageOf!(s.record.id);
    });
    return samples;
  }

  return () => {
    inFlight ??= sample().finally(() => {
      inFlight = null;
    });
    return inFlight;
  };
}
