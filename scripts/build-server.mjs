// @ts-check
/**
 * `npm run build:server` (and `npm install`, through `prepare`): compiles the server into
 * `dist/server/` with esbuild, our modules bundled (`main.js` and its lazily loaded chunks), npm
 * packages left to node_modules. Plain JavaScript, so `npm start` compiles the server without
 * loading a TypeScript loader. Type checking stays `npm run typecheck`.
 */
import { existsSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
/** The compiled entry point `npm start` runs. */
export const serverEntry = join(root, 'dist', 'server', 'main.js');
/** What the server is compiled from (the agent has its own bundle, made by the server). */
const sourceDirs = ['server', 'shared', 'client'].map((d) => join(root, d));

/** @param {string} dir @returns {number} */
function newestMtime(dir) {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(path) : statSync(path).mtimeMs);
  }
  return newest;
}

/** Whether `dist/server/main.js` is missing or older than a source file or package.json (one walk of the source tree: a few ms). */
export function serverBuildStale() {
  let built = 0;
  try {
    built = statSync(serverEntry).mtimeMs;
  } catch {
    return true;
  }
  return Math.max(statSync(join(root, 'package.json')).mtimeMs, ...sourceDirs.map(newestMtime)) > built;
}

/**
 * npm packages stay in node_modules, except trpc-to-openapi, which is bundled so that only the
 * parts the server uses load: its index pulls in every adapter, and with them h3 (the Nuxt and
 * fetch adapters), co-body (the Node adapter's body parser, unused: our REST layer hands it the
 * parsed body) and openapi3-ts (a re-export), about 4 MiB of heap at start. co-body stays
 * reachable, loaded on first use; h3 and openapi3-ts resolve to an empty module, which the bundle
 * never calls.
 * @type {import('esbuild').Plugin}
 */
const externalPackagesButTrimmed = {
  name: 'external-packages-but-trimmed',
  setup(b) {
    b.onResolve({ filter: /^[^./]/ }, (args) => {
      if (args.path === 'trpc-to-openapi') return undefined; // bundled
      if (/[\\/]node_modules[\\/]trpc-to-openapi[\\/]/.test(args.importer)) {
        if (args.path === 'co-body') return { path: 'co-body', namespace: 'lazy-co-body' };
        if (args.path === 'h3' || args.path.startsWith('openapi3-ts')) return { path: args.path, namespace: 'unused' };
      }
      return { path: args.path, external: true };
    });
    b.onLoad({ filter: /.*/, namespace: 'lazy-co-body' }, () => ({
      contents: "export default (...args) => import('co-body').then((m) => m.default(...args));",
      loader: 'js',
    }));
    // CommonJS, so any named import binds (to undefined).
    b.onLoad({ filter: /.*/, namespace: 'unused' }, () => ({ contents: 'module.exports = {};', loader: 'js' }));
  },
};

/**
 * Compiles the server into `dist/server/` (about a second), replacing what was there: built in a
 * private directory and renamed into place, so a server starting meanwhile never loads half a build.
 */
export async function buildServer() {
  const { build } = await import('esbuild');
  const target = dirname(serverEntry);
  const outdir = `${target}.${process.pid}.tmp`;
  const old = `${target}.${process.pid}.old`;
  rmSync(outdir, { recursive: true, force: true });
  await build({
    entryPoints: [join(root, 'server', 'main.ts')],
    outdir,
    bundle: true,
    // Dynamic imports stay lazy: the MongoDB store is its own chunk, loaded only with MONGO_URI.
    splitting: true,
    plugins: [externalPackagesButTrimmed],
    platform: 'node',
    format: 'esm',
    target: 'node20',
    sourcemap: 'linked',
    logLevel: 'warning',
  });
  try {
    renameSync(target, old);
  } catch {}
  try {
    renameSync(outdir, target);
  } catch (err) {
    if (!existsSync(serverEntry)) throw err; // another build finished first: theirs is as good
    rmSync(outdir, { recursive: true, force: true });
  }
  rmSync(old, { recursive: true, force: true });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  await buildServer();
  console.log(`server compiled into ${dirname(serverEntry)}`);
}
