import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, 'init.c');
const cacheDir = join(here, '..', '..', '..', 'dist', 'container-init');
const gccArgs = ['-static', '-O2', '-Wall', '-Werror'];

let building: Promise<string> | null = null;

/**
 * The container sandboxes' PID 1 (`init.c`), compiled with gcc into a static binary under
 * `dist/container-init/`, named after a hash of its source and flags: built on first use, rebuilt
 * whenever the source changes. Rejects with a one-line reason when it cannot be built.
 */
export function ensureContainerInit(): Promise<string> {
  building ??= build().catch((err: Error) => {
    building = null; // a later call tries again (e.g. after `npm run setup`)
    throw err;
  });
  return building;
}

async function build(): Promise<string> {
  const hash = createHash('sha256').update(readFileSync(source)).update(gccArgs.join(' ')).digest('hex').slice(0, 16);
  const binary = join(cacheDir, `voidrun-init-${hash}`);
  if (existsSync(binary)) return binary;
  await mkdir(cacheDir, { recursive: true });
  // Built under a private name and renamed, so concurrent servers never run a half-written file.
  const temp = `${binary}.${process.pid}.tmp`;
  try {
    await new Promise<void>((resolve, reject) => {
      execFile('gcc', [...gccArgs, '-o', temp, source], { timeout: 60_000 }, (err, _stdout, stderr) => {
        if (!err) return resolve();
        const why = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'gcc is not installed' : (stderr.trim().split('\n').pop() ?? err.message);
        reject(new Error(`the sandbox init cannot be built (${why}): run \`npm run setup\` (installs gcc and libc6-dev)`));
      });
    });
    await rename(temp, binary);
  } finally {
    await rm(temp, { force: true });
  }
  return binary;
}
