import { execFile, spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { access, readFile, stat, writeFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import { BOOT_PROBE_MARKER } from '../vm/guest-boot-files.js';
import type { VmImagePaths } from '../vm/guest.js';

export interface AcceleratorChoice {
  accel: 'kvm' | 'tcg';
  /** Why, in one line (logged and reported by GET /api/version). */
  reason: string;
}

export interface AcceleratorProbeOptions {
  qemu: string;
  image: VmImagePaths;
  /** Where the answer is remembered (per host boot and kernel). */
  cacheFile: string;
  /** How long an ordinary guest may take to reach userspace under KVM. */
  timeoutMs?: number;
  log: Logger;
}

/**
 * Whether KVM can run an ordinary guest here. `/dev/kvm` existing is not enough: on a PVM host
 * (kvm_pvm) it opens fine but a normal guest kernel hangs right after the boot loader. So the
 * probe boots the real guest kernel and initramfs under KVM with `voidrun.probe`, which prints a
 * marker from userspace and powers off; no marker in time means TCG. The answer is remembered
 * until the host reboots or the kernel changes.
 */
export async function probeAccelerator(opts: AcceleratorProbeOptions): Promise<AcceleratorChoice> {
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is missing or not accessible: TCG (software emulation)' };
  }
  const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => '')).trim();
  // Valid until the host reboots, the guest kernel or QEMU changes.
  const kernel = await stat(opts.image.kernel).catch(() => null);
  const qemuVersion = await new Promise<string>((resolve) => execFile(opts.qemu, ['--version'], (err, out) => resolve(err ? '' : out.split('\n')[0]!)));
  const key = `${bootId} ${kernel?.size}:${kernel?.mtimeMs} ${qemuVersion}`;
  try {
    const cached = JSON.parse(await readFile(opts.cacheFile, 'utf8')) as { key: string; choice: AcceleratorChoice; expiresAt?: number };
    if (cached.key === key && (cached.expiresAt === undefined || cached.expiresAt > Date.now())) return cached.choice;
  } catch {}

  const timeoutMs = opts.timeoutMs ?? 8000;
  opts.log.info(`probing whether KVM runs an ordinary guest here (at most ${timeoutMs / 1000} s)`);
  let stderr = '';
  let timedOut = false;
  const booted = await new Promise<boolean>((resolve) => {
    const child = spawn(
      opts.qemu,
      ['-M', 'pc', '-accel', 'kvm', '-cpu', 'host', '-m', '256', '-nodefaults', '-display', 'none', '-no-reboot', '-serial', 'stdio',
        '-kernel', opts.image.kernel, '-initrd', opts.image.initrd, '-append', 'console=ttyS0 panic=-1 quiet voidrun.probe'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      if (output.includes(BOOT_PROBE_MARKER)) {
        clearTimeout(timer);
        child.kill('SIGKILL');
        resolve(true);
      }
    });
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.once('error', () => resolve(false));
    child.once('close', () => {
      clearTimeout(timer);
      resolve(output.includes(BOOT_PROBE_MARKER));
    });
  });
  const choice: AcceleratorChoice = booted
    ? { accel: 'kvm', reason: 'KVM boots an ordinary guest here' }
    : {
        accel: 'tcg',
        reason: timedOut
          ? `/dev/kvm exists but an ordinary guest did not boot under it within ${timeoutMs / 1000} s (e.g. a PVM host): TCG (software emulation)`
          : `/dev/kvm exists but QEMU cannot run an ordinary guest with it (${stderr.trim().split('\n')[0] || 'no output'}): TCG (software emulation)`,
      };
  // A clear answer holds until the host reboots; a timeout may have been a busy moment: ask again in an hour.
  await writeFile(opts.cacheFile, JSON.stringify({ key, choice, ...(timedOut ? { expiresAt: Date.now() + 3_600_000 } : {}) })).catch(() => {});
  return choice;
}
