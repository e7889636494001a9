/**
 * The agent's shell sessions on this host's own shells (no sandbox: the same code the agent runs
 * inside one). The API over them is tested in sandboxes.test.ts.
 */
import { existsSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { evalFor, ShellSessions } from '../agent/services/shell/shell-sessions.js';

const sessions = new ShellSessions(process.env, tmpdir());
afterAll(() => sessions.closeAll());

async function run(shell: string, commands: string[]): Promise<Array<{ code: number; out: string; err: string }>> {
  const s = sessions.create(shell);
  const results = [];
  for (const command of commands) {
    let out = '';
    let err = '';
    const code = await s.exec(command, 10_000, (c) => (c.stream === 'stdout' ? (out += c.data) : (err += c.data)));
    results.push({ code, out, err });
  }
  s.close();
  return results;
}

describe('shell sessions (agent, on the host)', () => {
  it("hands zsh its commands with plain eval, every other shell with `command eval` (regression: zsh answered \"command not found: eval\" to every command)", () => {
    expect(evalFor('/usr/bin/zsh')).toBe('eval');
    expect(evalFor('/bin/zsh5')).toBe('eval');
    expect(evalFor('/bin/bash')).toBe('command eval');
    expect(evalFor('/bin/sh')).toBe('command eval');
    // By what the path resolves to: a link named zsh to /bin/sh (dash here) is not zsh.
    const dir = mkdtempSync(join(tmpdir(), 'shells-'));
    try {
      const fake = join(dir, 'zsh');
      symlinkSync('/bin/sh', fake);
      expect(evalFor(fake)).toBe('command eval');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const shell of ['/bin/bash', '/bin/sh', '/usr/bin/zsh'].filter((s) => existsSync(s))) {
    it(`${shell}: a command left open is its own syntax error; quotes pass as written; state persists`, async () => {
      const [open, quoted, set, read] = await run(shell, ['echo "unterminated', `echo "a'b" 'c"d' it\\'s`, 'cd /usr && X=5', 'pwd; echo $X']);
      expect(open!.code).not.toBe(0);
      expect(open!.err).not.toBe('');
      expect(quoted).toEqual({ code: 0, out: `a'b c"d it's\n`, err: '' });
      expect(set!.code).toBe(0);
      expect(read).toEqual({ code: 0, out: '/usr\n5\n', err: '' });
    });
  }
});
