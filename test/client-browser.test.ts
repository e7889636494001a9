import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { build } from 'esbuild';
import type { Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SandboxNotFoundError } from '../client/index.js';
import { CHROMIUM, hasChromium, launchChromium } from './helpers/chromium.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const canRun = support.ok && hasChromium;
if (!hasChromium) console.warn(`[client browser test] SKIPPED: ${CHROMIUM} is missing (.ci/run installs Debian's chromium)`);

/** The client bundled for a browser, as an app's bundler would: `window.voidrun` is client/index.ts. */
async function browserBundle(): Promise<{ code: string; packages: string[] }> {
  const out = await build({
    stdin: { contents: "import * as voidrun from './client/index.ts'; globalThis.voidrun = voidrun;", resolveDir: process.cwd(), loader: 'ts' },
    bundle: true,
    platform: 'browser',
    format: 'esm',
    target: 'es2022',
    write: false,
    metafile: true,
    logLevel: 'silent',
  });
  const packages = Object.keys(out.metafile.inputs)
    .filter((p) => p.includes('node_modules/'))
    .map((p) => p.split('node_modules/').pop()!.split('/').slice(0, p.includes('node_modules/@') ? 2 : 1).join('/'));
  return { code: out.outputFiles[0]!.text, packages: [...new Set(packages)] };
}

/**
 * What the page runs (plain JavaScript in a string: it runs in Chromium, not through this file's
 * transform). It drives the bundled client against the real server, cross-origin.
 */
const pageScript = `async ({ url, apiKey }) => {
  const { Sandbox, CommandExitError, FileNotFoundError } = globalThis.voidrun;
  const out = { inBrowser: typeof process === 'undefined' && typeof window === 'object' };
  try { await Sandbox.create(); } catch (e) { out.noUrl = String(e.message); }
  const sbx = await Sandbox.create({ apiUrl: url, apiKey, labels: { from: 'browser' } });
  out.id = sbx.sandboxId;
  out.status = sbx.info.status;
  out.run = await sbx.commands.run('echo hi from $((40 + 2))');
  const chunks = [];
  out.streamed = await sbx.commands.run('echo a; echo b >&2', { onStdout: (d) => chunks.push(d), onStderr: (d) => chunks.push('err:' + d) });
  out.chunks = chunks.join('');
  try { await sbx.commands.run('exit 3', { throwOnError: true }); } catch (e) { out.exitError = { isClass: e instanceof CommandExitError, exitCode: e.exitCode }; }
  await sbx.files.write('/root/up.txt', new Blob(['uploaded from a browser']));
  await sbx.files.write('/root/bytes.bin', new Uint8Array([0, 1, 2, 250]));
  out.text = await sbx.files.readText('/root/up.txt');
  out.bytes = Array.from(await sbx.files.read('/root/bytes.bin'));
  out.viaStream = await new Response(await sbx.files.downloadStream('/root/up.txt')).text();
  out.catted = (await sbx.commands.run('cat /root/up.txt')).stdout;
  try { await sbx.files.read('/root/nope'); } catch (e) { out.missingIsFileNotFound = e instanceof FileNotFoundError; }
  out.expires = (await sbx.setTimeout(300)).expiresAt;
  const events = sbx.events();
  for await (const e of events) { if (e.type === 'sandbox.created') { out.createdEvent = e.sandboxId; break; } }
  const bg = await sbx.commands.run('sleep 600', { background: true });
  out.killed = await bg.kill();
  out.bgExit = (await bg.wait()).exitCode;
  await sbx.kill();
  return out;
}`;

describe.skipIf(!canRun)('the typed client in a browser (headless Chromium, bundled with esbuild)', () => {
  let server: TestServer;
  let browser: Browser;
  let site: Server;
  let siteUrl: string;
  let bundle: { code: string; packages: string[] };

  beforeAll(async () => {
    server = await startTestServer();
    bundle = await browserBundle();
    // The page comes from another origin (another port), as an app's would: the API answers it through CORS.
    site = createServer((req, res) => {
      if (req.url === '/voidrun.js') res.writeHead(200, { 'content-type': 'text/javascript' }).end(bundle.code);
      else res.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><title>client</title><script type="module" src="/voidrun.js"></script>');
    });
    await new Promise<void>((resolve) => site.listen(0, '127.0.0.1', resolve));
    siteUrl = `http://127.0.0.1:${(site.address() as AddressInfo).port}/`;
    browser = await launchChromium();
  }, 180_000);
  afterAll(async () => {
    await browser?.close();
    await new Promise((resolve) => site?.close(resolve));
    await server?.close();
  });

  it('bundles for the browser without Node modules or the ws package', () => {
    expect(bundle.packages.sort()).toEqual(['@trpc/client', '@trpc/server', 'superjson']);
    // Node's modules are only named as strings for process.getBuiltinModule, never imported.
    expect(bundle.code).not.toMatch(/\bimport\s*(\(|[^;]*\bfrom)\s*["'](node:|ws["'])/);
    expect(bundle.code).not.toMatch(/\brequire\(/);
  });

  it('creates a sandbox, runs commands, uploads and downloads files, sets its timeout, reads its events, and deletes it from a page on another origin', async () => {
    const apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Browser User', email: uniqueEmail('browser') })).apiKey;
    const page = await browser.newPage();
    const pageErrors: string[] = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));
    try {
      await page.goto(siteUrl);
      await page.waitForFunction('globalThis.voidrun !== undefined');
      const out = (await page.evaluate(`(${pageScript})(${JSON.stringify({ url: server.url, apiKey })})`)) as Record<string, unknown>;
      expect(out).toMatchObject({
        inBrowser: true,
        status: 'running',
        run: { stdout: 'hi from 42\n', exitCode: 0 },
        streamed: { stdout: 'a\n', stderr: 'b\n', exitCode: 0 },
        exitError: { isClass: true, exitCode: 3 },
        text: 'uploaded from a browser',
        bytes: [0, 1, 2, 250],
        viaStream: 'uploaded from a browser',
        catted: 'uploaded from a browser',
        missingIsFileNotFound: true,
        killed: true,
      });
      expect(out.noUrl).toMatch(/VOIDRUN_API_URL/);
      // Both streams reached their callbacks (their relative order is the sandbox's business).
      expect(out.chunks).toContain('a\n');
      expect(out.chunks).toContain('err:b\n');
      expect(out.bgExit).not.toBe(0);
      // setTimeout over HTTP and the event stream over the browser's own WebSocket.
      expect(Date.parse(String(out.expires))).toBeGreaterThan(Date.now());
      expect(out.createdEvent).toBe(out.id);
      await expect(server.client(apiKey).sandboxes.get(String(out.id))).rejects.toBeInstanceOf(SandboxNotFoundError);
      expect(pageErrors).toEqual([]);
    } finally {
      await page.close();
    }
  });
});
