import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CHROMIUM, hasChromium, launchChromium } from './helpers/chromium.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const canRun = support.ok && hasChromium;
if (!hasChromium) console.warn(`[console test] SKIPPED: ${CHROMIUM} is missing (.ci/run installs Debian's chromium)`);

describe.skipIf(!canRun)('the browser console (headless Chromium)', () => {
  let server: TestServer;
  let browser: Browser;
  const shots = mkdtempSync(join(tmpdir(), 'voidrun-console-'));

  beforeAll(async () => {
    server = await startTestServer();
    browser = await launchChromium();
  }, 180_000);
  afterAll(async () => {
    await browser?.close();
    await server?.close();
    rmSync(shots, { recursive: true, force: true });
  });

  it('takes an API key, creates a sandbox, and runs echo hello in a working terminal', async () => {
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Console User', email: uniqueEmail('console') });
    const page = await browser.newPage({ viewport: { width: 1200, height: 700 } });
    try {
      await page.goto(`${server.url}/console`);
      await page.fill('#apiKey', reg.apiKey);
      await page.click('#connect');
      // Page-side expressions as strings: this file is type-checked without the DOM library.
      await page.waitForFunction("document.getElementById('status')?.textContent?.includes('sandbox')");
      await page.fill('#newName', 'console-box');
      await page.click('#create');
      await page.waitForFunction("document.getElementById('status')?.textContent?.startsWith('connected')", undefined, { timeout: 60_000 });
      await page.click('#terminal');
      await page.keyboard.type('echo hello');
      await page.keyboard.press('Enter');
      // The command line echoes "echo hello"; the output is a line that is just "hello".
      await page.waitForFunction("[...document.querySelectorAll('.xterm-rows > div')].some((row) => row.textContent?.trim() === 'hello')", undefined, { timeout: 20_000 });
      // VOIDRUN_SCREENSHOT_DIR keeps the screenshot for a person to look at.
      const file = join(process.env.VOIDRUN_SCREENSHOT_DIR ?? shots, 'console.png');
      await page.screenshot({ path: file });
      expect(statSync(file).size).toBeGreaterThan(10_000);
      expect((await page.locator('#sandboxes button').allTextContents()).join()).toContain('console-box');
    } finally {
      await page.close();
    }
  });

  it('serves the page and its assets without any outside URL', async () => {
    const html = await (await server.http('/')).text();
    expect(html).not.toMatch(/https?:\/\//);
    for (const asset of ['xterm.js', 'xterm.css', 'addon-fit.js']) expect((await server.http(`/console/assets/${asset}`)).status).toBe(200);
    expect((await server.http('/console/assets/../package.json')).status).toBe(404);
  });
});
