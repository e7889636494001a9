import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { pino } from 'pino';
import { createClient, type ClientOptions, type VoidRunClient } from '../../client/index.js';
import { createApp, type App } from '../../server/app.js';
import { loadConfig } from '../../server/config.js';

/** The state directories of one test server; pass them to a second server to simulate a restart. */
export interface ServerDirs {
  dataDir: string;
  instancesDir: string;
  snapshotsDir: string;
  runcRoot: string;
}

export interface TestServer {
  app: App;
  dirs: ServerDirs;
  /** `http://127.0.0.1:<port>` */
  url: string;
  /** Everything the server logged, one JSON line each. */
  logLines: string[];
  client(apiKey?: string, options?: Partial<ClientOptions>): VoidRunClient;
  /** Plain HTTP against the server: `http('/api/version')`. */
  http(path: string, init?: RequestInit & { apiKey?: string; json?: unknown }): Promise<Response>;
  /** Stops the server; removes its sandboxes and directories unless `keepState` (for restart tests). */
  close(options?: { keepState?: boolean }): Promise<void>;
}

export function newServerDirs(): ServerDirs {
  const root = mkdtempSync(join(tmpdir(), 'voidrun-test-'));
  chmodSync(root, 0o711); // sandboxes resolve their mounts as an unprivileged uid
  return {
    dataDir: join(root, 'data'),
    instancesDir: join(root, 'instances'),
    snapshotsDir: join(root, 'snapshots'),
    // runc keeps container state on tmpfs; one root per test server so servers never see each other's.
    runcRoot: join('/run/voidrun-test', root.split('/').pop()!),
  };
}

/**
 * Starts the real server (the composition root, real store in a temporary DATA_DIR) on an
 * ephemeral loopback port.
 */
export async function startTestServer(env: Record<string, string> = {}, dirs: ServerDirs = newServerDirs()): Promise<TestServer> {
  const logLines: string[] = [];
  const log = pino({ level: 'info', base: undefined }, { write: (line: string) => void logLines.push(line) });
  const config = loadConfig({
    SERVER_PORT: '0',
    SERVER_HOST: '127.0.0.1',
    DATA_DIR: dirs.dataDir,
    INSTANCES_DIR: dirs.instancesDir,
    SNAPSHOTS_DIR: dirs.snapshotsDir,
    RUNC_ROOT: dirs.runcRoot,
    // Images are shared between test servers (built once per machine, e.g. by .ci/run).
    BASE_IMAGES_DIR: process.env.BASE_IMAGES_DIR ?? '/var/lib/hyper-fleet/base-images',
    PREPARE_DEFAULT_IMAGE: 'false',
    // The layer store is shared too, and each test server's layer GC knows only its own images:
    // it must never collect the layers other servers (and the global setup's test image) use.
    IMAGE_LAYER_CACHE_TTL_SEC: String(365 * 86_400),
    // Loopback-only sandboxes and no host bridge unless a test opts in (test/container-network.test.ts).
    SANDBOX_NETWORK: 'none',
    ...env,
  });
  const app = await createApp(config, { log });
  const address = await app.listen();
  const url = `http://127.0.0.1:${address.port}`;
  const clients: VoidRunClient[] = [];
  return {
    app,
    dirs,
    url,
    logLines,
    client(apiKey, options) {
      const c = createClient({ url, apiKey, ...options });
      clients.push(c);
      return c;
    },
    http(path, init = {}) {
      const { apiKey, json, ...rest } = init;
      const headers = new Headers(rest.headers);
      if (apiKey) headers.set('x-api-key', apiKey);
      if (json !== undefined) headers.set('content-type', 'application/json');
      return fetch(url + path, { ...rest, headers, body: json !== undefined ? JSON.stringify(json) : rest.body });
    },
    async close(options = {}) {
      await Promise.all(clients.map((c) => c.close()));
      const driver = app.services.sandboxes.driverOrNull;
      const leftovers = options.keepState || !driver ? [] : await driver.list();
      await app.close();
      if (options.keepState) return;
      for (const id of leftovers) await driver!.destroy(id).catch(() => {});
      rmSync(dirname(dirs.dataDir), { recursive: true, force: true });
      rmSync(dirs.runcRoot, { recursive: true, force: true });
    },
  };
}

let counter = 0;
/** A unique email for a test registration. */
export function uniqueEmail(tag = 'user'): string {
  return `${tag}-${process.pid}-${Date.now()}-${counter++}@example.com`;
}
