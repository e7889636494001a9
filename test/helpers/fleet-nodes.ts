import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freeLoopbackPort } from '../../server/hypervisor/host-process.js';

const root = join(import.meta.dirname, '..', '..');

/** One fleet node: a real server process (VOIDRUN_ROLE api or host) of its own. */
export interface FleetNode {
  name: string;
  role: 'api' | 'host';
  env: Record<string, string>;
  child: ChildProcess;
  /** Its public port: `http://127.0.0.1:<SERVER_PORT>`. */
  url: string;
  /** A host's internal listener port. */
  internalPort?: number;
  log: string[];
}

/**
 * Fleet nodes as separate server processes on loopback, sharing one MongoDB-wire store (`mongoUri`,
 * a fresh database) and one cluster token; each with its own directories (and runc root).
 */
export class FleetProcesses {
  readonly token = randomBytes(24).toString('base64url');
  readonly adminKey = `admin-${randomBytes(24).toString('base64url')}`;
  readonly db = `fleet-${randomBytes(4).toString('hex')}`;
  readonly base = mkdtempSync(join(tmpdir(), 'voidrun-fleet-'));

  constructor(
    private readonly mongoUri: string,
    private readonly defaults: Record<string, string> = {},
  ) {
    chmodSync(this.base, 0o711); // sandboxes resolve their mounts as an unprivileged uid
  }

  async start(name: string, role: 'api' | 'host', extra: Record<string, string> = {}): Promise<FleetNode> {
    const port = await freeLoopbackPort();
    const internalPort = role === 'host' ? await freeLoopbackPort() : undefined;
    const dir = join(this.base, name);
    const env: Record<string, string> = {
      VOIDRUN_ROLE: role,
      MONGO_URI: this.mongoUri,
      MONGO_DB: this.db,
      CLUSTER_TOKEN: this.token,
      ADMIN_API_KEY: this.adminKey,
      SERVER_HOST: '127.0.0.1',
      SERVER_PORT: String(port),
      DATA_DIR: join(dir, 'data'),
      INSTANCES_DIR: join(dir, 'instances'),
      SNAPSHOTS_DIR: join(dir, 'snapshots'),
      RUNC_ROOT: join('/run/voidrun-test', `${this.base.split('/').pop()}-${name}`),
      SANDBOX_NETWORK: 'none',
      PREPARE_DEFAULT_IMAGE: 'false',
      IMAGE_LAYER_CACHE_TTL_SEC: String(365 * 86_400),
      ...(internalPort ? { HOST_INTERNAL_PORT: String(internalPort), HOST_ADVERTISE_ADDRESS: '127.0.0.1' } : {}),
      ...this.defaults,
      ...extra,
    };
    return launch({ name, role, env, internalPort });
  }

  /** Removes the nodes' directories (a sandbox disk still mounted after a failure is left). */
  cleanup(): void {
    try {
      rmSync(this.base, { recursive: true, force: true });
    } catch {
      // Left for the machine's tmp cleanup.
    }
  }
}

/** Starts (or restarts, with the same env and so the same node id) a node; resolves once it listens. */
export function launch(n: { name: string; role: 'api' | 'host'; env: Record<string, string>; internalPort?: number }): Promise<FleetNode> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server/main.ts'], { cwd: root, env: { ...process.env, ...n.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const log: string[] = [];
  return new Promise((resolve, reject) => {
    let pending = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      pending += chunk.toString();
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        log.push(line);
        if (line.includes('VoidRun listening on')) resolve({ ...n, child, log, url: `http://127.0.0.1:${n.env.SERVER_PORT}` });
      }
    });
    child.stderr!.on('data', (chunk: Buffer) => log.push(chunk.toString()));
    child.once('exit', (code) => reject(new Error(`${n.name} exited with ${code}: ${log.join('\n').slice(-3000)}`)));
  });
}

export async function stopNode(node: FleetNode, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (node.child.exitCode !== null || node.child.signalCode !== null) return;
  const exited = new Promise((r) => node.child.once('exit', r));
  node.child.kill(signal);
  await exited;
}

/** A JSON request; resolves with the status and the parsed body. */
export async function json(url: string, init: RequestInit & { apiKey?: string; body?: string } = {}): Promise<{ status: number; body: any }> {
  const res = await fetch(url, { ...init, headers: { 'content-type': 'application/json', ...(init.apiKey ? { 'x-api-key': init.apiKey } : {}), ...(init.headers as Record<string, string>) } });
  return { status: res.status, body: await res.json() };
}
