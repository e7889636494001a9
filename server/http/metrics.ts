import { hostname } from 'node:os';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { SandboxSample } from '../services/sandbox-usage.js';

/**
 * `voidrun_sbx_status` values, the original VoidRun's (1 running, 3 paused, 4 stopped as its
 * "killed", 5 error); a sandbox still being created is -1, as the original's "booting".
 */
const statusValue: Record<string, number> = { running: 1, paused: 3, stopped: 4, error: 5, creating: -1 };

/** Sandboxes that hold host resources, counted in `voidrun_host_allocated_*`. */
const holdsResources = new Set(['creating', 'running', 'paused']);
const MiB = 1024 * 1024;

/**
 * The samples of sandboxes an org owns: warm-pool members (owned by none) have no per-sandbox
 * series, as they are in no org's listing; they count in the host's allocation totals.
 */
function tenantSamples(list: SandboxSample[]): SandboxSample[] {
  return list.some((s) => s.record.pool) ? list.filter((s) => !s.record.pool) : list;
}

/** Prometheus metrics of one server instance (its own registry, so several servers can share a process). */
export class HttpMetrics {
  readonly registry = new Registry();
  readonly #requests = new Counter({
    name: 'voidrun_http_requests_total',
    help: 'HTTP requests by method, route and status',
    labelNames: ['method', 'route', 'status'] as const,
    registers: [this.registry],
  });
  readonly #duration = new Histogram({
    name: 'voidrun_http_request_duration_seconds',
    help: 'HTTP request latency by method, route and status',
    labelNames: ['method', 'route', 'status'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'voidrun_' });
  }

  /** `route` is a template (`/api/orgs/{orgId}/apikeys`), never a raw path, to bound label cardinality. */
  observe(method: string, route: string, status: number, seconds: number): void {
    const labels = { method, route, status: String(status) };
    this.#requests.inc(labels);
    this.#duration.observe(labels, seconds);
  }

  /** Adds `voidrun_sandboxes{status}`, counted from `count()` at every scrape. */
  /** `voidrun_node_info{role, node_id} 1`: which fleet role this node has (README "Fleet"). */
  addNodeInfo(role: string, nodeId: string): void {
    const g = new Gauge({ name: 'voidrun_node_info', help: "This node's fleet role (VOIDRUN_ROLE) and node id", labelNames: ['role', 'node_id'] as const, registers: [this.registry] });
    g.set({ role, node_id: nodeId }, 1);
  }

  /** The fleet's hosts as an API node sees them: state and slots (capacity, held) per host. */
  addFleetGauges(list: () => Promise<Array<{ id: string; state: string; capacity: { slots: number }; slotsHeld: number }>>): void {
    let hosts: Promise<Array<{ id: string; state: string; capacity: { slots: number }; slotsHeld: number }>> | null = null;
    // One listing serves both gauges of a scrape.
    const once = () => (hosts ??= list().finally(() => setImmediate(() => (hosts = null))));
    new Gauge({
      name: 'voidrun_fleet_host_state',
      help: 'Fleet hosts: 1 for the state each is in',
      labelNames: ['voidrun_host', 'state'] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const h of await once()) this.set({ voidrun_host: h.id, state: h.state }, 1);
      },
    });
    new Gauge({
      name: 'voidrun_fleet_host_slots',
      help: 'Fleet hosts: sandbox slots offered (capacity) and held',
      labelNames: ['voidrun_host', 'kind'] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const h of await once()) {
          this.set({ voidrun_host: h.id, kind: 'capacity' }, h.capacity.slots);
          this.set({ voidrun_host: h.id, kind: 'held' }, h.slotsHeld);
        }
      },
    });
  }

  addSandboxGauge(count: () => Promise<Record<string, number>>): void {
    new Gauge({
      name: 'voidrun_sandboxes',
      help: 'Sandboxes by status',
      labelNames: ['status'] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const [status, n] of Object.entries(await count())) this.set({ status }, n);
      },
    });
  }

  /**
   * The original VoidRun's per-sandbox gauges (`voidrun_sbx_*`, labelled by sandbox id and name,
   * org id and host) and host allocation totals (`voidrun_host_allocated_*`), computed from
   * `sample()` at each scrape: a deleted sandbox's series are gone at the next scrape. CPU percent
   * is over the time since the previous scrape, so it appears from a sandbox's second scrape on.
   * With `perSandbox` false only the host totals are served: per-sandbox series name every tenant's
   * sandboxes and orgs, so they are for a scraper holding METRICS_TOKEN.
   */
  addSandboxGauges(sample: () => Promise<SandboxSample[]>, { perSandbox = true, host = hostname() }: { perSandbox?: boolean; host?: string } = {}): void {
    const registers = [this.registry];
    // A metric registered nowhere is never collected.
    const sbxRegisters = perSandbox ? registers : [];
    const sbxLabels = ['sbx_id', 'sbx_name', 'org_id', 'voidrun_host'] as const;
    const labelsOf = (s: SandboxSample) => ({ sbx_id: s.record.id, sbx_name: s.record.name, org_id: s.record.orgId, voidrun_host: host });
    /** The previous CPU reading of each sandbox: seconds used, and when (ms). */
    const lastCpu = new Map<string, { cpuSeconds: number; at: number }>();
    const cpuPercent = new Map<string, number>();
    // The gauges read one sampling per scrape; CPU percent is derived when a sampling arrives.
    let current: Promise<SandboxSample[]> | null = null;
    const samples = () =>
      (current ??= sample()
        .then((list) => {
          const now = Date.now();
          cpuPercent.clear();
          const seen = new Set<string>();
          for (const s of list) {
            if (!s.usage) continue;
            seen.add(s.record.id);
            const prev = lastCpu.get(s.record.id);
            if (prev && now > prev.at) {
              const pct = ((s.usage.cpuSeconds - prev.cpuSeconds) / ((now - prev.at) / 1000) / Math.max(1, s.record.cpu)) * 100;
              cpuPercent.set(s.record.id, Math.min(100, Math.max(0, pct)));
            }
            lastCpu.set(s.record.id, { cpuSeconds: s.usage.cpuSeconds, at: now });
          }
          for (const id of lastCpu.keys()) if (!seen.has(id)) lastCpu.delete(id);
          return list;
        })
        .finally(() => {
          current = null;
        }));
    const gauge = (name: string, help: string, fill: (g: Gauge<(typeof sbxLabels)[number]>, list: SandboxSample[]) => void) =>
      new Gauge({
        name,
        help,
        labelNames: sbxLabels,
        registers: sbxRegisters,
        async collect() {
          const list = await samples();
          this.reset();
          fill(this, list);
        },
      });

    new Gauge({
      name: 'voidrun_sbx_status',
      help: 'Sandbox status as a number (1 running, 3 paused, 4 stopped, 5 error, -1 creating); the status label carries the name',
      labelNames: [...sbxLabels, 'status'] as const,
      registers: sbxRegisters,
      async collect() {
        const list = await samples();
        this.reset();
        for (const s of tenantSamples(list)) this.set({ ...labelsOf(s), status: s.record.status }, statusValue[s.record.status] ?? -1);
      },
    });
    gauge('voidrun_sbx_cpu_usage', 'Sandbox CPU usage in percent (0-100) of its vCPUs since the previous scrape, from the host (cgroup or VMM process)', (g, list) => {
      for (const s of tenantSamples(list)) {
        const pct = cpuPercent.get(s.record.id);
        if (pct !== undefined) g.set(labelsOf(s), pct);
      }
    });
    new Counter({
      name: 'voidrun_sbx_cpu_seconds_total',
      help: 'CPU time the sandbox has used since it (or its VMM) started, in seconds, from the host',
      labelNames: sbxLabels,
      registers: sbxRegisters,
      async collect() {
        const list = await samples();
        this.reset();
        for (const s of tenantSamples(list)) if (s.usage) this.inc(labelsOf(s), s.usage.cpuSeconds);
      },
    });
    gauge('voidrun_sbx_mem_used_bytes', 'Sandbox memory in use without reclaimable file cache (container: cgroup working set; microVM: the VMM process resident set)', (g, list) => {
      for (const s of tenantSamples(list)) if (s.usage) g.set(labelsOf(s), s.usage.memoryBytes);
    });
    gauge('voidrun_sbx_mem_limit_bytes', 'Memory allocated to the sandbox (mem)', (g, list) => {
      for (const s of tenantSamples(list)) g.set(labelsOf(s), s.record.mem * MiB);
    });
    gauge('voidrun_sbx_disk_limit_bytes', 'Disk allocated to the sandbox (diskMb)', (g, list) => {
      for (const s of tenantSamples(list)) g.set(labelsOf(s), s.record.diskMb * MiB);
    });
    for (const [direction, help] of [
      ['egress', 'Bytes the sandbox sent through its link on the host bridge since it last started, counted by the host kernel (host end of its veth or TAP)'],
      ['ingress', 'Bytes the sandbox received through its link on the host bridge since it last started, counted by the host kernel'],
    ] as const) {
      new Counter({
        name: `voidrun_sbx_network_${direction}_bytes`,
        help,
        labelNames: sbxLabels,
        registers: sbxRegisters,
        async collect() {
          const list = await samples();
          this.reset();
          for (const s of tenantSamples(list)) if (s.usage?.network) this.inc(labelsOf(s), s.usage.network[direction]);
        },
      });
    }
    // The original's names for the same counters (from its VMM's device counters: rx is what the
    // guest received), labelled by the guest's device.
    for (const [name, direction, help] of [
      ['voidrun_sbx_net_rx_bytes', 'ingress', 'Network RX bytes of the sandbox (what it received), as voidrun_sbx_network_ingress_bytes'],
      ['voidrun_sbx_net_tx_bytes', 'egress', 'Network TX bytes of the sandbox (what it sent), as voidrun_sbx_network_egress_bytes'],
    ] as const) {
      new Gauge({
        name,
        help,
        labelNames: [...sbxLabels, 'device'] as const,
        registers: sbxRegisters,
        async collect() {
          const list = await samples();
          this.reset();
          for (const s of tenantSamples(list)) if (s.usage?.network) this.set({ ...labelsOf(s), device: 'eth0' }, s.usage.network[direction]);
        },
      });
    }
    gauge('voidrun_sbx_metrics_up', 'Whether the host-side usage of a running or paused sandbox could be read (1 = up)', (g, list) => {
      for (const s of tenantSamples(list)) if (s.usage !== undefined) g.set(labelsOf(s), s.usage ? 1 : 0);
    });
    const allocated = (name: string, help: string, amount: (s: SandboxSample) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['voidrun_host'] as const,
        registers,
        async collect() {
          const list = await samples();
          this.reset();
          this.set({ voidrun_host: host }, list.filter((s) => holdsResources.has(s.record.status)).reduce((sum, s) => sum + amount(s), 0));
        },
      });
    allocated('voidrun_host_allocated_vcpus', 'vCPUs allocated to the sandboxes on this host that hold resources (creating, running, paused)', (s) => s.record.cpu);
    allocated('voidrun_host_allocated_mem_bytes', 'Memory allocated to the sandboxes on this host that hold resources', (s) => s.record.mem * MiB);
    allocated('voidrun_host_allocated_disk_bytes', 'Disk allocated to the sandboxes on this host that hold resources', (s) => s.record.diskMb * MiB);
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
