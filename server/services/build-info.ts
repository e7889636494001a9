import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { VersionInfo } from '../../shared/index.js';
import { repoRoot } from '../repo-root.js';

const startedAt = new Date().toISOString();

/** Reads the git commit from `.git` without spawning git; 'unknown' outside a checkout. */
function readCommit(): string {
  try {
    const gitDir = join(repoRoot, '.git');
    const head = readFileSync(join(gitDir, 'HEAD'), 'utf8').trim();
    if (!head.startsWith('ref: ')) return head.slice(0, 12);
    const ref = head.slice(5);
    try {
      return readFileSync(join(gitDir, ref), 'utf8').trim().slice(0, 12);
    } catch {
      const packed = readFileSync(join(gitDir, 'packed-refs'), 'utf8');
      const line = packed.split('\n').find((l) => l.endsWith(` ${ref}`));
      return line ? line.slice(0, 12) : 'unknown';
    }
  } catch {
    return 'unknown';
  }
}

/** Version from package.json; commit and build time as a release build set them, else from .git and the process start. */
export function readBuildInfo(build: { commit?: string; buildTime?: string }): VersionInfo {
  const pkg = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { version: string };
  return {
    version: pkg.version,
    commit: build.commit || readCommit(),
    buildTime: build.buildTime || startedAt,
  };
}
