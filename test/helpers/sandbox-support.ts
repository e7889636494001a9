import { execFileSync } from 'node:child_process';

/**
 * Whether this machine can run real sandboxes (root + runc). When it cannot, sandbox tests are
 * skipped with this reason printed — .ci/run installs runc, so CI always runs them.
 */
export function sandboxSupport(): { ok: boolean; reason: string } {
  if (process.getuid?.() !== 0) return { ok: false, reason: 'not running as root' };
  try {
    execFileSync('runc', ['--version'], { stdio: 'ignore' });
  } catch {
    return { ok: false, reason: 'runc is not installed (npm run setup installs it)' };
  }
  return { ok: true, reason: '' };
}

export const support = sandboxSupport();
if (!support.ok) console.warn(`[sandbox tests] SKIPPED: ${support.reason}`);
