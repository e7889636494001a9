import { execFile, spawn } from 'node:child_process';
import { openSync, closeSync } from 'node:fs';
import { canRaiseRlimits, RUNC_UNLIMITED_RLIMITS } from './kernel-limits.js';

export interface RuncState {
  id: string;
  pid: number;
  status: 'creating' | 'created' | 'running' | 'paused' | 'stopped';
}

export class RuncError extends Error {
  override name = 'RuncError';
}

/** The runc command line, with its state kept under `root` (one per server, not the host's default). */
export class Runc {
  constructor(
    private readonly root: string,
    private readonly binary = 'runc',
  ) {}

  #run(args: string[], timeoutMs = 30_000): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile(this.binary, ['--root', this.root, ...args], { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
        if (err) reject(new RuncError(`runc ${args[0]} failed: ${(stderr || err.message).trim().split('\n').pop()}`));
        else resolve(stdout);
      });
    });
  }

  async version(): Promise<string> {
    return (await this.#run(['--version'], 5000)).split('\n')[0] ?? '';
  }

  /**
   * Creates and starts the container detached; its stdout and stderr go to `logFile`. `passFd`, if
   * given, becomes file descriptor 3 of the container's first process. Where the host allows
   * (`canRaiseRlimits`), runc runs under `prlimit` with `RUNC_UNLIMITED_RLIMITS`, which the
   * container's user namespace takes as its parent-level limits; the spec's `process.rlimits` are
   * the container's own.
   */
  runDetached(id: string, bundle: string, logFile: string, passFd?: number): Promise<void> {
    const log = openSync(logFile, 'a');
    return new Promise((resolve, reject) => {
      const run = [this.binary, '--root', this.root, 'run', '--detach', '--bundle', bundle, '--pid-file', `${bundle}/init.pid`, ...(passFd !== undefined ? ['--preserve-fds', '1'] : []), id];
      const [command, ...args] = canRaiseRlimits() ? ['prlimit', ...RUNC_UNLIMITED_RLIMITS, '--', ...run] : run;
      const child = spawn(command!, args, { stdio: passFd !== undefined ? ['ignore', log, log, passFd] : ['ignore', log, log] });
      closeSync(log);
      child.once('error', (err) => reject(new RuncError(`runc run failed: ${err.message}`)));
      child.once('exit', (code) => (code === 0 ? resolve() : reject(new RuncError(`runc run exited with ${code}; see the sandbox log`))));
    });
  }

  async state(id: string): Promise<RuncState | null> {
    try {
      return JSON.parse(await this.#run(['state', id], 10_000)) as RuncState;
    } catch {
      return null;
    }
  }

  async list(): Promise<RuncState[]> {
    const out = await this.#run(['list', '--format', 'json'], 10_000);
    return (JSON.parse(out || 'null') as RuncState[] | null) ?? [];
  }

  kill(id: string, signal: 'TERM' | 'KILL'): Promise<string> {
    return this.#run(['kill', '--all', id, signal], 10_000);
  }

  delete(id: string): Promise<string> {
    return this.#run(['delete', '--force', id], 30_000);
  }

  pause(id: string): Promise<string> {
    return this.#run(['pause', id], 10_000);
  }

  resume(id: string): Promise<string> {
    return this.#run(['resume', id], 10_000);
  }
}
