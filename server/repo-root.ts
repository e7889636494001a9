import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The nearest directory at or above `dir` holding a package.json. */
function packageRoot(dir: string): string {
  for (let d = dir; ; d = dirname(d)) {
    if (existsSync(join(d, 'package.json'))) return d;
    if (d === dirname(d)) throw new Error(`no package.json above ${dir}`);
  }
}

/**
 * The checkout's root (where package.json, agent/ and node_modules/ are), found from this
 * module's location: the same directory whether the server runs from its sources (`server/`)
 * or compiled (`dist/server/`, which holds no package.json).
 */
export const repoRoot = packageRoot(dirname(fileURLToPath(import.meta.url)));
