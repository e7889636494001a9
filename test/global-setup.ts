/**
 * Runs once before the suite (vitest `globalSetup`): prepares what the sandbox tests need when it
 * is missing and this host allows it, so `npm test` on a fresh Debian/Ubuntu box runs them
 * instead of skipping them:
 *   1. host packages: `scripts/setup-host.sh --if-needed` (as root with apt it installs runc,
 *      debootstrap, QEMU, … saying so in one line; otherwise one line says what to install);
 *   2. the default image (debootstrap, about a minute the first time) and, with QEMU installed,
 *      its VM image and agent disk, into BASE_IMAGES_DIR;
 *   3. the image tests' small recipe image (TEST_IMAGE_RECIPE: python3-minimal, a few seconds the
 *      first time) into the layer cache, built in a build sandbox like any recipe.
 * A step that cannot run prints one line; the tests that need it then skip with their reason.
 * `VOIDRUN_SKIP_SETUP=1` skips both (a host prepared some other way).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { loadConfig } from '../server/config.js';
import { repoRoot } from '../server/repo-root.js';
import { buildRecipeLayers, prepareImages } from '../scripts/prepare-images.js';
import { TEST_IMAGE_RECIPE } from './helpers/test-images.js';

function installed(cmd: string, args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: 'ignore', env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` } });
    return true;
  } catch {
    return false;
  }
}

export default async function setup(): Promise<void> {
  if (process.platform !== 'linux' || process.env.VOIDRUN_SKIP_SETUP === '1') return;
  if (process.getuid?.() !== 0) {
    console.log('[test setup] not root: sandbox tests will skip (run `npm test` as root, after `npm run setup`, to run them)');
    return;
  }
  spawnSync('bash', [join(repoRoot, 'scripts', 'setup-host.sh'), '--if-needed'], { stdio: 'inherit' });
  if (!installed('runc', ['--version']) || !installed('debootstrap', ['--version'])) return; // setup-host said why
  const config = loadConfig();
  const log = pino({ level: 'info', base: undefined, timestamp: false, msgPrefix: '[test setup] ' });
  try {
    await prepareImages(config, config.SANDBOX_DEFAULT_IMAGE, {
      vm: installed('qemu-system-x86_64', ['--version']) && installed('qemu-img', ['--version']),
      log,
      say: (line) => console.log(`[test setup] ${line}`),
    });
  } catch (err) {
    console.log(`[test setup] the ${config.SANDBOX_DEFAULT_IMAGE} image could not be built (${(err as Error).message}): sandbox tests will fail or skip`);
    return;
  }
  // Build sandboxes of their own (instances, runc state, logs), so nothing of a server on this host is touched.
  const root = mkdtempSync(join(tmpdir(), 'voidrun-setup-'));
  chmodSync(root, 0o711);
  const runcRoot = join('/run/voidrun-test', root.split('/').pop()!);
  try {
    const started = Date.now();
    const buildConfig = { ...config, INSTANCES_DIR: join(root, 'instances'), RUNC_ROOT: runcRoot, DATA_DIR: join(root, 'data') };
    const layers = await buildRecipeLayers(buildConfig, TEST_IMAGE_RECIPE, log);
    console.log(`[test setup] test image (${TEST_IMAGE_RECIPE.packages.join(' ')}) ready: ${layers.length} layer (${Math.round((Date.now() - started) / 1000)} s)`);
  } catch (err) {
    console.log(`[test setup] the test image could not be built (${(err as Error).message}): image tests will build it themselves`);
  } finally {
    rmSync(root, { recursive: true, force: true });
    rmSync(runcRoot, { recursive: true, force: true });
  }
}
