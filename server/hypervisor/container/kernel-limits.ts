import { readFileSync, writeFileSync } from 'node:fs';
import type { Logger } from 'pino';
import { runHostCommand } from '../host-process.js';

/**
 * Kernel limits that every container sandbox would otherwise share with every other one.
 *
 * Every sandbox maps its root onto the same host uid, and host root (through runc) creates every
 * sandbox's user namespace, so limits the kernel counts per host uid, or charges to a user
 * namespace's creator, are one budget for all tenants: one sandbox reaching them would make every
 * other sandbox's (and the agent's) inotify_init, epoll_ctl, F_SETPIPE_SZ or fanotify_init fail.
 *
 * - inotify and fanotify instances, watches and marks are counted per user namespace and uid and
 *   again, for every sandbox, against host root under the host's `fs.inotify.max_user_*` and
 *   `fs.fanotify.max_user_*`. Each sandbox's own user namespace gets the usual limits (per uid in it:
 *   `SANDBOX_USERNS_LIMITS`), and the host's are raised to the kernel's maximum.
 * - epoll watches (`fs.epoll.max_user_watches`) and pipe buffer pages (`fs.pipe-user-pages-soft`,
 *   `-hard`) are counted per host uid only, with no per-namespace limit: the host's are raised to
 *   the maximum (0 is unlimited for the pipe limits).
 *
 * A tenant switching among its 65,536 uids multiplies any per-uid allowance, so any host limit it
 * could reach with them would let it starve the others. What bounds a sandbox instead is its memory
 * cgroup: the kernel charges it the memory of its inotify and fanotify groups and marks, epoll
 * watches (`eventpoll_epi` and `eventpoll_pwq` are accounted slabs) and pipe buffers.
 *
 * Message queue bytes, pending signals and locked shared memory (RLIMIT_MSGQUEUE, _SIGPENDING,
 * _MEMLOCK) are the other kind: see `RUNC_UNLIMITED_RLIMITS`.
 */
export const SANDBOX_USERNS_LIMITS = {
  max_inotify_instances: 128,
  max_inotify_watches: 65_536,
  max_fanotify_groups: 128,
  max_fanotify_marks: 65_536,
} as const;
/** The inotify limits of each sandbox's user namespace (per uid in it). */
export const SANDBOX_INOTIFY = { instances: SANDBOX_USERNS_LIMITS.max_inotify_instances, watches: SANDBOX_USERNS_LIMITS.max_inotify_watches } as const;
/** The most the kernel accepts for fs.inotify.max_user_* and fs.fanotify.max_user_*. */
export const HOST_INOTIFY_MAX = 2 ** 31 - 1;
/** The most the kernel accepts for fs.epoll.max_user_watches (LONG_MAX), as written to /proc/sys. */
export const HOST_EPOLL_WATCHES_MAX = '9223372036854775807';

/** A host sysctl and the value that leaves it unlimited for all practical purposes. */
interface HostLimit {
  sysctl: string;
  target: bigint;
  /** Whether `current` already allows at least as much as `target` (0 is "no limit" for some). */
  enough(current: bigint): boolean;
}

const atLeast = (sysctl: string, target: bigint): HostLimit => ({ sysctl, target, enough: (c) => c >= target });
const zeroIsUnlimited = (sysctl: string): HostLimit => ({ sysctl, target: 0n, enough: (c) => c === 0n });

/** The host sysctls `raiseHostKernelLimits` raises. */
export const HOST_LIMITS: readonly HostLimit[] = [
  atLeast('fs.inotify.max_user_instances', BigInt(HOST_INOTIFY_MAX)),
  atLeast('fs.inotify.max_user_watches', BigInt(HOST_INOTIFY_MAX)),
  atLeast('fs.fanotify.max_user_groups', BigInt(HOST_INOTIFY_MAX)),
  atLeast('fs.fanotify.max_user_marks', BigInt(HOST_INOTIFY_MAX)),
  atLeast('fs.epoll.max_user_watches', BigInt(HOST_EPOLL_WATCHES_MAX)),
  zeroIsUnlimited('fs.pipe-user-pages-soft'),
  zeroIsUnlimited('fs.pipe-user-pages-hard'),
];

/** The /proc/sys file of a sysctl name (`fs.pipe-user-pages-soft` → /proc/sys/fs/pipe-user-pages-soft). */
export const sysctlFile = (sysctl: string): string => `/proc/sys/${sysctl.replaceAll('.', '/')}`;

/**
 * Raises the host's per-uid limits that container sandboxes share (`HOST_LIMITS`: inotify,
 * fanotify, epoll watches, pipe buffers) so that only each sandbox's own user namespace limits and
 * memory cgroup bound it; each change is logged, and a limit already as high is left alone (never
 * lowered). A sysctl this kernel lacks (fanotify not built in) is skipped. Warns when runc cannot
 * be given `RUNC_UNLIMITED_RLIMITS` (`canRaiseRlimits`).
 */
export function raiseHostKernelLimits(log: Logger): void {
  for (const limit of HOST_LIMITS) {
    let current: bigint;
    try {
      current = BigInt(readFileSync(sysctlFile(limit.sysctl), 'utf8').trim());
    } catch {
      continue;
    }
    if (limit.enough(current)) continue;
    writeFileSync(sysctlFile(limit.sysctl), String(limit.target));
    log.info({ sysctl: limit.sysctl, from: String(current), to: String(limit.target) }, 'raised a per-uid host limit: container sandboxes are bounded per user namespace and by their memory cgroup');
  }
  if (!canRaiseRlimits()) log.warn('no CAP_SYS_RESOURCE: runc keeps the host rlimits, so POSIX message queues, pending signals and locked shared memory stay one budget shared by all container sandboxes');
}

/**
 * Sets the inotify and fanotify limits (`SANDBOX_USERNS_LIMITS`) of a running sandbox's user
 * namespace (`pid`: a host pid inside it), from the host with `voidrun-userns-limits`
 * (`userns-limits.c`): a write to /proc/sys/user/* applies to the writer's user namespace and needs
 * CAP_SYS_RESOURCE there, which a process entering it from outside has; sandbox processes lack the
 * capability, and their /proc/sys is read-only.
 */
export async function limitSandboxKernelLimits(helper: string, pid: number): Promise<void> {
  await runHostCommand(helper, [String(pid), ...Object.entries(SANDBOX_USERNS_LIMITS).map(([name, value]) => `${name}=${value}`)], 10_000);
}

/**
 * The rlimits runc runs with (`prlimit` arguments): message queue bytes, pending signals and locked
 * shared memory are charged, through ucounts, to every level of user namespaces, and a namespace's
 * parent level is held to the rlimit its creator had when creating it (`create_user_ns` copies
 * RLIMIT_MSGQUEUE, _SIGPENDING and _MEMLOCK into the namespace's `rlimit_max`). runc, as host root,
 * creates every sandbox's namespace, so with the host's default rlimits every sandbox would share
 * one 800 KiB of message queues and ~96k pending signals. With runc's unlimited, the host level does
 * not limit a sandbox; its processes get `SANDBOX_RLIMITS` (per uid in the sandbox) through the OCI
 * spec, and their memory (queued messages, signals, shm pages) is charged to its memory cgroup.
 */
export const RUNC_UNLIMITED_RLIMITS = ['--msgqueue=unlimited', '--sigpending=unlimited', '--memlock=unlimited'] as const;

const CAP_SYS_RESOURCE = 24n;
let raisable: boolean | undefined;
/**
 * Whether this process may raise hard rlimits (CAP_SYS_RESOURCE in its effective set), which
 * running runc with `RUNC_UNLIMITED_RLIMITS` needs. Some hosts (VMs or containers the server runs
 * in) drop the capability; there message queues and pending signals stay one budget for all sandboxes.
 */
export function canRaiseRlimits(): boolean {
  raisable ??= ((BigInt(`0x${/^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0'}`) >> CAP_SYS_RESOURCE) & 1n) === 1n;
  return raisable;
}

/**
 * Each sandbox process's RLIMIT_MSGQUEUE, _SIGPENDING and _MEMLOCK (soft = hard, so the sandbox
 * cannot raise them): the usual host defaults, counted per uid in its user namespace.
 */
export const SANDBOX_RLIMITS: readonly { type: string; hard: number; soft: number }[] = [
  { type: 'RLIMIT_MSGQUEUE', hard: 819_200, soft: 819_200 },
  { type: 'RLIMIT_SIGPENDING', hard: 65_536, soft: 65_536 },
  { type: 'RLIMIT_MEMLOCK', hard: 8 * 1024 * 1024, soft: 8 * 1024 * 1024 },
];
