import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { ConfigError, hostPlacementSlots, loadConfig } from '../server/config.js';

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
    [{ VOIDRUN_ROLE: 'worker' }, /VOIDRUN_ROLE="worker" — expected one of all, api, host/],
    [{ VOIDRUN_ROLE: 'api', MONGO_URI: 'mongodb://db/' }, /CLUSTER_TOKEN="" — expected a secret of at least 32 characters shared by every node \(VOIDRUN_ROLE=api needs it\)/],
    [{ VOIDRUN_ROLE: 'host', CLUSTER_TOKEN: 'x'.repeat(32) }, /MONGO_URI="" — expected the fleet's MongoDB \(VOIDRUN_ROLE=host: every node shares one store/],
    [{ CLUSTER_TOKEN: 'short' }, /^Invalid configuration: CLUSTER_TOKEN=<5 characters, not shown> — expected at least 32 characters$/],
    [{ HOST_HEARTBEAT_SEC: '10', HOST_DEAD_AFTER_SEC: '15' }, /HOST_DEAD_AFTER_SEC=15 — expected at least twice HOST_HEARTBEAT_SEC \(10\)/],
    [
      { VOIDRUN_ROLE: 'host', CLUSTER_TOKEN: 'x'.repeat(32), MONGO_URI: 'mongodb://db/', HOST_SLOTS: '4', WARM_POOL: 'debian:1cpu:1024mb=3,debian:2cpu:2048mb=1' },
      /HOST_SLOTS=4 — expected more than the 4 sandboxes WARM_POOL keeps ready on this host \(members count against its slots\)/,
    ],
  ])('rejects %o with one line naming the variable', (env, message) => {
    expect(() => loadConfig(env)).toThrowError(ConfigError);
    expect(() => loadConfig(env)).toThrowError(message);
  });

  it("a fleet host offers placement HOST_SLOTS less its warm pool's members (no overcommit by members that hold no slot)", () => {
    const fleetHost = { VOIDRUN_ROLE: 'host', CLUSTER_TOKEN: 'x'.repeat(32), MONGO_URI: 'mongodb://db/', HOST_SLOTS: '10' };
    expect(hostPlacementSlots(loadConfig({ ...fleetHost, WARM_POOL: 'debian:1cpu:1024mb=3,debian:2cpu:2048mb=2' }))).toBe(5);
    expect(hostPlacementSlots(loadConfig(fleetHost))).toBe(10);
  });

  it("accepts every variable of the original's we honour or ignore, with the original's defaults", () => {
    expect(loadConfig({})).toMatchObject({
      CORS_ENABLED: true,
      CORS_ALLOW_ORIGINS: ['*'],
      CORS_ALLOW_METHODS: ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
      CORS_ALLOW_HEADERS: ['Authorization', 'Content-Type', 'X-API-Key', 'X-Org-ID', 'Idempotency-Key', 'Last-Event-ID'],
      CORS_EXPOSE_HEADERS: [],
      CORS_ALLOW_CREDENTIALS: false,
      CORS_MAX_AGE_SEC: 600,
      METRICS_ENABLED: true,
      METRICS_PATH: '/metrics',
      METRICS_INTERVAL_SEC: 10,
      METRICS_DISK_INTERVAL_SEC: 10,
      METRICS_CONCURRENCY: 16,
      SANDBOX_SYNC_TIMEOUT_SEC: 30,
      DNS_NAMESERVERS: ['8.8.8.8', '1.1.1.1'],
      SANDBOX_DEFAULT_HOSTNAME: 'voidrun',
      NET_PREFIX: 'vr',
    });
    const given = loadConfig({
      CORS_ENABLED: 'false',
      CORS_ALLOW_ORIGINS: 'https://a.example.com, https://b.example.com,',
      CORS_ALLOW_METHODS: 'GET,POST',
      CORS_ALLOW_HEADERS: 'X-API-Key',
      CORS_EXPOSE_HEADERS: 'Content-Disposition',
      CORS_ALLOW_CREDENTIALS: 'true',
      CORS_MAX_AGE_SEC: '0',
      METRICS_ENABLED: 'false',
      METRICS_PATH: '/prom',
      METRICS_INTERVAL_SEC: '5',
      METRICS_DISK_INTERVAL_SEC: '60',
      METRICS_CONCURRENCY: '4',
      SANDBOX_SYNC_TIMEOUT_SEC: '90',
      DNS_NAMESERVERS: '9.9.9.9,2620:fe::fe',
      SANDBOX_DEFAULT_HOSTNAME: 'box',
      INITRD_PATH: '/boot/initrd.img',
      SANDBOX_KERNEL_CMDLINE: 'quiet loglevel=3',
      TAP_PREFIX: 'tp',
      NET_PREFIX: 'nt',
    });
    expect(given).toMatchObject({ CORS_ALLOW_ORIGINS: ['https://a.example.com', 'https://b.example.com'], DNS_NAMESERVERS: ['9.9.9.9', '2620:fe::fe'], SANDBOX_SYNC_TIMEOUT_SEC: 90, INITRD_PATH: '/boot/initrd.img', TAP_PREFIX: 'tp' });
  });

  it.each([
    [{ CORS_ALLOW_ORIGINS: 'example.com' }, /CORS_ALLOW_ORIGINS="example.com" — expected "\*" or http\(s\):\/\/ origins, comma-separated \("example.com" is not one\)/],
    [{ DNS_NAMESERVERS: '8.8.8.8,8.8.8.8/32' }, /DNS_NAMESERVERS="8.8.8.8,8.8.8.8\/32" — expected IP addresses, comma-separated/],
    [{ CORS_ALLOW_HEADERS: 'X-API-Key,bad header' }, /CORS_ALLOW_HEADERS=.* — expected header names, comma-separated \("bad header" is not one\)/],
    [{ TAP_PREFIX: 'toolong' }, /TAP_PREFIX="toolong" — expected one to three lowercase letters or digits/],
    [{ METRICS_PATH: 'metrics' }, /METRICS_PATH="metrics" — expected a path starting with \//],
  ])("rejects the original's variables when malformed: %o", (env, message) => {
    expect(() => loadConfig(env)).toThrowError(message);
  });

  it('parses values given', () => {
    expect(loadConfig({ SERVER_PORT: '8080', HEALTH_ENABLED: 'false', MONGO_URI: '' })).toMatchObject({ SERVER_PORT: 8080, HEALTH_ENABLED: false, MONGO_URI: undefined });
  });

  it('SANDBOX_PRIVATE_ALLOW: empty by default (no tenant opens a private range); CIDRs inside the private ranges, canonical', () => {
    expect(loadConfig({}).SANDBOX_PRIVATE_ALLOW).toEqual([]);
    expect(loadConfig({ SANDBOX_PRIVATE_ALLOW: ' 10.1.2.3/16, 192.168.5.7,100.64.0.0/10 ' }).SANDBOX_PRIVATE_ALLOW).toEqual(['10.1.0.0/16', '192.168.5.7/32', '100.64.0.0/10']);
    for (const bad of ['203.0.113.0/24', '10.0.0.0/7', '0.0.0.0/0', 'intranet.example', '10.0.0.0/33']) {
      expect(() => loadConfig({ SANDBOX_PRIVATE_ALLOW: bad })).toThrowError(/SANDBOX_PRIVATE_ALLOW=.* — expected IPv4 CIDRs inside 10\.0\.0\.0\/8, 172\.16\.0\.0\/12, 192\.168\.0\.0\/16 or 100\.64\.0\.0\/10/);
    }
  });

  it('WEBHOOK_ALLOW_PRIVATE: empty by default (webhooks reach no loopback or private address); IPv4 or IPv6 CIDRs or addresses', () => {
    expect(loadConfig({}).WEBHOOK_ALLOW_PRIVATE).toEqual([]);
    expect(loadConfig({ WEBHOOK_ALLOW_PRIVATE: ' 127.0.0.1/32, ::1,10.0.0.0/8 ' }).WEBHOOK_ALLOW_PRIVATE).toEqual(['127.0.0.1/32', '::1', '10.0.0.0/8']);
    for (const bad of ['localhost', '10.0.0.0/33', '::1/129', '1.2.3.4/8/9', '10.0.0.0/x']) {
      expect(() => loadConfig({ WEBHOOK_ALLOW_PRIVATE: bad })).toThrowError(/WEBHOOK_ALLOW_PRIVATE=.* — expected IPv4 or IPv6 CIDRs/);
    }
  });

  it('events and webhooks: defaults as the README says', () => {
    expect(loadConfig({})).toMatchObject({ EVENTS_RETENTION: 10_000, EVENTS_QUEUE_MAX: 10_000, EVENTS_POLL_INTERVAL_SEC: 5, WEBHOOK_MAX_ATTEMPTS: 6, WEBHOOK_RETRY_BASE_MS: 10_000, WEBHOOK_TIMEOUT_MS: 5000, WEBHOOK_MAX_IN_FLIGHT_PER_ORG: 4, ORG_MAX_WEBHOOKS: 10 });
    expect(() => loadConfig({ EVENTS_RETENTION: '0' })).toThrowError(/EVENTS_RETENTION/);
    expect(loadConfig({})).toMatchObject({ EVENTS_SANDBOX_RATE: 20, EVENTS_SANDBOX_BURST: 200, WEBHOOK_MAX_PENDING_PER_ORG: 1000 });
    for (const name of ['EVENTS_SANDBOX_RATE', 'EVENTS_SANDBOX_BURST', 'WEBHOOK_MAX_PENDING_PER_ORG']) expect(() => loadConfig({ [name]: '0' })).toThrowError(new RegExp(name));
  });
});

describe('the server process', () => {
  it('lifecycle: no maximum and no default timeout (sandboxes stay), 5% CPU, a 1 s tick; a default above the maximum stops startup naming both', () => {
    expect(loadConfig({})).toMatchObject({ SANDBOX_MAX_TIMEOUT_SEC: 0, SANDBOX_DEFAULT_TIMEOUT_SEC: 0, SANDBOX_IDLE_CPU_PERCENT: 5, LIFECYCLE_TICK_MS: 1000 });
    expect(loadConfig({ SANDBOX_MAX_TIMEOUT_SEC: '3600', SANDBOX_DEFAULT_TIMEOUT_SEC: '300' })).toMatchObject({ SANDBOX_MAX_TIMEOUT_SEC: 3600, SANDBOX_DEFAULT_TIMEOUT_SEC: 300 });
    expect(() => loadConfig({ SANDBOX_MAX_TIMEOUT_SEC: '60', SANDBOX_DEFAULT_TIMEOUT_SEC: '300' })).toThrowError(
      'Invalid configuration: SANDBOX_DEFAULT_TIMEOUT_SEC=300 — expected at most SANDBOX_MAX_TIMEOUT_SEC (60)',
    );
    expect(() => loadConfig({ LIFECYCLE_TICK_MS: '10' })).toThrowError(/LIFECYCLE_TICK_MS="10" — expected an integer from 100 to 60000/);
    expect(() => loadConfig({ SANDBOX_IDLE_CPU_PERCENT: '0' })).toThrowError(/SANDBOX_IDLE_CPU_PERCENT="0" — expected an integer from 1 to 100000/);
  });

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
