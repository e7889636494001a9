import { closeSync, fstatSync, openSync, readFileSync, readSync } from 'node:fs';

/** What drivers ask about the host processes they start (VMMs, containers) and their logs. */

/** Whether `pid` is a live process (a zombie counts as gone: it has exited, only a wait is missing). */
export function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return false;
  }
}

/** Resolves true once `pid` is gone, false if it is still alive after `timeoutMs`. */
export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 10));
  }
  return true;
}

/** The last lines of a log, reading at most its last 4 KiB, for error messages. */
export function lastLogLines(file: string, lines = 3): string {
  try {
    const fd = openSync(file, 'r');
    try {
      const size = fstatSync(fd).size;
      const buf = Buffer.alloc(Math.min(4096, size));
      readSync(fd, buf, 0, buf.length, size - buf.length);
      return buf.toString('utf8').trim().split('\n').slice(-lines).join(' | ') || '(no output)';
    } finally {
      closeSync(fd);
    }
  } catch {
    return '(no log)';
  }
}
