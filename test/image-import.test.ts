import { chmodSync, existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { VoidRunClient } from '../client/index.js';
import { TarReader } from '../shared/tar-reader.js';
import { changeManifest, dockerSave, ociLayout, ociLayoutFiles, sha256, tar, tarBlocks, tarOfFiles, type ImageSpec, type TarItem } from './helpers/oci-archive.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { until } from './helpers/until.js';

const UID_BASE = 200_000;
const MAX_BYTES = 32 * 1024 * 1024;
/** A static busybox (the VM initrd's), so the imported image has a shell; without it the tree is read through the files API only. */
const busyboxPath = join(process.env.BASE_IMAGES_DIR ?? '/var/lib/hyper-fleet/base-images', 'debian-busybox');
const busybox = existsSync(busyboxPath) ? readFileSync(busyboxPath) : null;

/** The test image: three layers with a whiteout, an opaque dir, symbolic and hard links, a setuid file and a non-root owner. */
function testImage(): ImageSpec {
  const shell: TarItem[] = busybox
    ? [{ name: 'bin/busybox', body: busybox, mode: 0o755 }, ...['sh', 'ls', 'cat', 'stat', 'id', 'pwd', 'echo'].map((n): TarItem => ({ name: `bin/${n}`, type: 'symlink', linkName: 'busybox' }))]
    : [];
  return {
    layers: [
      [
        { name: 'bin/' },
        ...shell,
        { name: 'etc/' },
        { name: 'etc/hello', body: 'hello\n' },
        { name: 'etc/gone.txt', body: 'deleted by layer 2\n' },
        { name: 'srv/old/a.txt', body: 'hidden by the opaque dir\n' },
        { name: 'srv/old/keep/x', body: 'hidden too\n' },
        { name: 'usr/bin/tool', body: '#!/bin/sh\necho tool\n', mode: 0o4755 },
        { name: 'home/user/', uid: 1000, gid: 1000 },
        { name: 'home/user/notes', body: 'mine\n', uid: 1000, gid: 1000, mode: 0o600 },
        { name: 'tmp/', mode: 0o1777 },
        { name: 'root/', mode: 0o700 },
      ],
      [
        { name: 'etc/.wh.gone.txt' },
        { name: 'srv/old/c.txt', body: 'this layer\'s\n' },
        { name: 'srv/old/.wh..wh..opq' },
        { name: 'etc/link', type: 'symlink', linkName: 'hello' },
        { name: 'etc/abs', type: 'symlink', linkName: '/etc/hello' },
        { name: 'etc/hard', type: 'hardlink', linkName: 'etc/hello' },
        { name: '.wh..wh.plnk/' },
        { name: '.wh..wh.plnk/123.456', body: 'aufs metadata' },
      ],
      [
        { name: 'app/' },
        { name: 'app/run.sh', body: '#!/bin/sh\necho "$GREETING from $(pwd)"\n', mode: 0o755 },
        // Times out of range are clamped to 1970 and the year 9999 (not wrapped, not a 500).
        { name: 'app/before-1970', pax: { mtime: '-1.5' } },
        { name: 'app/far-future', pax: { mtime: '9000000000000000' } },
      ],
    ],
    env: ['PATH=/usr/bin:/bin', 'GREETING=hi'],
    workdir: '/app',
  };
}

/** An OCI layout whose one layer holds `items` (after a harmless first layer). */
function hostile(items: TarItem[], gzip = false): Buffer {
  return ociLayout({ layers: [[{ name: 'etc/' }, { name: 'etc/ok', body: 'ok' }], items], gzip: [true, gzip] });
}

describe.skipIf(!support.ok)('OCI image import (POST /api/images/import)', () => {
  let server: TestServer;
  let apiKey: string;
  let otherKey: string;
  let vr: VoidRunClient;
  let baseImagesDir: string;
  const layersDir = () => join(baseImagesDir, 'layers');
  const spoolDir = () => join(baseImagesDir, 'import-spool');
  const upload = (name: string, body: Buffer, key = apiKey, type = 'application/x-tar') =>
    server.http(`/api/images/import?name=${name}`, { method: 'POST', apiKey: key, headers: { 'content-type': type }, body });
  /** What an import leaves on the host: layer dirs (complete or staged) and spools. */
  const hostState = () => ({ layers: readdirSync(layersDir()).sort(), spool: existsSync(spoolDir()) ? readdirSync(spoolDir()) : [] });

  beforeAll(async () => {
    // A private image store: what an import leaves behind is all there is to see.
    baseImagesDir = mkdtempSync(join(tmpdir(), 'voidrun-import-'));
    chmodSync(baseImagesDir, 0o711);
    server = await startTestServer({ BASE_IMAGES_DIR: baseImagesDir, SANDBOX_UID_BASE: String(UID_BASE), IMAGE_IMPORT_MAX_BYTES: String(MAX_BYTES) });
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Importer', email: uniqueEmail('import') })).apiKey;
    otherKey = (await server.client().trpc.auth.register.mutate({ name: 'Other', email: uniqueEmail('import-other') })).apiKey;
    vr = server.client(apiKey);
  }, 180_000);
  afterAll(async () => {
    await server?.close();
    if (baseImagesDir) rmSync(baseImagesDir, { recursive: true, force: true });
  });

  let imageId: string;

  it('imports an OCI image layout: layers applied in order (whiteout, opaque dir, links), owners shifted, config env and workdir kept', async () => {
    const res = await upload('oci-test', ociLayout(testImage()));
    const body = (await res.json()) as Record<string, unknown> & { data: Record<string, unknown> };
    expect(res.status, JSON.stringify(body)).toBe(201);
    expect(body).toMatchObject({ status: 'success', message: 'Image imported', name: 'oci-test', source: 'import', base: '', layerCount: 1 });
    expect(body.data).toMatchObject({ name: 'oci-test', status: 'ready', source: 'import', env: { PATH: '/usr/bin:/bin', GREETING: 'hi' }, workdir: '/app' });
    expect(body.data.sizeBytes).toBeGreaterThan(0);
    imageId = body.data.id as string;

    // The layer on the host: the flattened tree, owned by the sandbox uid range.
    const [layer] = hostState().layers;
    const fs = join(layersDir(), layer!, 'fs');
    const owner = (p: string) => `${lstatSync(join(fs, p)).uid}:${lstatSync(join(fs, p)).gid}`;
    expect(existsSync(join(fs, 'etc/gone.txt'))).toBe(false);
    expect(readdirSync(join(fs, 'srv/old'))).toEqual(['c.txt']);
    expect(readdirSync(fs).sort()).toEqual(['app', 'bin', 'etc', 'home', 'root', 'srv', 'tmp', 'usr']);
    expect(readlinkSync(join(fs, 'etc/abs'))).toBe('/etc/hello');
    expect(owner('etc/hello')).toBe(`${UID_BASE}:${UID_BASE}`);
    expect(owner('home/user/notes')).toBe(`${UID_BASE + 1000}:${UID_BASE + 1000}`);
    expect(owner('etc/link')).toBe(`${UID_BASE}:${UID_BASE}`);
    expect(lstatSync(join(fs, 'usr/bin/tool')).mode & 0o7777).toBe(0o4755);
    expect(lstatSync(join(fs, 'tmp')).mode & 0o7777).toBe(0o1777);
    expect(lstatSync(join(fs, 'etc/hard')).ino).toBe(lstatSync(join(fs, 'etc/hello')).ino);
    expect(lstatSync(join(fs, 'etc/hello')).mtimeMs).toBe(1_700_000_000_000);
    expect(lstatSync(join(fs, 'app/before-1970')).mtimeMs).toBe(0);
    // The year 9999 asked for; the filesystem keeps its own latest (2038 to 2446 on ext4, by inode size).
    expect(lstatSync(join(fs, 'app/far-future')).mtimeMs).toBeGreaterThanOrEqual(2 ** 31 * 1000 - 1000);
    expect(hostState().spool).toEqual([]);
  });

  it('a sandbox created from the imported image (templateId) sees that tree, as root, with the image env and workdir', async () => {
    const box = await vr.sandboxes.create({ name: 'from-import', templateId: imageId });
    try {
      expect((await box.files.read('/etc/hello')).toString()).toBe('hello\n');
      expect((await box.files.read('/etc/link')).toString()).toBe('hello\n');
      expect((await box.files.read('/etc/hard')).toString()).toBe('hello\n');
      expect(await box.files.stat('/etc/gone.txt').catch((e: Error & { code?: string }) => e.code)).toBe('FILE_NOT_FOUND');
      expect((await box.files.list('/srv/old')).map((f) => f.name)).toEqual(['c.txt']);
      expect(await box.files.stat('/etc/abs')).toMatchObject({ isSymlink: true, linkTarget: '/etc/hello', uid: 0, gid: 0 });
      expect(await box.files.stat('/etc/hello')).toMatchObject({ uid: 0, gid: 0 });
      expect(await box.files.stat('/home/user/notes')).toMatchObject({ uid: 1000, gid: 1000 });
      if (busybox) {
        expect((await box.exec('./run.sh')).stdout).toBe('hi from /app\n');
        expect((await box.exec('id -u; stat -c "%a %u" /usr/bin/tool /tmp; cat /etc/abs')).stdout).toBe('0\n4755 0\n1777 0\nhello\n');
      }
    } finally {
      await box.delete();
    }
  }, 120_000);

  it('imports a docker save tar, gzip-compressed as a whole, streamed from a file by the client (images.import)', async () => {
    const file = join(baseImagesDir, 'docker-save.tar.gz');
    writeFileSync(file, gzipSync(dockerSave({ ...testImage(), workdir: '/srv' })));
    const image = await vr.images.import('docker-test', { path: file }, { version: '1.0' });
    rmSync(file);
    expect(image).toMatchObject({ name: 'docker-test', tag: '1.0', status: 'ready', source: 'import', workdir: '/srv', env: { GREETING: 'hi' } });
    const box = await vr.sandboxes.create({ name: 'from-docker', templateId: 'docker-test' });
    try {
      expect((await box.files.list('/srv/old')).map((f) => f.name)).toEqual(['c.txt']);
      expect((await box.files.read('/app/run.sh')).toString()).toContain('GREETING');
    } finally {
      await box.delete();
    }
  }, 120_000);

  it('imports a docker save tar whose layers are linked (../<id>/layer.tar, as older docker writes a shared layer)', async () => {
    const layer = tar([{ name: 'shared/file', body: 'shared' }]);
    const config = Buffer.from(JSON.stringify({ config: { Env: ['A=1'] } }));
    const archive = tar([
      { name: 'aaa/' },
      { name: 'aaa/layer.tar', body: layer },
      { name: 'bbb/' },
      { name: 'bbb/layer.tar', type: 'symlink', linkName: '../aaa/layer.tar' },
      { name: 'ccc/' },
      { name: 'ccc/layer.tar', type: 'hardlink', linkName: 'aaa/layer.tar' },
      { name: 'config.json', body: config },
      { name: 'manifest.json', body: JSON.stringify([{ Config: 'config.json', RepoTags: null, Layers: ['aaa/layer.tar', 'bbb/layer.tar', 'ccc/layer.tar'] }]) },
    ]);
    const res = await upload('linked-layers', archive);
    expect(res.status, await res.clone().text()).toBe(201);
    expect(((await res.json()) as { data: { env: Record<string, string> } }).data.env).toEqual({ A: '1' });
    const outside = tar([{ name: 'x/layer.tar', type: 'symlink', linkName: '../../etc/passwd' }, { name: 'manifest.json', body: '[]' }]);
    const refused = await upload('linked-out', outside);
    expect(refused.status).toBe(400);
    expect(((await refused.json()) as { error: string }).error).toContain('"x/layer.tar" links to "../../etc/passwd", outside the archive');
  });

  it('applies a layer written by GNU tar (PAX long names, hard links, ./ names, numeric owners)', async () => {
    const src = mkdtempSync(join(tmpdir(), 'voidrun-gnu-layer-'));
    try {
      const long = `${'deep-directory-name/'.repeat(8)}file-with-a-long-name.txt`;
      execFileSync('sh', ['-c', `cd "${src}" && chmod 755 . && mkdir -p "$(dirname "${long}")" && echo long > "${long}" && echo one > one && ln one two && ln -s one three && chown 1234:5678 one`]);
      const layer = execFileSync('tar', ['--format=posix', '--numeric-owner', '-C', src, '-cf', '-', '.']);
      const files = ociLayoutFiles({ layers: [[{ name: 'placeholder', body: '' }]], gzip: [false] });
      // Swap the layer for GNU tar's, fixing up its digest in the manifest.
      changeManifest(files, (manifest) => {
        files.delete(`blobs/sha256/${manifest.layers[0]!.digest.slice(7)}`);
        manifest.layers[0] = { ...manifest.layers[0]!, digest: `sha256:${sha256(layer)}`, size: layer.length };
      });
      files.set(`blobs/sha256/${sha256(layer)}`, layer);
      const before = new Set(hostState().layers);
      const res = await upload('gnu-tar', tarOfFiles(files));
      expect(res.status, await res.clone().text()).toBe(201);
      const layerId = hostState().layers.find((l) => !before.has(l))!;
      const fs = join(layersDir(), layerId, 'fs');
      expect(readFileSync(join(fs, long), 'utf8')).toBe('long\n');
      expect(lstatSync(join(fs, 'two')).ino).toBe(lstatSync(join(fs, 'one')).ino);
      expect(readlinkSync(join(fs, 'three'))).toBe('one');
      expect(lstatSync(join(fs, 'one'))).toMatchObject({ uid: UID_BASE + 1234, gid: UID_BASE + 5678 });
      expect(lstatSync(fs).mode & 0o7777).toBe(0o755);
    } finally {
      rmSync(src, { recursive: true, force: true });
    }
  });

  it('a whiteout after a re-created dir in the same layer hides the lower layer\'s files', async () => {
    const before = new Set(hostState().layers);
    const archive = ociLayout({
      layers: [
        [{ name: 'd/old', body: 'lower' }, { name: 'e/old', body: 'lower' }, { name: 'f', body: 'lower' }, { name: 'g/keep', body: 'lower' }],
        // Whiteouts apply to the lower layers wherever they come in the layer: d/new and e/new stay, d/old and e/old go.
        [{ name: 'd/new', body: 'upper' }, { name: '.wh.d' }, { name: '.wh.e' }, { name: 'e/new', body: 'upper' }, { name: 'f', body: 'upper' }, { name: '.wh.f' }, { name: 'g/.wh.keep' }, { name: 'g/keep', body: 'upper' }],
      ],
    });
    const res = await upload('whiteout-order', archive);
    expect(res.status, await res.clone().text()).toBe(201);
    const fs = join(layersDir(), hostState().layers.find((l) => !before.has(l))!, 'fs');
    expect(readdirSync(join(fs, 'd'))).toEqual(['new']);
    expect(readdirSync(join(fs, 'e'))).toEqual(['new']);
    expect(readFileSync(join(fs, 'f'), 'utf8')).toBe('upper');
    expect(readFileSync(join(fs, 'g/keep'), 'utf8')).toBe('upper');
  });

  it('another org cannot see or use the imported image (404)', async () => {
    const other = server.client(otherKey);
    expect((await server.http(`/api/images/${imageId}`, { apiKey: otherKey })).status).toBe(404);
    expect((await other.trpc.images.list.query()).map((i) => i.id)).not.toContain(imageId);
    const create = await other.sandboxes.create({ name: 'steal', templateId: imageId }).catch((e: Error & { code?: string }) => e);
    expect(create).toMatchObject({ code: 'IMAGE_NOT_FOUND' });
    expect(await other.sandboxes.create({ name: 'steal', templateId: 'oci-test' }).catch((e: Error & { code?: string }) => e.code)).toBe('IMAGE_NOT_FOUND');
  });

  it('refuses hostile archives with 400 naming the entry, and leaves nothing behind (layers, staging, spool, image list)', async () => {
    const before = hostState();
    const imagesBefore = (await vr.trpc.images.list.query()).map((i) => i.id).sort();
    const marker = `voidrun-import-escape-${process.pid}`;
    const wrongDigest = ociLayoutFiles({ layers: [[{ name: 'etc/ok', body: 'ok' }]], gzip: [false] });
    for (const [name, content] of wrongDigest) if (name.startsWith('blobs/') && content.length > 1024) wrongDigest.set(name, tar([{ name: 'etc/ok', body: 'altered' }]));
    // The manifest names a layer blob that the archive holds only as a link to another blob (of the descriptor's size).
    const linkedBlob = ociLayoutFiles({ layers: [[{ name: 'etc/ok', body: 'ok' }]], gzip: [false] });
    const otherLayer = tar([{ name: 'etc/evil', body: 'not the layer the manifest names' }]);
    let claimed = '';
    changeManifest(linkedBlob, (manifest) => {
      claimed = manifest.layers[0]!.digest.slice(7);
      manifest.layers[0]!.size = otherLayer.length;
    });
    linkedBlob.delete(`blobs/sha256/${claimed}`);
    linkedBlob.set(`blobs/sha256/${sha256(otherLayer)}`, otherLayer);
    const blobLinkMismatch = `blob blobs/sha256/${claimed} is a link to blobs/sha256/${sha256(otherLayer)}, which does not match its digest`;
    const globalHeaders = (n: number) => Array.from({ length: n }, (): TarItem => ({ name: 'g', type: 'global' }));
    const cases: Array<[string, Buffer, string]> = [
      ['dotdot', hostile([{ name: '../escape.txt', body: 'x' }]), '"../escape.txt" has a ".." component'],
      ['nested dotdot', hostile([{ name: 'etc/../../escape.txt', body: 'x' }], true), '".." component'],
      ['absolute symlink written through', hostile([{ name: 'escape', type: 'symlink', linkName: '/etc' }, { name: `escape/${marker}`, body: 'x' }]), `"escape/${marker}" goes through the symbolic link "escape"`],
      ['relative symlink written through', hostile([{ name: 'up', type: 'symlink', linkName: '../../../../tmp' }, { name: `up/${marker}`, body: 'x' }]), `"up/${marker}" goes through the symbolic link "up"`],
      ['symlink dir replaced then written', hostile([{ name: 'etc', type: 'symlink', linkName: '/etc' }, { name: `etc/${marker}`, body: 'x' }]), 'goes through the symbolic link "etc"'],
      ['hard link out of the tree', hostile([{ name: 'passwd', type: 'hardlink', linkName: '/etc/passwd' }]), '"passwd" is a hard link to "/etc/passwd", which is not an earlier regular file'],
      ['hard link through a symlink', hostile([{ name: 'l', type: 'symlink', linkName: '/etc' }, { name: 'h', type: 'hardlink', linkName: 'l/passwd' }]), 'goes through the symbolic link "l"'],
      ['hard link over its own target\'s dir', hostile([{ name: 'etc', type: 'hardlink', linkName: 'etc/ok' }]), '"etc" is a hard link to itself or to something under it'],
      ['char device', hostile([{ name: 'dev/', type: 'dir' }, { name: 'dev/mem', type: 'char' }]), '"dev/mem" is a device node'],
      ['block device', hostile([{ name: 'sda', type: 'block' }]), '"sda" is a device node'],
      ['GNU sparse entry', hostile([{ name: 'sparse.img', type: 'sparse', body: 'tiny' }]), '"sparse.img" is a GNU sparse file'],
      ['PAX sparse entry', hostile([{ name: 'sparse2.img', body: 'tiny', pax: { 'GNU.sparse.major': '1', 'GNU.sparse.minor': '0', 'GNU.sparse.realsize': String(10 * 1024 ** 3) } }]), '"sparse2.img" is a GNU sparse file'],
      ['10 GB declared, tiny body', hostile([{ name: 'huge.img', body: 'tiny', declaredSize: 10 * 1024 ** 3 }], true), `"huge.img" declares ${10 * 1024 ** 3} bytes, past IMAGE_IMPORT_MAX_BYTES`],
      ['uid past 65535', hostile([{ name: 'setuid-high', body: 'x', uid: 70_000 }]), '"setuid-high" is owned by 70000:0'],
      ['gid past 65535', hostile([{ name: 'gid-high', body: 'x', gid: 65_536 }]), '"gid-high" is owned by 0:65536'],
      ['name component over 255 bytes', hostile([{ name: `etc/${'n'.repeat(300)}`, body: 'x' }]), 'has a name component over 255 bytes'],
      ['file under a file', hostile([{ name: 'etc/ok/inside', body: 'x' }]), '"etc/ok/inside" is under "etc/ok", which is not a directory'],
      ['wrong blob digest', tarOfFiles(wrongDigest), 'does not match its digest'],
      ['zstd layer', ociLayout({ layers: [[{ name: 'a', body: 'a' }]], gzip: [false], layerMediaType: 'application/vnd.oci.image.layer.v1.tar+zstd' }), '"application/vnd.oci.image.layer.v1.tar+zstd", which is not supported'],
      ['zstd upload', Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), Buffer.alloc(600)]), 'zstd-compressed, which is not supported'],
      ['not an image', tar([{ name: 'readme.txt', body: 'hi' }]), 'neither index.json (an OCI image layout) nor manifest.json'],
      ['not a tar', Buffer.from('not a tar at all'.repeat(64)), 'Not a tar stream'],
      // A NUL reached open/mkdir/symlink as a bad argument: a 500 with the host staging path in the log.
      ['PAX path with a NUL byte', hostile([{ name: 'nul', body: 'x', pax: { path: 'a\0b' } }]), '"a\\u0000b" has a NUL or control character in its name'],
      ['PAX path with a NUL byte in a dir component', hostile([{ name: 'nul', body: 'x', pax: { path: 'a\0b/c' } }], true), '"a\\u0000b/c" has a NUL or control character in its name'],
      ['symlink linkpath with a NUL byte', hostile([{ name: 'l', type: 'symlink', linkName: 'x', pax: { linkpath: 'a\0b' } }]), '"l" has a NUL or control character in its link target'],
      ['hard-link linkpath with a NUL byte', hostile([{ name: 'h', type: 'hardlink', linkName: 'x', pax: { linkpath: 'etc/ok\0x' } }]), '"h" has a NUL or control character in its link target'],
      ['control character in a name', hostile([{ name: 'bad\nname', body: 'x' }]), 'has a NUL or control character in its name'],
      ['outer archive PAX path with a NUL byte', tar([{ name: 'x', body: 'x', pax: { path: 'index.json\0' } }]), 'has a NUL or control character in its name'],
      // Digests were checked only for regular files: a link named as a blob stood in for another blob.
      ['a blob that is a symlink to another blob', tarOfFiles(linkedBlob, [{ name: `blobs/sha256/${claimed}`, type: 'symlink', linkName: sha256(otherLayer) }]), blobLinkMismatch],
      ['a blob that is a hard link to another blob', tarOfFiles(linkedBlob, [{ name: `blobs/sha256/${claimed}`, type: 'hardlink', linkName: `blobs/sha256/${sha256(otherLayer)}` }]), blobLinkMismatch],
      // Metadata headers and skipped bodies were read unbudgeted: through gzip, hours of unpacking per upload.
      ['global PAX headers in a row in a gzip layer', hostile([...globalHeaders(1000), { name: 'after', body: 'x' }], true), 'More than 16 metadata headers'],
      ['a gzip upload of global PAX headers', gzipSync(tar(globalHeaders(1000))), 'More than 16 metadata headers'],
      ['a whiteout entry declaring a body', hostile([{ name: 'etc/.wh.ok', body: 'x' }]), '"etc/.wh.ok" is a whiteout but declares a 1-byte body'],
      ['a directory declaring 64 GiB of body', hostile([{ name: 'big/', declaredSize: 64 * 1024 ** 3 }], true), `"big/" is a directory but declares a ${64 * 1024 ** 3}-byte body`],
      ['a symlink declaring a body', hostile([{ name: 's', type: 'symlink', linkName: 'etc/ok', body: 'x' }]), '"s" is a link but declares a 1-byte body'],
      ['an outer-archive directory declaring a body', tar([{ name: 'blobs/', declaredSize: 10 * 1024 ** 3 }]), '"blobs/" is a directory but declares'],
      // Accepted, every process of its sandboxes would fail to start (E2BIG).
      ['an image config with 3 MiB of Env', ociLayout({ layers: [[{ name: 'a', body: 'a' }]], env: Array.from({ length: 24 }, (_, i) => `V${i}=${'x'.repeat(128 * 1024 - 10)}`) }), "The image config's Env holds"],
    ];
    for (const [what, archive, message] of cases) {
      const res = await upload(`bad-${sha256(Buffer.from(what)).slice(0, 8)}`, archive);
      const body = (await res.json()) as { error: string; code: string };
      expect(res.status, `${what}: ${JSON.stringify(body)}`).toBe(400);
      expect(body.code, what).toBe('INVALID_INPUT');
      expect(body.error, what).toContain(message);
      expect(body.error, what).not.toContain(baseImagesDir);
      expect(hostState(), what).toEqual(before);
    }
    expect(existsSync(`/etc/${marker}`)).toBe(false);
    expect(existsSync(`/tmp/${marker}`)).toBe(false);
    expect((await vr.trpc.images.list.query()).map((i) => i.id).sort()).toEqual(imagesBefore);
  });

  it('answers 413 for an upload over IMAGE_IMPORT_MAX_BYTES, declared or streamed, and keeps nothing', async () => {
    const before = hostState();
    const big = Buffer.alloc(MAX_BYTES + 1024);
    const declared = await upload('too-big', big);
    expect(declared.status).toBe(413);
    expect(await declared.json()).toMatchObject({ code: 'PAYLOAD_TOO_LARGE' });
    // Streamed without a length: a file declaring more than the bound is refused before its bytes are kept.
    const head = tar([{ name: 'blobs/sha256/big', declaredSize: 40 * 1024 * 1024 }]).subarray(0, 512);
    const streamed = await server.http('/api/images/import?name=too-big', {
      method: 'POST',
      apiKey,
      headers: { 'content-type': 'application/x-tar' },
      body: new ReadableStream({
        start(c) {
          c.enqueue(head);
          for (let i = 0; i < 40; i++) c.enqueue(new Uint8Array(1024 * 1024));
          c.close();
        },
      }),
      duplex: 'half',
    } as RequestInit);
    expect(streamed.status).toBe(400);
    expect(((await streamed.json()) as { error: string }).error).toContain('past IMAGE_IMPORT_MAX_BYTES');
    expect(hostState()).toEqual(before);
  });

  it('a client that disconnects mid-upload leaves nothing behind (and held its org\'s one import slot meanwhile)', async () => {
    const before = hostState();
    const archive = ociLayout({ layers: [[{ name: 'big.bin', body: Buffer.alloc(8 * 1024 * 1024, 7) }]], gzip: [false] });
    const url = new URL(`${server.url}/api/images/import?name=cut-off`);
    const req = request(url, { method: 'POST', headers: { 'x-api-key': apiKey, 'content-type': 'application/x-tar', 'content-length': archive.length } });
    req.on('error', () => {});
    req.write(archive.subarray(0, 4 * 1024 * 1024));
    // Cut once the server has started spooling it.
    await until(() => hostState().spool.length, (n) => n > 0, 'the import to start spooling');
    // One import at a time per org: a second one meanwhile is a 429 (another org's is not held up).
    const second = await upload('second', ociLayout({ layers: [[{ name: 'a', body: 'a' }]] }));
    expect(second.status).toBe(429);
    expect(((await second.json()) as { error: string }).error).toContain('already importing an image');
    req.destroy();
    await until(hostState, (s) => JSON.stringify(s) === JSON.stringify(before), 'the spool to be removed');
    expect((await vr.trpc.images.list.query()).map((i) => i.name)).not.toContain('cut-off');
  });

  it('refuses a name the org already uses (409) before reading the upload', async () => {
    const res = await upload('oci-test', Buffer.alloc(1024));
    expect(res.status).toBe(409);
    expect(await vr.images.import('oci-test', Buffer.alloc(1024)).catch((e: Error & { code?: string }) => e.code)).toBe('CONFLICT');
    expect((await upload('Bad_Name', Buffer.alloc(1024))).status).toBe(400);
  });
});

describe.skipIf(!support.ok)('OCI image import and the org disk quota', () => {
  let server: TestServer;

  beforeAll(async () => {
    server = await startTestServer({ ORG_MAX_DISK_MB: '64', SANDBOX_DEFAULT_DISK_MB: '64' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('an org with no disk left under ORG_MAX_DISK_MB gets 429 before its upload is read', async () => {
    const { apiKey } = await server.client().trpc.auth.register.mutate({ name: 'Full', email: uniqueEmail('import-full') });
    const box = await server.client(apiKey).sandboxes.create({ name: 'fills-the-quota' });
    try {
      const res = await server.http('/api/images/import?name=no-room', { method: 'POST', apiKey, headers: { 'content-type': 'application/x-tar' }, body: ociLayout({ layers: [[{ name: 'a', body: 'a' }]] }) });
      expect(res.status).toBe(429);
      expect(((await res.json()) as { error: string }).error).toContain('ORG_MAX_DISK_MB');
      expect((await server.client(apiKey).trpc.images.list.query()).map((i) => i.name)).not.toContain('no-room');
    } finally {
      await box.delete();
    }
  }, 120_000);

  it('an import larger than the org\'s disk left is refused while it is applied and leaves no layer', async () => {
    const { apiKey } = await server.client().trpc.auth.register.mutate({ name: 'Big', email: uniqueEmail('import-big') });
    // The layer store is shared with other test servers: this import's layer would hold the marker dir.
    const layers = join(process.env.BASE_IMAGES_DIR ?? '/var/lib/hyper-fleet/base-images', 'layers');
    const before = new Set(readdirSync(layers));
    const marker = `quota-marker-${process.pid}-${Date.now()}`;
    const leftBehind = () =>
      readdirSync(layers).filter((n) => !before.has(n) && (n.startsWith(`.staging-${process.pid}-`) || existsSync(join(layers, n, 'fs', marker))));
    const send = (name: string, items: TarItem[]) =>
      server.http(`/api/images/import?name=${name}`, { method: 'POST', apiKey, headers: { 'content-type': 'application/x-tar' }, body: ociLayout({ layers: [items], gzip: [true] }) });
    // 70 MiB declared by one file (64 MiB left): refused at its header, before it is written.
    const declared = await send('too-big-file', [{ name: `${marker}/big.bin`, body: Buffer.alloc(70 * 1024 * 1024) }]);
    expect(declared.status).toBe(429);
    expect(((await declared.json()) as { error: string }).error).toMatch(/image too-big-file takes \d+ bytes or more and your organization has 67108864 left under ORG_MAX_DISK_MB/);
    expect(leftBehind()).toEqual([]);
    // 45 MB declared in 9000 files, over 70 MB on disk (a block each and more): measured before commit, refused, discarded.
    const files = Array.from({ length: 9000 }, (_, i): TarItem => ({ name: `${marker}/f${i}`, body: Buffer.alloc(5000) }));
    const measured = await send('too-big-tree', files);
    expect(measured.status).toBe(429);
    expect(((await measured.json()) as { error: string }).error).toContain('image too-big-tree takes');
    expect(leftBehind()).toEqual([]);
    expect((await server.client(apiKey).trpc.images.list.query()).map((i) => i.name)).not.toContain('too-big-tree');
  }, 120_000);
});

describe('TarReader bounds (unit: the reader alone, no server)', () => {
  it('a stream of a million global PAX headers is refused after reading a few of them', async () => {
    const block = Buffer.concat(tarBlocks({ name: 'g', type: 'global' }));
    let pulled = 0;
    async function* source(): AsyncGenerator<Buffer> {
      for (let i = 0; i < 1_000_000; i++) {
        pulled += block.length;
        yield block;
      }
    }
    await expect(new TarReader(source(), (m) => new Error(m)).next()).rejects.toThrow('More than 16 metadata headers');
    expect(pulled).toBeLessThanOrEqual(17 * 512);
  });

  it('a reader bounded to N bytes refuses the stream past N, whatever its entries hold (headers, PAX records, skipped bodies)', async () => {
    const entry = Buffer.concat(tarBlocks({ name: 'f', body: 'x'.repeat(5000), pax: { comment: 'x'.repeat(60_000) } }));
    let pulled = 0;
    // Not a Readable (which reads ahead): each chunk is pulled only when the reader asks for it.
    async function* source(): AsyncGenerator<Buffer> {
      for (;;) {
        pulled += entry.length;
        yield entry;
      }
    }
    const reader = new TarReader(source(), (m) => new Error(m), { maxBytes: 1024 * 1024, limit: 'the test bound' });
    const walk = async () => {
      for (let e = await reader.next(); e; e = await reader.next());
    };
    await expect(walk()).rejects.toThrow('The tar stream is longer than 1048576 bytes (headers, metadata and bodies together; the test bound)');
    expect(pulled).toBeLessThanOrEqual(1024 * 1024 + entry.length);
  });
});
