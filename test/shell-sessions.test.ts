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

  it('a command queued behind a longer one is answered 409 at its own timeout, not when its turn comes (regression: only then, past the server\'s deadline: 502)', async () => {
    const s = sessions.create('/bin/bash');
    try {
      const order: string[] = [];
      const long = s.exec('sleep 2; echo long', 30_000, () => {}).then(() => order.push('long'));
      const queued = s.exec('echo queued', 300, () => {}).catch((err: Error) => order.push(`queued: ${err.message}`));
      await Promise.all([long, queued]);
      expect(order).toEqual(['queued: The shell session was busy with an earlier command for the whole 0.3 s timeout; this command did not run', 'long']);
      let out = '';
      expect(await s.exec('echo next', 10_000, (c) => (out += c.data))).toBe(0);
      expect(out).toBe('next\n');
    } finally {
      s.close();
    }
  });

  it("a timed-out `read` (bash carries on reading after the interrupt's trap) does not end the session; what was held back is sent before the timeout's answer", async () => {
    const s = sessions.create('/bin/bash');
    try {
      await expect(s.exec('read line; echo "got $line"', 500, () => {})).rejects.toThrow(/did not finish within 0.5 s/);
      let out = '';
      expect(await s.exec('echo alive', 10_000, (c) => (out += c.data))).toBe(0);
      expect(out).toBe('alive\n');
      let partial = '';
      await expect(s.exec('echo partial; sleep 30', 500, (c) => (partial += c.data))).rejects.toThrow(/did not finish/);
      expect(partial).toBe('partial\n'); // its newline was held back (it could have begun an end marker)
    } finally {
      s.close();
    }
  });

  it('a streamed line arrives whole while its command runs on (its newline is not held until the command ends)', async () => {
    const s = sessions.create('/bin/bash');
    try {
      const chunks: string[] = [];
      // The command waits for the line to have arrived whole (or gives up after 20 s, failing the test).
      let sawLine!: () => void;
      const lineSeen = new Promise<void>((r) => (sawLine = r));
      const run = s.exec('echo started; read -t 20 go; echo "done $go"', 30_000, (c) => {
        chunks.push(c.data);
        if (chunks.join('') === 'started\n') sawLine();
      });
      await lineSeen;
      s.input('yes\n');
      expect(await run).toBe(0);
      expect(chunks.join('')).toBe('started\ndone yes\n');
    } finally {
      s.close();
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
