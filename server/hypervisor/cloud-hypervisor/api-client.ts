import { request as httpRequest } from 'node:http';
import type { RestoreConfig, VmConfig, VmSnapshotConfig } from './vm-config.js';

/** cloud-hypervisor's VM states (`VmState` in its API schema). */
export type VmState = 'Created' | 'Running' | 'Shutdown' | 'Paused' | 'BreakPoint';

export interface VmmPingResponse {
  version: string;
  build_version?: string;
  pid?: number;
  features?: string[];
}

export interface VmInfo {
  state: VmState;
  config: Record<string, unknown>;
  memory_actual_size?: number;
}

/**
 * Every endpoint this client calls, with its method, exactly as in cloud-hypervisor's OpenAPI
 * description (paths are relative to its `/api/v1` server URL). The contract test checks each
 * exists there.
 */
export const CLOUD_HYPERVISOR_ENDPOINTS = {
  ping: { method: 'GET', path: '/vmm.ping' },
  shutdownVmm: { method: 'PUT', path: '/vmm.shutdown' },
  create: { method: 'PUT', path: '/vm.create' },
  boot: { method: 'PUT', path: '/vm.boot' },
  pause: { method: 'PUT', path: '/vm.pause' },
  resume: { method: 'PUT', path: '/vm.resume' },
  shutdown: { method: 'PUT', path: '/vm.shutdown' },
  delete: { method: 'PUT', path: '/vm.delete' },
  info: { method: 'GET', path: '/vm.info' },
  snapshot: { method: 'PUT', path: '/vm.snapshot' },
  restore: { method: 'PUT', path: '/vm.restore' },
} as const satisfies Record<string, { method: 'GET' | 'PUT'; path: `/${string}` }>;

type Endpoint = (typeof CLOUD_HYPERVISOR_ENDPOINTS)[keyof typeof CLOUD_HYPERVISOR_ENDPOINTS];

/** A non-2xx answer from cloud-hypervisor, with its own explanation. */
export class CloudHypervisorApiError extends Error {
  constructor(
    readonly endpoint: string,
    readonly status: number,
    readonly body: string,
  ) {
    super(`cloud-hypervisor ${endpoint} answered ${status}${body ? `: ${body}` : ''}`);
    this.name = 'CloudHypervisorApiError';
  }
}

export interface CloudHypervisorApiOptions {
  /** The VMM's `--api-socket`. */
  socketPath: string;
  /** Deadline for quick calls (everything but snapshot and restore). */
  timeoutMs?: number;
  /** Deadline for snapshot and restore, which copy the guest's whole memory. */
  longTimeoutMs?: number;
}

/**
 * cloud-hypervisor's HTTP API over its unix `--api-socket`. One connection per call (no
 * keep-alive): calls are rare, and a VMM that exits must not leave a pooled socket behind.
 */
export class CloudHypervisorApi {
  readonly socketPath: string;
  readonly #timeoutMs: number;
  readonly #longTimeoutMs: number;

  constructor(opts: CloudHypervisorApiOptions) {
    this.socketPath = opts.socketPath;
    this.#timeoutMs = opts.timeoutMs ?? 10_000;
    this.#longTimeoutMs = opts.longTimeoutMs ?? 600_000;
  }

  async ping(timeoutMs?: number): Promise<VmmPingResponse> {
    return (await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.ping, undefined, timeoutMs)) as VmmPingResponse;
  }

  async createVm(config: VmConfig): Promise<void> {
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.create, config);
  }

  async bootVm(): Promise<void> {
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.boot);
  }

  async pauseVm(): Promise<void> {
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.pause);
  }

  async resumeVm(): Promise<void> {
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.resume);
  }

  /** Stops the guest at once (no ACPI request to the guest); the VMM keeps running. */
  async shutdownVm(): Promise<void> {
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.shutdown);
  }

  async deleteVm(): Promise<void> {
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.delete);
  }

  async info(timeoutMs?: number): Promise<VmInfo> {
    return (await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.info, undefined, timeoutMs)) as VmInfo;
  }

  /** Writes config.json, state.json and the memory ranges into `directory` (which must exist). The VM must be paused. */
  async snapshot(directory: string): Promise<void> {
    const body: VmSnapshotConfig = { destination_url: `file://${directory}` };
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.snapshot, body, this.#longTimeoutMs);
  }

  /** Restores the VM written by `snapshot` into `directory`; it comes back paused. */
  async restore(directory: string): Promise<void> {
    const body: RestoreConfig = { source_url: `file://${directory}` };
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.restore, body, this.#longTimeoutMs);
  }

  /** Ends the VMM process. */
  async shutdownVmm(timeoutMs?: number): Promise<void> {
    await this.#call(CLOUD_HYPERVISOR_ENDPOINTS.shutdownVmm, undefined, timeoutMs);
  }

  #call(endpoint: Endpoint, body?: unknown, timeoutMs = this.#timeoutMs): Promise<unknown> {
    const name = `${endpoint.method} ${endpoint.path}`;
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = httpRequest(
        {
          socketPath: this.socketPath,
          method: endpoint.method,
          path: `/api/v1${endpoint.path}`,
          agent: false,
          timeout: timeoutMs,
          headers: {
            Accept: 'application/json',
            ...(payload ? { 'Content-Type': 'application/json', 'Content-Length': payload.length } : {}),
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.once('error', reject);
          res.once('end', () => {
            const text = Buffer.concat(chunks).toString('utf8').trim();
            const status = res.statusCode ?? 0;
            if (status < 200 || status > 299) return reject(new CloudHypervisorApiError(name, status, text));
            if (!text) return resolve(undefined);
            try {
              resolve(JSON.parse(text));
            } catch {
              reject(new Error(`cloud-hypervisor ${name} answered ${status} with a body that is not JSON: ${text.slice(0, 200)}`));
            }
          });
        },
      );
      req.once('timeout', () => req.destroy(new Error(`cloud-hypervisor ${name} did not answer within ${timeoutMs} ms`)));
      req.once('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') reject(new Error(`cloud-hypervisor is not listening on ${this.socketPath} (${err.code})`, { cause: err }));
        else reject(err);
      });
      req.end(payload);
    });
  }
}
