import { readFileSync, readdirSync } from 'node:fs';

/** Whether something is mounted at `path` in this process's mount namespace. */
export function mountedAt(path: string): boolean {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[1] === path);
}

/** Loop devices whose backing file is `file` (none once every mount of its filesystem is gone). */
export function loopDevicesOf(file: string): string[] {
  const devices: string[] = [];
  for (const name of readdirSync('/sys/block').filter((n) => n.startsWith('loop'))) {
    try {
      if (readFileSync(`/sys/block/${name}/loop/backing_file`, 'utf8').trim() === file) devices.push(`/dev/${name}`);
    } catch {
      // Not attached.
    }
  }
  return devices;
}
