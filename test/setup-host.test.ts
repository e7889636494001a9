import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const script = join(import.meta.dirname, '..', 'scripts', 'setup-host.sh');
/** A PATH with only `id` and `apt-get`: the host looks fresh to the script (which also searches /usr/sbin and /sbin). */
const bare = mkdtempSync(join(tmpdir(), 'voidrun-setup-path-'));
chmodSync(bare, 0o755); // searchable by the unprivileged user of the not-root cases
for (const tool of ['id', 'apt-get']) symlinkSync(`/usr/bin/${tool}`, join(bare, tool));
afterAll(() => rmSync(bare, { recursive: true, force: true }));

function run(args: string[], opts: { asNobody?: boolean } = {}) {
  const [cmd, argv] = opts.asNobody ? ['/usr/bin/setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '/bin/bash', script, ...args]] : ['/bin/bash', [script, ...args]];
  const r = spawnSync(cmd as string, argv as string[], { encoding: 'utf8', env: { PATH: bare } });
  return { status: r.status, out: (r.stdout + r.stderr).trim() };
}

describe('scripts/setup-host.sh (what npm start and the tests run on a fresh host)', () => {
  it('--dry-run names the packages a host without them would get, in one line, installing nothing', () => {
    const { status, out } = run(['--dry-run']);
    expect(status).toBe(0);
    expect(out.split('\n')).toHaveLength(1);
    expect(out).toMatch(/^setup: would install .*\bqemu-system-x86\b.*\bqemu-utils\b.*\bgcc\b.* with apt-get$/);
  });

  it.skipIf(process.getuid?.() !== 0)('not root: --if-needed says in one line what to install and exits 0, so the server still starts', () => {
    const { status, out } = run(['--if-needed'], { asNobody: true });
    expect(status).toBe(0);
    expect(out.split('\n')).toHaveLength(1);
    expect(out).toMatch(/^setup: sandboxes need .*gcc.*: install them as root \(apt-get install .*\) or run `npm run setup` as root$/);
  });

  it.skipIf(process.getuid?.() !== 0)('not root, without --if-needed (npm run setup): the same line and a failed exit', () => {
    const { status, out } = run([], { asNobody: true });
    expect(status).toBe(1);
    expect(out).toMatch(/^setup: sandboxes need /);
  });
});
