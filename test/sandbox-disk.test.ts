import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const DISK_MB = 64;

/** Loop devices whose backing file lies under `dir`. */
function loopDevicesUnder(dir: string): string[] {
  return readdirSync('/sys/block')
    .filter((n) => n.startsWith('loop'))
    .filter((n) => {
      try {
        return readFileSync(`/sys/block/${n}/loop/backing_file`, 'utf8').startsWith(dir);
      } catch {
        return false;
      }
    });
}

function mounted(path: string): boolean {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[1] === path);
}

describe.skipIf(!support.ok)('container sandbox disks (diskMb enforced)', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: String(DISK_MB), SNAPSHOT_MAX_BYTES: String(1024 * 1024) });
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Disk User', email: uniqueEmail('disk') });
    apiKey = reg.apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'disk' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('writing past diskMb fails with ENOSPC inside the sandbox, and the host file stays within diskMb', async () => {
    const r = await box.exec(`head -c ${DISK_MB * 2}m /dev/zero > /root/fill; echo "exit=$?"`, { timeout: 60 });
    expect(r.stderr).toContain('No space left on device');
    expect(r.stdout).toContain('exit=1');
    const image = statSync(join(server.dirs.instancesDir, box.id, 'disk.img'));
    expect(image.blocks * 512).toBeLessThanOrEqual(DISK_MB * 1024 * 1024);
    expect((await box.exec('rm /root/fill && echo freed')).stdout).toBe('freed\n');
  });

  it('creating files past the inode limit fails inside the sandbox', async () => {
    const free = Number((await box.exec('stat -f -c %d /')).stdout.trim());
    expect(free).toBeGreaterThan(100);
    expect(free).toBeLessThan(100_000);
    // Shell builtins only: one process creates every file.
    const r = await box.exec(`mkdir /root/many && cd /root/many && for i in $(seq 1 ${free + 100}); do true > f$i || { echo "failed at $i"; break; }; done`, { timeout: 60 });
    expect(r.stdout).toMatch(/failed at \d+/);
    expect(r.stderr).toContain('No space left on device');
    expect((await box.exec('rm -rf /root/many && echo ok')).stdout).toBe('ok\n');
  });

  it('an upload larger than the free disk answers 413 and leaves no partial file', async () => {
    const body = Buffer.alloc((DISK_MB + 16) * 1024 * 1024, 1);
    const res = await server.http(`/api/sandboxes/${box.id}/files/upload?path=/root/too-big.bin`, {
      method: 'POST',
      apiKey,
      headers: { 'content-type': 'application/octet-stream' },
      body,
    });
    expect(res.status).toBe(413);
    const text = await res.text();
    expect(text).toMatch(/no space left on the sandbox's disk/i);
    expect(text).toContain(`diskMb ${DISK_MB}`);
    expect((await box.exec('ls -A /root')).stdout).not.toMatch(/too-big/);
  });

  it("the sandbox's /proc/self/mountinfo and /sys name no host directory: not the checkout, its node_modules or dist/, nor any state directory", async () => {
    const info = (await box.exec('cat /proc/self/mountinfo')).stdout;
    const lines = info.trim().split('\n').map((l) => l.split(' '));
    expect(lines.find((f) => f[4] === '/')!.join(' ')).toContain('lowerdir=image,upperdir=disk/upper,workdir=disk/work');
    // What the agent runs from: directories inside the agent runtime image, on a loop device.
    const agent = lines.filter((f) => f[4] === '/opt/voidrun' || f[4] === '/etc/ld.so.preload').map((f) => [f[3], f[4], f[f.length - 2]]);
    expect(agent).toEqual([
      ['/agent', '/opt/voidrun', expect.stringMatching(/^\/dev\/loop\d+$/)],
      ['/empty', '/etc/ld.so.preload', expect.stringMatching(/^\/dev\/loop\d+$/)],
    ]);
    const hostPaths = [process.cwd(), 'node_modules', 'dist/', server.dirs.instancesDir, server.dirs.dataDir, server.dirs.snapshotsDir, server.app.config.BASE_IMAGES_DIR, '/run/voidrun'];
    for (const path of hostPaths) expect(info).not.toContain(path);
    // Loop devices' backing files (every sandbox's disk image) are hidden too.
    const backing = await box.exec('cat /sys/block/loop*/loop/backing_file 2>/dev/null; ls /sys/devices/virtual/block | wc -l');
    expect(backing.stdout).toBe('0\n');
  });

  it('stop unmounts the disk and start mounts it again with the data kept', async () => {
    const sb = await vr.sandboxes.create({ name: 'stop-start' });
    const dir = join(server.dirs.instancesDir, sb.id);
    await sb.exec('echo kept > /root/kept');
    await sb.stop();
    expect(mounted(join(dir, 'disk'))).toBe(false);
    expect(loopDevicesUnder(dir)).toEqual([]);
    await sb.start();
    expect(mounted(join(dir, 'disk'))).toBe(true);
    expect((await sb.exec('cat /root/kept')).stdout).toBe('kept\n');
    await sb.delete();
  });

  it("after a host reboot (runtime, mounts and loop devices gone) a restarted server's start remounts the disk with its data", async () => {
    const first = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: String(DISK_MB) });
    const reg = await first.client().trpc.auth.register.mutate({ name: 'Reboot User', email: uniqueEmail('reboot') });
    const sb = await first.client(reg.apiKey).sandboxes.create({ name: 'rebooted' });
    await sb.exec('echo survived > /root/mark');
    await first.close({ keepState: true });
    // What a reboot leaves: the instance directory, no container, no mount, no loop device.
    await first.app.services.sandboxes.driver.stop(sb.id);
    const dir = join(first.dirs.instancesDir, sb.id);
    expect(mounted(join(dir, 'disk'))).toBe(false);
    expect(loopDevicesUnder(dir)).toEqual([]);

    const second = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: String(DISK_MB) }, first.dirs);
    try {
      const back = await second.client(reg.apiKey).sandboxes.get(sb.id);
      expect(back.info.status).toBe('stopped');
      await back.start();
      expect((await back.exec('cat /root/mark')).stdout).toBe('survived\n');
      expect((await back.exec(`head -c ${DISK_MB * 2}m /dev/zero > /root/fill`)).stderr).toContain('No space left on device');
    } finally {
      await second.close();
    }
  });

  it('delete leaves no mount, loop device or file of the sandbox behind', async () => {
    const sb = await vr.sandboxes.create({ name: 'deleted' });
    const dir = join(server.dirs.instancesDir, sb.id);
    expect(loopDevicesUnder(dir)).toHaveLength(1);
    await sb.delete();
    expect(loopDevicesUnder(dir)).toEqual([]);
    expect(mounted(join(dir, 'disk'))).toBe(false);
    expect(mounted(join(dir, 'rootfs'))).toBe(false);
    expect(() => statSync(dir)).toThrow();
  });

  it('a sparse 1 GiB file does not inflate a snapshot, and restores still sparse', async () => {
    const sb = await vr.sandboxes.create({ name: 'sparse' });
    await sb.exec('truncate -s 1G /root/sparse && echo tail >> /root/sparse');
    const snap = await sb.snapshot();
    expect(snap.size).toBeLessThan(256 * 1024);
    const restored = await vr.sandboxes.restore({ snapshot_path: snap.full_path, new_id: 'sparse-restored' });
    const r = await restored.exec('stat -c %s /root/sparse; du -k /root/sparse | cut -f1; tail -c 5 /root/sparse');
    const [size, kb, tail] = r.stdout.split('\n');
    expect(Number(size)).toBe(1024 * 1024 * 1024 + 5);
    expect(Number(kb)).toBeLessThan(1024);
    expect(tail).toBe('tail');
    await restored.delete();
    await sb.delete();
  });

  it('a snapshot larger than SNAPSHOT_MAX_BYTES is refused with 413 and leaves no partial archive', async () => {
    const sb = await vr.sandboxes.create({ name: 'big-snap' });
    await sb.exec('head -c 3m /dev/urandom > /root/noise');
    const res = await server.http(`/api/sandboxes/${sb.id}/snapshot`, { method: 'POST', apiKey, json: {} });
    expect(res.status).toBe(413);
    expect(await res.text()).toContain('SNAPSHOT_MAX_BYTES');
    const dir = join(server.dirs.snapshotsDir, sb.info.orgId, sb.id);
    expect(readdirSync(dir)).toEqual([]);
    expect(await sb.snapshots()).toEqual([]);
    await sb.delete();
  });
});
