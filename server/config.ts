import { isIP } from 'node:net';
import { z } from 'zod';
import { insidePrivateRange, isCidrRule, parseNetworkRule } from '../shared/schemas/network.js';

const bool = z
  .enum(['true', 'false', '1', '0', 'yes', 'no'], { error: 'true or false' })
  .transform((v) => v === 'true' || v === '1' || v === 'yes');
const oneOf = <const T extends readonly [string, ...string[]]>(values: T) => z.enum(values, { error: `one of ${values.join(', ')}` });
const int = (min: number, max: number) =>
  z
    .string()
    .regex(/^\d+$/, `an integer from ${min} to ${max}`)
    .transform(Number)
    .pipe(z.number().int().min(min, `an integer from ${min} to ${max}`).max(max, `an integer from ${min} to ${max}`));
const nonEmpty = z.string().min(1, 'a non-empty value');
/** A shared secret: unset or empty means none; set, at least 32 characters. */
const secret32 = z
  .string()
  .optional()
  .transform((v) => v || undefined)
  .pipe(z.string().min(32, 'at least 32 characters').optional());
const optionalString = z
  .string()
  .optional()
  .transform((v) => v || undefined);
/**
 * A comma-separated list as the original reads it (items trimmed, empty ones dropped; unset or
 * empty means `fallback`); each item must pass `valid`.
 */
const csv = (fallback: string, valid: (item: string) => boolean, expected: string) =>
  z
    .string()
    .optional()
    .transform((v) => (v || fallback).split(',').map((s) => s.trim()).filter(Boolean))
    .check((ctx) => {
      const bad = ctx.value.find((v) => !valid(v));
      if (bad !== undefined) ctx.issues.push({ code: 'custom', message: `${expected} (${JSON.stringify(bad)} is not one)`, input: ctx.value });
    });
/** One `WARM_POOL` entry: `<image>:<n>cpu:<m>mb=<count>`. */
export interface WarmPoolEntry {
  image: string;
  cpu: number;
  memMb: number;
  count: number;
  /** The shape without the count (`debian:1cpu:1024mb`): the `pool` key of its members' records. */
  key: string;
}
const warmPoolEntry = /^([a-z0-9][a-z0-9._-]{0,62}):(\d{1,2})cpu:(\d{1,7})mb=(\d{1,3})$/;
/** WARM_POOL: comma-separated entries, each shape at most once, bounded like the defaults they match. */
const warmPool = z
  .string()
  .optional()
  .transform((v, ctx) => {
    const entries: WarmPoolEntry[] = [];
    for (const item of (v ?? '').split(',').map((s) => s.trim()).filter(Boolean)) {
      const m = warmPoolEntry.exec(item);
      const [cpu, memMb, count] = m ? [Number(m[2]), Number(m[3]), Number(m[4])] : [0, 0, 0];
      const problem = !m
        ? 'is not <image>:<n>cpu:<m>mb=<count>'
        : cpu < 1 || cpu > 64
          ? 'asks for cpu outside 1 to 64'
          : memMb < 64 || memMb > 1_048_576
            ? 'asks for memory outside 64 to 1048576 MB'
            : count > 256
              ? 'asks for more than 256 sandboxes'
              : entries.some((e) => e.key === `${m[1]}:${cpu}cpu:${memMb}mb`)
                ? 'repeats a shape listed before'
                : null;
      if (problem) {
        ctx.issues.push({ code: 'custom', message: `comma-separated <image>:<n>cpu:<m>mb=<count> entries such as debian:1cpu:1024mb=4 (${JSON.stringify(item.slice(0, 80))} ${problem})`, input: v });
        return z.NEVER;
      }
      entries.push({ image: m![1]!, cpu, memMb, count, key: `${m![1]}:${cpu}cpu:${memMb}mb` });
    }
    return entries;
  });
const headerName = (v: string) => /^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/.test(v);
/** An IPv4 or IPv6 CIDR (`127.0.0.1/32`, `fd00::/8`); a bare address is one address. */
const anyCidr = (v: string) => {
  const [addr = '', prefix, ...rest] = v.split('/');
  const family = isIP(addr);
  if (!family || rest.length) return false;
  return prefix === undefined || (/^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128));
};
const privateCidr = (v: string) => {
  const parsed = parseNetworkRule(v);
  return 'rule' in parsed && isCidrRule(parsed.rule) && insidePrivateRange(parsed.rule);
};

/**
 * Every environment variable the server reads. Names and defaults of the original VoidRun's variables
 * are kept; the rest are ours. This is the only place `process.env` is read.
 */
const EnvSchema = z.object({
  SERVER_PORT: int(0, 65535).default(33944),
  SERVER_HOST: z.string().default(''),
  // Unset means the embedded SQLite store; set, it selects MongoDB.
  MONGO_URI: z
    .string()
    .regex(/^mongodb(\+srv)?:\/\//, 'a mongodb:// or mongodb+srv:// URI')
    .optional()
    .or(z.literal('').transform(() => undefined)),
  MONGO_DB: nonEmpty.default('vr-db'),
  // How long a request waits for an unreachable MongoDB before it answers 503.
  MONGO_TIMEOUT_MS: int(100, 600_000).default(5000),
  DATA_DIR: nonEmpty.default('./data'),
  BASE_IMAGES_DIR: nonEmpty.default('/var/lib/hyper-fleet/base-images'),
  INSTANCES_DIR: nonEmpty.default('/var/lib/hyper-fleet/instances'),
  KERNEL_PATH: nonEmpty.default('/var/lib/hyper-fleet/base-images/vmlinux'),
  BRIDGE_NAME: nonEmpty.default('vmbr0'),
  GATEWAY_IP: z.string().regex(/^\d{1,3}(\.\d{1,3}){3}\/\d{1,2}$/, 'an IPv4 address with a prefix length, like 192.168.100.1/22').default('192.168.100.1/22'),
  NETWORK_CIDR: z.string().regex(/^\d{1,3}(\.\d{1,3}){3}\/\d{1,2}$/, 'an IPv4 CIDR, like 192.168.100.0/22').default('192.168.100.0/22'),
  SUBNET_PREFIX: z.string().regex(/^(\d{1,3}\.){1,3}$/, 'an address prefix ending in a dot, like 192.168.100.').default('192.168.100.'),
  SYSTEM_USER_NAME: nonEmpty.default('System'),
  SYSTEM_USER_EMAIL: z.string().regex(/^[^@\s]+@[^@\s]+$/, 'an email address').default('system@local'),
  SANDBOX_DEFAULT_VCPUS: int(1, 64).default(1),
  SANDBOX_DEFAULT_MEMORY_MB: int(64, 1_048_576).default(1024),
  SANDBOX_DEFAULT_DISK_MB: int(64, 16_777_216).default(5120),
  SANDBOX_DEFAULT_IMAGE: nonEmpty.default('debian'),
  // Running sandboxes kept ready for creates of these shapes (README "Warm pool"); empty: none.
  WARM_POOL: warmPool,
  // Idempotency keys one org may hold at once (README "Idempotent requests"); a new key past it is a 429.
  IDEMPOTENCY_MAX_KEYS_PER_ORG: int(1, 10_000_000).default(10_000),
  SANDBOX_DRIVER: oneOf(['auto', 'container', 'qemu', 'cloud-hypervisor']).default('auto'),
  QEMU_BINARY: nonEmpty.default('qemu-system-x86_64'),
  CLOUD_HYPERVISOR_BINARY: nonEmpty.default('/usr/local/bin/cloud-hypervisor'),
  HEALTH_ENABLED: bool.default(true),
  HEALTH_INTERVAL_SEC: int(1, 86_400).default(60),
  HEALTH_CONCURRENCY: int(1, 1024).default(16),
  API_KEY_CACHE_TTL_SECONDS: int(0, 86_400).default(3600),
  LOG_LEVEL: oneOf(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  MAX_JSON_BODY_BYTES: int(1024, 1024 * 1024 * 1024).default(1024 * 1024),
  API_KEY_LAST_USED_FLUSH_SEC: int(1, 3600).default(30),
  SNAPSHOTS_DIR: nonEmpty.default('/var/lib/hyper-fleet/snapshots'),
  RUNC_ROOT: nonEmpty.default('/run/voidrun/runc'),
  SANDBOX_UID_BASE: int(1, 4_000_000_000).default(200_000),
  SANDBOX_PIDS_LIMIT: int(16, 1_000_000).default(1024),
  // Per-org quotas: every sandbox record counts (whatever its status) until it is deleted.
  ORG_MAX_SANDBOXES: int(1, 100_000).default(10),
  ORG_MAX_VCPUS: int(1, 100_000).default(8),
  ORG_MAX_MEMORY_MB: int(1024, 1_073_741_824).default(16384),
  // Sandboxes' diskMb plus the org's snapshot archives.
  ORG_MAX_DISK_MB: int(64, 1_073_741_824).default(65536),
  // Process ids kept for the host: sandboxes × SANDBOX_PIDS_LIMIT stay within kernel.pid_max minus these.
  HOST_RESERVED_PIDS: int(0, 4_194_304).default(4096),
  // The memory all sandboxes on this host may be promised together, in percent of its RAM.
  HOST_MEMORY_COMMIT_PERCENT: int(10, 10_000).default(200),
  // The disk all sandboxes on this host may be promised together, in percent of the free space.
  HOST_DISK_COMMIT_PERCENT: int(10, 10_000).default(200),
  SNAPSHOT_MAX_BYTES: int(1024 * 1024, Number.MAX_SAFE_INTEGER).default(5 * 1024 * 1024 * 1024),
  SANDBOX_LIST_DEFAULT_LIMIT: int(1, 100).default(20),
  // Unset: SANDBOX_SYNC_TIMEOUT_SEC (the original's name for it).
  AGENT_READY_TIMEOUT_MS: int(100, 600_000).optional(),
  MAX_UPLOAD_BYTES: int(1, Number.MAX_SAFE_INTEGER).default(10 * 1024 * 1024 * 1024),
  PTY_IDLE_TIMEOUT_SEC: int(0, 30 * 86_400).default(3600),
  WATCH_IDLE_TIMEOUT_SEC: int(1, 86_400).default(300),
  // File-watch sessions one org may hold at once (each is a watch in its sandbox's agent).
  ORG_MAX_WATCH_SESSIONS: int(1, 100_000).default(16),
  EXEC_OUTPUT_LIMIT_BYTES: int(1024, 1024 * 1024 * 1024).default(4 * 1024 * 1024),
  // The HTTP edge (README "The HTTP edge"). Our client batches at most 10 calls, hence the minimum.
  TRPC_MAX_BATCH_SIZE: int(10, 1000).default(10),
  ORG_MAX_CONCURRENT_EXECS: int(1, 100_000).default(16),
  ORG_MAX_STREAMS: int(1, 100_000).default(32),
  HTTP_HEADERS_TIMEOUT_MS: int(100, 600_000).default(10_000),
  HTTP_REQUEST_TIMEOUT_MS: int(100, 86_400_000).default(300_000),
  HTTP_MAX_CONNECTIONS: int(1, 1_000_000).default(2048),
  // 0: no per-address cap (behind a reverse proxy every client has the proxy's address).
  HTTP_MAX_CONNECTIONS_PER_ADDRESS: int(0, 1_000_000).default(0),
  WS_AUTH_TIMEOUT_MS: int(100, 600_000).default(10_000),
  // How long a sandbox's server has to start its answer once a proxied request was sent whole.
  PORT_ANSWER_TIMEOUT_MS: int(100, 86_400_000).default(60_000),
  // Set, `/metrics` answers only `Authorization: Bearer <token>`.
  METRICS_TOKEN: z
    .string()
    .optional()
    .transform((v) => v || undefined),
  // The original VoidRun's CORS settings (README "Configuration"): any origin by default.
  CORS_ENABLED: bool.default(true),
  CORS_ALLOW_ORIGINS: csv('*', (v) => /^(\*|https?:\/\/\S+)$/.test(v), '"*" or http(s):// origins, comma-separated'),
  CORS_ALLOW_METHODS: csv('GET,POST,PUT,PATCH,DELETE,OPTIONS', (v) => /^[A-Za-z]+$/.test(v), 'HTTP methods, comma-separated'),
  CORS_ALLOW_HEADERS: csv('Authorization,Content-Type,X-API-Key,X-Org-ID,Idempotency-Key,Last-Event-ID', headerName, 'header names, comma-separated'),
  CORS_EXPOSE_HEADERS: csv('', headerName, 'header names, comma-separated'),
  CORS_ALLOW_CREDENTIALS: bool.default(false),
  CORS_MAX_AGE_SEC: int(0, 86_400 * 365).default(600),
  // Off, `/metrics` is not served; METRICS_PATH moves it.
  METRICS_ENABLED: bool.default(true),
  METRICS_PATH: z.string().regex(/^\/[A-Za-z0-9._~/-]*$/, 'a path starting with /').default('/metrics'),
  // The original's polling settings: accepted, unused (gauges are read at scrape time from the host).
  METRICS_INTERVAL_SEC: int(0, 86_400).default(10),
  METRICS_DISK_INTERVAL_SEC: int(0, 86_400).default(10),
  METRICS_CONCURRENCY: int(1, 1024).default(16),
  // How long a create waits for the sandbox's agent, unless AGENT_READY_TIMEOUT_MS says otherwise.
  SANDBOX_SYNC_TIMEOUT_SEC: int(1, 3600).default(30),
  // Lifecycle (README "Lifecycle: timeouts, idle and auto-resume"). The longest timeout a sandbox may ask for; 0: no maximum.
  SANDBOX_MAX_TIMEOUT_SEC: int(0, 315_360_000).default(0),
  // The timeout of a sandbox whose create names none; 0: none (sandboxes stay until stopped or deleted).
  SANDBOX_DEFAULT_TIMEOUT_SEC: int(0, 315_360_000).default(0),
  // CPU use above this (percent of one CPU, read on the host) counts as activity for idle policies.
  SANDBOX_IDLE_CPU_PERCENT: int(1, 100_000).default(5),
  // How often timeouts and idle policies are checked (and the CPU use for idle sandboxes sampled).
  LIFECYCLE_TICK_MS: int(100, 60_000).default(1000),
  // A sandbox's egress when its create says none: every public address (allow) or only what its policy allows (deny).
  SANDBOX_DEFAULT_EGRESS: oneOf(['allow', 'deny']).default('allow'),
  // Set (> 0): every sandbox's egress byte cap and its ceiling (policies may ask for less, not more); 0: no cap unless a policy sets one.
  SANDBOX_EGRESS_BYTES_MAX: int(0, Number.MAX_SAFE_INTEGER).default(0),
  // The parts of the private ranges sandboxes' allow CIDRs may open (IPv4 CIDRs inside them); empty: none.
  SANDBOX_PRIVATE_ALLOW: csv('', privateCidr, 'IPv4 CIDRs inside 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10, comma-separated').transform((items) => items.map((v) => (parseNetworkRule(v) as { rule: string }).rule)),
  // Sandbox event streams (README "Events and webhooks"): events kept per sandbox, events waiting to be written, how often streams are pruned.
  EVENTS_RETENTION: int(10, 10_000_000).default(10_000),
  EVENTS_QUEUE_MAX: int(100, 10_000_000).default(10_000),
  EVENTS_PRUNE_INTERVAL_SEC: int(1, 86_400).default(60),
  // Per sandbox: non-lifecycle events admitted a second on average, and at once; past it they are counted into one events.dropped.
  EVENTS_SANDBOX_RATE: int(1, 1_000_000).default(20),
  EVENTS_SANDBOX_BURST: int(1, 1_000_000).default(200),
  // How often running sandboxes' listening ports and OOM kills are read on the host (port.* and sandbox.oom_killed events).
  EVENTS_POLL_INTERVAL_SEC: int(1, 3600).default(5),
  // Webhooks: attempts per event, the first retry's delay (doubling after), each attempt's deadline, deliveries in flight per org, webhooks per org.
  WEBHOOK_MAX_ATTEMPTS: int(1, 100).default(6),
  WEBHOOK_RETRY_BASE_MS: int(10, 3_600_000).default(10_000),
  WEBHOOK_TIMEOUT_MS: int(100, 120_000).default(5000),
  WEBHOOK_MAX_IN_FLIGHT_PER_ORG: int(1, 1000).default(4),
  // Deliveries one org may have pending (in flight, waiting, or waiting for a retry); past it new ones are not stored (counted, logged once a minute).
  WEBHOOK_MAX_PENDING_PER_ORG: int(1, 1_000_000).default(1000),
  ORG_MAX_WEBHOOKS: int(1, 1000).default(10),
  // Addresses webhooks may reach though loopback, private or link-local (IPv4/IPv6 CIDRs); empty: none (SSRF guard).
  WEBHOOK_ALLOW_PRIVATE: csv('', anyCidr, 'IPv4 or IPv6 CIDRs (a bare address is one address), comma-separated'),
  // Unset: bridge where the host can do it (root, ip and nft present), else none (loopback only).
  SANDBOX_NETWORK: oneOf(['bridge', 'none']).optional(),
  // Set, port N of sandbox ID is also served at https://N-ID.<PREVIEW_DOMAIN> (README "Ports and preview URLs").
  PREVIEW_DOMAIN: z
    .string()
    .regex(/^(?=.{1,200}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(:\d{1,5})?$/, 'a lowercase DNS name such as preview.example.com (optionally with :port)')
    .optional()
    .or(z.literal('').transform(() => undefined)),
  // The scheme of the preview URLs the API hands out (TLS is terminated in front of the server).
  PREVIEW_URL_SCHEME: oneOf(['https', 'http']).default('https'),
  // The guests' resolvers in the original; accepted and validated (README "Configuration").
  DNS_NAMESERVERS: csv('8.8.8.8,1.1.1.1', (v) => isIP(v) !== 0, 'IP addresses, comma-separated'),
  // The hostname of a sandbox without a name in the original; every sandbox here has one.
  SANDBOX_DEFAULT_HOSTNAME: z.string().regex(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/, 'a hostname: lowercase letters, digits and "-", at most 63').default('voidrun'),
  // Set, cloud-hypervisor boots this initramfs instead of the image's.
  INITRD_PATH: optionalString,
  // Set, appended to the microVMs' kernel command line (later parameters win).
  SANDBOX_KERNEL_CMDLINE: optionalString,
  // The microVMs' TAP device names start with this (the rest is 12 hex digits of the sandbox id).
  NET_PREFIX: z.string().regex(/^[a-z][a-z0-9]{0,2}$/, 'one to three lowercase letters or digits, starting with a letter').default('vr'),
  // Another name for NET_PREFIX; wins when both are set.
  TAP_PREFIX: z
    .string()
    .regex(/^[a-z][a-z0-9]{0,2}$/, 'one to three lowercase letters or digits, starting with a letter')
    .optional()
    .or(z.literal('').transform(() => undefined)),
  // Build the default image at startup (in the background) so the first sandbox needn't wait.
  PREPARE_DEFAULT_IMAGE: bool.default(true),
  DEBIAN_MIRROR: z.string().regex(/^https?:\/\//, 'an http(s) URL of a Debian mirror').default('http://deb.debian.org/debian'),
  // Images (README "Images"): recipe builds one org may have queued or running at once (more is a 429).
  IMAGE_BUILDS_PER_ORG: int(1, 1000).default(2),
  // Layers no image uses are removed once they are this old (the layer cache: a rebuild within it reuses them).
  IMAGE_LAYER_CACHE_TTL_SEC: int(0, 365 * 86_400).default(86_400),
  // Recipe builds (README "Images"): each step's bound (a run command, the package install), the build sandbox's disk, the log kept (its tail).
  IMAGE_BUILD_STEP_TIMEOUT_SEC: int(10, 86_400).default(1800),
  // A whole build's bound (its queue wait not counted), so one org's long recipe cannot hold the server's build queue for days.
  IMAGE_BUILD_TIMEOUT_SEC: int(60, 7 * 86_400).default(14_400),
  IMAGE_BUILD_DISK_MB: int(256, 1_048_576).default(4096),
  IMAGE_BUILD_LOG_MAX_BYTES: int(4096, 1024 * 1024 * 1024).default(1024 * 1024),
  // OCI image imports (README "Importing an OCI image"): the upload's bytes (and the image's files' declared bytes), and its entries (in all layers).
  IMAGE_IMPORT_MAX_BYTES: int(1024, Number.MAX_SAFE_INTEGER).default(4 * 1024 * 1024 * 1024),
  IMAGE_IMPORT_MAX_FILES: int(10, 100_000_000).default(500_000),
  // The fleet (README "Fleet"): all (one process, the default), api (stateless: auth, store,
  // placement, forwarding; no sandboxes) or host (runs sandboxes; registers in the store and serves
  // API nodes on HOST_INTERNAL_PORT at HOST_ADVERTISE_ADDRESS, authenticated by CLUSTER_TOKEN).
  VOIDRUN_ROLE: oneOf(['all', 'api', 'host']).default('all'),
  HOST_INTERNAL_PORT: int(1, 65535).default(33945),
  // Where API nodes reach this host's internal listener (an address, or host name); unset: the first non-loopback IPv4 address.
  HOST_ADVERTISE_ADDRESS: z.string().regex(/^[A-Za-z0-9.:-]{0,253}$/, 'an IP address or host name').default(''),
  // Shared by every node of a fleet; at least 32 characters. Required for the api and host roles.
  CLUSTER_TOKEN: secret32,
  // A host whose heartbeat is older than this is unresponsive: its sandboxes end with 'host-lost'.
  HOST_DEAD_AFTER_SEC: int(3, 3600).default(15),
  HOST_HEARTBEAT_SEC: int(1, 600).default(3),
  // Sandbox slots this host offers to placement (the fleet's count of sandboxes per host).
  HOST_SLOTS: int(1, 100_000).default(100),
  // Set, this key (sent as X-API-Key like any key) may list, drain and undrain hosts; at least 32 characters.
  ADMIN_API_KEY: secret32,
  // Set by release builds (the Dockerfile); a checkout reads the commit from .git.
  VOIDRUN_COMMIT: z.string().optional(),
  VOIDRUN_BUILD_TIME: z.string().optional(),
});

export type Config = z.infer<typeof EnvSchema>;

/** How many sandboxes WARM_POOL keeps ready (every entry's count). */
export function warmPoolMembers(entries: readonly WarmPoolEntry[]): number {
  return entries.reduce((n, e) => n + e.count, 0);
}

/**
 * The slots a fleet host offers placement: HOST_SLOTS less its warm pool's members, which run
 * there without a slot of their own (a create served from the pool takes the slot its API node
 * reserved, and the pool builds a member anew), so members and placed sandboxes stay within HOST_SLOTS.
 */
export function hostPlacementSlots(c: Pick<Config, 'HOST_SLOTS' | 'WARM_POOL'>): number {
  return c.HOST_SLOTS - warmPoolMembers(c.WARM_POOL);
}

/** The names of every variable the server reads (the deployment files are checked against it). */
export const configVariables: readonly string[] = Object.keys(EnvSchema.shape);

/** Variables whose values a config error does not repeat. */
const secretVariables = new Set(['CLUSTER_TOKEN', 'ADMIN_API_KEY', 'METRICS_TOKEN']);

/** Startup stops with this: one line naming the variable and what it expected. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** Parses the environment into a typed config; throws `ConfigError` naming the first bad variable. */
export function loadConfig(env: Record<string, string | undefined> = process.env): Config {
  const result = EnvSchema.safeParse(env);
  if (result.success) {
    const c = result.data;
    if (c.SANDBOX_MAX_TIMEOUT_SEC > 0 && c.SANDBOX_DEFAULT_TIMEOUT_SEC > c.SANDBOX_MAX_TIMEOUT_SEC) {
      throw new ConfigError(`Invalid configuration: SANDBOX_DEFAULT_TIMEOUT_SEC=${c.SANDBOX_DEFAULT_TIMEOUT_SEC} — expected at most SANDBOX_MAX_TIMEOUT_SEC (${c.SANDBOX_MAX_TIMEOUT_SEC})`);
    }
    for (const name of ['CLUSTER_TOKEN', 'ADMIN_API_KEY'] as const) {
      if (c[name]?.startsWith('REPLACE-WITH')) throw new ConfigError(`Invalid configuration: ${name} is still the placeholder of the deployment files — expected a secret of your own (e.g. openssl rand -hex 32)`);
    }
    if (c.VOIDRUN_ROLE !== 'all' && !c.CLUSTER_TOKEN) {
      throw new ConfigError(`Invalid configuration: CLUSTER_TOKEN="" — expected a secret of at least 32 characters shared by every node (VOIDRUN_ROLE=${c.VOIDRUN_ROLE} needs it)`);
    }
    if (c.VOIDRUN_ROLE !== 'all' && !c.MONGO_URI) {
      throw new ConfigError(`Invalid configuration: MONGO_URI="" — expected the fleet's MongoDB (VOIDRUN_ROLE=${c.VOIDRUN_ROLE}: every node shares one store; the embedded SQLite is one process's)`);
    }
    if (c.VOIDRUN_ROLE === 'host' && hostPlacementSlots(c) < 1) {
      throw new ConfigError(`Invalid configuration: HOST_SLOTS=${c.HOST_SLOTS} — expected more than the ${warmPoolMembers(c.WARM_POOL)} sandboxes WARM_POOL keeps ready on this host (members count against its slots)`);
    }
    if (c.HOST_DEAD_AFTER_SEC < 2 * c.HOST_HEARTBEAT_SEC) {
      throw new ConfigError(`Invalid configuration: HOST_DEAD_AFTER_SEC=${c.HOST_DEAD_AFTER_SEC} — expected at least twice HOST_HEARTBEAT_SEC (${c.HOST_HEARTBEAT_SEC})`);
    }
    return c;
  }
  const issue = result.error.issues[0]!;
  const name = String(issue.path[0]);
  // A secret's value is not repeated (it reaches logs): its length says enough.
  const shown = secretVariables.has(name) ? `<${(env[name] ?? '').length} characters, not shown>` : JSON.stringify(env[name] ?? '');
  throw new ConfigError(`Invalid configuration: ${name}=${shown} — expected ${issue.message}`);
}
