import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../server/config.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const main = join(root, 'server', 'main.ts');

describe('config', () => {
  it("uses the original VoidRun's defaults", () => {
    const c = loadConfig({});
    expect(c).toMatchObject({
      SERVER_PORT: 33944,
      SERVER_HOST: '',
      MONGO_DB: 'vr-db',
      BASE_IMAGES_DIR: '/var/lib/hyper-fleet/base-images',
      INSTANCES_DIR: '/var/lib/hyper-fleet/instances',
      KERNEL_PATH: '/var/lib/hyper-fleet/base-images/vmlinux',
      BRIDGE_NAME: 'vmbr0',
      GATEWAY_IP: '192.168.100.1/22',
      NETWORK_CIDR: '192.168.100.0/22',
      SUBNET_PREFIX: '192.168.100.',
      SYSTEM_USER_NAME: 'System',
      SYSTEM_USER_EMAIL: 'system@local',
      SANDBOX_DEFAULT_VCPUS: 1,
      SANDBOX_DEFAULT_MEMORY_MB: 1024,
      SANDBOX_DEFAULT_DISK_MB: 5120,
      SANDBOX_DEFAULT_IMAGE: 'debian',
      HEALTH_ENABLED: true,
      HEALTH_INTERVAL_SEC: 60,
      HEALTH_CONCURRENCY: 16,
      API_KEY_CACHE_TTL_SECONDS: 3600,
      DATA_DIR: './data',
      SANDBOX_DRIVER: 'auto',
    });
  });

  it.each([
    [{ SERVER_PORT: 'abc' }, /SERVER_PORT="abc" — expected an integer from 0 to 65535/],
    [{ SERVER_PORT: '70000' }, /SERVER_PORT="70000" — expected an integer from 0 to 65535/],
    [{ HEALTH_ENABLED: 'maybe' }, /HEALTH_ENABLED="maybe" — expected true or false/],
    [{ SANDBOX_DRIVER: 'docker' }, /SANDBOX_DRIVER="docker" — expected one of auto, container, qemu, cloud-hypervisor/],
    [{ MONGO_URI: 'postgres://x' }, /MONGO_URI="postgres:\/\/x" — expected a mongodb:\/\/ or mongodb\+srv:\/\/ URI/],
    [{ GATEWAY_IP: '192.168.100.1' }, /GATEWAY_IP="192.168.100.1" — expected an IPv4 address with a prefix length/],
  ])('rejects %o with one line naming the variable', (env, message) => {
    expect(() => loadConfig(env)).toThrowError(ConfigError);
    expect(() => loadConfig(env)).toThrowError(message);
  });

  it('parses values given', () => {
    expect(loadConfig({ SERVER_PORT: '8080', HEALTH_ENABLED: 'false', MONGO_URI: '' })).toMatchObject({ SERVER_PORT: 8080, HEALTH_ENABLED: false, MONGO_URI: undefined });
  });
});

describe('the server process', () => {
  it('stops at startup with exactly one line when a variable is bad', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', main], { cwd: root, env: { ...process.env, SERVER_PORT: 'not-a-port' }, encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual(['Invalid configuration: SERVER_PORT="not-a-port" — expected an integer from 0 to 65535']);
  });

  it('starts with the embedded store, serves requests, and exits cleanly on SIGTERM', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'voidrun-main-'));
    const child = spawn(process.execPath, ['--import', 'tsx', main], {
      cwd: root,
      env: { ...process.env, SERVER_PORT: '0', SERVER_HOST: '127.0.0.1', DATA_DIR: dataDir, MONGO_URI: '' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    try {
      const lines = createInterface({ input: child.stdout! });
      let port = 0;
      for await (const line of lines) {
        const entry = JSON.parse(line) as { port?: number; store?: string };
        if (entry.port) {
          expect(entry.store).toBe('sqlite');
          port = entry.port;
          break;
        }
      }
      const res = await fetch(`http://127.0.0.1:${port}/api/version`);
      expect(res.status).toBe(200);
      const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
    } finally {
      child.kill('SIGKILL');
      rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
