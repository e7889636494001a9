import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { support } from './sandbox-support.js';

/** QEMU installed (npm run setup) and the VM image built (npm run image:build -- debian --vm), as .ci/run does. */
export function qemuSupport(): { ok: boolean; reason: string } {
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
