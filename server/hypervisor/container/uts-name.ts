import { spawn } from 'node:child_process';
import { open, stat } from 'node:fs/promises';
import { sandboxInit } from './listening-ports.js';
import { hostnameFor } from './oci-spec.js';

/**
 * Sets a running container sandbox's hostname from the host (a claimed warm-pool member takes its
 * new name without a restart; the agent cannot, the sandbox has no CAP_SYS_ADMIN over it): the
 * host's `hostname` run by `nsenter` in the UTS namespace of the sandbox's init and no other
 * (~2 ms). The namespace is opened while the pid is checked to be the sandbox's before and after,
 * and refused if it is the host's own, so a pid reused by another process never renames the host.
 */
export async function setContainerHostname(pidFile: string, cgroupName: string, name: string): Promise<void> {
  const init = await sandboxInit(pidFile, cgroupName);
  if (!init) throw new Error('the sandbox has no running init');
  const ns = await open(`/proc/${init.pid}/ns/uts`, 'r');
  try {
    const [theirs, ours] = await Promise.all([ns.stat(), stat('/proc/self/ns/uts')]);
    if (!(await init.isSandbox()) || theirs.ino === ours.ino) throw new Error("the sandbox's init is gone");
    await new Promise<void>((resolve, reject) => {
      const child = spawn('nsenter', ['--uts=/proc/self/fd/3', '--', 'hostname', '--', hostnameFor(name)], { stdio: ['ignore', 'ignore', 'pipe', ns.fd] });
      let stderr = '';
      child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-512)));
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      child.once('error', (err) => (clearTimeout(timer), reject(err)));
      child.once('close', (code) => {
        clearTimeout(timer);
        if (code === 0) resolve();
        else reject(new Error(`nsenter hostname failed: ${stderr.trim().split('\n').pop() ?? `exit ${code}`}`));
      });
    });
  } finally {
    await ns.close();
  }
}
