/**
 * Recipe builds at the builder level: real build sandboxes (the container driver, runc), real apt
 * downloads from DEBIAN_MIRROR, real layers in the shared BASE_IMAGES_DIR, and the records in a
 * real server's store. The API over them (POST /images with a recipe) is tested in images.test.ts.
 */
import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Recipe } from '../shared/schemas/images.js';
import { agentProcessStream } from '../server/agent-client/process-stream.js';
import { AptFetch, installOrder } from '../server/hypervisor/images/apt-fetch.js';
import { LayerStore } from '../server/hypervisor/images/layer-store.js';
import { RootfsImages } from '../server/hypervisor/images/rootfs-images.js';
import { createImageBuilds } from '../server/services/image-build-setup.js';
import { installCommand, planSteps, scrub, stackKey, stepLayerId } from '../server/services/image-builder.js';
import type { ImageBuilds } from '../server/services/image-builds.js';
import { newId } from '../server/store/ids.js';
import type { ImageRecord } from '../server/store/types.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, type TestServer } from './helpers/server.js';
import { TEST_IMAGE_RECIPE } from './helpers/test-images.js';
import { until } from './helpers/until.js';

describe('recipe build plans (pure)', () => {
  const parent = { base: 'debian', layers: [], env: { A: '1', B: 'parent' }, workdir: '/parent' };

  it('orders steps packages, files, run; dedupes and sorts packages; run steps carry the merged env and workdir', () => {
    const steps = planSteps({ packages: ['git', 'curl', 'git'], files: [{ path: '/x', content: 'y' }], run: ['make'], env: { B: 'mine' }, workdir: '/w' }, parent);
    expect(steps).toEqual([
      { kind: 'packages', packages: ['curl', 'git'] },
      { kind: 'files', files: [{ path: '/x', content: 'y' }], workdir: '/w' },
      { kind: 'run', command: 'make', env: { A: '1', B: 'mine' }, workdir: '/w' },
    ]);
    expect(planSteps({ workdir: '/only' }, parent)).toEqual([{ kind: 'files', files: [], workdir: '/only' }]);
    expect(planSteps({ run: ['ls'] }, parent)).toEqual([{ kind: 'run', command: 'ls', env: { A: '1', B: 'parent' }, workdir: '/parent' }]);
  });

  it('layer ids are content addresses of the stack below and the step (the layer cache key)', () => {
    const [step] = planSteps({ packages: ['b', 'a'] }, parent);
    const [same] = planSteps({ packages: ['a', 'b', 'a'] }, parent);
    const base = stackKey('/images/debian/rootfs-v2', []);
    expect(stepLayerId(base, step!)).toBe(stepLayerId(base, same!));
    expect(stepLayerId(base, step!)).toMatch(/^[0-9a-f]{64}$/);
    expect(stepLayerId(stackKey('/images/debian/rootfs-v3', []), step!)).not.toBe(stepLayerId(base, step!));
    expect(stackKey('/x/debian/rootfs-v2', ['aa'.repeat(12), 'bb'.repeat(12)])).toBe('bb'.repeat(12));
  });

  it("apt's simulated install order becomes unpack and configure runs of the downloaded files", () => {
    const simulation = [
      'NOTE: This is only a simulation!',
      'Inst libssl3 (3.0.20-1~deb12u2 Debian:12 [amd64])',
      'Inst python3.11-minimal (3.11.2-6+deb12u8 Debian:12 [amd64])',
      'Conf libssl3 (3.0.20-1~deb12u2 Debian:12 [amd64])',
      'Conf python3.11-minimal:amd64 (3.11.2-6+deb12u8 Debian:12 [amd64])',
      'Inst python3-minimal (3.11.2-1+b1 Debian:12 [amd64])',
      'Inst not-downloaded (1 Debian:12 [all])',
      'Conf python3-minimal (3.11.2-1+b1 Debian:12 [amd64])',
    ];
    const files = ['libssl3_3.0.20-1~deb12u2_amd64.deb', 'python3-minimal_3.11.2-1+b1_amd64.deb', 'python3.11-minimal_3.11.2-6+deb12u8_amd64.deb'];
    const order = installOrder(simulation, files);
    expect(order).toEqual([
      { op: 'unpack', files: ['libssl3_3.0.20-1~deb12u2_amd64.deb', 'python3.11-minimal_3.11.2-6+deb12u8_amd64.deb'] },
      { op: 'configure', packages: ['libssl3', 'python3.11-minimal'] },
      { op: 'unpack', files: ['python3-minimal_3.11.2-1+b1_amd64.deb'] },
      { op: 'configure', packages: ['python3-minimal'] },
    ]);
    expect(installCommand(order)).toMatch(/dpkg --force-confdef --force-confold --unpack '\/var\/cache\/voidrun-debs\/libssl3_3\.0\.20-1~deb12u2_amd64\.deb' /);
  });

  it('a package name apt would read as an option or a pattern is refused before apt runs', async () => {
    const apt = new AptFetch({ baseImagesDir: '/nonexistent', mirror: 'http://deb.debian.org/debian', log: pino({ level: 'silent' }) });
    for (const name of ['-oDebug::pkgProblemResolver=1', 'python3*', 'Python3', 'a b', 'x']) {
      await expect(apt.download([name], '/nonexistent')).rejects.toThrow(/is not a valid apt package name/);
    }
  });

  it('host paths are scrubbed from build errors', () => {
    expect(scrub('mount failed: /var/lib/hyper-fleet/instances/abc/disk: busy | /tmp/x/y.log')).toBe('mount failed: <host path>: busy | <host path>');
  });
});

describe.skipIf(!support.ok)('image builds (real build sandboxes)', () => {
  let server: TestServer;
  let setup: Awaited<ReturnType<typeof createImageBuilds>>;
  let builds: ImageBuilds;
  let layers: LayerStore;
  let rootfs: RootfsImages;
  let debian: ImageRecord;
  const orgId = newId();
  const closers: Array<() => Promise<void>> = [];

  beforeAll(async () => {
    server = await startTestServer();
    const { config, log } = server.app;
    layers = new LayerStore({ baseImagesDir: config.BASE_IMAGES_DIR, log });
    rootfs = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap: { hostId: config.SANDBOX_UID_BASE, size: 65536 }, mirror: config.DEBIAN_MIRROR, log, layers });
    setup = await createImageBuilds({ config, layers, rootfs, images: server.app.store.images, log });
    builds = setup.builds;
    debian = (await server.app.store.images.findByName(null, 'debian'))!;
  }, 120_000);

  /** Layers these tests built from builder.build calls (record builds are found in the store). */
  const builtHere = new Set<string>();

  afterAll(async () => {
    for (const close of closers) await close();
    // Every layer here but the shared test image's carries a marker of this run: nothing else uses them.
    if (setup) {
      for (const record of await server.app.store.images.listAll()) for (const id of record.layers) builtHere.add(id);
      const shared = new Set((await setup.builder.plan(TEST_IMAGE_RECIPE, { base: 'debian', layers: [], env: {}, workdir: null })).map((p) => p.layerId));
      for (const id of builtHere) if (!shared.has(id)) await rm(join(server.app.config.BASE_IMAGES_DIR, 'layers', id), { recursive: true, force: true });
    }
    await setup?.close();
    await server?.close();
  });

  /** A 'building' recipe record of the test org on debian, as the image service records one. */
  async function recordBuild(recipe: Recipe): Promise<ImageRecord> {
    return server.app.store.images.create({
      name: `img-${newId().slice(-8)}`,
      tag: 'latest',
      description: 'test recipe',
      base: 'debian',
      orgId,
      isSystem: false,
      createdBy: newId(),
      status: 'building',
      source: 'recipe',
      parentId: debian.id,
      recipe,
    });
  }

  async function built(image: ImageRecord): Promise<ImageRecord> {
    builds.enqueue(image, debian);
    return until(() => server.app.store.images.findById(image.id), (r) => r?.status !== 'building', `image ${image.id} to finish building`, 600_000, 100) as Promise<ImageRecord>;
  }

  /** Runs `command` in a fresh sandbox on debian + `layerIds`; its stdout. */
  async function runOn(layerIds: string[], command: string): Promise<string> {
    const { driver, agents } = setup.container;
    const id = newId();
    await driver.create({ id, name: `check-${id.slice(-8)}`, rootfs: await rootfs.ensure('debian'), layers: layerIds.map((l) => layers.fsPath(l)), image: 'debian', cpu: 1, memMb: 256, diskMb: 256, envVars: {} });
    try {
      let out = '';
      for await (const line of agentProcessStream(agents, id, { start: { command, timeoutMs: 30_000 } })) {
        if (line.type === 'stdout') out += line.data;
        if (line.type === 'exit') break;
      }
      return out;
    } finally {
      await agents.drop(id);
      await driver.destroy(id);
    }
  }

  it('a python3-minimal recipe builds, and a sandbox on its layers runs python3 (42)', async () => {
    const image = await built(await recordBuild(TEST_IMAGE_RECIPE));
    expect(image.error).toBeNull();
    expect(image.status).toBe('ready');
    expect(image.layers).toHaveLength(1);
    expect(image.sizeBytes).toBeGreaterThan(1024 * 1024);
    expect(image.progress).toBeNull();
    expect(await runOn(image.layers, `python3 -c 'print(6*7)'`)).toBe('42\n');
    const log = await builds.readLog(image.id);
    expect(log.text).toMatch(/step 1\/1: install 1 package \(python3-minimal\)/);
    expect(log.text).toMatch(/is ready/);
  }, 600_000);

  it('a second build of the same recipe reuses every layer (no build sandbox started)', async () => {
    const parent = { base: 'debian', layers: [], env: {}, workdir: null };
    const first = await setup.builder.build({ recipe: TEST_IMAGE_RECIPE, parent, onLine: () => {} });
    const lines: string[] = [];
    const again = await setup.builder.build({ recipe: { ...TEST_IMAGE_RECIPE }, parent, onLine: (l) => lines.push(l) });
    expect(again.built).toBe(0);
    expect(again.layers).toEqual(first.layers);
    expect(lines.join('\n')).toMatch(/\(cached\)/);
    expect(lines.join('\n')).not.toMatch(/installing/);
  }, 600_000);

  it('a recipe with one more run step reuses the packages layer and builds only that step, as the sandbox root (not host root)', async () => {
    const parent = { base: 'debian', layers: [], env: {}, workdir: null };
    const base = await setup.builder.build({ recipe: TEST_IMAGE_RECIPE, parent, onLine: () => {} });
    const marker = newId();
    const more = await setup.builder.build({ recipe: { ...TEST_IMAGE_RECIPE, run: [`echo ${marker} > /built-by-run`] }, parent, onLine: () => {} });
    expect(more.built).toBe(1);
    expect(more.layers).toHaveLength(2);
    expect(more.layers[0]).toBe(base.layers[0]);
    builtHere.add(more.layers[1]!);
    // Written by the build sandbox's root, which is an unprivileged uid on the host (never host root).
    const written = await stat(join(layers.fsPath(more.layers[1]!), 'built-by-run'));
    expect([written.uid, written.gid]).toEqual([server.app.config.SANDBOX_UID_BASE, server.app.config.SANDBOX_UID_BASE]);
    expect(await runOn(more.layers, 'cat /built-by-run; python3 -c "print(1+1)"')).toBe(`${marker}\n2\n`);
  }, 600_000);

  it('a failing run step ends the build failed, with its output in the log (also followed live)', async () => {
    const image = await recordBuild({ ...TEST_IMAGE_RECIPE, run: ['echo about to fail; echo on stderr >&2; exit 3'] });
    builds.enqueue(image, debian);
    const followed: string[] = [];
    const controller = new AbortController();
    for await (const line of builds.followLog(image.id, controller.signal)) followed.push(line);
    const failed = (await server.app.store.images.findById(image.id))!;
    expect(failed.status).toBe('failed');
    expect(failed.error).toMatch(/step 2\/2: run "echo about to fail.*" failed with exit code 3; see the build log/);
    expect(failed.error).not.toMatch(/\/var\/|\/tmp\//);
    const log = await builds.readLog(image.id);
    expect(log.text).toMatch(/step 1\/2: install 1 package \(python3-minimal\) \(cached\)/);
    expect(log.text).toMatch(/^about to fail$/m);
    expect(log.text).toMatch(/^on stderr$/m);
    expect(followed).toContain('about to fail');
    expect(followed.at(-1)).toMatch(/^build failed: /);
  }, 600_000);

  it('a package the mirror does not have fails the build naming it', async () => {
    const image = await built(await recordBuild({ packages: ['python3-minimal', 'no-such-package-voidrun'] }));
    expect(image.status).toBe('failed');
    expect(image.error).toBe('package no-such-package-voidrun not found in DEBIAN_MIRROR (http://deb.debian.org/debian bookworm main)'.replace('http://deb.debian.org/debian', server.app.config.DEBIAN_MIRROR));
  }, 600_000);

  it('files and workdir become a layer written through the build sandbox agent, with their modes', async () => {
    const parent = { base: 'debian', layers: [], env: {}, workdir: null };
    // A new file each run, so the steps are built (not found in the layer cache).
    const marker = newId();
    const result = await setup.builder.build({
      recipe: { files: [{ path: '/opt/app/run.sh', content: `#!/bin/sh\necho from-file-${marker}\n`, mode: '0755' }], workdir: '/srv/work', run: ['pwd > /srv/work/where; echo "$GREETING" >> /srv/work/where'], env: { GREETING: 'hello-env' } },
      parent,
      onLine: () => {},
    });
    for (const id of result.layers) builtHere.add(id);
    expect(result.built).toBe(2);
    expect(result.workdir).toBe('/srv/work');
    expect(result.env).toEqual({ GREETING: 'hello-env' });
    expect(await runOn(result.layers, '/opt/app/run.sh; stat -c %a /opt/app/run.sh; cat /srv/work/where')).toBe(`from-file-${marker}\n755\n/srv/work\nhello-env\n`);
  }, 600_000);

  it('a build log past IMAGE_BUILD_LOG_MAX_BYTES keeps its tail', async () => {
    const { config, log } = server.app;
    const small = await createImageBuilds({ config: { ...config, IMAGE_BUILD_LOG_MAX_BYTES: 4096 }, layers, rootfs, images: server.app.store.images, log });
    closers.push(() => small.close());
    const image = await recordBuild({ run: [`seq 1 5000; echo ${newId()}`] });
    small.builds.enqueue(image, debian);
    const done = await until(() => server.app.store.images.findById(image.id), (r) => r?.status !== 'building', 'the build to end', 600_000, 100);
    expect(done!.status).toBe('ready');
    const { text, truncated } = await small.builds.readLog(image.id);
    expect(truncated).toBe(true);
    expect(Buffer.byteLength(text)).toBeLessThanOrEqual(4096);
    expect(text).toMatch(/^5000$/m);
    expect(text).toMatch(/is ready/);
    expect(text).not.toMatch(/^1$/m);
  }, 600_000);

  it('past IMAGE_BUILDS_PER_ORG queued or running builds another is refused (429)', async () => {
    const busyOrg = newId();
    const make = async () => ({ ...(await recordBuild({ run: ['sleep 0.2'] })), orgId: busyOrg });
    const first = await make();
    const second = await make();
    builds.enqueue(first, debian);
    builds.enqueue(second, debian);
    expect(() => builds.checkCapacity(busyOrg)).toThrow(/IMAGE_BUILDS_PER_ORG is 2/);
    await until(() => server.app.store.images.findById(second.id), (r) => r?.status !== 'building', 'the builds to end', 600_000, 100);
    expect(() => builds.checkCapacity(busyOrg)).not.toThrow();
  }, 600_000);

  it('cancel stops a running build and removes its build sandbox; a queued one ends without running', async () => {
    // Its output (started-2) is not its command's text, which the log's step line carries.
    const running = await recordBuild({ run: ['echo started-$((1+1)); sleep 300'] });
    const queued = await recordBuild({ run: ['echo never'] });
    builds.enqueue(running, debian);
    builds.enqueue(queued, debian);
    try {
      await until(() => builds.readLog(running.id), (l) => /^started-2$/m.test(l.text), 'the run step to start', 60_000, 50);
      expect((await server.app.store.images.findById(running.id))!.progress).toEqual({ step: 1, steps: 1, message: 'run "echo started-$((1+1)); sleep 300"' });
      expect(await setup.container.driver.list()).toHaveLength(1);
    } finally {
      await builds.cancel(queued.id);
      await builds.cancel(running.id);
    }
    expect(await setup.container.driver.list()).toEqual([]);
    expect((await server.app.store.images.findById(running.id))!.status).toBe('failed');
    expect((await server.app.store.images.findById(queued.id))!.status).toBe('building'); // its record is the deleter's
    expect(await builds.readLog(queued.id)).toEqual({ text: '', truncated: false });
    await server.app.store.images.delete(queued.id);
  }, 120_000);

  it('a run step past IMAGE_BUILD_STEP_TIMEOUT_SEC is killed and fails the build saying so', async () => {
    const { config, log } = server.app;
    const quick = await createImageBuilds({ config: { ...config, IMAGE_BUILD_STEP_TIMEOUT_SEC: 1 }, layers, rootfs, images: server.app.store.images, log });
    closers.push(() => quick.close());
    const image = await recordBuild({ run: ['sleep 300'] });
    quick.builds.enqueue(image, debian);
    const done = await until(() => server.app.store.images.findById(image.id), (r) => r?.status !== 'building', 'the build to end', 60_000, 50);
    expect(done!.status).toBe('failed');
    expect(done!.error).toBe('step 1/1: run "sleep 300" timed out after 1 s (IMAGE_BUILD_STEP_TIMEOUT_SEC)');
  }, 120_000);

  it('builds a stopped server left building are resumed at start (cached steps reused)', async () => {
    const image = await recordBuild({ ...TEST_IMAGE_RECIPE, run: [`echo resumed-${newId()}`] });
    await builds.resume();
    const done = await until(() => server.app.store.images.findById(image.id), (r) => r?.status !== 'building', 'the resumed build to end', 600_000, 100);
    expect(done!.status).toBe('ready');
    expect(done!.layers).toHaveLength(2);
    const log = await builds.readLog(image.id);
    expect(log.text).toMatch(/the server restarted during this build/);
    expect(log.text).toMatch(/install 1 package \(python3-minimal\) \(cached\)/);
  }, 600_000);

  it('a recipe on one of your images builds on its layers and keeps them below its own', async () => {
    const python = await built(await recordBuild(TEST_IMAGE_RECIPE));
    const marker = newId();
    const child = await server.app.store.images.create({
      name: `child-${marker.slice(-8)}`, tag: 'latest', description: 'on python', base: 'debian', orgId, isSystem: false, createdBy: newId(),
      status: 'building', source: 'recipe', parentId: python.id, recipe: { base: python.name, run: [`python3 -c 'print("${marker}")' > /from-child`] },
    });
    builds.enqueue(child, python);
    const done = await until(() => server.app.store.images.findById(child.id), (r) => r?.status !== 'building', 'the child build to end', 600_000, 100);
    expect(done!.error).toBeNull();
    expect(done!.layers.slice(0, -1)).toEqual(python.layers);
    expect(done!.layers).toHaveLength(python.layers.length + 1);
    expect(await runOn(done!.layers, 'cat /from-child')).toBe(`${marker}\n`);
  }, 600_000);

  it('packages on an image without a system base (an import) are refused saying to use a run step', async () => {
    const python = await built(await recordBuild(TEST_IMAGE_RECIPE));
    const image = await recordBuild({ packages: ['file'] });
    builds.enqueue(image, { ...python, base: '' });
    const done = await until(() => server.app.store.images.findById(image.id), (r) => r?.status !== 'building', 'the build to end', 60_000, 50);
    expect(done!.status).toBe('failed');
    expect(done!.error).toMatch(/^packages can be installed only on an image built on a system base \(debian\); on an imported image install them with a run step/);
  }, 120_000);

  it('a server stopping during a build leaves it building (no build sandbox left), and the next start builds it', async () => {
    const { config, log } = server.app;
    const first = await createImageBuilds({ config, layers, rootfs, images: server.app.store.images, log });
    const image = await recordBuild({ run: [`echo started-$((1+1)); sleep 3; echo ${newId()}`] });
    first.builds.enqueue(image, debian);
    await until(() => first.builds.readLog(image.id), (l) => /^started-2$/m.test(l.text), 'the run step to start', 60_000, 50);
    await first.close();
    expect((await server.app.store.images.findById(image.id))!.status).toBe('building');
    expect(await first.container.driver.list()).toEqual([]);
    await builds.resume();
    const done = await until(() => server.app.store.images.findById(image.id), (r) => r?.status !== 'building', 'the resumed build to end', 120_000, 100);
    expect(done!.status).toBe('ready');
    expect((await builds.readLog(image.id)).text).toMatch(/the server stopped during this build[\s\S]*the server restarted during this build[\s\S]*is ready/);
  }, 180_000);
});
