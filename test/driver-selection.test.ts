import { afterEach, describe, expect, it } from 'vitest';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

interface DriverInfo {
  name: string | null;
  accelerator?: string;
  reason: string;
}

describe('choosing the sandbox driver (SANDBOX_DRIVER)', () => {
  let server: TestServer | undefined;
  afterEach(async () => {
    await server?.close();
    server = undefined;
  });
  const driverOf = async (s: TestServer) => ((await (await s.http('/api/version')).json()) as { driver: DriverInfo }).driver;

  it('answers 503 naming what is missing when cloud-hypervisor is asked for and absent', async () => {
    server = await startTestServer({ SANDBOX_DRIVER: 'cloud-hypervisor', CLOUD_HYPERVISOR_BINARY: '/nonexistent/cloud-hypervisor' });
    const driver = await driverOf(server);
    expect(driver.name).toBeNull();
    expect(driver.reason).toMatch(/cloud-hypervisor is not installed at \/nonexistent\/cloud-hypervisor/);
    const reg = await server.client().trpc.auth.register.mutate({ name: 'No Driver', email: uniqueEmail('nodriver') });
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey: reg.apiKey, json: { name: 'nope' } });
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: string }).error).toMatch(/cloud-hypervisor/);
  });

  it.skipIf(!support.ok)('with auto, says why it chose what it chose', async () => {
    server = await startTestServer({ SANDBOX_DRIVER: 'auto', CLOUD_HYPERVISOR_BINARY: '/nonexistent/cloud-hypervisor' });
    const driver = await driverOf(server);
    expect(driver.name).not.toBeNull();
    expect(driver.reason).toMatch(/^auto: /);
    // cloud-hypervisor is first in line; its absence is named.
    expect(driver.reason).toMatch(/cloud-hypervisor: cloud-hypervisor is not installed/);
    if (driver.name === 'container') expect(driver.reason).toMatch(/qemu/);
  });
});
