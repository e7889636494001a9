import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> };

/**
 * The `start` script run as npm runs it (its node flags, scripts/start.mjs), in its own process with a
 * temporary DATA_DIR, and a sandbox driver this host lacks (cloud-hypervisor is not installed here), so
 * the server must start anyway and answer sandbox requests 503 with the driver's reason.
 */
describe('npm start (compiled server, in its own process)', () => {
  let child: ChildProcess;
  let url = '';
  const dataDir = mkdtempSync(join(tmpdir(), 'voidrun-start-'));
  const output: string[] = [];

  beforeAll(async () => {
    const [node, ...args] = pkg.scripts.start!.split(' ');
    expect(node).toBe('node');
    child = spawn(process.execPath, args, {
      cwd: root,
      env: { ...process.env, SERVER_PORT: '0', SERVER_HOST: '127.0.0.1', DATA_DIR: dataDir, VOIDRUN_SKIP_SETUP: '1', SANDBOX_DRIVER: 'cloud-hypervisor', CLOUD_HYPERVISOR_BINARY: join(dataDir, 'no-such-binary'), HEALTH_ENABLED: 'false', PREPARE_DEFAULT_IMAGE: 'false', SANDBOX_NETWORK: 'none' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child.stderr!.on('data', (d: Buffer) => output.push(d.toString()));
    url = await new Promise<string>((resolve, reject) => {
      child.once('exit', (code) => reject(new Error(`npm start exited with ${code}: ${output.join('')}`)));
      createInterface({ input: child.stdout! }).on('line', (line) => {
        output.push(line);
        const m = /VoidRun listening on http:\/\/[^:]+:(\d+)/.exec(line);
        if (m) resolve(`http://127.0.0.1:${m[1]}`);
      });
    });
  }, 120_000);

  afterAll(async () => {
    if (child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    }
    rmSync(dataDir, { recursive: true, force: true });
  });

  it('runs dist/server/main.js with plain node, no TypeScript loader', async () => {
    const cmdline = readFileSync(`/proc/${child.pid}/cmdline`, 'utf8').split('\0');
    expect(cmdline).toContain('scripts/start.mjs');
    expect(cmdline.join(' ')).not.toMatch(/tsx/);
    const maps = readFileSync(`/proc/${child.pid}/maps`, 'utf8');
    expect(maps).not.toMatch(/tsx/);
    const res = await fetch(`${url}/api/version`);
    expect(res.status).toBe(200);
    expect(((await res.json()) as { driver: { name: string | null } }).driver.name).toBeNull();
  });

  it('starts without a usable sandbox driver and answers sandbox requests 503 with the reason', async () => {
    const reg = await fetch(`${url}/api/register`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'Admin', email: 'admin@example.com' }) });
    const key = ((await reg.json()) as { data: { apiKey: string } }).data.apiKey;
    const res = await fetch(`${url}/api/sandboxes`, { method: 'POST', headers: { 'content-type': 'application/json', 'x-api-key': key }, body: JSON.stringify({ name: 'box-1' }) });
    expect(res.status).toBe(503);
    expect(JSON.stringify(await res.json())).toMatch(/cloud-hypervisor/);
  });
});
