import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { createClient, type ClientOptions, type VoidRunClient } from '../../client/index.js';
import { createApp, type App } from '../../server/app.js';
import { loadConfig } from '../../server/config.js';

export interface TestServer {
  app: App;
  /** `http://127.0.0.1:<port>` */
  url: string;
  /** Everything the server logged, one JSON line each. */
  logLines: string[];
  client(apiKey?: string, options?: Partial<ClientOptions>): VoidRunClient;
  /** Plain HTTP against the server: `http('/api/version')`. */
  http(path: string, init?: RequestInit & { apiKey?: string; json?: unknown }): Promise<Response>;
  close(): Promise<void>;
}

/**
 * Starts the real server (the composition root, real store in a temporary DATA_DIR) on an
 * ephemeral loopback port.
 */
export async function startTestServer(env: Record<string, string> = {}): Promise<TestServer> {
  const dataDir = mkdtempSync(join(tmpdir(), 'voidrun-test-'));
  const logLines: string[] = [];
  const log = pino({ level: 'info', base: undefined }, { write: (line: string) => void logLines.push(line) });
  const config = loadConfig({ SERVER_PORT: '0', SERVER_HOST: '127.0.0.1', DATA_DIR: dataDir, ...env });
  const app = await createApp(config, { log });
  const address = await app.listen();
  const url = `http://127.0.0.1:${address.port}`;
  const clients: VoidRunClient[] = [];
  return {
    app,
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
    async close() {
      await Promise.all(clients.map((c) => c.close()));
      await app.close();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

let counter = 0;
/** A unique email for a test registration. */
export function uniqueEmail(tag = 'user'): string {
  return `${tag}-${process.pid}-${Date.now()}-${counter++}@example.com`;
}
