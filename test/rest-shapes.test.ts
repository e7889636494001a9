import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle } from '../client/index.js';
import { duSize } from '../server/services/file-service.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/**
 * REST bodies as the original VoidRun's contract and code give them: bare where they send bare
 * bodies, both shapes at once where they disagree, and tRPC unchanged.
 */
describe('REST answers without a sandbox', () => {
  let server: TestServer;
  let apiKey: string;
  let orgId: string;

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Shapes User', email: uniqueEmail('shapes') });
    ({ apiKey, orgId } = reg);
  });
  afterAll(async () => {
    await server?.close();
  });

  it('a query key named like an Object.prototype member (toString, __proto__, …) is a parameter like any other, never a 500', async () => {
    for (const key of ['toString', 'constructor', '__proto__', 'valueOf', 'hasOwnProperty']) {
      for (const query of [`${key}=1`, `${key}=a&${key}=b`]) {
        const calls: Array<[string, string, unknown?]> = [
          ['GET', `/api/version?${query}`],
          ['GET', `/api/orgs/me?${query}`],
          ['GET', `/api/sandboxes?${query}`],
          ['GET', `/api/images?${query}`],
          ['POST', `/api/orgs/${orgId}/apikeys?${query}`, { orgId, keyName: `key ${key}` }],
          ['GET', `/api/sandboxes/65ae1234567890abcdef1234/files/stat?path=/root&${query}`],
        ];
        for (const [method, path, json] of calls) {
          const res = await server.http(path, { method, apiKey, json });
          expect(res.status, `${method} ${path}`).toBeLessThan(500);
          expect(res.status, `${method} ${path}`).not.toBe(400);
        }
      }
    }
  });

  it('GET /version is bare, as the original sends it', async () => {
    const body = (await (await server.http('/api/version')).json()) as Record<string, unknown>;
    expect(body).toMatchObject({ version: expect.any(String), commit: expect.any(String), buildTime: expect.any(String) });
    expect(body).not.toHaveProperty('data');
  });

  it('GET /orgs/me is both the bare Organization of the contract and the envelope of the original', async () => {
    const body = (await (await server.http('/api/orgs/me', { apiKey })).json()) as Record<string, unknown>;
    const org = { id: orgId, name: expect.any(String), ownerId: expect.any(String), members: expect.any(Array), plan: expect.any(String), usage: expect.any(Number) };
    const times = { createdAt: expect.any(String), createdBy: expect.any(String), updatedAt: expect.any(String) };
    expect(body).toMatchObject({ ...org, ...times, status: 'success', message: expect.any(String), data: { ...org, ...times } });
    // tRPC answers the Organization itself.
    const viaTrpc = await server.client(apiKey).trpc.org.me.query();
    expect(viaTrpc).toEqual(body.data);
  });

  it('API keys: POST answers the bare GeneratedAPIKeyResponse, GET a bare array newest first', async () => {
    const created = await server.http(`/api/orgs/${orgId}/apikeys`, { method: 'POST', apiKey, json: { orgId, keyName: 'newest' } });
    expect(created.status).toBe(200);
    const key = (await created.json()) as Record<string, unknown>;
    expect(key).toEqual({ plainKey: expect.stringMatching(/^vr_/), keyId: expect.any(String), keyName: 'newest', orgId, createdAt: expect.any(String), expiresIn: expect.any(String) });
    const list = (await (await server.http(`/api/orgs/${orgId}/apikeys`, { apiKey })).json()) as Array<{ id: string; name: string; createdAt: string }>;
    expect(Array.isArray(list)).toBe(true);
    expect(list[0]).toMatchObject({ id: key.keyId, name: 'newest' });
    expect(list.at(-1)!.name).toBe('Default Key');
    const times = list.map((k) => Date.parse(k.createdAt));
    expect(times).toEqual([...times].sort((a, b) => b - a));
    expect((await server.client(apiKey).trpc.org.listApiKeys.query({ orgId })).map((k) => k.id)).toEqual(list.map((k) => k.id));
  });

  it('REST path parameters are percent-decoded as the original (gin) decodes them; a malformed escape is no route', async () => {
    const debian = (await (await server.http('/api/images/name/debian', { apiKey })).json()) as { id: string };
    expect(await (await server.http('/api/images/name/deb%69an', { apiKey })).json()).toEqual(debian);
    expect((await server.http(`/api/images/${encodeURIComponent(debian.id).replace('a', '%61')}`, { apiKey })).status).toBe(200);
    expect((await server.http('/api/images/name/deb%zzan', { apiKey })).status).toBe(404);
    expect((await server.http('/api/images/name/a%2Fb', { apiKey })).status).toBe(404);
  });

  it('images: GET list, by id and by name are bare; POST is both the bare Image and the envelope (201)', async () => {
    const list = (await (await server.http('/api/images', { apiKey })).json()) as Array<{ id: string; _id: string; name: string }>;
    const debian = list.find((i) => i.name === 'debian')!;
    // The contract's orgId is a string: a system image's is the original's empty ObjectId (tRPC keeps null).
    expect(debian).toMatchObject({ id: expect.any(String), _id: debian.id, system: true, orgId: '000000000000000000000000' });
    expect((await server.client(apiKey).trpc.images.get.query({ id: debian.id })).orgId).toBeNull();
    expect(await (await server.http(`/api/images/${debian.id}`, { apiKey })).json()).toEqual(debian);
    expect(await (await server.http('/api/images/name/debian', { apiKey })).json()).toEqual(debian);
    const created = await server.http('/api/images', { method: 'POST', apiKey, json: { name: 'shapes-image', path: 'debian' } });
    expect(created.status).toBe(201);
    const body = (await created.json()) as Record<string, unknown> & { data: Record<string, unknown> };
    expect(body).toMatchObject({ status: 'success', message: 'Image created', name: 'shapes-image', id: body.data.id, data: { name: 'shapes-image' } });
  });

  it('GET /sandboxes clamps page and limit out of range, as the original does, instead of refusing them', async () => {
    const meta = async (query: string) => {
      const res = await server.http(`/api/sandboxes?${query}`, { apiKey });
      expect(res.status, query).toBe(200);
      return ((await res.json()) as { meta: { page: number; limit: number } }).meta;
    };
    expect(await meta('page=0&limit=0')).toMatchObject({ page: 1, limit: 20 });
    expect(await meta('page=-3&limit=-1')).toMatchObject({ page: 1, limit: 20 });
    expect(await meta('limit=1000')).toMatchObject({ page: 1, limit: 100 });
    expect(await meta('page=2&limit=5')).toMatchObject({ page: 2, limit: 5 });
    expect((await meta('page=1000000000000')).page).toBeGreaterThan(1); // a page far past the end is empty, not a 500
    expect((await server.http('/api/sandboxes?page=two', { apiKey })).status).toBe(400);
  });

  it('du sizes read as `du -h` prints them', () => {
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-du-'));
    try {
      const sizes = [0, 1, 512, 1023, 1024, 1025, 4096, 4352, 10239, 10240, 10241, 102400, 1048575, 1048576, 1153434, 10485759, 62914560, 1073741823, 1610612736];
      for (const size of sizes) {
        const file = join(dir, String(size));
        writeFileSync(file, '');
        truncateSync(file, size);
        const du = execFileSync('du', ['-h', '--apparent-size', file], { encoding: 'utf8' }).split('\t')[0];
        expect(duSize(size), String(size)).toBe(du);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.skipIf(!support.ok)('REST answers about a sandbox', () => {
  let server: TestServer;
  let apiKey: string;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Shapes Box', email: uniqueEmail('shapesbox') });
    apiKey = reg.apiKey;
    box = await server.client(apiKey).sandboxes.create({ name: 'shapes' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  const call = async (method: string, path: string, json?: unknown) => {
    const res = await server.http(`/api/sandboxes/${box.id}${path}`, { method, apiKey, json });
    expect(res.status, `${method} ${path}`).toBeLessThan(300);
    return (await res.json()) as Record<string, any>;
  };

  it('GET /sandboxes/{id} carries success beside status, and the sandbox with the contract status, phase and ready', async () => {
    const body = await call('GET', '');
    expect(body).toMatchObject({ success: true, status: 'success', message: expect.any(String) });
    expect(body.data).toMatchObject({ id: box.id, status: 'running', phase: 'running', ready: true });
  });

  it('background commands answer bare: CommandRunResponse, CommandListResponse, CommandKillResponse, CommandWaitResponse', async () => {
    const run = await call('POST', '/commands/run', { command: 'sleep 600' });
    expect(run).toEqual({ success: true, pid: expect.any(Number), command: 'sleep 600' });
    const list = await call('GET', '/commands/list');
    expect(list).toEqual({ success: true, processes: expect.arrayContaining([expect.objectContaining({ pid: run.pid, command: 'sleep 600', running: true, startTime: expect.any(String) })]) });
    expect(await call('POST', '/commands/kill', { pid: run.pid })).toEqual({ success: true, message: expect.any(String) });
    expect(await call('POST', '/commands/wait', { pid: run.pid })).toEqual({ success: true, exitCode: 137, error: null });
  });

  it('POST /session-exec answers bare, as the original sends it', async () => {
    const created = await call('POST', '/session-exec', { action: 'create' });
    expect(created).toMatchObject({ success: true, sessionId: expect.any(String) });
    expect(await call('POST', '/session-exec', { action: 'exec', sessionId: created.sessionId, command: 'echo hi' })).toMatchObject({ success: true, output: 'hi\n', exitCode: 0 });
    await call('POST', '/session-exec', { action: 'close', sessionId: created.sessionId });
  });

  it('file stat prints one JSON object as `stat -c` did, du prints `du -sh`, search matches a plain pattern as a substring', async () => {
    await box.exec('mkdir -p /root/shapes/sub && printf 12345 > /root/shapes/report-2024.txt && : > /root/shapes/sub/empty.log && chmod 640 /root/shapes/report-2024.txt');
    const stat = await call('GET', '/files/stat?path=/root/shapes/report-2024.txt');
    const printed = JSON.parse(stat.data.stdout);
    const mtime = Number(execInBox(await box.exec('stat -c %Y /root/shapes/report-2024.txt')));
    expect(printed).toEqual({ path: '/root/shapes/report-2024.txt', size: 5, mode: '81a0', mtime, type: 'regular file' });
    expect(stat.data).toMatchObject({ mode: '0640', size: 5, isDir: false, type: 'regular file' }); // the structured fields stay
    expect(JSON.parse((await call('GET', '/files/stat?path=/root/shapes/sub')).data.stdout)).toMatchObject({ mode: '41ed', type: 'directory' });
    expect(JSON.parse((await call('GET', '/files/stat?path=/root/shapes/sub/empty.log')).data.stdout)).toMatchObject({ size: 0, type: 'regular empty file' });

    const du = await call('GET', '/files/du?path=/root/shapes');
    expect(du.data.stdout).toBe(execInBox(await box.exec('du -sh /root/shapes')) + '\n');
    expect(du.data).toMatchObject({ path: '/root/shapes', size: expect.any(Number) });

    const plain = await call('GET', '/files/search?path=/root/shapes&pattern=port');
    expect(plain.data.stdout).toBe('/root/shapes/report-2024.txt\n');
    expect(plain.data.matches).toEqual(['/root/shapes/report-2024.txt']);
    const glob = await call('GET', `/files/search?path=/root/shapes&pattern=${encodeURIComponent('*.log')}`);
    expect(glob.data.matches).toEqual(['/root/shapes/sub/empty.log']);
    const anchored = await call('GET', `/files/search?path=/root/shapes&pattern=${encodeURIComponent('port*')}`);
    expect(anchored.data.matches).toEqual([]); // a glob is matched against the whole name
  });

  it('GET /sandboxes/{id}/snapshots is a bare array', async () => {
    const snap = await call('POST', '/snapshot');
    const list = await call('GET', '/snapshots');
    expect(Array.isArray(list)).toBe(true);
    expect(list).toEqual([expect.objectContaining({ id: snap.data.id, full_path: snap.data.full_path, created_at: expect.any(String) })]);

    // POST /sandboxes/restore: the contract's bare Sandbox, with the original's message and data beside it.
    const res = await server.http('/api/sandboxes/restore', { method: 'POST', apiKey, json: { snapshot_path: snap.data.full_path, new_id: 'shapes-restored', cold: true } });
    expect(res.status).toBe(201);
    const restored = (await res.json()) as Record<string, any>;
    expect(restored).toMatchObject({ name: 'shapes-restored', status: 'stopped', message: 'Sandbox restored' });
    expect(restored.data).toMatchObject({ id: restored.id, name: 'shapes-restored', status: 'stopped' });
    await server.client(apiKey).trpc.sandbox.delete.mutate({ id: restored.id });
  }, 180_000);

  it('every REST answer carrying a sandbox keeps status within the contract enum, with phase and ready beside it', async () => {
    const list = await server.http('/api/sandboxes', { apiKey });
    expect(((await list.json()) as { data: unknown[] }).data).toEqual([expect.objectContaining({ id: box.id, status: 'running', phase: 'running', ready: true })]);
    expect((await call('POST', '/pause')).data).toEqual({ id: box.id, status: 'paused', phase: 'paused', ready: false });
    expect((await call('POST', '/resume')).data).toEqual({ id: box.id, status: 'running', phase: 'running', ready: true });
  }, 120_000);
});

/** The first line of a command's stdout, as the sandbox printed it. */
function execInBox(result: { stdout: string; exitCode: number }): string {
  expect(result.exitCode).toBe(0);
  return result.stdout.split('\n')[0]!;
}
