import { randomBytes, randomInt } from 'node:crypto';
import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { findLink, tapNameFor, tearDown } from '../server/hypervisor/network/host-network.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { fetchCommand, ip, onPath, startTestInternet, type TestInternet } from './helpers/test-internet.js';

const netSkip = !support.ok ? support.reason : !['ip', 'nft', 'nsenter', 'bridge'].every(onPath) ? 'ip, nft, nsenter or bridge missing' : null;
if (netSkip) console.warn(`container network tests skipped: ${netSkip}`);

describe.skipIf(netSkip !== null)('container sandboxes on the bridge', () => {
  const tag = randomBytes(3).toString('hex');
  const bridge = `vrtb${tag}`;
  const subnet = `10.213.${randomInt(0, 256)}`;
  let internet: TestInternet;
  let server: TestServer;
  let apiKey: string;
  let vr: VoidRunClient;
  let box: SandboxHandle;

  beforeAll(async () => {
    internet = await startTestInternet({ name: `vrti-${tag}`, hostIf: `vti${tag}`, testNet: '198.51.100' });
    server = await startTestServer({
      SANDBOX_DRIVER: 'container',
      SANDBOX_NETWORK: 'bridge',
      BRIDGE_NAME: bridge,
      GATEWAY_IP: `${subnet}.1/24`,
      NETWORK_CIDR: `${subnet}.0/24`,
      DNS_NAMESERVERS: internet.address,
      METRICS_TOKEN: 'metrics-secret',
      HEALTH_ENABLED: 'false',
    });
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Net User', email: uniqueEmail('net') });
    apiKey = reg.apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'net-box' });
  }, 180_000);

  afterAll(async () => {
    try {
      await server?.close();
    } finally {
      // The bridge and exactly its NAT and FORWARD rules (setup-net --down).
      await tearDown({ bridge, gatewayCidr: `${subnet}.1/24`, networkCidr: `${subnet}.0/24` });
      await internet?.close();
    }
  }, 60_000);

  it('a sandbox with the default policy fetches from the test internet by IP, masqueraded behind the host', async () => {
    const res = await box.exec(fetchCommand(internet.address));
    expect(res.exitCode, res.stderr).toBe(0);
    expect(JSON.parse(res.stdout)).toEqual({ from: internet.hostAddress, received: 0 });
  }, 60_000);
});
