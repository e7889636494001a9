import { existsSync, readFileSync } from 'node:fs';
import type { HostUsage } from '../types.js';

/**
 * A small kernel file's text, or null when it is not there. Read synchronously: the kernel makes
 * up a cgroup file's few bytes at once (nothing waits on a disk), and four calls through the thread
 * pool (open, stat, read, close) cost more than the read — this runs beside every exec.
 */
const read = (file: string): string | null => {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return null;
  }
};

/** Each stat key's line pattern, compiled once (these run beside every exec). */
const statPatterns = new Map<string, RegExp>();

/** One `key value` line of a cgroup stat file, as a number (0 when absent). */
function statValue(text: string | null, key: string): number {
  let pattern = statPatterns.get(key);
  if (!pattern) statPatterns.set(key, (pattern = new RegExp(`^${key} (\\d+)$`, 'm')));
  const m = pattern.exec(text ?? '');
  return m ? Number(m[1]) : 0;
}

/**
 * Whether the cgroup hierarchy at `root` is v2 (unified), looked at once per root: reading the
 * other layout's file first would cost a failed open, and its exception, beside every exec.
 */
const unified = new Map<string, boolean>();
function isUnified(root: string): boolean {
  let v2 = unified.get(root);
  if (v2 === undefined) unified.set(root, (v2 = existsSync(`${root}/cgroup.controllers`)));
  return v2;
}

/**
 * A container's usage from its cgroup (`cgroupsPath` as given to runc): cgroup v1 (`cpuacct.usage`,
 * `memory.usage_in_bytes`) or v2 (`cpu.stat`, `memory.current`), memory without its inactive file
 * cache (the working set, as the kubelet counts it). null when the cgroup is gone. Reads four
 * small kernel files; nothing from inside the sandbox.
 */
export async function cgroupUsage(cgroupsPath: string, root = '/sys/fs/cgroup'): Promise<HostUsage | null> {
  const v1Cpu = isUnified(root) ? null : read(`${root}/cpuacct${cgroupsPath}/cpuacct.usage`);
  if (v1Cpu !== null) {
    const [usage, stat] = [read(`${root}/memory${cgroupsPath}/memory.usage_in_bytes`), read(`${root}/memory${cgroupsPath}/memory.stat`)];
    const memory = Number(usage ?? 0) - statValue(stat, 'total_inactive_file');
    return { cpuSeconds: Number(v1Cpu) / 1e9, memoryBytes: Math.max(0, memory) };
  }
  const cpuStat = read(`${root}${cgroupsPath}/cpu.stat`);
  if (cpuStat === null) return null;
  const [current, stat] = [read(`${root}${cgroupsPath}/memory.current`), read(`${root}${cgroupsPath}/memory.stat`)];
  const memory = Number(current ?? 0) - statValue(stat, 'inactive_file');
  return { cpuSeconds: statValue(cpuStat, 'usage_usec') / 1e6, memoryBytes: Math.max(0, memory) };
}

/**
 * How many processes of the cgroup the kernel's OOM killer killed: `oom_kill` of cgroup v1's
 * `memory.oom_control` or v2's `memory.events` (the counter starts at 0 with the cgroup, i.e. at
 * each start of the sandbox). null when the cgroup is gone. A kernel file; nothing from the sandbox.
 */
export async function cgroupOomKills(cgroupsPath: string, root = '/sys/fs/cgroup'): Promise<number | null> {
  const [v1, v2] = [`${root}/memory${cgroupsPath}/memory.oom_control`, `${root}${cgroupsPath}/memory.events`];
  const text = isUnified(root) ? (read(v2) ?? read(v1)) : (read(v1) ?? read(v2));
  return text === null ? null : statValue(text, 'oom_kill');
}
