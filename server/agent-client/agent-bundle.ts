import { statSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../repo-root.js';

/** The host files every sandbox's agent is made from (the drivers copy what the agent needs onto a read-only image). */
export interface AgentFiles {
  nodeBinary: string;
  bundle: string;
  nodeModules: string;
}

function newestMtime(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(path) : statSync(path).mtimeMs);
  }
  return newest;
}

/**
 * Bundles `agent/` into one CommonJS file (`dist/agent/agent.cjs`) when it is missing or older than
 * its sources, so `npm start` needs no separate build step. Native modules stay external: the
 * agent loads node-pty from the node_modules next to it on the sandbox's read-only agent image.
 */
export async function ensureAgentBundle(): Promise<AgentFiles> {
  const bundle = join(repoRoot, 'dist', 'agent', 'agent.cjs');
  let built = 0;
  try {
    built = statSync(bundle).mtimeMs;
  } catch {}
  const sources = Math.max(newestMtime(join(repoRoot, 'agent')), newestMtime(join(repoRoot, 'shared')));
  if (built < sources) {
    // Loaded only to rebuild: a server whose bundle is current never loads esbuild.
    const { build } = await import('esbuild');
    await build({
      entryPoints: [join(repoRoot, 'agent', 'main.ts')],
      outfile: bundle,
      bundle: true,
      platform: 'node',
      format: 'cjs',
      target: 'node20',
      external: ['node-pty', 'bufferutil', 'utf-8-validate'],
      // V8 keeps every script's source in the heap of each sandbox's agent: no whitespace or
      // comments (names stay, so stack traces still read).
      minifyWhitespace: true,
      minifySyntax: true,
      legalComments: 'none',
      logLevel: 'silent',
    });
  }
  return { nodeBinary: process.execPath, bundle, nodeModules: join(repoRoot, 'node_modules') };
}
