import { readFileSync, writeFileSync } from 'node:fs';
import type { Logger } from 'pino';
import { runHostCommand } from '../host-process.js';

/**
 * inotify instances and watches are counted per user namespace and uid, and again, for every
 * sandbox, against host root in the host's namespace (host root creates every sandbox's user
 * namespace) under the host's `fs.inotify.max_user_*`: with the host's default of 128 instances,
 * one sandbox could hold them all and every other sandbox's file watch would fail.
 *
 * So each sandbox's own user namespace gets the usual limits (per uid inside it), and the host's
 * limits are raised to the kernel's maximum: a tenant switching among its 65,536 uids multiplies
 * its own allowance, so any host limit it could reach with them would let it starve the others.
 * What bounds a sandbox instead is its memory cgroup, which the kernel memory of its instances and
 * watches is charged to (about 1 KiB an instance).
 */
export const SANDBOX_INOTIFY = { instances: 128, watches: 65_536 } as const;
/** The most the kernel accepts for fs.inotify.max_user_instances and max_user_watches. */
export const HOST_INOTIFY_MAX = 2 ** 31 - 1;

const hostFiles = { instances: '/proc/sys/fs/inotify/max_user_instances', watches: '/proc/sys/fs/inotify/max_user_watches' } as const;

/** Raises the host's inotify limits to HOST_INOTIFY_MAX (logged); never lowers them. */
export function raiseHostInotifyLimits(log: Logger): void {
  for (const key of ['instances', 'watches'] as const) {
    const current = Number(readFileSync(hostFiles[key], 'utf8').trim());
    if (current >= HOST_INOTIFY_MAX) continue;
    writeFileSync(hostFiles[key], String(HOST_INOTIFY_MAX));
    log.info({ sysctl: `fs.inotify.max_user_${key}`, from: current, to: HOST_INOTIFY_MAX }, 'raised the host inotify limit: container sandboxes are bounded per user namespace and by their memory cgroup');
  }
}

/**
 * Sets the inotify limits of a running sandbox's user namespace (`pid`: a host pid inside it),
 * from the host with `voidrun-userns-limits` (`userns-limits.c`): a write to /proc/sys/user/*
 * applies to the writer's user namespace and needs CAP_SYS_RESOURCE there, which a process entering
 * it from outside has; sandbox processes lack the capability, and their /proc/sys is read-only.
 */
export async function limitSandboxInotify(helper: string, pid: number): Promise<void> {
  await runHostCommand(helper, [String(pid), `max_inotify_instances=${SANDBOX_INOTIFY.instances}`, `max_inotify_watches=${SANDBOX_INOTIFY.watches}`], 10_000);
}
