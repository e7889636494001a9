import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, lstatSync, mkdtempSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { lchown, mkdir, readFile, rm, symlink, utimes, writeFile, link } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isLayerId, LayerStore, MAX_IMAGE_LAYERS, measureTree } from '../server/hypervisor/images/layer-store.js';
import { RootfsImages, vmImageKey } from '../server/hypervisor/images/rootfs-images.js';
import type { SandboxDriver, SandboxSpec, SnapshottingDriver } from '../server/hypervisor/types.js';
import { VmImages, vmBootImage } from '../server/hypervisor/vm/vm-images.js';
import { newId } from '../server/store/ids.js';
import { AgentClients } from '../server/agent-client/agent-clients.js';
import { qemuSupport } from './helpers/qemu-support.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const log = pino({ level: 'silent' });
const isRoot = process.getuid?.() === 0;

function run(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => (err ? reject(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`)) : resolve(stdout))),
  );
}

/** An overlayfs whiteout (a 0/0 character device) at `path`. */
const whiteout = (path: string) => run('mknod', [path, 'c', '0', '0']);

/** A new layer filled by `fill(dir)`, owned by the sandbox uid range as a system rootfs is; its id is added to `made`. */
async function makeLayer(store: LayerStore, uidBase: number, made: string[], fill: (dir: string) => Promise<void>): Promise<string> {
  const staged = await store.stage();
  await fill(staged.path);
  await run('chown', ['-R', '-h', `${uidBase}:${uidBase}`, staged.path]);
  const id = newId();
  made.push(id);
  await staged.commit(id, 'image-layers test');
  return id;
}

/** The test stack above debian: two files, one hidden again by the top layer, and debian's /etc/debian_version deleted. */
async function makeStack(store: LayerStore, uidBase: number, made: string[]): Promise<{ bottom: string; top: string }> {
  const bottom = await makeLayer(store, uidBase, made, async (dir) => {
    await mkdir(join(dir, 'opt', 'one'), { recursive: true });
    await writeFile(join(dir, 'opt', 'one', 'a.txt'), 'from the bottom layer\n');
    await writeFile(join(dir, 'opt', 'one', 'gone.txt'), 'hidden by the top layer\n');
    await mkdir(join(dir, 'opt', 'replaced'));
    await writeFile(join(dir, 'opt', 'replaced', 'old.txt'), 'old\n');
  });
  const top = await makeLayer(store, uidBase, made, async (dir) => {
    await mkdir(join(dir, 'opt', 'one'), { recursive: true });
    await mkdir(join(dir, 'opt', 'two'));
    await mkdir(join(dir, 'etc'));
    await writeFile(join(dir, 'opt', 'two', 'b.txt'), 'from the top layer\n');
    await whiteout(join(dir, 'opt', 'one', 'gone.txt'));
    await whiteout(join(dir, 'etc', 'debian_version'));
  });
  return { bottom, top };
}

/** Removes the layers a test made (never gc: the shared BASE_IMAGES_DIR holds other tests' layers). */
async function removeLayers(store: LayerStore, ids: string[]): Promise<void> {
  for (const id of ids) await rm(join(store.fsPath(id), '..'), { recursive: true, force: true });
}

describe.skipIf(!isRoot)('LayerStore', () => {
  let base: string;
  let store: LayerStore;

  beforeAll(() => {
    base = mkdtempSync(join(tmpdir(), 'voidrun-layers-'));
    store = new LayerStore({ baseImagesDir: base, log });
  });
  afterAll(() => rm(base, { recursive: true, force: true }));

  const leftovers = () => readdirSync(join(base, 'layers')).filter((n) => n.startsWith('.'));

  it('commit moves the staged tree into place with its layer.json, counting entries and allocated bytes without following links', async () => {
    const staged = await store.stage();
    expect(statSync(join(staged.path, '..')).mode & 0o777).toBe(0o700);
    await mkdir(join(staged.path, 'etc'));
    await writeFile(join(staged.path, 'etc', 'hello'), 'x'.repeat(10_000));
    await link(join(staged.path, 'etc', 'hello'), join(staged.path, 'etc', 'hello-again'));
    // A link to a big host file: counted as a link, never followed.
    await symlink('/proc/kcore', join(staged.path, 'etc', 'kcore'));
    await whiteout(join(staged.path, 'etc', 'gone'));
    const id = newId();
    expect(store.has(id)).toBe(false);
    const info = await staged.commit(id, 'test layer');
    expect(info).toMatchObject({ id, files: 5, description: 'test layer' });
    // One 10 kB file (two names) and a directory's block or so: never the link target's size.
    expect(info.bytes).toBeGreaterThanOrEqual(10_000);
    expect(info.bytes).toBeLessThan(200_000);
    expect(store.has(id)).toBe(true);
    expect(await store.info(id)).toEqual(info);
    expect(readFileSync(join(store.fsPath(id), 'etc', 'hello'), 'utf8')).toHaveLength(10_000);
    expect(lstatSync(join(store.fsPath(id), 'etc', 'gone')).isCharacterDevice()).toBe(true);
    expect(statSync(join(base, 'layers', id)).mode & 0o777).toBe(0o711);
    expect(leftovers()).toEqual([]);
  });

  it('committing an id that exists keeps the existing layer and discards the staged tree (also when two commit at once)', async () => {
    const id = newId();
    const first = await store.stage();
    await writeFile(join(first.path, 'which'), 'first');
    const info = await first.commit(id, 'first');
    const second = await store.stage();
    await writeFile(join(second.path, 'which'), 'second');
    expect(await second.commit(id, 'second')).toEqual(info);
    expect(readFileSync(join(store.fsPath(id), 'which'), 'utf8')).toBe('first');

    const racing = newId();
    const a = await store.stage();
    const b = await store.stage();
    await writeFile(join(a.path, 'which'), 'a');
    await writeFile(join(b.path, 'which'), 'b');
    const [ia, ib] = await Promise.all([a.commit(racing, 'a'), b.commit(racing, 'b')]);
    expect(ia).toEqual(ib);
    expect(readFileSync(join(store.fsPath(racing), 'which'), 'utf8')).toBe(ia.description);
    expect(leftovers()).toEqual([]);
  });

  it('a layer with a device node other than a whiteout is refused and leaves nothing behind', async () => {
    const staged = await store.stage();
    await run('mknod', [join(staged.path, 'null'), 'c', '1', '3']);
    const id = newId();
    await expect(staged.commit(id, 'device')).rejects.toThrow('The layer holds a device node, "/null"');
    expect(store.has(id)).toBe(false);
    expect(existsSync(join(base, 'layers', id))).toBe(false);
    expect(leftovers()).toEqual([]);
  });

  it('ids that are not 24–64 lowercase hex name no path', async () => {
    expect(isLayerId('a'.repeat(24))).toBe(true);
    expect(isLayerId('../../etc')).toBe(false);
    expect(() => store.fsPath('../../etc')).toThrow(/lowercase hex/);
    expect(store.has('../layers')).toBe(false);
    expect(await store.info('ABCDEF0123456789abcdef01')).toBeNull();
    const staged = await store.stage();
    await expect(staged.commit('../x', 'bad')).rejects.toThrow(/lowercase hex/);
    expect(leftovers()).toEqual([]);
  });

  it('gc removes unreferenced layers unused for the minimum age and stale staging dirs, and keeps referenced, young, just reused and in-use ones', async () => {
    const make = async () => {
      const s = await store.stage();
      await writeFile(join(s.path, 'f'), 'f');
      return (await s.commit(newId(), 'gc')).id;
    };
    const [kept, old, young, reused] = [await make(), await make(), await make(), await make()];
    // As once their image records exist (until then a pass keeps them whatever their age).
    store.settle([kept, old, young, reused]);
    const anHourAgo = new Date(Date.now() - 3_600_000);
    for (const id of [kept, old, reused]) await utimes(join(base, 'layers', id, 'layer.json'), anHourAgo, anHourAgo);
    // A build reusing a cached layer reads its info: that counts as a use.
    expect((await store.info(reused))?.id).toBe(reused);
    // A staging dir of a process that is gone, and one this process is filling.
    await mkdir(join(base, 'layers', '.staging-999999999-abc'));
    const active = await store.stage();
    const removed = await store.gc(new Set([kept]), 60_000);
    expect(removed).toContain(old);
    expect(removed).not.toContain(kept);
    expect(removed).not.toContain(young);
    expect([store.has(kept), store.has(old), store.has(young), store.has(reused)]).toEqual([true, false, true, true]);
    expect(existsSync(join(base, 'layers', '.staging-999999999-abc'))).toBe(false);
    expect(existsSync(active.path)).toBe(true);
    await active.discard();
    expect(leftovers()).toEqual([]);
  });

  it('a layer committed but not yet recorded survives a GC pass with no minimum age until it is settled; remove() takes a refused one at once', async () => {
    const s = await store.stage();
    await writeFile(join(s.path, 'f'), 'pending');
    const id = (await s.commit(newId(), 'pending')).id;
    expect(await store.gc(new Set(), 0)).not.toContain(id);
    expect(store.has(id)).toBe(true);
    store.settle([id]);
    expect(await store.gc(new Set(), 0)).toContain(id);
    expect(store.has(id)).toBe(false);
    const t = await store.stage();
    const refused = (await t.commit(newId(), 'refused')).id;
    expect(await store.remove(refused)).toBe(true);
    expect([store.has(refused), existsSync(join(base, 'layers', refused))]).toEqual([false, false]);
    expect(await store.remove(refused)).toBe(false);
    expect(leftovers()).toEqual([]);
  });

  it('a layer dir is not traversable by a non-root host uid outside the sandbox range, and a layer root is never group/world-writable', async () => {
    const uidBase = 200_000;
    await run('chmod', ['0711', base]); // as BASE_IMAGES_DIR is
    const guarded = new LayerStore({ baseImagesDir: base, log, uidBase });
    const s = await guarded.stage();
    await run('chmod', ['0777', s.path]); // as an import's './' entry could set it
    await writeFile(join(s.path, 'f'), 'x');
    const id = (await s.commit(newId(), 'modes')).id;
    const root = statSync(join(base, 'layers'));
    expect([root.mode & 0o777, root.gid]).toEqual([0o710, uidBase]);
    expect(statSync(guarded.fsPath(id)).mode & 0o777).toBe(0o755);
    // uid/gid 65534 (nobody): neither the sandbox range nor root, so layers/ is closed to it.
    await expect(run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'cat', join(guarded.fsPath(id), 'f')])).rejects.toThrow(/Permission denied/);
    // The sandbox's mapped root (the uid base) still reaches it.
    expect(await run('setpriv', [`--reuid=${uidBase}`, `--regid=${uidBase}`, '--clear-groups', 'cat', join(guarded.fsPath(id), 'f')])).toBe('x');
    await guarded.remove(id);
  });

  it('measureTree sizes a file with 1000 hard links as one file, and a sparse 1 TB file by its blocks; past maxBytes it stops naming the bound', async () => {
    const tree = mkdtempSync(join(tmpdir(), 'voidrun-measure-'));
    try {
      await writeFile(join(tree, 'one'), randomBytes(1024 * 1024));
      for (let i = 0; i < 1000; i++) await link(join(tree, 'one'), join(tree, `link-${i}`));
      await run('truncate', ['-s', '1T', join(tree, 'sparse')]);
      const m = await measureTree(tree);
      expect(m.files).toBe(1002);
      expect(m.inodes).toBe(3); // the root, the file and the sparse file
      expect(m.bytes).toBeGreaterThanOrEqual(1024 * 1024);
      expect(m.bytes).toBeLessThan(2 * 1024 * 1024);
      await expect(measureTree(tree, { maxBytes: 512 * 1024, tooBig: (b) => new Error(`past the bound (${b})`) })).rejects.toThrow('past the bound');
    } finally {
      await rm(tree, { recursive: true, force: true });
    }
  });

  it('fromSnapshot extracts a snapshot archive as is: whiteouts, numeric owners and modes kept', async () => {
    const upper = mkdtempSync(join(tmpdir(), 'voidrun-upper-'));
    try {
      await mkdir(join(upper, 'etc'));
      await writeFile(join(upper, 'etc', 'new'), 'new', { mode: 0o640 });
      await lchown(join(upper, 'etc', 'new'), 200_123, 200_456);
      await whiteout(join(upper, 'etc', 'removed'));
      await symlink('/etc/passwd', join(upper, 'etc', 'link'));
      const file = join(upper, '..', `${upper.split('/').pop()}.tar.gz`);
      // As ContainerDriver.snapshot writes it.
      await run('tar', ['-czf', file, '--sparse', '-C', upper, '--numeric-owner', '--xattrs', '--xattrs-include=trusted.overlay.*', '.']);
      const id = newId();
      const info = await store.fromSnapshot(file, id, 'from a snapshot');
      await rm(file);
      expect(info).toMatchObject({ id, files: 4 });
      const fs = store.fsPath(id);
      const removed = lstatSync(join(fs, 'etc', 'removed'));
      expect(removed.isCharacterDevice() && removed.rdev === 0).toBe(true);
      const added = lstatSync(join(fs, 'etc', 'new'));
      expect([added.uid, added.gid, added.mode & 0o777]).toEqual([200_123, 200_456, 0o640]);
      expect(lstatSync(join(fs, 'etc', 'link')).isSymbolicLink()).toBe(true);
      // The same id again: the existing layer, nothing extracted.
      expect(await store.fromSnapshot('/nonexistent.tar.gz', id, 'again')).toEqual(info);
      await expect(store.fromSnapshot('/nonexistent.tar.gz', newId(), 'missing')).rejects.toThrow(/tar/);
      expect(leftovers()).toEqual([]);
    } finally {
      await rm(upper, { recursive: true, force: true });
    }
  });
});

describe.skipIf(!support.ok)('sandboxes on a layer stack (real container driver; layers made with LayerStore in BASE_IMAGES_DIR)', () => {
  let server: TestServer;
  let driver: SandboxDriver & SnapshottingDriver;
  let layers: LayerStore;
  let rootfs: RootfsImages;
  let uidBase: number;
  const made: string[] = [];
  const boxes: string[] = [];
  let bottom: string;
  let top: string;
  let spec: SandboxSpec;

  /** A command in the sandbox, run with `runc exec` (these sandboxes have no store record, so the API does not know them). */
  const sh = (id: string, script: string) => run('runc', ['--root', server.dirs.runcRoot, 'exec', `vr-${id}`, '/bin/sh', '-c', script]);

  async function specFor(layerIds: string[]): Promise<SandboxSpec> {
    const [root, ...above] = await rootfs.lowerDirs({ base: 'debian', layers: layerIds });
    const id = newId();
    boxes.push(id);
    return { id, name: 'layers', rootfs: root!, layers: above, image: 'debian', cpu: 1, memMb: 256, diskMb: 64, envVars: {} };
  }

  beforeAll(async () => {
    server = await startTestServer();
    const d = server.app.services.sandboxes.driverOrNull;
    if (!d || d.name !== 'container') throw new Error(`these tests need the container driver, not ${d?.name ?? 'none'}`);
    driver = d as SandboxDriver & SnapshottingDriver;
    const config = server.app.config;
    uidBase = config.SANDBOX_UID_BASE;
    layers = new LayerStore({ baseImagesDir: config.BASE_IMAGES_DIR, log });
    rootfs = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap: { hostId: uidBase, size: 65536 }, mirror: config.DEBIAN_MIRROR, log, layers });
    ({ bottom, top } = await makeStack(layers, uidBase, made));
    spec = await specFor([bottom, top]);
    await driver.create(spec);
  }, 120_000);

  afterAll(async () => {
    for (const id of boxes) await driver?.destroy(id).catch(() => {});
    await server?.close();
    if (layers) await removeLayers(layers, made);
  });

  const view = (id: string) => sh(id, 'cat /opt/one/a.txt /opt/two/b.txt; ls /opt/one; test -e /etc/debian_version && echo debian_version; test -x /bin/sh && echo debian');

  it('sees the files of both layers and of the rootfs, and a whiteout in the top layer hides a lower file', async () => {
    expect(await view(spec.id)).toBe('from the bottom layer\nfrom the top layer\na.txt\ndebian\n');
    // The sandbox writes to its own upper only.
    await sh(spec.id, 'echo mine > /opt/one/a.txt');
    expect(readFileSync(join(layers.fsPath(bottom), 'opt', 'one', 'a.txt'), 'utf8')).toBe('from the bottom layer\n');
  });

  it("the sandbox's mountinfo shows the overlay with relative lower dirs only, no host path", async () => {
    const info = await sh(spec.id, 'cat /proc/self/mountinfo');
    const root = info.split('\n').find((l) => l.split(' ')[4] === '/')!;
    expect(root).toContain('lowerdir=lowers/2:lowers/1:lowers/0,upperdir=disk/upper,workdir=disk/work');
    for (const path of [server.app.config.BASE_IMAGES_DIR, server.dirs.instancesDir, 'layers/', bottom, top]) expect(info).not.toContain(path);
    const instance = join(server.dirs.instancesDir, spec.id);
    expect(readFileSync(join(instance, 'lower'), 'utf8').split('\n')).toEqual([spec.rootfs, ...spec.layers!]);
  });

  it('keeps its layers and its writes across stop and start', async () => {
    await driver.stop(spec.id);
    expect(await driver.inspect(spec.id)).toBe('stopped');
    await driver.start(spec);
    expect(await view(spec.id)).toBe('mine\nfrom the top layer\na.txt\ndebian\n');
  });

  it("a snapshot becomes a layer with the sandbox's deletions (whiteouts) and replaced directories (opaque), for a new sandbox and a restore", async () => {
    await sh(spec.id, 'rm /opt/two/b.txt && rm -rf /opt/replaced && mkdir /opt/replaced && echo new > /opt/replaced/new.txt && echo kept > /root/kept');
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-layer-snap-'));
    try {
      const file = join(dir, 'snap.tar.gz');
      await driver.snapshot(spec.id, file);
      const id = newId();
      made.push(id);
      await layers.fromSnapshot(file, id, 'snapshot of a sandbox');
      const next = await specFor([bottom, top, id]);
      await driver.create(next);
      const seen = 'cat /opt/one/a.txt; ls /opt/two; ls /opt/replaced; cat /root/kept';
      expect(await sh(next.id, seen)).toBe('mine\nnew.txt\nkept\n');
      // Restoring the snapshot onto the stack below it gives the same tree.
      const restored = await specFor([bottom, top]);
      await driver.restore(restored, file);
      expect(await sh(restored.id, seen)).toBe('mine\nnew.txt\nkept\n');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("a stack's lower dirs fail with a message naming the missing layer, or the layer limit", async () => {
    await expect(rootfs.lowerDirs({ base: 'debian', layers: [newId()] })).rejects.toThrow(/is missing on this server/);
    const tooMany = Array.from({ length: MAX_IMAGE_LAYERS + 1 }, () => bottom);
    await expect(rootfs.lowerDirs({ base: 'debian', layers: tooMany })).rejects.toThrow(`more than the ${MAX_IMAGE_LAYERS} a sandbox can mount`);
  });

  describe.skipIf(!existsSync('/var/lib/hyper-fleet/base-images/debian-vm.json'))('VM image of the stack (its qcow2 read with debugfs; a microVM boots one below)', () => {
    it('builds <key>-base.qcow2 from the merged lower dirs, whiteouts applied, with the debian kernel and initramfs, and removes chain images whose layers are gone', async () => {
      const config = server.app.config;
      const vm = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: uidBase, log });
      const dirs = await rootfs.lowerDirs({ base: 'debian', layers: [bottom, top] });
      const key = vmImageKey(dirs);
      const raw = join(mkdtempSync(join(tmpdir(), 'voidrun-chain-')), 'root.raw');
      // A chain image whose layers were collected: the next chain build removes it.
      const gone = `chain-${randomBytes(8).toString('hex')}`;
      await writeFile(join(config.BASE_IMAGES_DIR, `${gone}-vm.json`), JSON.stringify({ name: gone, version: 3, lowerDirs: [dirs[0], join(config.BASE_IMAGES_DIR, 'layers', newId(), 'fs')] }));
      await writeFile(join(config.BASE_IMAGES_DIR, `${gone}-base-v3.qcow2`), 'stale');
      await symlink(`${gone}-base-v3.qcow2`, join(config.BASE_IMAGES_DIR, `${gone}-base.qcow2`));
      try {
        await expect(vm.ensure(key)).rejects.toThrow(/does not name its layers/);
        await expect(vm.ensure(key, dirs.slice(1))).rejects.toThrow(/not the image of these layers/);
        const paths = await vm.ensure(key, dirs);
        expect(paths.baseDisk).toBe(join(config.BASE_IMAGES_DIR, `${key}-base.qcow2`));
        expect([paths.kernel, paths.initrd]).toEqual([vm.paths('debian').kernel, vm.paths('debian').initrd]);
        // Boot files (and the agent disk's busybox) of anything but a debootstrap image are debian's.
        expect([vmBootImage(key), vmBootImage('code'), vmBootImage('debian')]).toEqual(['debian', 'debian', 'debian']);
        expect(await vm.isReady(key)).toBe(true);
        expect(readdirSync(config.BASE_IMAGES_DIR).filter((f) => f.startsWith(gone))).toEqual([]);
        await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', paths.baseDisk, raw]);
        const cat = (path: string) => run('debugfs', ['-R', `cat ${path}`, raw]);
        expect(await cat('/opt/one/a.txt')).toBe('from the bottom layer\n');
        expect(await cat('/opt/two/b.txt')).toBe('from the top layer\n');
        const listing = await run('debugfs', ['-R', 'ls -l /opt/one', raw]);
        expect(listing).toContain('a.txt');
        expect(listing).not.toContain('gone.txt');
        expect(await run('debugfs', ['-R', 'stat /etc/debian_version', raw]).catch((e: Error) => e.message)).not.toMatch(/Inode:/);
        // Plain ownership in the VM: the sandbox uid range shifted back.
        expect(await run('debugfs', ['-R', 'stat /opt/one/a.txt', raw])).toMatch(/User:\s+0\s+Group:\s+0/);
        // Built once: the marker is in place.
        expect(JSON.parse(await readFile(join(config.BASE_IMAGES_DIR, `${key}-vm.json`), 'utf8'))).toMatchObject({ name: key, lowerDirs: dirs });
      } finally {
        await rm(join(raw, '..'), { recursive: true, force: true });
        for (const k of [key, gone]) for (const f of [`${k}-base.qcow2`, `${k}-base-v3.qcow2`, `${k}-vm.json`]) await rm(join(config.BASE_IMAGES_DIR, f), { force: true });
      }
    }, 600_000);

    it('a VM image of a layer with 1000 hard links to one file and a sparse 100 GB file gets a small disk; a stack past the root disk bound is refused naming it', async () => {
      const config = server.app.config;
      const vm = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: uidBase, log });
      const linked = await makeLayer(layers, uidBase, made, async (dir) => {
        await mkdir(join(dir, 'opt', 'links'), { recursive: true });
        await writeFile(join(dir, 'opt', 'links', 'one'), randomBytes(1024 * 1024));
        for (let i = 0; i < 1000; i++) await link(join(dir, 'opt', 'links', 'one'), join(dir, 'opt', 'links', `l-${i}`));
        await run('truncate', ['-s', '100G', join(dir, 'opt', 'sparse')]);
      });
      const dirs = await rootfs.lowerDirs({ base: 'debian', layers: [linked] });
      const key = vmImageKey(dirs);
      try {
        // Bounded: a root disk of at most 520 MiB cannot hold debian.
        const small = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: uidBase, log, maxRootMb: 520 });
        await expect(small.ensure(key, dirs)).rejects.toThrow('past the 520 MiB a VM root disk may have on this server');
        expect(await vm.isReady(key)).toBe(false);
        await vm.ensure(key, dirs);
        const marker = JSON.parse(await readFile(join(config.BASE_IMAGES_DIR, `${key}-vm.json`), 'utf8')) as { rootMb: number };
        // Apparent sizes would ask for ~100 GB + 1000 MB; blocks, each inode once, for debian plus about 1 MB.
        expect(marker.rootMb).toBeLessThan(2048);
      } finally {
        for (const f of [`${key}-base.qcow2`, `${key}-base-v3.qcow2`, `${key}-vm.json`]) await rm(join(config.BASE_IMAGES_DIR, f), { force: true });
      }
    }, 600_000);

    it("a chain image whose layers are gone is not pruned while a sandbox's disk (a qcow2 overlay in INSTANCES_DIR) is built on it", async () => {
      const config = server.app.config;
      const instances = mkdtempSync(join(tmpdir(), 'voidrun-vm-instances-'));
      const vm = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: uidBase, log, instancesDir: instances });
      const dirs = await rootfs.lowerDirs({ base: 'debian', layers: [bottom] });
      const key = vmImageKey(dirs);
      const used = `chain-${randomBytes(8).toString('hex')}`;
      const usedFiles = [`${used}-vm.json`, `${used}-base-v3.qcow2`];
      await writeFile(join(config.BASE_IMAGES_DIR, usedFiles[0]!), JSON.stringify({ name: used, version: 3, lowerDirs: [dirs[0], join(config.BASE_IMAGES_DIR, 'layers', newId(), 'fs')] }));
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(config.BASE_IMAGES_DIR, usedFiles[1]!), '64M']);
      await mkdir(join(instances, newId()));
      const overlay = join(instances, readdirSync(instances)[0]!, 'overlay.qcow2');
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(config.BASE_IMAGES_DIR, usedFiles[1]!), '-F', 'qcow2', overlay, '128M']);
      try {
        await vm.ensure(key, dirs); // a chain build prunes first
        for (const f of usedFiles) expect(existsSync(join(config.BASE_IMAGES_DIR, f))).toBe(true);
      } finally {
        await rm(instances, { recursive: true, force: true });
        for (const f of [`${key}-base.qcow2`, `${key}-base-v3.qcow2`, `${key}-vm.json`, ...usedFiles]) await rm(join(config.BASE_IMAGES_DIR, f), { force: true });
      }
    }, 600_000);

    it("building a layer's VM image writes nothing through the layer's links: a /etc/hostname and a dpkg database linking to host files", async () => {
      const config = server.app.config;
      const vm = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: uidBase, log });
      const host = mkdtempSync(join(tmpdir(), 'voidrun-host-files-'));
      const raw = join(host, 'root.raw');
      const canary = join(host, 'hostname');
      const status = join(host, 'status');
      await writeFile(canary, 'a host file\n');
      // Read through the link, it would say socat is installed and the guest would get none.
      await writeFile(status, 'Package: socat\nStatus: install ok installed\n');
      const hostile = await makeLayer(layers, uidBase, made, async (dir) => {
        await mkdir(join(dir, 'etc'));
        await symlink(canary, join(dir, 'etc', 'hostname'));
        await mkdir(join(dir, 'var', 'lib', 'dpkg'), { recursive: true });
        await symlink(status, join(dir, 'var', 'lib', 'dpkg', 'status'));
      });
      const dirs = await rootfs.lowerDirs({ base: 'debian', layers: [bottom, hostile] });
      const key = vmImageKey(dirs);
      try {
        const paths = await vm.ensure(key, dirs);
        expect(readFileSync(canary, 'utf8')).toBe('a host file\n');
        await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', paths.baseDisk, raw]);
        expect(await run('debugfs', ['-R', 'cat /etc/hostname', raw])).toBe('sandbox\n');
        expect(await run('debugfs', ['-R', 'stat /usr/bin/socat', raw])).toMatch(/Type: regular/);
        expect(await run('debugfs', ['-R', 'cat /opt/one/a.txt', raw])).toBe('from the bottom layer\n');
      } finally {
        await rm(host, { recursive: true, force: true });
        for (const f of [`${key}-base.qcow2`, `${key}-base-v3.qcow2`, `${key}-vm.json`]) await rm(join(config.BASE_IMAGES_DIR, f), { force: true });
      }
    }, 600_000);
  });
});

const qemu = qemuSupport();

describe.skipIf(!qemu.ok)('a microVM on a layer stack (real qemu driver; TCG where KVM cannot run a guest)', () => {
  let server: TestServer;
  let layers: LayerStore;
  let vm: VmImages;
  let key = '';
  let stack: string[] = [];
  const made: string[] = [];
  const id = newId();

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DRIVER: 'qemu' });
    const config = server.app.config;
    layers = new LayerStore({ baseImagesDir: config.BASE_IMAGES_DIR, log });
    const rootfs = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap: { hostId: config.SANDBOX_UID_BASE, size: 65536 }, mirror: config.DEBIAN_MIRROR, log, layers });
    vm = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: config.SANDBOX_UID_BASE, log });
    const { bottom, top } = await makeStack(layers, config.SANDBOX_UID_BASE, made);
    stack = await rootfs.lowerDirs({ base: 'debian', layers: [bottom, top] });
    const [root, ...above] = stack;
    key = vmImageKey(stack);
    const driver = server.app.services.sandboxes.driverOrNull!;
    expect(driver.name).toBe('qemu');
    await driver.create({ id, name: 'chain-vm', rootfs: root!, layers: above, image: key, cpu: 1, memMb: 512, diskMb: 1024, envVars: {} });
  }, 300_000);

  afterAll(async () => {
    await server?.app.services.sandboxes.driverOrNull?.destroy(id).catch(() => {});
    await server?.close();
    if (layers) await removeLayers(layers, made);
    if (key) for (const f of [`${key}-base.qcow2`, `${key}-base-v3.qcow2`, `${key}-vm.json`]) await rm(join(server.app.config.BASE_IMAGES_DIR, f), { force: true });
  });

  it('boots the chain image built from the stack: both layers seen, the whiteouts applied, on the debian kernel', async () => {
    expect(await vm.isReady(key)).toBe(true);
    const agents = new AgentClients(server.app.services.sandboxes.driverOrNull!, { maxMessageBytes: 16 * 1024 * 1024 });
    try {
      const agent = agents.get(id);
      const read = async (path: string) => (await agent.files.headTail.query({ path, lines: 10, head: true })).content;
      expect(await read('/opt/one/a.txt')).toBe('from the bottom layer\n');
      expect(await read('/opt/two/b.txt')).toBe('from the top layer\n');
      expect((await agent.files.list.query({ path: '/opt/one' })).map((f) => f.name)).toEqual(['a.txt']);
      await expect(agent.files.stat.query({ path: '/etc/debian_version' })).rejects.toThrow();
      expect(await read('/etc/os-release')).toMatch(/bookworm/);
      expect(await read('/proc/version')).toMatch(/cloud-amd64/);
    } finally {
      await agents.closeAll();
    }
  }, 60_000);

  it('starts again after a stop from the same chain image, its files kept', async () => {
    const driver = server.app.services.sandboxes.driverOrNull!;
    const spec = { id, name: 'chain-vm', rootfs: stack[0]!, layers: stack.slice(1), image: key, cpu: 1, memMb: 512, diskMb: 1024, envVars: {} };
    const agents = new AgentClients(driver, { maxMessageBytes: 16 * 1024 * 1024 });
    try {
      await agents.get(id).files.create.mutate({ path: '/root/kept.txt', content: 'kept\n' });
      await agents.closeAll();
      await driver.stop(id);
      expect(await driver.inspect(id)).toBe('stopped');
      await driver.start(spec);
      const read = async (path: string) => (await agents.get(id).files.headTail.query({ path, lines: 10, head: true })).content;
      expect(await read('/root/kept.txt')).toBe('kept\n');
      expect(await read('/opt/two/b.txt')).toBe('from the top layer\n');
    } finally {
      await agents.closeAll();
    }
  }, 120_000);
});
