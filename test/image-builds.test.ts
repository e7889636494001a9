/**
 * Recipe builds at the builder level: real build sandboxes (the container driver, runc), real apt
 * downloads from DEBIAN_MIRROR, real layers in the shared BASE_IMAGES_DIR, and the records in a
 * real server's store. The API over them (POST /images with a recipe) is tested in images.test.ts.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Recipe as RecipeSchema, type Recipe } from '../shared/schemas/images.js';
import { agentProcessStream } from '../server/agent-client/process-stream.js';
import { AptFetch, aptSizes, installOrder } from '../server/hypervisor/images/apt-fetch.js';
import { LayerStore } from '../server/hypervisor/images/layer-store.js';
import { RootfsImages } from '../server/hypervisor/images/rootfs-images.js';
import { createImageBuilds } from '../server/services/image-build-setup.js';
import { BuildFailedError, installCommand, planSteps, scrub, stackKey, stepLayerId, type BuildRequest, type BuildResult, type ImageBuilder } from '../server/services/image-builder.js';
import { ImageBuilds } from '../server/services/image-builds.js';
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
    for (const name of ['-oDebug::pkgProblemResolver=1', 'python3*', 'Python3', 'a b', 'x', 'coreutils-']) {
      await expect(apt.download([name], '/nonexistent')).rejects.toThrow(/is not a valid apt package name/);
    }
  });

  it('a package name ending in "-" (apt\'s remove suffix) or of one character is a 400 at POST (schema), before any build', () => {
    for (const name of ['a', 'coreutils-', '-x', 'Python3']) expect(RecipeSchema.safeParse({ packages: [name] }).success).toBe(false);
    for (const name of ['g++', 'db5.3-util', 'python3-minimal']) expect(RecipeSchema.safeParse({ packages: [name] }).success).toBe(true);
  });

  it("apt's download and installed sizes are read from its --print-uris answer", () => {
    const lines = [
      "'http://deb.debian.org/debian/pool/main/o/openssl/libssl3_3.0.20-1%7edeb12u2_amd64.deb' libssl3_3.0.20-1~deb12u2_amd64.deb 2036016 MD5Sum:4efab63a42e193c6107a3e1d1c46eaa4",
      "'http://deb.debian.org/debian/pool/main/e/expat/libexpat1_2.5.0-1%2bdeb12u2_amd64.deb' libexpat1_2.5.0-1+deb12u2_amd64.deb 99888 MD5Sum:f5150efb6f21c50361fc1971ab8de870",
      'Need to get 2136 kB of archives.',
      'After this operation, 19.0 MB of additional disk space will be used.',
    ];
    expect(aptSizes(lines)).toEqual({ download: 2036016 + 99888, installed: 19_000_000 });
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

  it("a build whose record was ended elsewhere meanwhile (a fleet's sweep failed it: its host was declared lost) leaves that record as it is when it finishes", async () => {
    const image = await recordBuild({ run: [`echo began-${newId().slice(-6)}; sleep 1`] });
    builds.enqueue(image, debian);
    await until(() => builds.readLog(image.id), (l) => /^began-/m.test(l.text), 'the run step to start', 60_000, 50);
    const verdict = { status: 'failed' as const, progress: null, error: 'Its build host h1 stopped answering (host-lost) before the build finished; delete the image and create it again' };
    await server.app.store.images.update(image.id, verdict);
    // The log is followed until the build ends (it ends the follow).
    for await (const line of builds.followLog(image.id, new AbortController().signal)) void line;
    expect(await server.app.store.images.findById(image.id)).toMatchObject(verdict);
    await server.app.store.images.delete(image.id);
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
  /** An ImageBuilds over a fake builder (the edge under test is the queue, not the build): `impl` stands in for ImageBuilder.build. */
  function fakeBuilds(impl: (req: BuildRequest) => Promise<BuildResult>, extra: Partial<ConstructorParameters<typeof ImageBuilds>[0]> = {}) {
    const b = new ImageBuilds({
      images: server.app.store.images,
      builder: { build: impl } as unknown as ImageBuilder,
      logsDir: join(server.app.config.DATA_DIR, 'image-logs'),
      log: server.app.log,
      maxPerOrg: 10,
      logMaxBytes: 1024 * 1024,
      ...extra,
    });
    closers.push(() => b.close());
    return b;
  }
  const result = (layers: string[] = []): BuildResult => ({ layers, sizeBytes: 0, env: {}, workdir: null, built: layers.length });
  const finished = (id: string) => until(() => server.app.store.images.findById(id), (r) => r?.status !== 'building', `image ${id} to finish`, 60_000, 20) as Promise<ImageRecord>;

  it("a second org's build starts before the first org's second queued build, and system image builds go first (fake builder)", async () => {
    const order: string[] = [];
    let release = () => {};
    const gate = new Promise<void>((r) => (release = r));
    const b = fakeBuilds(async (req) => {
      const name = req.recipe.run?.[0] ?? 'system';
      order.push(name);
      if (name === 'a1') await gate;
      return result();
    });
    const orgA = newId();
    const orgB = newId();
    const a1 = { ...(await recordBuild({ run: ['a1'] })), orgId: orgA };
    const a2 = { ...(await recordBuild({ run: ['a2'] })), orgId: orgA };
    const b1 = { ...(await recordBuild({ run: ['b1'] })), orgId: orgB };
    b.enqueue(a1, debian);
    b.enqueue(a2, debian);
    b.enqueue(b1, debian);
    const system = b.buildLayers({ base: 'debian', packages: ['python3-minimal'] });
    await until(async () => order, (o) => o.length === 1, 'the first build to start', 10_000, 10);
    release();
    await system;
    await finished(a2.id);
    expect(order).toEqual(['a1', 'system', 'b1', 'a2']);
  });

  it('a build past IMAGE_BUILD_TIMEOUT_SEC ends failed naming it (fake builder that never ends a step)', async () => {
    const b = fakeBuilds((req) => new Promise((_, reject) => req.signal!.addEventListener('abort', () => reject(new BuildFailedError('the build was cancelled')))), { buildTimeoutMs: 200 });
    const image = await recordBuild({ run: ['forever'] });
    b.enqueue(image, debian);
    const done = await finished(image.id);
    expect(done.status).toBe('failed');
    expect(done.error).toMatch(/^the build ran past IMAGE_BUILD_TIMEOUT_SEC \(0 s\)/);
  });

  it("a build passing the org's disk quota fails at that step and the layers it made are discarded (fake builder)", async () => {
    const discarded: string[][] = [];
    const steps: number[] = [];
    const b = fakeBuilds(
      async (req) => {
        for (const [i, bytes] of [10 * 2 ** 20, 30 * 2 ** 20, 50 * 2 ** 20].entries()) {
          steps.push(i);
          req.onBuilt?.(`${i}`.repeat(24));
          await req.afterStep?.(bytes);
        }
        return result();
      },
      { budget: async () => 20 * 2 ** 20, discardLayers: async (ids) => void discarded.push(ids) },
    );
    const image = await recordBuild({ run: ['one', 'two', 'three'] });
    b.enqueue(image, debian);
    const done = await finished(image.id);
    expect(done.status).toBe('failed');
    expect(done.error).toBe("the image's layers so far take 30 MB and only 20 MB of the org's disk quota (ORG_MAX_DISK_MB) is left: delete images, snapshots or sandboxes, or install less");
    expect(steps).toEqual([0, 1]);
    await until(async () => discarded, (d) => d.length === 1, 'the layers to be discarded', 10_000, 10);
    expect(discarded).toEqual([['0'.repeat(24), '1'.repeat(24)]]);
  });

  it('deleting a failed recipe image removes its build log, and logs without a record are pruned at start (fake builder)', async () => {
    const b = fakeBuilds(async (req) => {
      req.onLine('about to fail');
      throw new BuildFailedError('step 1/1: run "x" failed with exit code 1; see the build log');
    });
    const image = await recordBuild({ run: ['x'] });
    b.enqueue(image, debian);
    expect((await finished(image.id)).status).toBe('failed');
    const logsDir = join(server.app.config.DATA_DIR, 'image-logs');
    const file = join(logsDir, `${image.id}.log`);
    expect(existsSync(file)).toBe(true);
    // What the image service does on a delete of any recipe image (its record first, then the build's cancel).
    await server.app.store.images.delete(image.id);
    await b.cancel(image.id);
    expect(existsSync(file)).toBe(false);
    // A log a stopped server left for an image deleted meanwhile.
    const orphan = join(logsDir, `${newId()}.log`);
    await mkdir(logsDir, { recursive: true });
    await writeFile(orphan, 'old\n');
    const kept = await recordBuild({ run: ['kept'] });
    await writeFile(join(logsDir, `${kept.id}.log`), 'kept\n');
    await server.app.store.images.update(kept.id, { status: 'failed', error: 'x' });
    await b.resume();
    expect(existsSync(orphan)).toBe(false);
    expect(existsSync(join(logsDir, `${kept.id}.log`))).toBe(true);
    expect((await readdir(logsDir)).filter((n) => !n.endsWith('.log'))).toEqual([]);
  });

  it('a build resumed after its system base\'s recipe changed builds on the stack recorded at POST, not the base\'s current (empty) layers (fake builder)', async () => {
    const parents: Array<BuildRequest['parent']> = [];
    const b = fakeBuilds(async (req) => (parents.push(req.parent), result([...req.parent.layers, 'c'.repeat(64)])));
    const codeLayer = 'd'.repeat(64);
    // The parent as it is after the upgrade reset its layers; the building record still has the stack it was asked on.
    const parent = await server.app.store.images.create({ name: `code-${newId().slice(-6)}`, tag: 'latest', description: 'a system recipe image', base: 'debian', orgId: null, isSystem: true, createdBy: newId(), status: 'ready', source: 'recipe', layers: [] });
    const image = await server.app.store.images.create({
      name: `on-code-${newId().slice(-6)}`, tag: 'latest', description: 'on code', base: 'debian', orgId, isSystem: false, createdBy: newId(),
      status: 'building', source: 'recipe', parentId: parent.id, layers: [codeLayer], recipe: { base: parent.name, run: ['echo x'] }, env: { FROM: 'record' }, workdir: '/w',
    });
    try {
      await b.resume();
      const done = await finished(image.id);
      expect(done.status).toBe('ready');
      expect(parents.find((p) => p.layers.includes(codeLayer))).toEqual({ base: 'debian', layers: [codeLayer], env: { FROM: 'record' }, workdir: '/w' });
      expect(done.layers).toEqual([codeLayer, 'c'.repeat(64)]);
    } finally {
      await server.app.store.images.delete(image.id);
      await server.app.store.images.delete(parent.id);
    }
  });

  it('a run step that leaves a process holding its output open times out on the host and the next build runs', async () => {
    const { config, log } = server.app;
    const quick = await createImageBuilds({ config: { ...config, IMAGE_BUILD_STEP_TIMEOUT_SEC: 1 }, layers, rootfs, images: server.app.store.images, log });
    closers.push(() => quick.close());
    // A child outside the process group holds the output, and the agent itself is stopped: only the host's deadline ends it.
    const stuck = await recordBuild({ run: ['setsid sleep 300 & kill -STOP $PPID; sleep 300'] });
    const marker = newId();
    const next = await recordBuild({ run: [`echo next-${marker}`] });
    quick.builds.enqueue(stuck, debian);
    quick.builds.enqueue(next, debian);
    const failed = await until(() => server.app.store.images.findById(stuck.id), (r) => r?.status !== 'building', 'the stuck build to end', 120_000, 100);
    expect(failed!.status).toBe('failed');
    expect(failed!.error).toBe('step 1/1: run "setsid sleep 300 & kill -STOP $PPID; sleep 300" timed out after 1 s (IMAGE_BUILD_STEP_TIMEOUT_SEC)');
    const ready = await until(() => server.app.store.images.findById(next.id), (r) => r?.status !== 'building', 'the next build to end', 120_000, 100);
    expect(ready!.status).toBe('ready');
    for (const id of ready!.layers) builtHere.add(id);
    expect(await quick.container.driver.list()).toEqual([]);
  }, 180_000);

  it('a build sandbox left by a killed server is removed at the next start', async () => {
    const { config, log } = server.app;
    const before = await createImageBuilds({ config, layers, rootfs, images: server.app.store.images, log });
    const id = newId();
    await before.container.driver.create({ id, name: `left-${id.slice(-8)}`, rootfs: await rootfs.ensure('debian'), layers: [], image: 'debian', cpu: 1, memMb: 256, diskMb: 256, envVars: {} });
    expect(await before.container.driver.list()).toEqual([id]);
    // The server is killed: nothing is closed or destroyed. The next start makes its own setup.
    const after = await createImageBuilds({ config, layers, rootfs, images: server.app.store.images, log });
    closers.push(() => after.close(), () => before.close());
    expect(await after.container.driver.list()).toEqual([]);
  }, 120_000);

  it('a stop and a destroy of one container sandbox at the same time leave no instance behind (a timed-out build step left its sandbox)', async () => {
    const { config, log } = server.app;
    const own = await createImageBuilds({ config, layers, rootfs, images: server.app.store.images, log });
    closers.push(() => own.close());
    const driver = own.container.driver;
    const base = await rootfs.ensure('debian');
    // What a step's deadline does (stop) while the step's cleanup runs (destroy), the destroy a little later each time.
    for (let round = 0; round < 4; round++) {
      const ids = [newId(), newId(), newId()];
      await Promise.all(ids.map((id) => driver.create({ id, name: `race-${id.slice(-8)}`, rootfs: base, layers: [], image: 'debian', cpu: 1, memMb: 256, diskMb: 256, envVars: {} })));
      await Promise.all(ids.flatMap((id, i) => [driver.stop(id).catch(() => {}), new Promise((r) => setTimeout(r, (round * 3 + i) * 15)).then(() => driver.destroy(id))]));
      expect(await driver.list()).toEqual([]);
    }
  }, 180_000);

  it('a package name that is a regex (python3.+) fails naming it, and nothing is downloaded', async () => {
    const apt = new AptFetch({ baseImagesDir: server.app.config.BASE_IMAGES_DIR, mirror: server.app.config.DEBIAN_MIRROR, log: server.app.log });
    const lines: string[] = [];
    await expect(apt.download(['python3.+'], await rootfs.ensure('debian'), (l) => lines.push(l))).rejects.toThrow(/^package python3\.\+ not found in DEBIAN_MIRROR .*; names must be exact package names \(no patterns\)$/);
    expect(lines.filter((l) => /^downloading|^Get:/.test(l))).toEqual([]);
  }, 300_000);

  it('packages whose download and install exceed IMAGE_BUILD_DISK_MB fail before the download', async () => {
    const apt = new AptFetch({ baseImagesDir: server.app.config.BASE_IMAGES_DIR, mirror: server.app.config.DEBIAN_MIRROR, log: server.app.log, maxBytes: 2 ** 20 });
    const lines: string[] = [];
    await expect(apt.download(['python3-minimal'], await rootfs.ensure('debian'), (l) => lines.push(l))).rejects.toThrow(/^packages python3-minimal need \d+ MB to download and \d+ MB installed, more than the build sandbox's disk \(IMAGE_BUILD_DISK_MB, 1 MB\)/);
    expect(lines.filter((l) => /^downloading|^Get:/.test(l))).toEqual([]);
  }, 300_000);

  it('packages on an image whose sandbox removed a dependency fail with a message naming the missing package and the fix', async () => {
    const marker = newId();
    const removed = await setup.builder.build({ recipe: { run: [`dpkg --purge --force-depends libdb5.3 && echo ${marker}`] }, parent: { base: 'debian', layers: [], env: {}, workdir: null }, onLine: () => {} });
    for (const id of removed.layers) builtHere.add(id);
    const image = await recordBuild({ packages: ['db5.3-util'] });
    builds.enqueue(image, { base: 'debian', layers: removed.layers, env: {}, workdir: null });
    const done = await finished(image.id);
    expect(done.status).toBe('failed');
    expect(done.error).toMatch(/^step 1\/1: install 1 package \(db5\.3-util\): this image lacks libdb5\.3 \(needed by db5\.3-util\): packages are resolved against the system base's package list.*install them with a run step instead \(apt-get update && apt-get install -y db5\.3-util\)/);
  }, 600_000);
  it("a build passing the org's disk quota fails at that step and its layers do not outlive it", async () => {
    const { config, log } = server.app;
    const tight = await createImageBuilds({ config, layers, rootfs, images: server.app.store.images, log, budget: async () => 2 ** 20 });
    closers.push(() => tight.close());
    const recipe: Recipe = { run: [`head -c 3M /dev/urandom > /big-${newId()}`, 'echo never-runs'] };
    const [first] = await tight.builder.plan(recipe, { base: 'debian', layers: [], env: {}, workdir: null });
    const image = await recordBuild(recipe);
    tight.builds.enqueue(image, debian);
    const done = await until(() => server.app.store.images.findById(image.id), (r) => r?.status !== 'building', 'the build to end', 120_000, 100);
    expect(done!.status).toBe('failed');
    expect(done!.error).toMatch(/^the image's layers so far take [34] MB and only 1 MB of the org's disk quota \(ORG_MAX_DISK_MB\) is left/);
    expect((await tight.builds.readLog(image.id)).text).not.toMatch(/step 2\/2/);
    await until(async () => layers.has(first!.layerId), (has) => !has, 'the layer of the failed build to be removed', 10_000, 20);
  }, 180_000);
});
