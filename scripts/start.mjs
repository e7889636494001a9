// @ts-check
/**
 * `npm start`: prepares what the server needs when it is missing, then runs the compiled server
 * in this process (no TypeScript loader):
 *   1. the host packages sandboxes need (`scripts/setup-host.sh --if-needed`: installs them with
 *      apt as root, else prints one line saying what to install; the server starts either way
 *      and answers sandbox requests 503 with the reason);
 *   2. `dist/server/` compiled again when a source is newer than it (`npm install` compiles it
 *      first, through `prepare`);
 *   3. `dist/server/main.js`, which builds the default image in the background on first start.
 * `VOIDRUN_SKIP_SETUP=1` skips step 1 (a host prepared some other way).
 */
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { buildServer, serverBuildStale, serverEntry } from './build-server.mjs';

const scripts = dirname(fileURLToPath(import.meta.url));

if (process.platform === 'linux' && process.env.VOIDRUN_SKIP_SETUP !== '1') {
  spawnSync('bash', [join(scripts, 'setup-host.sh'), '--if-needed'], { stdio: 'inherit' });
}
if (serverBuildStale()) {
  console.log('compiling the server into dist/server (its sources changed since the last build)');
  await buildServer();
}
await import(pathToFileURL(serverEntry).href);
