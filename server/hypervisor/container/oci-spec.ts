import type { SandboxSpec } from '../types.js';
import type { AgentRuntime } from './agent-runtime.js';
import { SANDBOX_RLIMITS } from './kernel-limits.js';
import { buildSeccompProfile } from './seccomp-profile.js';

/** Where a sandbox's pieces are, on the host and inside. */
export interface ContainerPaths {
  /** The overlay mount (image + writable layer): the container's root. */
  rootfs: string;
  /**
   * The mounted agent runtime (`<dir>/agent`: init, node, its loader and libraries, the agent
   * bundle, node-pty; `<dir>/empty`), bound read-only into the sandbox.
   */
  runtime: AgentRuntime;
}

export interface IdMapping {
  /** First host uid/gid of the range the sandbox's ids 0…size-1 map onto. */
  hostId: number;
  size: number;
}

/** A network namespace made on the host for the sandbox (bridge networking), and what goes with it. */
export interface ContainerNetwork {
  /** The namespace runc joins (`/run/netns/…`), owned by the host's user namespace. */
  netnsPath: string;
  /** A sysfs the host mounted for that namespace (the sandbox's user namespace may not mount one). */
  sysfsPath: string;
  /** The sandbox's /etc/resolv.conf. */
  resolvConfPath: string;
}

export interface OciSpecOptions {
  spec: SandboxSpec;
  paths: ContainerPaths;
  idMap: IdMapping;
  pidsLimit: number;
  cgroupsPath: string;
  /** Bridge networking; without it the sandbox gets a namespace of its own with loopback only. */
  network?: ContainerNetwork;
}

/** Inside the sandbox. */
export const AGENT_DIR = '/opt/voidrun';
/**
 * The agent's listening socket arrives as this inherited file descriptor (runc --preserve-fds):
 * the driver binds it to a path in a host directory the sandbox cannot see or write, so nothing
 * inside the sandbox can redirect the server's connections.
 */
export const AGENT_LISTEN_FD = 3;
/** The init truncates the host's sandbox.log (with a marker line) whenever it would pass this size. */
export const SANDBOX_LOG_LIMIT_BYTES = 1024 * 1024;

const CPU_PERIOD_US = 100_000;
const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** The capabilities container runtimes grant by default (Docker's set). */
export const defaultCapabilities = [
  'CAP_CHOWN',
  'CAP_DAC_OVERRIDE',
  'CAP_FSETID',
  'CAP_FOWNER',
  'CAP_MKNOD',
  'CAP_NET_RAW',
  'CAP_SETGID',
  'CAP_SETUID',
  'CAP_SETFCAP',
  'CAP_SETPCAP',
  'CAP_NET_BIND_SERVICE',
  'CAP_SYS_CHROOT',
  'CAP_KILL',
  'CAP_AUDIT_WRITE',
];

/**
 * The OCI runtime `config.json` for a sandbox. Pure: no I/O, so every isolation decision is visible
 * and table-tested here.
 *
 * - Namespaces: user (ids mapped onto `idMap`, so sandbox root is an unprivileged host uid), pid,
 *   ipc, uts (hostname = sandbox name), mount, network and cgroup. The network namespace is a new
 *   one with loopback only, or with `network` the host-made one on the bridge, joined by path: it
 *   belongs to the host's user namespace, so sandbox root holds no capability over it. Its /sys is
 *   then the sysfs the host mounted for it (read-only), and /etc/resolv.conf is bound read-only.
 * - PID 1 is our init (`init.c`: reaps orphans, forwards signals, holds no agent socket, bounds the
 *   log), bound read-only at /opt/voidrun from the agent runtime image with the node binary, its
 *   loader and libraries, the agent bundle it starts and node-pty; nothing else of the host is
 *   mounted, and the sandbox's mountinfo shows the image's loop device and paths inside the image.
 * - cgroup limits: memory (no swap beyond it), CPU quota = `cpu` cores, a pids limit.
 */
export function buildOciSpec(o: OciSpecOptions) {
  const { spec, paths, idMap } = o;
  // The sandbox's envVars reach the agent encoded, not as its own environment, so a user's
  // NODE_OPTIONS (say) configures the commands they run and never the agent itself.
  const env = {
    PATH: DEFAULT_PATH,
    HOME: '/root',
    TERM: 'xterm-256color',
    LANG: 'C.UTF-8',
    VOIDRUN_SANDBOX_ID: spec.id,
    VOIDRUN_AGENT_FD: String(AGENT_LISTEN_FD),
    VOIDRUN_SANDBOX_ENV: Buffer.from(JSON.stringify(spec.envVars)).toString('base64'),
    // ws loads these optional modules if it finds them; they are not installed, so Node would
    // search the image's /node_modules and HOME, where the tenant can put anything. Not passed on
    // to commands.
    WS_NO_BUFFER_UTIL: '1',
    WS_NO_UTF_8_VALIDATE: '1',
    ...Object.fromEntries(Object.entries(spec.agentSettings ?? {}).filter(([k]) => k.startsWith('VOIDRUN_'))),
  };
  const memBytes = spec.memMb * 1024 * 1024;
  const ro = ['rbind', 'ro', 'nosuid', 'nodev'];
  return {
    ociVersion: '1.0.2',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      // A small young generation: the agent's garbage is many short strings (terminal and command
      // output); the default lets the heap balloon under a flood before it collects.
      args: [
        `${AGENT_DIR}/init`,
        String(SANDBOX_LOG_LIMIT_BYTES),
        '--',
        // The host's loader and libraries, never the image's (which the tenant can replace); no
        // OpenSSL config from the image's /etc/ssl either (it can load modules).
        ...(paths.runtime.loader ? [`${AGENT_DIR}/lib/ld.so`, '--inhibit-cache', '--library-path', `${AGENT_DIR}/lib`] : []),
        `${AGENT_DIR}/node`,
        `--openssl-config=${AGENT_DIR}/openssl.cnf`,
        '--max-semi-space-size=2',
        // One V8 helper thread, not four: the agent is mostly idle, and each thread costs its stack
        // and a malloc arena (idle agent: 23.5 → 17.9 MiB private memory).
        '--v8-pool-size=1',
        `${AGENT_DIR}/agent.cjs`,
      ],
      env: Object.entries(env).map(([k, v]) => `${k}=${v}`),
      cwd: '/root',
      capabilities: {
        bounding: defaultCapabilities,
        effective: defaultCapabilities,
        permitted: defaultCapabilities,
      },
      // The agent must outlive a memory hog: a negative oomScoreAdj is refused inside a user
      // namespace, so instead the agent raises the score of every command it starts.
      noNewPrivileges: false,
      // Per uid in the sandbox's user namespace; runc itself runs with them unlimited, which makes
      // that the namespace's parent-level limit (kernel-limits.ts, RUNC_UNLIMITED_RLIMITS).
      rlimits: SANDBOX_RLIMITS.map((r) => ({ ...r })),
    },
    root: { path: paths.rootfs, readonly: false },
    hostname: hostnameFor(spec.name),
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620'] },
      { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
      { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
      o.network
        ? { destination: '/sys', type: 'bind', source: o.network.sysfsPath, options: ['rbind', 'ro', 'nosuid', 'noexec', 'nodev'] }
        : { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
      // init, node, lib/, agent.cjs, openssl.cnf (empty) and node_modules/node-pty, where Node's
      // resolution from agent.cjs finds it.
      { destination: AGENT_DIR, type: 'bind', source: `${paths.runtime.dir}/agent`, options: ro },
      // Read by every dynamic loader, the host's too: empty, so nothing is preloaded into the agent.
      { destination: '/etc/ld.so.preload', type: 'bind', source: `${paths.runtime.dir}/empty`, options: ro },
      ...(o.network ? [{ destination: '/etc/resolv.conf', type: 'bind', source: o.network.resolvConfPath, options: ro }] : []),
    ],
    linux: {
      uidMappings: [{ containerID: 0, hostID: idMap.hostId, size: idMap.size }],
      gidMappings: [{ containerID: 0, hostID: idMap.hostId, size: idMap.size }],
      namespaces: [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }, o.network ? { type: 'network', path: o.network.netnsPath } : { type: 'network' }, { type: 'user' }, { type: 'cgroup' }],
      cgroupsPath: o.cgroupsPath,
      resources: {
        devices: [{ allow: false, access: 'rwm' }],
        memory: { limit: memBytes, swap: memBytes },
        cpu: { quota: Math.round(spec.cpu * CPU_PERIOD_US), period: CPU_PERIOD_US },
        pids: { limit: o.pidsLimit },
      },
      seccomp: buildSeccompProfile(),
      maskedPaths: [
        '/proc/acpi',
        '/proc/asound',
        '/proc/kcore',
        '/proc/keys',
        '/proc/latency_stats',
        '/proc/timer_list',
        '/proc/timer_stats',
        '/proc/sched_debug',
        '/proc/scsi',
        '/sys/firmware',
        // Every loop device's backing file (each sandbox's disk image, under INSTANCES_DIR), and
        // what else tells of other sandboxes' disks: their I/O counters, mounted filesystems, count.
        '/sys/devices/virtual/block',
        '/sys/block',
        '/sys/class/block',
        '/sys/fs/ext4',
        '/proc/diskstats',
        '/proc/fs',
      ],
      readonlyPaths: ['/proc/bus', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'],
    },
  };
}

export type OciSpec = ReturnType<typeof buildOciSpec>;

/** The sandbox name as a hostname: names may be 253 characters, hostnames 63 (cut at a dot or dash). */
export function hostnameFor(name: string): string {
  return name.length <= 63 ? name : name.slice(0, 63).replace(/[.-]+$/, '');
}
