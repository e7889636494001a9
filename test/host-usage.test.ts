import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../server/config.js';
import { cgroupOomKills, cgroupUsage } from '../server/hypervisor/container/cgroup-usage.js';
import { processUsage } from '../server/hypervisor/host-process.js';
import { agentReadyTimeoutMs } from '../server/hypervisor/select-driver.js';

/** Writes `files` (path → content) under `root`. */
function tree(root: string, files: Record<string, string>): void {
  for (const [path, content] of Object.entries(files)) {
    mkdirSync(join(root, path, '..'), { recursive: true });
    writeFileSync(join(root, path), content);
  }
}

describe('host-side sandbox usage (what the metrics read; never the agent)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'host-usage-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('reads a cgroup v1 container: cpuacct.usage in ns, memory without its inactive file cache', async () => {
    const root = join(dir, 'v1');
    tree(root, {
      'cpuacct/voidrun/vr-a/cpuacct.usage': '2500000000\n',
      'memory/voidrun/vr-a/memory.usage_in_bytes': '104857600\n',
      'memory/voidrun/vr-a/memory.stat': 'cache 1\ntotal_inactive_file 4857600\ntotal_active_file 2\n',
    });
    expect(await cgroupUsage('/voidrun/vr-a', root)).toEqual({ cpuSeconds: 2.5, memoryBytes: 100_000_000 });
  });

  it('reads a cgroup v2 container: cpu.stat usage_usec, memory.current without inactive_file', async () => {
    const root = join(dir, 'v2');
    tree(root, {
      'voidrun/vr-b/cpu.stat': 'usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n',
      'voidrun/vr-b/memory.current': '2000\n',
      'voidrun/vr-b/memory.stat': 'anon 1000\ninactive_file 500\n',
    });
    expect(await cgroupUsage('/voidrun/vr-b', root)).toEqual({ cpuSeconds: 1.5, memoryBytes: 1500 });
  });

  it("counts OOM kills from cgroup v1's memory.oom_control or v2's memory.events (the layout looked at once per root), null once the cgroup is gone", async () => {
    tree(join(dir, 'v1'), { 'memory/voidrun/vr-o/memory.oom_control': 'oom_kill_disable 0\nunder_oom 0\noom_kill 3\n' });
    const v2 = join(dir, 'v2-unified');
    tree(v2, { 'cgroup.controllers': 'cpu memory pids\n', 'voidrun/vr-o/memory.events': 'low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n' });
    expect(await cgroupOomKills('/voidrun/vr-o', join(dir, 'v1'))).toBe(3);
    expect(await cgroupOomKills('/voidrun/vr-o', v2)).toBe(2);
    expect(await cgroupOomKills('/voidrun/vr-o', v2)).toBe(2);
    expect(await cgroupOomKills('/voidrun/vr-gone', v2)).toBeNull();
    expect(await cgroupOomKills('/voidrun/vr-gone', join(dir, 'v1'))).toBeNull();
  });

  it('answers null for a cgroup that is gone (a stopped or deleted sandbox)', async () => {
    expect(await cgroupUsage('/voidrun/vr-gone', join(dir, 'v1'))).toBeNull();
  });

  it("reads a VMM process's CPU time and resident memory from /proc, null once it is gone", async () => {
    const usage = await processUsage(process.pid);
    expect(usage!.cpuSeconds).toBeGreaterThan(0);
    expect(usage!.memoryBytes).toBeGreaterThan(1024 * 1024);
    expect(await processUsage(2 ** 22 + 1)).toBeNull();
  });
});

describe('SANDBOX_SYNC_TIMEOUT_SEC (the original name for how long a create waits for the agent)', () => {
  it('sets the agent-ready wait unless AGENT_READY_TIMEOUT_MS is given', () => {
    expect(agentReadyTimeoutMs(loadConfig({}))).toBe(30_000);
    expect(agentReadyTimeoutMs(loadConfig({ SANDBOX_SYNC_TIMEOUT_SEC: '5' }))).toBe(5000);
    expect(agentReadyTimeoutMs(loadConfig({ SANDBOX_SYNC_TIMEOUT_SEC: '5', AGENT_READY_TIMEOUT_MS: '1200' }))).toBe(1200);
  });
});
