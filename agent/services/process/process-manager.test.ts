import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { OutputLog } from './output-log.js';
import { ProcessManager, ProcessTable, utf8Prefix, type ManagedProcess } from './process-manager.js';

const entry = (pid: number, bytes = 0) => ({ pid, output: { bytes } });

describe("the agent's process table", () => {
  it('a pid reused by a new process while the first is still listed does not evict the new one when the first retires', () => {
    const table = new ProcessTable<ReturnType<typeof entry>>(0);
    const first = entry(42);
    const firstId = table.add(first);
    // The kernel reaped the first and gave its pid to another process before the agent saw the first finish.
    const second = entry(42);
    const secondId = table.add(second);
    expect(table.get(42)).toBe(second);
    table.retire(firstId); // keepFinished 0: the first is forgotten at once
    expect(table.get(42)).toBe(second);
    expect(table.all()).toEqual([second]);
    table.retire(secondId);
    expect(table.get(42)).toBeUndefined();
    expect(table.size).toBe(0);
  });

  it('keeps the newest finished processes within its count and log-bytes bounds', () => {
    const table = new ProcessTable<ReturnType<typeof entry>>(2, 100);
    const ids = [entry(1, 10), entry(2, 10), entry(3, 10)].map((p) => table.add(p));
    for (const id of ids) table.retire(id);
    expect(table.all().map((p) => p.pid)).toEqual([2, 3]);
    table.retire(table.add(entry(4, 95)));
    expect(table.all().map((p) => p.pid)).toEqual([4]);
  });
});

describe('output counted in bytes', () => {
  it('utf8Prefix cuts at a byte bound without splitting a character', () => {
    expect(utf8Prefix('aé€😀', 1)).toBe('a');
    expect(utf8Prefix('aé€😀', 2)).toBe('a');
    expect(utf8Prefix('aé€😀', 3)).toBe('aé');
    expect(utf8Prefix('aé€😀', 6)).toBe('aé€');
    expect(utf8Prefix('aé€😀', 9)).toBe('aé€'); // the emoji needs 4 bytes
    expect(utf8Prefix('aé€😀', 10)).toBe('aé€😀');
    expect(utf8Prefix('abc', 0)).toBe('');
  });

  it("the output log's capacity is bytes of output, not UTF-16 units", () => {
    const log = new OutputLog(10);
    log.append({ type: 'stdout', data: 'éééé' }); // 4 characters, 8 bytes
    log.append({ type: 'stdout', data: 'éé' }); // 4 more bytes: 12 > 10, the first goes
    expect(log.bytes).toBe(4);
    expect(log.since(0)[0]!.event).toEqual({ type: 'gap', droppedBytes: 8 });
  });

  it('a run capped at N bytes keeps at most N bytes of multi-byte output, whole characters only, and says truncated', async () => {
    const manager = new ProcessManager(process.env, tmpdir());
    // 10 × "é" = 20 bytes in 10 UTF-16 units.
    const r = await manager.run({ command: "printf 'éééééééééé'", timeoutMs: 10_000, maxOutputBytes: 5 });
    expect(r.stdout).toBe('éé');
    expect(r.truncated).toBe(true);
    const whole = await manager.run({ command: "printf 'éééééééééé'", timeoutMs: 10_000, maxOutputBytes: 20 });
    expect(whole).toMatchObject({ stdout: 'éééééééééé', truncated: false });
  });
});

describe('backpressure', () => {
  it('a held process stops being read, blocks writing its pipe, and goes on once released', async () => {
    const manager = new ProcessManager(process.env, tmpdir());
    const proc = manager.start({ command: 'exec yes', timeoutMs: 60_000 });
    const holder = {};
    proc.hold(holder);
    // Blocked in write(2) on its stdout (Node gives children a socketpair; a pipe would show pipe_write).
    await expect.poll(() => readFileSync(`/proc/${proc.pid}/wchan`, 'utf8'), { timeout: 10_000 }).toMatch(/^(sock_alloc_send_pskb|pipe_write|unix_stream_sendmsg)$/);
    const held = proc.output.since(0).length;
    proc.release(holder);
    await expect.poll(() => proc.output.since(0).length, { timeout: 10_000 }).toBeGreaterThan(held);
    await proc.terminate('SIGKILL');
    expect(proc.running).toBe(false);
  });
});

describe('descendants that leave the process group', () => {
  /** Starts `command` with a `setsid` sleeper holding its output; the sleeper is killed afterwards. */
  async function withEscapedChild(prefix: string, timeoutMs: number, check: (proc: ManagedProcess) => Promise<void>) {
    const dir = mkdtempSync(join(tmpdir(), 'escaped-'));
    const pidFile = join(dir, 'pid');
    const manager = new ProcessManager(process.env, tmpdir());
    const proc = manager.start({ command: `setsid sh -c 'echo $$ > ${pidFile}; exec sleep 60' & ${prefix}`, timeoutMs });
    try {
      await check(proc);
    } finally {
      await expect.poll(() => existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '', { timeout: 10_000 }).toBe(true);
      try {
        process.kill(Number(readFileSync(pidFile, 'utf8')), 'SIGKILL');
      } catch {
        // already gone
      }
      rmSync(dir, { recursive: true, force: true });
    }
  }

  it('a timed-out command whose setsid child holds its output reports the timeout instead of waiting for the child', async () => {
    await withEscapedChild('echo started; sleep 60', 500, async (proc) => {
      const exit = await proc.exited;
      expect(exit).toMatchObject({ timedOut: true, exitCode: 124 });
      expect(proc.output.since(0).map((e) => e.event.type)).toContain('exit');
    });
  }, 30_000);

  it('a command that exits while a setsid child holds its output reports its exit after a short grace', async () => {
    await withEscapedChild('echo started; exit 3', 0, async (proc) => {
      const exit = await proc.exited;
      expect(exit).toMatchObject({ timedOut: false, exitCode: 3 });
      expect(proc.output.since(0).some((e) => e.event.type === 'stdout' && e.event.data.includes('started'))).toBe(true);
    });
  }, 30_000);
});
