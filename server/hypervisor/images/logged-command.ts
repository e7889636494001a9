import { spawn } from 'node:child_process';
import type { Logger } from 'pino';

/**
 * Runs a host command of an image build, logging the output lines `worthLogging` picks as
 * progress; rejects with the command's last lines on failure.
 */
export function runLogged(cmd: string, args: string[], log: Logger, worthLogging: (line: string) => boolean = () => false): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const tail: string[] = [];
    const onData = (chunk: Buffer) => {
      for (const line of chunk.toString().split('\n')) {
        if (!line.trim()) continue;
        tail.push(line);
        if (tail.length > 5) tail.shift();
        if (worthLogging(line)) log.info(line);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('error', (err) => reject((err as NodeJS.ErrnoException).code === 'ENOENT' ? new Error(`${cmd} is not installed (npm run setup installs what images need)`) : err));
    child.once('close', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} exited with ${code}: ${tail.join(' | ')}`))));
  });
}
