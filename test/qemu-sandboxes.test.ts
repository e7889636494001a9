import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/** QEMU installed (npm run setup) and the VM image built (npm run image:build -- debian --vm), as .ci/run does. */
function qemuSupport(): { ok: boolean; reason: string } {
  if (!support.ok) return support;
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
  } catch {
    return { ok: false, reason: 'qemu-system-x86_64 is not installed (npm run setup installs it)' };
  }
  const images = process.env.BASE_IMAGES_DIR ?? '/var/lib/hyper-fleet/base-images';
  if (!existsSync(join(images, 'debian-vm.json'))) return { ok: false, reason: 'the VM image is not built (npm run image:build -- debian --vm)' };
  return { ok: true, reason: '' };
}
const qemu = qemuSupport();
if (!qemu.ok) console.warn(`[qemu sandboxes] SKIPPED: ${qemu.reason}`);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The running QEMU processes of a sandbox. */
function qemuProcesses(sandboxId: string): number {
  try {
    return execFileSync('pgrep', ['-f', `voidrun-${sandboxId}`], { encoding: 'utf8' }).trim().split('\n').filter(Boolean).length;
  } catch {
    return 0;
  }
}

describe.skipIf(!qemu.ok)('sandboxes on the qemu driver (microVMs; TCG where KVM cannot run a guest)', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DRIVER: 'qemu' });
    const reg = await server.client().trpc.auth.register.mutate({ name: 'VM User', email: uniqueEmail('vm') });
    vr = server.client(reg.apiKey);
    box = await vr.sandboxes.create({ name: 'vm-box', envVars: { GREETING: 'hello from a VM' } });
  }, 240_000);
  afterAll(async () => {
    await server?.close();
  });

  it('says which driver and accelerator it runs on', async () => {
    const version = (await (await server.http('/api/version')).json()) as { driver: { name: string; accelerator: string; reason: string } };
    expect(version.driver).toMatchObject({ name: 'qemu', accelerator: expect.stringMatching(/^(kvm|tcg)$/) });
    expect(version.driver.reason).toMatch(/KVM|TCG/);
  });

  it("runs commands in the guest's own kernel with the sandbox's name, env and disk size", async () => {
    const r = await box.exec('uname -r; hostname; echo "$GREETING"; df -m / | tail -1');
    const [kernel, hostname, greeting, df] = r.stdout.trim().split('\n');
    expect(kernel).toMatch(/cloud-amd64$/); // Debian's cloud kernel, not the host's
    expect(hostname).toBe('vm-box');
    expect(greeting).toBe('hello from a VM');
    // The root filesystem grows to the sandbox's disk size (SANDBOX_DEFAULT_DISK_MB, 5120) at boot.
    const sizeMb = Number(df!.split(/\s+/)[1]);
    expect(sizeMb).toBeGreaterThan(4000);
    expect(qemuProcesses(box.id)).toBe(1);
  });

  it("refuses a connection to the guest's agent that cannot prove it holds the sandbox's token", async () => {
    const { port } = JSON.parse(readFileSync(join(server.dirs.instancesDir, box.id, 'instance.json'), 'utf8')) as { port: number };
    const exchange = await new Promise<string>((resolve) => {
      const socket = connect(port, '127.0.0.1');
      let received = '';
      socket.on('data', (chunk) => {
        received += chunk.toString();
        // Answer the challenge with a made-up proof, then try to talk HTTP anyway.
        if (received.endsWith('\n') && !received.includes('HTTP')) socket.write(`VOIDRUN-AGENT ${'0'.repeat(64)} ${'1'.repeat(32)}\nGET /ready HTTP/1.1\r\n\r\n`);
      });
      socket.on('close', () => resolve(received));
      socket.on('error', () => resolve(received));
    });
    // The agent opened with a challenge (the token never crosses the wire) and closed without a word more.
    expect(exchange).toMatch(/^VOIDRUN-AGENT-CHALLENGE [0-9a-f]{32}\n$/);
  });

  it('moves files in and out and runs a terminal', async () => {
    await box.files.upload('/root/data.bin', Buffer.from('bytes into a VM'));
    const chunks: Buffer[] = [];
    for await (const chunk of await box.files.download('/root/data.bin')) chunks.push(chunk as Buffer);
    expect(Buffer.concat(chunks).toString()).toBe('bytes into a VM');

    const term = await box.pty.create({ cols: 91, rows: 33 });
    let seen = '';
    const sized = new Promise<void>((resolve) => {
      const stop = term.onData((data) => {
        seen += data;
        if (seen.includes('33 91')) {
          stop();
          resolve();
        }
      });
    });
    await term.write('stty size\n');
    await sized;
    await term.kill();
  });

  it('pauses (the clock inside stops advancing its work) and resumes', async () => {
    await box.commands.run(`sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/ticks; sleep 0.1; done'`);
    await sleep(500);
    await box.pause();
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).status).toBe('paused');
    const read = async () => Number((await box.exec('cat /root/ticks').catch(() => null))?.stdout ?? NaN);
    await box.resume();
    const a = await read();
    await sleep(600);
    expect(await read()).toBeGreaterThan(a);
  }, 60_000);

  it('snapshots memory and disk: a restored VM continues its running processes', async () => {
    await box.commands.run(`sh -c 'n=0; while true; do n=$((n+1)); echo $n > /root/counter; sleep 0.2; done'`);
    await sleep(1000);
    await box.files.write('/root/before.txt', 'written before the snapshot');
    const beforeSnapshot = Number((await box.exec('cat /root/counter')).stdout);
    expect(beforeSnapshot).toBeGreaterThan(0);
    const snap = await box.snapshot();
    expect(snap.kind).toBe('memory+filesystem');
    await box.files.write('/root/after.txt', 'written after the snapshot');

    const restored = await vr.sandboxes.restore({ snapshot_path: snap.full_path, new_id: 'vm-restored' });
    // The counter process came back with the memory: it is still counting, from where it was when
    // the snapshot was taken (not from 0, as a fresh boot would). (The original's count after the
    // snapshot says little: its guest clock catches up on the time it was paused.)
    const first = Number((await restored.exec('cat /root/counter')).stdout);
    expect(first).toBeGreaterThanOrEqual(beforeSnapshot);
    await sleep(1000);
    const second = Number((await restored.exec('cat /root/counter')).stdout);
    expect(second).toBeGreaterThan(first);
    expect((await restored.exec('hostname; echo $VOIDRUN_SANDBOX_ID')).stdout).toBe(`vm-restored\n${restored.id}\n`);
    expect((await restored.exec('cat /root/before.txt; test -e /root/after.txt && echo after-exists || echo no-after')).stdout).toBe(
      'written before the snapshotno-after\n',
    );
    await restored.delete();
    expect(qemuProcesses(restored.id)).toBe(0);
  }, 240_000);

  it('stops and starts with its disk kept, and delete leaves no VM and no files', async () => {
    await box.files.write('/root/kept.txt', 'survives a stop');
    await box.stop();
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).status).toBe('stopped');
    expect(qemuProcesses(box.id)).toBe(0);
    await box.start();
    expect((await box.exec('cat /root/kept.txt')).stdout).toBe('survives a stop');
    await box.delete();
    expect(qemuProcesses(box.id)).toBe(0);
    expect(existsSync(join(server.dirs.instancesDir, box.id))).toBe(false);
  }, 120_000);
});
