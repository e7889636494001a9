import { readFileSync, writeFileSync } from 'node:fs';
import type { Logger } from 'pino';
import { runHostCommand } from '../host-process.js';

/**
 * inotify instances and watches are counted per user namespace and uid, and again, for every
 * sandbox, against host root in the host's namespace (host root creates every sandbox's user
 * namespace): with the host's limits alone (128 instances by default), one sandbox could hold them
 * all and every other sandbox's file watch would fail. So each sandbox's own user namespace gets
 * these limits (per uid inside it), and the host's limits are raised to cover many sandboxes.
 */
export const SANDBOX_INOTIFY = { instances: 128, watches: 65_536 } as const;
/** How many sandboxes at their full inotify use the host's limits are raised to hold. */
const HOST_INOTIFY_SANDBOXES = 256;

const hostFiles = { instances: '/proc/sys/fs/inotify/max_user_instances', watches: '/proc/sys/fs/inotify/max_user_watches' } as const;

/** Raises the host's inotify limits to hold HOST_INOTIFY_SANDBOXES sandboxes with margin; never lowers them. */
export function raiseHostInotifyLimits(log: Logger): void {
  for (const key of ['instances', 'watches'] as const) {
    const file = hostFiles[key];
    const current = Number(readFileSync(file, 'utf8').trim());
    const wanted = SANDBOX_INOTIFY[key] * HOST_INOTIFY_SANDBOXES + current;
    if (current >= SANDBOX_INOTIFY[key] * HOST_INOTIFY_SANDBOXES) continue;
    writeFileSync(file, String(wanted));
    log.info({ sysctl: `fs.inotify.max_user_${key}`, from: current, to: wanted }, 'raised the host inotify limit for container sandboxes');
  }
}

/**
 * Sets the inotify limits of a running sandbox's user namespace (`pid`: a host pid inside it),
 * from the host: a write to /proc/sys/user/* applies to the writer's user namespace and needs
 * CAP_SYS_RESOURCE there, which a process entering it from outside has (as the namespace's root,
 * so the shell it execs keeps it); sandbox processes lack the capability, and their /proc/sys is
 * read-only.
 */
export async function limitSandboxInotify(pid: number): Promise<void> {
  const script = `echo ${SANDBOX_INOTIFY.instances} > /proc/sys/user/max_inotify_instances && echo ${SANDBOX_INOTIFY.watches} > /proc/sys/user/max_inotify_watches`;
  await runHostCommand('nsenter', ['--target', String(pid), '--user', '--', 'sh', '-c', script], 10_000);
}
