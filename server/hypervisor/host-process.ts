import { execFile } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync, readSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:net';

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

/** Runs a host command (no shell); rejects with the command and the last line of its stderr. */
export function runHostCommand(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 4 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args[0] ?? ''} failed: ${(stderr || err.message).trim().split('\n').pop()}`));
      else resolve(stdout);
    });
  });
}

/** Sends `sig` to `pid`, ignoring a process that is already gone. */
export function signalQuietly(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // Already gone.
  }
}

/** A TCP port free on 127.0.0.1 right now (the caller binds it soon after). */
export async function freeLoopbackPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve, reject) => srv.once('error', reject).listen(0, '127.0.0.1', resolve));
  const { port } = srv.address() as { port: number };
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

/** Clock ticks per second of /proc/<pid>/stat times (USER_HZ: 100 on every Linux architecture Node runs on). */
const USER_HZ = 100;

/** A host process's CPU time (user + system, seconds) and resident memory (bytes); null once it is gone. */
export async function processUsage(pid: number): Promise<{ cpuSeconds: number; memoryBytes: number } | null> {
  try {
    const [stat, status] = await Promise.all([readFile(`/proc/${pid}/stat`, 'utf8'), readFile(`/proc/${pid}/status`, 'utf8')]);
    // Fields after the command (which may hold spaces and parentheses): state is field 3, utime 14, stime 15.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[11]) + Number(fields[12]);
    const rssKb = Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1] ?? 0);
    return Number.isFinite(ticks) ? { cpuSeconds: ticks / USER_HZ, memoryBytes: rssKb * 1024 } : null;
  } catch {
    return null;
  }
}
