import { open, readFile } from 'node:fs/promises';
import { listeningPorts, MAX_TCP_TABLE_BYTES } from '../../../shared/listening-ports.js';

/**
 * A container sandbox's listening TCP ports, read host-side from its init process's network
 * tables (`/proc/<pid>/net/tcp`, `tcp6`): what the kernel says, never what the agent says. The pid
 * comes from runc's pid file; it counts only while `/proc/<pid>/cgroup` names the sandbox's
 * cgroup `cgroupName`, checked before and after the read, so a pid reused by another process
 * (the sandbox stopped meanwhile) never lends its namespace's ports. null when the sandbox has no
 * live init.
 */
export async function containerListeningPorts(pidFile: string, cgroupName: string): Promise<number[] | null> {
  const init = await sandboxInit(pidFile, cgroupName);
  if (!init) return null;
  const { pid, isSandbox } = init;
  const tables = await Promise.all(['tcp', 'tcp6'].map((t) => readTable(`/proc/${pid}/net/${t}`)));
  if (!(await isSandbox())) return null;
  return listeningPorts(...tables);
}

/**
 * A container sandbox's init pid from runc's pid file, while `/proc/<pid>/cgroup` names the
 * sandbox's cgroup `cgroupName`; `isSandbox` checks that again (around a use of the pid, so a pid
 * reused by another process never lends its namespaces). null when the sandbox has no live init.
 */
export async function sandboxInit(pidFile: string, cgroupName: string): Promise<{ pid: number; isSandbox: () => Promise<boolean> } | null> {
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (!Number.isInteger(pid) || pid <= 1) return null;
  const inCgroup = new RegExp(`/${cgroupName.replace(/[^a-zA-Z0-9_-]/g, '')}(/|$)`);
  const isSandbox = async () => (await readFile(`/proc/${pid}/cgroup`, 'utf8').catch(() => '')).split('\n').some((line) => inCgroup.test(line.split(':').slice(2).join(':')));
  return (await isSandbox()) ? { pid, isSandbox } : null;
}

/** A proc table's text, at most MAX_TCP_TABLE_BYTES of it ('' when it cannot be read). */
async function readTable(path: string): Promise<string> {
  const file = await open(path, 'r').catch(() => null);
  if (!file) return '';
  try {
    const chunks: Buffer[] = [];
    let total = 0;
    while (total < MAX_TCP_TABLE_BYTES) {
      const buf = Buffer.alloc(Math.min(64 * 1024, MAX_TCP_TABLE_BYTES - total));
      const { bytesRead } = await file.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      chunks.push(buf.subarray(0, bytesRead));
      total += bytesRead;
    }
    return Buffer.concat(chunks).toString('latin1');
  } catch {
    return '';
  } finally {
    await file.close();
  }
}
