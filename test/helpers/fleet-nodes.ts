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
  /** Its public port: `http://<SERVER_HOST>:<SERVER_PORT>`. */
  url: string;
  /** The network namespace it runs in, if not the test's own. */
  netns?: string;
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

  /**
   * Starts a node. With `netns`, in that network namespace (entered with nsenter: only the network
   * is its own, so runc still sees the host's cgroups and mounts) on its address there, fixed ports.
   */
  async start(name: string, role: 'api' | 'host', extra: Record<string, string> = {}, netns?: { ns: string; address: string }): Promise<FleetNode> {
    const port = netns ? 33944 : await freeLoopbackPort();
    const internalPort = role === 'host' ? (netns ? 33945 : await freeLoopbackPort()) : undefined;
    const address = netns?.address ?? '127.0.0.1';
    const dir = join(this.base, name);
    const env: Record<string, string> = {
      VOIDRUN_ROLE: role,
      MONGO_URI: this.mongoUri,
      MONGO_DB: this.db,
      CLUSTER_TOKEN: this.token,
      ADMIN_API_KEY: this.adminKey,
      SERVER_HOST: address,
      SERVER_PORT: String(port),
      DATA_DIR: join(dir, 'data'),
      INSTANCES_DIR: join(dir, 'instances'),
      SNAPSHOTS_DIR: join(dir, 'snapshots'),
      RUNC_ROOT: join('/run/voidrun-test', `${this.base.split('/').pop()}-${name}`),
      SANDBOX_NETWORK: 'none',
      PREPARE_DEFAULT_IMAGE: 'false',
      IMAGE_LAYER_CACHE_TTL_SEC: String(365 * 86_400),
      ...(internalPort ? { HOST_INTERNAL_PORT: String(internalPort), HOST_ADVERTISE_ADDRESS: address } : {}),
      ...this.defaults,
      ...extra,
    };
    return launch({ name, role, env, internalPort, ...(netns ? { netns: netns.ns } : {}) });
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
export function launch(n: { name: string; role: 'api' | 'host'; env: Record<string, string>; internalPort?: number; netns?: string }): Promise<FleetNode> {
  const node = [process.execPath, '--import', 'tsx', 'server/main.ts'];
  const [command, ...args] = n.netns ? ['nsenter', `--net=/run/netns/${n.netns}`, '--', ...node] : node;
  const child = spawn(command!, args, { cwd: root, env: { ...process.env, ...n.env }, stdio: ['ignore', 'pipe', 'pipe'] });
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
        if (line.includes('VoidRun listening on')) resolve({ ...n, child, log, url: `http://${n.env.SERVER_HOST}:${n.env.SERVER_PORT}` });
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

/** `runc --root <root> <args…>`'s stdout ('' when it fails, e.g. no such container). */
export function runc(root: string, ...args: string[]): Promise<string> {
  return new Promise((resolve) => {
    const p = spawn('runc', ['--root', root, ...args]);
    let text = '';
    p.stdout.on('data', (d: Buffer) => (text += d.toString()));
    p.once('error', () => resolve(''));
    p.once('close', () => resolve(text));
  });
}
