import { createHash, randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { createReadStream, createWriteStream, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { FileNotFoundError, ForbiddenError, InvalidInputError, NotFoundError, PayloadTooLargeError, SandboxNotFoundError, type SandboxHandle, type VoidRunClient } from '../client/index.js';
import { SandboxFiles } from '../client/files.js';
import type { WatchMessage } from '../shared/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

async function sha256(stream: NodeJS.ReadableStream): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of stream) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

describe.skipIf(!support.ok)('files in sandboxes', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let box: SandboxHandle;
  const scratch = mkdtempSync(join(tmpdir(), 'voidrun-files-'));

  beforeAll(async () => {
    server = await startTestServer({ MAX_UPLOAD_BYTES: String(200 * 1024 * 1024) });
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Files User', email: uniqueEmail('files') });
    apiKey = reg.apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'files' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
    rmSync(scratch, { recursive: true, force: true });
  });

  it('round-trips a 100 MB random file with an equal checksum', async () => {
    const local = join(scratch, 'big.bin');
    await pipeline(
      (async function* () {
        for (let i = 0; i < 100; i++) yield randomBytes(1024 * 1024);
      })(),
      createWriteStream(local),
    );
    const uploaded = await box.files.upload('/root/big.bin', { path: local });
    expect(uploaded).toEqual({ path: '/root/big.bin', size: 100 * 1024 * 1024 });
    const [sent, received] = await Promise.all([sha256(createReadStream(local)), sha256(await box.files.download('/root/big.bin'))]);
    expect(received).toBe(sent);
    const res = await server.http(`/api/sandboxes/${box.id}/files/download?path=/root/big.bin`, { apiKey });
    expect(res.headers.get('content-length')).toBe(String(100 * 1024 * 1024));
    expect(res.headers.get('content-disposition')).toContain('attachment; filename="big.bin"');
    await res.body?.cancel();
  });

  it('leaves the previous file and no temporary file when an upload breaks off midway', async () => {
    await box.files.write('/root/keep/target.txt', 'version 1');
    await new Promise<void>((resolve) => {
      const req = request(`${server.url}/api/sandboxes/${box.id}/files/upload?path=/root/keep/target.txt`, {
        method: 'POST',
        headers: { 'x-api-key': apiKey, 'content-type': 'application/octet-stream', 'content-length': String(10 * 1024 * 1024) },
      });
      req.on('error', () => resolve());
      req.write(randomBytes(1024 * 1024), () => setTimeout(() => req.destroy(), 200));
      req.on('close', () => resolve());
    });
    // The agent notices the broken stream and removes its temporary file.
    let names: string[] = [];
    for (let i = 0; i < 50; i++) {
      names = (await box.files.list('/root/keep')).map((f) => f.name);
      if (names.length === 1) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(names).toEqual(['target.txt']);
    expect((await box.files.read('/root/keep/target.txt')).toString()).toBe('version 1');
  });

  it('accepts octet-stream and multipart/form-data uploads', async () => {
    const raw = await server.http(`/api/sandboxes/${box.id}/files/upload?path=/root/up/raw.txt`, {
      method: 'POST',
      apiKey,
      headers: { 'content-type': 'application/octet-stream' },
      body: 'raw bytes',
    });
    expect(raw.status).toBe(200);
    const form = new FormData();
    form.append('note', 'ignored');
    form.append('file', new Blob(['multipart bytes']), 'x.txt');
    const multi = await server.http(`/api/sandboxes/${box.id}/files/upload?path=/root/up/multi.txt`, { method: 'POST', apiKey, body: form });
    expect(multi.status).toBe(200);
    expect(await multi.json()).toMatchObject({ status: 'success', data: { path: '/root/up/multi.txt', size: 15 } });
    expect((await box.files.read('/root/up/raw.txt')).toString()).toBe('raw bytes');
    expect((await box.files.read('/root/up/multi.txt')).toString()).toBe('multipart bytes');
    const noFile = new FormData();
    noFile.append('other', 'x');
    expect((await server.http(`/api/sandboxes/${box.id}/files/upload?path=/root/up/none.txt`, { method: 'POST', apiKey, body: noFile })).status).toBe(400);
  });

  it('writes many files in one tar upload (writeMany and a plain tar over HTTP) and reads each back', async () => {
    const files: Record<string, string> = {};
    for (let i = 0; i < 300; i++) files[`d${i % 7}/f ${i}.txt`] = `content ${i}\n`.repeat(i % 5);
    const longName = `${'long-dir/'.repeat(12)}ñame.txt`; // over 100 bytes: a PAX header
    files[longName] = 'long';
    const written = await box.files.writeMany('/root/many', files);
    expect(written).toEqual({ path: '/root/many', files: 301, directories: 0, symlinks: 0, size: Object.values(files).reduce((n, c) => n + Buffer.byteLength(c), 0) });
    for (const name of ['d0/f 0.txt', 'd3/f 3.txt', 'd5/f 299.txt', longName]) expect((await box.files.read(`/root/many/${name}`)).toString(), name).toBe(files[name]);
    expect((await box.exec('find /root/many -type f | wc -l')).stdout.trim()).toBe('301');
    expect((await box.exec('find /root/many -name ".*upload-*" | wc -l')).stdout.trim()).toBe('0');

    // A tar made by GNU tar: directories, modes and a symbolic link that stays inside.
    const src = join(scratch, 'tree');
    execFileSync('sh', ['-c', `mkdir -p "${src}/bin" && printf '#!/bin/sh\necho hi\n' > "${src}/bin/run.sh" && chmod 755 "${src}/bin/run.sh" && ln -s bin/run.sh "${src}/run"`]);
    const res = await server.http(`/api/sandboxes/${box.id}/files/upload-tar?path=/root/gnu`, { method: 'POST', apiKey, headers: { 'content-type': 'application/x-tar' }, body: execFileSync('tar', ['-cf', '-', '-C', src, '.']) });
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: 'success', data: { path: '/root/gnu', files: 1, symlinks: 1 } });
    expect((await box.exec('/root/gnu/run && stat -c %a /root/gnu/bin/run.sh')).stdout).toBe('hi\n755\n');
  });

  it('refuses hostile tar entries with 400 naming the entry, and writes nothing of them', async () => {
    const dir = join(scratch, 'hostile');
    execFileSync('sh', ['-c', [
      `mkdir -p "${dir}/in" && cd "${dir}/in" && echo secret > ../outside.txt && echo ok > ok.txt`,
      `tar -cPf "${dir}/dotdot.tar" ../outside.txt`,
      `tar -cPf "${dir}/absolute.tar" /etc/hostname`,
      `ln -sf /etc "${dir}/in/etc-link" && tar -cf "${dir}/symlink-out.tar" -C "${dir}/in" etc-link`,
      `mknod "${dir}/in/null-dev" c 1 3 && tar -cf "${dir}/device.tar" -C "${dir}/in" null-dev`,
      `ln "${dir}/in/ok.txt" "${dir}/in/hard.txt" && tar -cf "${dir}/hardlink.tar" -C "${dir}/in" ok.txt hard.txt`,
    ].join(' && ')]);
    const cases: Record<string, string> = { dotdot: '../outside.txt', absolute: '/etc/hostname', 'symlink-out': 'etc-link', device: 'null-dev', hardlink: 'hard.txt' };
    for (const [name, entry] of Object.entries(cases)) {
      const res = await server.http(`/api/sandboxes/${box.id}/files/upload-tar?path=/root/hostile-${name}`, { method: 'POST', apiKey, body: readFileSync(join(dir, `${name}.tar`)) });
      expect(res.status, name).toBe(400);
      const body = (await res.json()) as { error: string; code: string };
      expect(body.error, name).toContain(JSON.stringify(entry));
      expect(body.code, name).toBe('INVALID_INPUT');
    }
    expect((await box.exec('ls -A /root/hostile-dotdot /root/hostile-absolute /root/hostile-symlink-out /root/hostile-device | grep -v : | grep -c . || true')).stdout.trim()).toBe('0');
    expect((await box.exec('test -e /root/outside.txt')).exitCode).not.toBe(0);
    const garbage = await server.http(`/api/sandboxes/${box.id}/files/upload-tar?path=/root/garbage`, { method: 'POST', apiKey, body: 'not a tar at all'.repeat(64) });
    expect(garbage.status).toBe(400);
    const named = await box.files.writeMany('/root/named', { '../escape.txt': 'x' }).catch((e: unknown) => e);
    expect(named).toBeInstanceOf(InvalidInputError);
    expect((named as Error).message).toContain('"../escape.txt"');
  });

  it('answers 413 for an upload over MAX_UPLOAD_BYTES, declared or streamed, and writes nothing', async () => {
    const declared = await server.http(`/api/sandboxes/${box.id}/files/upload?path=/root/huge.bin`, {
      method: 'POST',
      apiKey,
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(300 * 1024 * 1024) },
      body: 'x',
    }).catch(() => null);
    if (declared) expect(declared.status).toBe(413);
    const streamed = await box.files
      .upload(
        '/root/huge.bin',
        (async function* () {
          for (let i = 0; i < 210; i++) yield Buffer.alloc(1024 * 1024);
        })(),
      )
      .catch((e: unknown) => e);
    expect(streamed).toBeInstanceOf(PayloadTooLargeError);
    expect(await box.files.exists('/root/huge.bin')).toBe(false);
  });

  it('does every file operation on a tree with spaces and unicode in its names', async () => {
    const root = '/root/tree ü';
    expect((await box.files.mkdir(`${root}/sub dir/ñ`)).path).toBe(`${root}/sub dir/ñ`);
    await box.files.create(`${root}/hello wörld.txt`, 'line1\nline2\nline3\n');
    const created = await server.http(`/api/sandboxes/${box.id}/files/create?path=${encodeURIComponent(`${root}/q.txt`)}&content=from%20query`, { method: 'POST', apiKey });
    expect(created.status).toBe(200);
    expect((await box.files.read(`${root}/q.txt`)).toString()).toBe('from query');
    expect((await box.files.list(root)).map((f) => [f.name, f.isDir])).toEqual([
      ['hello wörld.txt', false],
      ['q.txt', false],
      ['sub dir', true],
    ]);
    expect((await box.files.head(`${root}/hello wörld.txt`, 2)).content).toBe('line1\nline2\n');
    expect((await box.files.tail(`${root}/hello wörld.txt`, 2)).content).toBe('line2\nline3\n');
    const tailRest = await server.http(`/api/sandboxes/${box.id}/files/head-tail?path=${encodeURIComponent(`${root}/hello wörld.txt`)}&lines=1&head=false`, { apiKey });
    expect(await tailRest.json()).toMatchObject({ data: { stdout: 'line3\n' } });
    await box.files.copy(`${root}/hello wörld.txt`, `${root}/sub dir/copy.txt`);
    await box.files.move(`${root}/sub dir/copy.txt`, `${root}/sub dir/ñ/moved.txt`);
    expect((await box.files.search(root, '*.txt')).matches).toEqual([`${root}/hello wörld.txt`, `${root}/q.txt`, `${root}/sub dir/ñ/moved.txt`]);
    await box.files.chmod(`${root}/q.txt`, '0600');
    const st = await box.files.stat(`${root}/q.txt`);
    expect(st).toMatchObject({ mode: '0600', size: 10, isDir: false, uid: 0, gid: 0 });
    const du = await box.files.du(root);
    expect(du.size).toBeGreaterThan(0);
    expect(du.stdout).toContain(root);
    await box.files.remove(`${root}/sub dir`);
    expect(await box.files.exists(`${root}/sub dir`)).toBe(false);
    expect((await box.files.stat('tree ü')).path).toBe(root); // relative to /root
  });

  it('tells a missing file from a missing sandbox by code: FILE_NOT_FOUND on every face, exists() false only for the file', async () => {
    expect(await box.files.exists('/no/such/file')).toBe(false);
    expect(await box.files.exists('/etc/hostname')).toBe(true);
    await expect(box.files.stat('/no/such/file')).rejects.toBeInstanceOf(FileNotFoundError);
    await expect(box.files.read('/no/such/file')).rejects.toBeInstanceOf(FileNotFoundError);
    for (const route of ['files/stat', 'files/download']) {
      const res = await server.http(`/api/sandboxes/${box.id}/${route}?path=/no/such/file`, { apiKey });
      expect(res.status, route).toBe(404);
      expect(await res.json(), route).toMatchObject({ code: 'FILE_NOT_FOUND', error: expect.stringContaining('/no/such/file') });
    }
    const gone = new SandboxFiles(vr.trpc, { baseUrl: server.url, headers: { 'x-api-key': apiKey } }, '65ae1234567890abcdef1234');
    await expect(gone.exists('/etc/hostname')).rejects.toBeInstanceOf(SandboxNotFoundError);
    const attach = await server.http(`/api/sandboxes/${box.id}/commands/attach`, { method: 'POST', apiKey, json: { pid: 999_999 } });
    expect(attach.status).toBe(404);
    expect(await attach.json()).toMatchObject({ code: 'PROCESS_NOT_FOUND' });
  });

  it('a path under a regular file does not exist: exists() is false and stat is FILE_NOT_FOUND, not "Not a directory"', async () => {
    expect(await box.files.exists('/etc/hostname/x')).toBe(false);
    await expect(box.files.stat('/etc/hostname/x')).rejects.toBeInstanceOf(FileNotFoundError);
    const res = await server.http(`/api/sandboxes/${box.id}/files/stat?path=/etc/hostname/x`, { apiKey });
    expect(res.status).toBe(404);
    expect(await res.json()).toMatchObject({ code: 'FILE_NOT_FOUND', error: expect.stringContaining('/etc/hostname/x') });
    // Other operations keep saying what is wrong with the path.
    await expect(box.files.list('/etc/hostname')).rejects.toBeInstanceOf(InvalidInputError);
  });

  it('answers each kind of file error with its own status and the path', async () => {
    await expect(box.files.stat('/no/such/file')).rejects.toBeInstanceOf(NotFoundError);
    const notDir = await box.files.list('/etc/hostname').catch((e: unknown) => e);
    expect(notDir).toBeInstanceOf(InvalidInputError);
    expect((notDir as Error).message).toContain('/etc/hostname');
    await expect(box.files.create('/opt/voidrun/node_modules/voidrun-test', 'x')).rejects.toBeInstanceOf(ForbiddenError);
    const badMode = await server.http(`/api/sandboxes/${box.id}/files/chmod?path=/root&mode=rwx`, { method: 'POST', apiKey });
    expect(badMode.status).toBe(400);
    const badFormat = await server.http(`/api/sandboxes/${box.id}/files/compress?path=/root&format=rar`, { method: 'POST', apiKey });
    expect(badFormat.status).toBe(400);
    const missing = await server.http(`/api/sandboxes/${box.id}/files?path=/nope`, { apiKey });
    expect(missing.status).toBe(404);
    expect(await missing.json()).toEqual({ error: 'No such file or directory: /nope', code: 'FILE_NOT_FOUND' });
    const dirDownload = await server.http(`/api/sandboxes/${box.id}/files/download?path=/root`, { apiKey });
    expect(dirDownload.status).toBe(400);
    const noPath = await server.http(`/api/sandboxes/${box.id}/files/download`, { apiKey });
    expect(noPath.status).toBe(400);
  });

  it.each(['tar', 'tar.gz', 'tar.bz2', 'zip'] as const)('compresses and extracts a tree back unchanged (%s)', async (format) => {
    const src = `/root/arch-${format}/data set`;
    await box.exec(`mkdir -p "${src}/a b/ç" && echo one > "${src}/a b/1.txt" && echo two > "${src}/a b/ç/2.txt" && ln -s "1.txt" "${src}/a b/link"`);
    const { archive } = await box.files.compress(src, format);
    expect(archive).toBe(`${src}.${format}`);
    const dest = `/root/arch-${format}/out`;
    const extracted = await box.files.extract(archive, dest);
    expect(extracted.entries).toBeGreaterThan(3);
    const before = (await box.exec(`cd "${src}" && find . | sort && cat "a b/1.txt" "a b/ç/2.txt"`)).stdout;
    const after = (await box.exec(`cd "${dest}/data set" && find . | sort && cat "a b/1.txt" "a b/ç/2.txt"`)).stdout;
    expect(after).toBe(before);
  });

  it('refuses archives whose entries would escape the destination', async () => {
    await box.exec(
      [
        'mkdir -p /root/evil/in && cd /root/evil/in && echo secret > ../outside.txt',
        'tar -cPf /root/evil/dotdot.tar ../outside.txt',
        'tar -cPf /root/evil/absolute.tar /etc/hostname',
        'ln -sf /etc /root/evil/in/etc-link && tar -cf /root/evil/symlink.tar -C /root/evil/in etc-link',
      ].join(' && '),
    );
    for (const name of ['dotdot', 'absolute', 'symlink']) {
      const res = await server.http(`/api/sandboxes/${box.id}/files/extract?archive=/root/evil/${name}.tar&dest=/root/evil/dest-${name}`, { method: 'POST', apiKey });
      expect(res.status, name).toBe(400);
      expect(((await res.json()) as { error: string }).error).toMatch(/refusing to extract/);
    }
    expect((await box.exec('ls -A /root/evil/dest-symlink /root/evil/dest-dotdot | grep -v : | grep -c . || true')).stdout.trim()).toBe('0');
  });

  it('refuses archives that escape through chained symbolic links or links already on disk (regression)', async () => {
    await box.exec(
      [
        'mkdir -p /root/chain/src/a && cd /root/chain/src',
        'ln -s .. a/t && ln -s a/t/../.. s',
        'tar -cf /root/chain/chained.tar a s',
        'mkdir -p /root/chain/dest && ln -s /etc /root/chain/dest/etc-link',
        'mkdir -p /root/chain/src2/etc-link && echo x > /root/chain/src2/etc-link/evil && tar -cf /root/chain/via-disk.tar -C /root/chain/src2 etc-link',
      ].join(' && '),
    );
    for (const name of ['chained', 'via-disk']) {
      const res = await server.http(`/api/sandboxes/${box.id}/files/extract?archive=/root/chain/${name}.tar&dest=/root/chain/dest`, { method: 'POST', apiKey });
      expect(res.status, name).toBe(400);
    }
    expect((await box.exec('test -e /etc/evil')).exitCode).not.toBe(0);
  });

  it('answers client mistakes with 400, not 502 (regression)', async () => {
    await box.files.mkdir('/root/selfcopy/inner');
    for (const path of ['copy?from=/root/selfcopy&to=/root/selfcopy/inner/x', 'move?from=/root/selfcopy&to=/root/selfcopy/inner/x']) {
      const res = await server.http(`/api/sandboxes/${box.id}/files/${path}`, { method: 'POST', apiKey });
      expect(res.status, path).toBe(400);
    }
    expect((await server.http(`/api/sandboxes/${box.id}/files/search?path=/root&pattern=${encodeURIComponent('[z-a]')}`, { apiKey })).status).toBe(400);
    await box.exec('mkfifo /root/pipe');
    expect((await server.http(`/api/sandboxes/${box.id}/files/download?path=/root/pipe`, { apiKey })).status).toBe(400);
    const proc = await server.http(`/api/sandboxes/${box.id}/files/download?path=/proc/self/status`, { apiKey });
    expect(proc.status).toBe(200);
    expect(await proc.text()).toContain('Name:');
    const literal = await server.http(`/api/sandboxes/${box.id}/files/create?path=/root/literal.txt&content=true`, { method: 'POST', apiKey });
    expect(literal.status).toBe(200);
    expect((await box.files.read('/root/literal.txt')).toString()).toBe('true');
  });

  it("downloads what a symlink points to inside the sandbox, never the host's file of that name", async () => {
    // The same absolute path on the host and in the sandbox, with different contents: the server
    // reads downloads from the host side of the sandbox's filesystem, so this pins that it reads
    // the sandbox's.
    const name = `/tmp/voidrun-same-name-${Date.now()}`;
    writeFileSync(name, 'host content');
    try {
      await box.exec(`echo -n 'sandbox content' > ${name} && ln -sf ${name} /root/abs-link`);
      const res = await server.http(`/api/sandboxes/${box.id}/files/download?path=/root/abs-link`, { apiKey });
      expect(res.status).toBe(200);
      expect(await res.text()).toBe('sandbox content');
      expect((await box.files.read('/root/abs-link')).toString()).toBe('sandbox content');
    } finally {
      rmSync(name, { force: true });
    }
  });

  it('replaces an existing archive when compressing again (regression: zip added to it)', async () => {
    await box.exec('mkdir -p /root/again/d && echo 1 > /root/again/d/old.txt');
    await box.files.compress('/root/again/d', 'zip');
    await box.exec('rm /root/again/d/old.txt && echo 2 > /root/again/d/new.txt');
    await box.files.compress('/root/again/d', 'zip');
    expect((await box.exec('unzip -Z1 /root/again/d.zip')).stdout.split('\n').filter(Boolean).sort()).toEqual(['d/', 'd/new.txt']);
    expect((await box.files.list('/root/again')).map((f) => f.name)).toEqual(['d', 'd.zip']);
  });

  it('watches create, modify, rename and delete in order, over tRPC and over the WebSocket route', async () => {
    await box.files.mkdir('/root/watched');
    const viaTrpc: WatchMessage[] = [];
    const events = box.files.watch('/root/watched');
    const collecting = (async () => {
      for await (const e of events) {
        viaTrpc.push(e);
        if (e.type === 'deleted') break;
      }
    })();

    const start = await server.http(`/api/sandboxes/${box.id}/files/watch`, { method: 'POST', apiKey, json: { path: '/root/watched', recursive: true } });
    expect(start.status).toBe(200);
    const { sessionId } = ((await start.json()) as { data: { sessionId: string } }).data;
    const ws = new WebSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch/${sessionId}/stream`, { headers: { 'x-api-key': apiKey } });
    const viaWs: WatchMessage[] = [];
    ws.on('message', (m) => viaWs.push(JSON.parse(m.toString()) as WatchMessage));
    await new Promise((r) => ws.once('open', r));
    await new Promise((r) => setTimeout(r, 300)); // the tRPC watch is established

    await box.exec('cd /root/watched && echo a > f && sleep 0.15 && echo b >> f && sleep 0.15 && mv f g && sleep 0.15 && rm g');
    await collecting;
    for (let i = 0; i < 40 && !viaWs.some((e) => e.type === 'deleted'); i++) await new Promise((r) => setTimeout(r, 50));
    ws.close();
    const summary = (list: WatchMessage[]) => list.map((e) => `${e.type} ${'path' in e ? e.path.split('/').pop() : ''}${'oldPath' in e && e.oldPath ? ` from ${e.oldPath.split('/').pop()}` : ''}`);
    const expected = ['created f', 'modified f', 'renamed g from f', 'deleted g'];
    expect(summary(viaTrpc)).toEqual(expected);
    expect(summary(viaWs)).toEqual(expected);
  });

  it('answers 404 for an unknown watch session and refuses a bad key on the watch socket', async () => {
    const status = (url: string, headers: Record<string, string>) =>
      new Promise<number>((resolve) => {
        const ws = new WebSocket(url, { headers });
        ws.on('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
        ws.on('open', () => resolve(101));
        ws.on('error', () => {});
      });
    const base = `${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch`;
    expect(await status(`${base}/00000000-0000-0000-0000-000000000000/stream`, { 'x-api-key': apiKey })).toBe(404);
    expect(await status(`${base}/00000000-0000-0000-0000-000000000000/stream`, { 'x-api-key': 'vr_bad' })).toBe(401);
  });

  it("answers 404 on every file route for another org's sandbox", async () => {
    const other = await server.client().trpc.auth.register.mutate({ name: 'Other Files', email: uniqueEmail('of') });
    const routes: Array<[string, string]> = [
      ['GET', 'files?path=/root'],
      ['DELETE', 'files?path=/root/x'],
      ['POST', 'files/upload?path=/root/x'],
      ['GET', 'files/download?path=/etc/hostname'],
      ['GET', 'files/head-tail?path=/etc/hostname'],
      ['GET', 'files/search?path=/root&pattern=*'],
      ['POST', 'files/mkdir?path=/root/x'],
      ['POST', 'files/create?path=/root/x'],
      ['POST', 'files/copy?from=/a&to=/b'],
      ['POST', 'files/move?from=/a&to=/b'],
      ['POST', 'files/chmod?path=/root&mode=755'],
      ['GET', 'files/stat?path=/root'],
      ['GET', 'files/du?path=/root'],
      ['POST', 'files/compress?path=/root'],
      ['POST', 'files/extract?archive=/a.tar&dest=/b'],
      ['POST', 'files/watch'],
    ];
    for (const [method, path] of routes) {
      const res = await server.http(`/api/sandboxes/${box.id}/${path}`, {
        method,
        apiKey: other.apiKey,
        ...(path === 'files/watch' ? { json: { path: '/root' } } : method === 'POST' && !path.startsWith('files/upload') ? { json: {} } : method === 'POST' ? { body: 'x' } : {}),
      });
      expect(res.status, `${method} ${path}`).toBe(404);
    }
  });
});

describe.skipIf(!support.ok)('watch session lifetime', () => {
  it('ends a session with no client after WATCH_IDLE_TIMEOUT_SEC, and every session of a deleted sandbox', async () => {
    const server = await startTestServer({ WATCH_IDLE_TIMEOUT_SEC: '1' });
    try {
      const reg = await server.client().trpc.auth.register.mutate({ name: 'Watch Life', email: uniqueEmail('wl') });
      const sb = await server.client(reg.apiKey).sandboxes.create({ name: 'watch-life' });
      const start = async () =>
        ((await (await server.http(`/api/sandboxes/${sb.id}/files/watch`, { method: 'POST', apiKey: reg.apiKey, json: { path: '/root' } })).json()) as { data: { sessionId: string } }).data
          .sessionId;
      const connect = (sessionId: string) =>
        new Promise<{ status: number; ws?: WebSocket }>((resolve) => {
          const ws = new WebSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${sb.id}/files/watch/${sessionId}/stream?apiKey=${reg.apiKey}`);
          ws.on('unexpected-response', (_req, res) => resolve({ status: res.statusCode ?? 0 }));
          ws.on('open', () => resolve({ status: 101, ws }));
          ws.on('error', () => {});
        });

      const idle = await start();
      await new Promise((r) => setTimeout(r, 1500));
      expect((await connect(idle)).status).toBe(404);

      const live = await start();
      const { status, ws } = await connect(live);
      expect(status).toBe(101);
      const closed = new Promise<number>((resolve) => ws!.once('close', (code) => resolve(code)));
      await sb.delete();
      expect(await closed).toBe(1000);
    } finally {
      await server.close();
    }
  });
});
