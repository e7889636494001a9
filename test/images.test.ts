import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageNotReadyError, type VoidRunClient } from '../client/index.js';
import type { RestImage } from '../shared/index.js';
import { ociLayout } from './helpers/oci-archive.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { TEST_IMAGE_RECIPE } from './helpers/test-images.js';
import { until } from './helpers/until.js';
import { newId as newLayerId } from '../server/store/ids.js';

/**
 * Images through the real server, our client and plain HTTP: recipe builds (the shared test recipe,
 * built once per machine by the global setup, so its layer comes from the cache), images from a
 * sandbox, visibility between orgs, the delete rules and the build log.
 */
interface Org {
  apiKey: string;
  orgId: string;
  vr: VoidRunClient;
}

const BUILD_TIMEOUT_MS = 600_000;

describe.skipIf(!support.ok)('images', () => {
  let server: TestServer;
  let mine: Org;
  let other: Org;

  async function register(tag: string): Promise<Org> {
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Image User', email: uniqueEmail(tag) });
    return { apiKey: reg.apiKey, orgId: reg.orgId, vr: server.client(reg.apiKey) };
  }

  async function post(org: Org, path: string, json: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
    const res = await server.http(path, { method: 'POST', apiKey: org.apiKey, json });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  }

  /** POST /images answers the image's fields beside the envelope's (whose `status` is "success"), and in `data`. */
  async function createImage(org: Org, json: unknown): Promise<{ status: number; image: RestImage; body: Record<string, unknown> }> {
    const r = await post(org, '/api/images', json);
    return { ...r, image: r.body.data as RestImage };
  }

  async function getImage(org: Org, id: string): Promise<RestImage> {
    const res = await server.http(`/api/images/${id}`, { apiKey: org.apiKey });
    expect(res.status).toBe(200);
    return (await res.json()) as RestImage;
  }

  /** Waits until the build of `id` ends (ready or failed); returns the image then. */
  function built(org: Org, id: string): Promise<RestImage> {
    return until(() => getImage(org, id), (i) => i.status !== 'building', `image ${id} to finish building`, BUILD_TIMEOUT_MS, 250);
  }

  beforeAll(async () => {
    server = await startTestServer({ IMAGE_BUILDS_PER_ORG: '3' });
    mine = await register('images-mine');
    other = await register('images-other');
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it("a recipe adding python3 builds in the background; a sandbox created from it by templateId runs python3 -c 'print(6*7)'", async () => {
    const created = await createImage(mine, { name: 'py', ...TEST_IMAGE_RECIPE });
    expect(created.status).toBe(201);
    expect(created.body).toMatchObject({ status: 'success', message: 'Image created', id: created.image.id, name: 'py' });
    expect(created.image).toMatchObject({ name: 'py', status: 'building', source: 'recipe', system: false, orgId: mine.orgId, recipe: TEST_IMAGE_RECIPE });
    const image = await built(mine, created.image.id);
    expect(image).toMatchObject({ status: 'ready', ready: true, error: null, progress: null, layerCount: 1, base: 'debian' });
    expect(image.sizeBytes).toBeGreaterThan(1024 * 1024);
    // By id and by name.
    for (const templateId of [image.id, 'py']) {
      const sb = await mine.vr.sandboxes.create({ name: `py-${templateId.length}`, templateId });
      const r = await sb.exec("python3 -c 'print(6*7)'");
      expect(r).toMatchObject({ exitCode: 0, stdout: '42\n' });
      await sb.delete();
    }
    // The org's disk quota counts the image.
    const limits = await mine.vr.trpc.org.limits.query();
    expect(limits.usage.imageBytes).toBeGreaterThanOrEqual(image.sizeBytes);
  }, BUILD_TIMEOUT_MS);

  it('shows progress in GET while building; the log follows live over SSE and ends with the status; env and workdir reach the sandbox', async () => {
    const created = await createImage(mine, {
      name: 'slow',
      base: 'py',
      env: { GREETING: 'hello from the image' },
      workdir: '/srv/app',
      // A new command each run, so its layer is not in the (per-machine) layer cache and it really runs.
      run: [`echo step one is running: ${Date.now()}; sleep 3; echo step one done`, 'echo "$GREETING" > greeting.txt'],
    });
    expect(created.status).toBe(201);
    const id = created.image.id;
    const during = await until(() => getImage(mine, id), (i) => i.status !== 'building' || (i.progress?.step ?? 0) >= 1, 'build progress in GET', BUILD_TIMEOUT_MS, 50);
    expect(during.status).toBe('building');
    expect(during.progress).toMatchObject({ step: expect.any(Number), steps: 3 });

    const stream = await server.http(`/api/images/${id}/logs/stream`, { apiKey: mine.apiKey });
    expect(stream.status).toBe(200);
    expect(stream.headers.get('content-type')).toContain('text/event-stream');
    const sse = await stream.text(); // ends when the build does
    expect(sse).toContain('data: step one done');
    expect(sse).toMatch(/event: end\ndata: \{"status":"ready"\}/);

    const image = await built(mine, id);
    expect(image).toMatchObject({ status: 'ready', env: { GREETING: 'hello from the image' }, workdir: '/srv/app', parentId: expect.any(String) });
    expect(image.layerCount).toBeGreaterThan(1);
    const log = await mine.vr.trpc.images.buildLog.query({ id });
    expect(log).toMatchObject({ id, status: 'ready', truncated: false });
    expect(log.log).toContain('step one is running');

    const sb = await mine.vr.sandboxes.create({ name: 'slow-1', templateId: id, envVars: { EXTRA: 'mine' } });
    const r = await sb.exec('pwd; cat greeting.txt; echo "$GREETING/$EXTRA"');
    expect(r).toMatchObject({ exitCode: 0, stdout: '/srv/app\nhello from the image\nhello from the image/mine\n' });
    // The create's envVars win over the image's env.
    const sb2 = await mine.vr.sandboxes.create({ name: 'slow-2', templateId: id, envVars: { GREETING: 'overridden' } });
    expect((await sb2.exec('echo "$GREETING"')).stdout).toBe('overridden\n');
    await Promise.all([sb.delete(), sb2.delete()]);
  }, BUILD_TIMEOUT_MS);

  it('a failing recipe ends failed with its log; sandboxes and builds on it get 409 IMAGE_NOT_READY', async () => {
    const created = await createImage(mine, { name: 'broken', base: 'debian', run: ['echo about to fail; exit 3'] });
    expect(created.status).toBe(201);
    const id = created.image.id;
    const image = await built(mine, id);
    expect(image.status).toBe('failed');
    expect(image.ready).toBe(false);
    expect(image.error).toMatch(/exit/i);
    expect(image.error).not.toMatch(/\/var\/|\/tmp\//);
    const logs = await server.http(`/api/images/${id}/logs`, { apiKey: mine.apiKey });
    expect(logs.status).toBe(200);
    const { data } = (await logs.json()) as { data: { log: string; status: string } };
    expect(data.status).toBe('failed');
    expect(data.log).toContain('about to fail');
    // The tRPC subscription images.logs: the whole log of a finished build, then it completes.
    const lines = await new Promise<string[]>((resolve, reject) => {
      const got: string[] = [];
      mine.vr.trpc.images.logs.subscribe({ id }, { onData: (line) => void got.push(line), onComplete: () => resolve(got), onError: reject });
    });
    expect(lines.join('\n')).toBe(data.log.trimEnd());

    const sandbox = await post(mine, '/api/sandboxes', { name: 'on-broken', templateId: id });
    expect(sandbox.status).toBe(409);
    expect(sandbox.body).toMatchObject({ code: 'IMAGE_NOT_READY' });
    expect(String(sandbox.body.error)).toContain('failed to build');
    await expect(mine.vr.sandboxes.create({ name: 'on-broken', templateId: id })).rejects.toBeInstanceOf(ImageNotReadyError);
    const onTop = await post(mine, '/api/images', { name: 'on-broken', base: id, run: ['true'] });
    expect(onTop.status).toBe(409);
    expect(onTop.body).toMatchObject({ code: 'IMAGE_NOT_READY' });
    expect((await server.http(`/api/images/${id}`, { method: 'DELETE', apiKey: mine.apiKey })).status).toBe(200);
  }, BUILD_TIMEOUT_MS);

  it('an image made from a sandbox carries a file written in that sandbox', async () => {
    const source = await mine.vr.sandboxes.create({ name: 'snap-source' });
    await source.exec('mkdir -p /opt/made && echo written in the sandbox > /opt/made/marker.txt && rm /etc/motd');
    const made = await post(mine, `/api/sandboxes/${source.id}/image`, { name: 'from-sandbox', version: 'v1' });
    expect(made.status).toBe(201);
    const image = made.body.data as RestImage;
    expect(image).toMatchObject({ name: 'from-sandbox', tag: 'v1', status: 'ready', source: 'sandbox', layerCount: 1, orgId: mine.orgId });
    expect(image.sizeBytes).toBeGreaterThan(0);
    // Taken from a running sandbox, which keeps running.
    expect((await source.exec('cat /opt/made/marker.txt')).stdout).toBe('written in the sandbox\n');
    const copy = await mine.vr.sandboxes.create({ name: 'snap-copy', templateId: image.id });
    const r = await copy.exec('cat /opt/made/marker.txt; test -e /etc/motd && echo motd is back || echo motd stays deleted');
    expect(r).toMatchObject({ exitCode: 0, stdout: 'written in the sandbox\nmotd stays deleted\n' });
    // A name the org already uses is a 409, before anything is captured.
    expect((await post(mine, `/api/sandboxes/${source.id}/image`, { name: 'from-sandbox' })).status).toBe(409);
    await Promise.all([source.delete(), copy.delete()]);
  }, BUILD_TIMEOUT_MS);

  it("another org can't see or use your images: 404 for GET, templateId, recipe base and delete", async () => {
    const created = await createImage(mine, { name: 'private', path: 'debian' });
    expect(created.status).toBe(201);
    const id = created.image.id;
    expect((await server.http(`/api/images/${id}`, { apiKey: other.apiKey })).status).toBe(404);
    expect((await server.http(`/api/images/name/private`, { apiKey: other.apiKey })).status).toBe(404);
    expect((await server.http(`/api/images/${id}/logs`, { apiKey: other.apiKey })).status).toBe(404);
    expect((await server.http(`/api/images/${id}/logs/stream`, { apiKey: other.apiKey })).status).toBe(404);
    const list = (await (await server.http('/api/images', { apiKey: other.apiKey })).json()) as RestImage[];
    expect(list.map((i) => i.id)).not.toContain(id);
    expect(list.map((i) => i.name)).toContain('debian');
    for (const templateId of [id, 'private']) {
      const sb = await post(other, '/api/sandboxes', { name: 'theirs', templateId });
      expect(sb.status).toBe(404);
      expect(sb.body).toMatchObject({ code: 'IMAGE_NOT_FOUND' });
    }
    const onTop = await post(other, '/api/images', { name: 'stolen', base: id, run: ['true'] });
    expect(onTop.status).toBe(404);
    expect(onTop.body).toMatchObject({ code: 'IMAGE_NOT_FOUND' });
    expect((await server.http(`/api/images/${id}`, { method: 'DELETE', apiKey: other.apiKey })).status).toBe(404);
    // The owner still sees it.
    expect((await getImage(mine, id)).name).toBe('private');
  });

  it('delete: 409 while a sandbox uses the image, 403 for a system image, then 200 once the sandbox is gone', async () => {
    const created = await createImage(mine, { name: 'in-use', base: 'debian', env: { X: '1' } });
    expect(created.status).toBe(201);
    const id = created.image.id;
    expect(created.image).toMatchObject({ status: 'ready', layerCount: 0 }); // config only: nothing to build
    const sb = await mine.vr.sandboxes.create({ name: 'user-of-image', templateId: id });
    await sb.stop(); // any status counts
    const refused = await server.http(`/api/images/${id}`, { method: 'DELETE', apiKey: mine.apiKey });
    expect(refused.status).toBe(409);
    expect(((await refused.json()) as { error: string }).error).toContain('user-of-image');
    const debian = ((await (await server.http('/api/images', { apiKey: mine.apiKey })).json()) as RestImage[]).find((i) => i.name === 'debian')!;
    expect(debian).toMatchObject({ system: true, source: 'system', status: 'ready' });
    // The code image is seeded as a system recipe image, built on its first use.
    const images = (await (await server.http('/api/images', { apiKey: mine.apiKey })).json()) as RestImage[];
    const code = images.find((i) => i.name === 'code')!;
    expect(code).toMatchObject({ system: true, source: 'system', status: 'ready', base: 'debian', recipe: { base: 'debian', packages: expect.arrayContaining(['python3', 'nodejs', 'git', 'curl']) } });
    if (!code.ready) {
      // Not built here yet: building on it would build on debian alone, so it is refused until its first use.
      const onCode = await post(mine, '/api/images', { name: 'on-code', base: 'code', run: ['true'] });
      expect(onCode.status).toBe(409);
      expect(onCode.body).toMatchObject({ code: 'IMAGE_NOT_READY' });
      expect(String(onCode.body.error)).toContain('built on its first use');
    }
    expect((await server.http(`/api/images/${debian.id}`, { method: 'DELETE', apiKey: mine.apiKey })).status).toBe(403);
    await sb.delete();
    expect((await server.http(`/api/images/${id}`, { method: 'DELETE', apiKey: mine.apiKey })).status).toBe(200);
    expect((await server.http(`/api/images/${id}`, { apiKey: mine.apiKey })).status).toBe(404);

    // A create racing a delete: either the delete wins (the create is refused) or the sandbox does
    // (the delete is a 409), never a sandbox on a deleted image.
    for (let round = 0; round < 4; round++) {
      const raced = await createImage(mine, { name: `raced-${round}`, path: 'debian' });
      const [create, del] = await Promise.all([
        post(mine, '/api/sandboxes', { name: `racer-${round}`, templateId: raced.image.id }),
        server.http(`/api/images/${raced.image.id}`, { method: 'DELETE', apiKey: mine.apiKey }),
      ]);
      if (del.status === 200) expect([404, 409]).toContain(create.status);
      else expect([del.status, create.status]).toEqual([409, 201]);
      if (create.status === 201) await server.http(`/api/sandboxes/${(create.body.data as { id: string }).id}`, { method: 'DELETE', apiKey: mine.apiKey });
    }

    // Deleting an image while it builds cancels the build.
    const slow = await createImage(mine, { name: 'cancelled', base: 'debian', run: ['sleep 600'] });
    expect(slow.image.status).toBe('building');
    await until(() => getImage(mine, slow.image.id), (i) => (i.progress?.step ?? 0) >= 1, 'the sleep step to start', BUILD_TIMEOUT_MS, 50);
    expect((await server.http(`/api/images/${slow.image.id}`, { method: 'DELETE', apiKey: mine.apiKey })).status).toBe(200);
    expect((await server.http(`/api/images/${slow.image.id}`, { apiKey: mine.apiKey })).status).toBe(404);
    // The queue is free again: a new build runs to its end.
    const next = await createImage(mine, { name: 'after-cancel', base: 'debian', run: ['true'] });
    expect((await built(mine, next.image.id)).status).toBe('ready');
  }, BUILD_TIMEOUT_MS);

  it("the create answer's data.status is building and GET shows the same (the top-level status is the envelope's)", async () => {
    const created = await createImage(mine, { name: 'status-check', run: [`sleep 600 # status ${Date.now()}`] });
    expect(created.status).toBe(201);
    // The original contract's envelope: its `status` is "success", spread over the image's.
    expect(created.body.status).toBe('success');
    expect(created.image.status).toBe('building');
    expect((await getImage(mine, created.image.id)).status).toBe('building');
    expect((await server.http(`/api/images/${created.image.id}`, { method: 'DELETE', apiKey: mine.apiKey })).status).toBe(200);
  });

  it('a recipe that would stack more than MAX_IMAGE_LAYERS layers is a 400 naming the limit, before anything is recorded', async () => {
    const parent = await createImage(mine, { name: 'deep-parent', path: 'debian' });
    // A parent of 100 layers (as made by many builds on each other), recorded directly.
    await server.app.store.images.update(parent.image.id, { layers: Array.from({ length: 100 }, () => newLayerId()) });
    const r = await post(mine, '/api/images', { name: 'too-deep', base: parent.image.id, run: Array.from({ length: 30 }, (_, i) => `echo ${i}`) });
    expect(r.status).toBe(400);
    expect(String(r.body.error)).toContain('more than the 120 a sandbox can mount (MAX_IMAGE_LAYERS)');
    expect((await server.http('/api/images/name/too-deep', { apiKey: mine.apiKey })).status).toBe(404);
    expect((await server.http(`/api/images/${parent.image.id}`, { method: 'DELETE', apiKey: mine.apiKey })).status).toBe(200);
  });

  it('restoring a kept snapshot of a sandbox on an org image, after the sandbox is deleted, runs on that image (or 409 naming it when it is gone); the image cannot be deleted meanwhile', async () => {
    const source = await mine.vr.sandboxes.create({ name: 'snap-img-source' });
    await source.exec('echo on the image > /opt/image-marker.txt');
    const made = await post(mine, `/api/sandboxes/${source.id}/image`, { name: 'snap-img' });
    expect(made.status).toBe(201);
    const imageId = (made.body.data as RestImage).id;
    await source.delete();
    const sb = await mine.vr.sandboxes.create({ name: 'snap-img-user', templateId: imageId });
    await sb.exec('echo in the snapshot > /root/snap.txt');
    const fullPath = (await sb.snapshot()).full_path;
    await mine.vr.trpc.sandbox.delete.mutate({ id: sb.id, keepSnapshots: true });
    // The kept snapshot uses the image.
    const refused = await server.http(`/api/images/${imageId}`, { method: 'DELETE', apiKey: mine.apiKey });
    expect(refused.status).toBe(409);
    expect(((await refused.json()) as { error: string }).error).toContain('snapshot');
    const restored = await mine.vr.sandboxes.restore({ orgId: mine.orgId, snapshot_path: fullPath });
    const r = await restored.exec('cat /opt/image-marker.txt /root/snap.txt');
    expect(r).toMatchObject({ exitCode: 0, stdout: 'on the image\nin the snapshot\n' });
    await restored.delete();
    // The image gone (removed from the store directly): the restore is a 409 naming it, never the default image.
    await server.app.store.images.delete(imageId);
    const gone = await post(mine, '/api/sandboxes/restore', { orgId: mine.orgId, snapshot_path: fullPath });
    expect(gone.status).toBe(409);
    expect(String(gone.body.error)).toContain(imageId);
  }, BUILD_TIMEOUT_MS);

  it('concurrent builds past IMAGE_BUILDS_PER_ORG are refused with 429, none left building forever', async () => {
    const org = await register('images-cap');
    const answers = await Promise.all(Array.from({ length: 5 }, (_, i) => post(org, '/api/images', { name: `capped-${i}`, run: [`sleep 600 # ${i}`] })));
    expect(answers.map((a) => a.status).sort()).toEqual([201, 201, 201, 429, 429]);
    expect(answers.find((a) => a.status === 429)!.body.error).toContain('IMAGE_BUILDS_PER_ORG 3');
    const list = (await (await server.http('/api/images', { apiKey: org.apiKey })).json()) as RestImage[];
    const mineBuilding = list.filter((i) => i.orgId === org.orgId);
    expect(mineBuilding.map((i) => i.status)).toEqual(['building', 'building', 'building']);
    for (const image of mineBuilding) expect((await server.http(`/api/images/${image.id}`, { method: 'DELETE', apiKey: org.apiKey })).status).toBe(200);
  });

  it('bad recipes are 400s naming the field; an alias registration is unchanged ({name, path})', async () => {
    const bad = [
      [{ name: 'x1', packages: ['Python3;rm'] }, 'packages'],
      [{ name: 'x2', workdir: 'relative/dir' }, 'workdir'],
      [{ name: 'x3', files: [{ path: '/etc/../../x', content: '' }] }, 'files'],
      [{ name: 'x4', path: 'debian', run: ['true'] }, 'path'],
    ] as const;
    for (const [json, field] of bad) {
      const r = await post(mine, '/api/images', json);
      expect(r.status, JSON.stringify(json)).toBe(400);
      expect(JSON.stringify(r.body)).toContain(field);
    }
    const alias = await createImage(mine, { name: 'my-debian', version: '12', path: 'debian' });
    expect(alias.status).toBe(201);
    expect(alias.image).toMatchObject({ name: 'my-debian', tag: '12', base: 'debian', status: 'ready', source: 'alias', layerCount: 0 });
  });
});

describe.skipIf(!support.ok)('images: the org disk quota (ORG_MAX_DISK_MB)', () => {
  let server: TestServer;

  beforeAll(async () => {
    // One sandbox takes 128 of the org's 160 MB: 32 MB are left for images.
    server = await startTestServer({ SANDBOX_DEFAULT_DISK_MB: '128', ORG_MAX_DISK_MB: '160' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('an image from a sandbox, or a build, larger than what is left of the quota is refused or fails saying so; an image from a sandbox past the quota leaves no layer', async () => {
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Quota Images', email: uniqueEmail('image-quota') });
    const vr = server.client(reg.apiKey);
    const sb = await vr.sandboxes.create({ name: 'big-writer' });
    const layersDir = join(server.app.config.BASE_IMAGES_DIR, 'layers');
    const sandboxLayers = () =>
      readdirSync(layersDir).filter((n) => /^[0-9a-f]{24,64}$/.test(n) && (existsSync(join(layersDir, n, 'layer.json')) ? readFileSync(join(layersDir, n, 'layer.json'), 'utf8') : '').includes('"description":"sandbox big-writer"'));
    const before = sandboxLayers();
    // 40 MB that compresses to little: the snapshot fits, the layer it becomes does not, and is removed at once.
    expect((await sb.exec('yes voidrun-layer | head -c 41943040 > /root/text.txt && echo ok')).stdout).toBe('ok\n');
    const overQuota = await server.http(`/api/sandboxes/${sb.id}/image`, { method: 'POST', apiKey: reg.apiKey, json: { name: 'too-big' } });
    expect(overQuota.status).toBe(429);
    expect(sandboxLayers()).toEqual(before);
    await sb.exec('rm /root/text.txt');
    // 40 MB that does not compress.
    expect((await sb.exec('head -c 41943040 /dev/urandom > /root/noise.bin && echo ok')).stdout).toBe('ok\n');
    const refused = await server.http(`/api/sandboxes/${sb.id}/image`, { method: 'POST', apiKey: reg.apiKey, json: { name: 'too-big' } });
    expect(refused.status).toBe(429);
    expect(((await refused.json()) as { error: string }).error).toContain('ORG_MAX_DISK_MB');
    expect((await server.http('/api/images/name/too-big', { apiKey: reg.apiKey })).status).toBe(404);
    // An image from a sandbox past the quota leaves no layer (none waits for the layer GC).
    expect(sandboxLayers()).toEqual(before);

    // The same 40 MB written by a recipe: built, then failed (the layer is not the org's).
    const res = await server.http('/api/images', { method: 'POST', apiKey: reg.apiKey, json: { name: 'built-too-big', run: ['head -c 41943040 /dev/urandom > /opt/noise.bin'] } });
    expect(res.status).toBe(201);
    const id = ((await res.json()) as { data: RestImage }).data.id;
    const image = await until(
      async () => (await (await server.http(`/api/images/${id}`, { apiKey: reg.apiKey })).json()) as RestImage,
      (i) => i.status !== 'building',
      'the build to end',
      BUILD_TIMEOUT_MS,
      250,
    );
    expect(image).toMatchObject({ status: 'failed', sizeBytes: 0 });
    expect(image.error).toMatch(/only \d+ MB of the org's disk quota \(ORG_MAX_DISK_MB\) is left/);
    expect((await vr.trpc.org.limits.query()).usage.imageBytes).toBe(0);
    await sb.delete();
  }, BUILD_TIMEOUT_MS);
});

describe.skipIf(!support.ok)('images: layer GC', () => {
  let server: TestServer;
  let baseImagesDir: string;
  let apiKey: string;

  beforeAll(async () => {
    // A private layer store (GC here must not touch the shared one), every unused layer collectable at once.
    baseImagesDir = mkdtempSync(join(tmpdir(), 'voidrun-gc-'));
    chmodSync(baseImagesDir, 0o711);
    server = await startTestServer({ BASE_IMAGES_DIR: baseImagesDir, IMAGE_LAYER_CACHE_TTL_SEC: '0' });
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'GC', email: uniqueEmail('image-gc') })).apiKey;
  }, 180_000);
  afterAll(async () => {
    await server?.close();
    if (baseImagesDir) rmSync(baseImagesDir, { recursive: true, force: true });
  });

  const importImage = async (name: string) => {
    const res = await server.http(`/api/images/import?name=${name}`, { method: 'POST', apiKey, headers: { 'content-type': 'application/x-tar' }, body: ociLayout({ layers: [[{ name: `${name}.txt`, body: name }]] }) });
    expect(res.status).toBe(201);
    return ((await res.json()) as { data: RestImage }).data;
  };

  it("deleting an image removes its layers once no image uses them; other images' layers stay", async () => {
    const [gone, kept] = [await importImage('gc-gone'), await importImage('gc-kept')];
    const layerDirs = () => readdirSync(join(baseImagesDir, 'layers')).filter((n) => /^[0-9a-f]{24,64}$/.test(n));
    expect(layerDirs()).toHaveLength(2);
    const goneLayer = (await server.app.store.images.findById(gone.id))!.layers[0]!;
    const keptLayer = (await server.app.store.images.findById(kept.id))!.layers[0]!;
    expect((await server.http(`/api/images/${gone.id}`, { method: 'DELETE', apiKey })).status).toBe(200);
    await until(() => layerDirs(), (dirs) => !dirs.includes(goneLayer), 'the deleted image\'s layer to be collected');
    expect(layerDirs()).toEqual([keptLayer]);
    expect(existsSync(join(baseImagesDir, 'layers', keptLayer, 'layer.json'))).toBe(true);
    expect((await server.http(`/api/images/${kept.id}`, { method: 'DELETE', apiKey })).status).toBe(200);
  });

  it('a layer a sandbox instance mounts (its lower file) stays through a GC pass when no record names it any more (a system recipe changed under it)', async () => {
    const image = await importImage('gc-mounted');
    const layer = (await server.app.store.images.findById(image.id))!.layers[0]!;
    // A container instance on that layer, as the driver leaves it: its `lower` file, bottom first.
    const instance = join(server.dirs.instancesDir, newLayerId());
    mkdirSync(instance, { recursive: true });
    writeFileSync(join(instance, 'lower'), `${join(baseImagesDir, 'layers', layer, 'fs')}\n`);
    // No record names the layer any more (as `code` after its recipe changed).
    expect((await server.http(`/api/images/${image.id}`, { method: 'DELETE', apiKey })).status).toBe(200);
    await server.app.services.images.collectLayers();
    expect(existsSync(join(baseImagesDir, 'layers', layer, 'layer.json'))).toBe(true);
    rmSync(instance, { recursive: true, force: true });
    await server.app.services.images.collectLayers();
    expect(existsSync(join(baseImagesDir, 'layers', layer))).toBe(false);
  });

  it("deleting an image another image is built on does not lower the org's imageBytes below what its layers take", async () => {
    const parent = await importImage('charged-parent');
    const limits = async () => (await server.client(apiKey).trpc.org.limits.query()).usage.imageBytes;
    const withParent = await limits();
    expect(withParent).toBeGreaterThan(0);
    const child = await server.http('/api/images', { method: 'POST', apiKey, json: { name: 'charged-child', base: parent.id, env: { A: '1' } } });
    expect(child.status).toBe(201);
    const childId = ((await child.json()) as { data: RestImage }).data.id;
    // The child keeps the same layer: charged once.
    expect(await limits()).toBe(withParent);
    expect((await server.http(`/api/images/${parent.id}`, { method: 'DELETE', apiKey })).status).toBe(200);
    expect(await limits()).toBe(withParent);
    expect((await server.http(`/api/images/${childId}`, { method: 'DELETE', apiKey })).status).toBe(200);
    expect(await limits()).toBe(0);
  });
});

describe.skipIf(!support.ok)('images: a server restart during a build', () => {
  let server: TestServer | undefined;

  afterAll(async () => {
    await server?.close();
  });

  it('a build the server stopped during is built again at the next start and ends ready', async () => {
    server = await startTestServer();
    const { apiKey } = await server.client().trpc.auth.register.mutate({ name: 'Restart', email: uniqueEmail('image-restart') });
    const get = async () => (await (await server!.http(`/api/images/${id}`, { apiKey })).json()) as RestImage;
    const res = await server.http('/api/images', { method: 'POST', apiKey, json: { name: 'interrupted', run: [`echo interrupted ${Date.now()}; sleep 5; echo slept`] } });
    expect(res.status).toBe(201);
    const id = ((await res.json()) as { data: RestImage }).data.id;
    await until(get, (i) => (i.progress?.step ?? 0) >= 1, 'the build to start', BUILD_TIMEOUT_MS, 50);
    const dirs = server.dirs;
    await server.close({ keepState: true });
    server = await startTestServer({}, dirs);
    const image = await until(get, (i) => i.status !== 'building', 'the resumed build to end', BUILD_TIMEOUT_MS, 250);
    expect(image).toMatchObject({ status: 'ready', layerCount: 1, error: null });
    const log = (await (await server.http(`/api/images/${id}/logs`, { apiKey })).json()) as { data: { log: string } };
    expect(log.data.log).toContain('the server restarted during this build');
    expect(log.data.log).toContain('slept');
  }, BUILD_TIMEOUT_MS);
});
