import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NetworkPolicy } from '../shared/index.js';
import { addressUsable, hostAddresses } from '../server/hypervisor/network/egress-firewall.js';
import { setUp, tearDown } from '../server/hypervisor/network/host-network.js';
import { SandboxEgress } from '../server/hypervisor/network/sandbox-egress.js';
import { tapGuardTable } from '../server/hypervisor/network/tap-guard.js';
import { newId } from '../server/store/ids.js';
import { ip, onPath, startTestInternet, type TestInternet } from './helpers/test-internet.js';

/*
 * The name proxy (the SNI/Host check of ports 80 and 443) connects from the host itself, so the
 * input hook that keeps sandboxes off the host does not see its connections: it must refuse the
 * host's own addresses itself, and only connections the firewall redirected may reach it.
 * "Sandboxes" here are network namespaces this file creates on its own bridge, with the real
 * firewall, resolver and proxy of one bridge (SandboxEgress) and no sandbox runtime.
 */

const run = promisify(execFile);
const policy = (p: Partial<NetworkPolicy>): NetworkPolicy => ({ mode: 'bridge', egress: 'allow', allow: [], deny: [], maxEgressBytes: null, egressCut: false, ...p });

describe('the name proxy never connects a sandbox to the host (pure)', () => {
  it("no address of the host's own interfaces is usable on a sandbox's behalf, whatever its allow CIDRs", () => {
    const own = [...hostAddresses()];
    expect(own.length).toBeGreaterThan(0);
    expect(own.filter((address) => addressUsable(address, policy({ allow: ['0.0.0.0/0'] }), '10.211.0.0/24'))).toEqual([]);
  });
});

const netSkip = process.getuid?.() !== 0 ? 'not root' : !['ip', 'nft'].every(onPath) ? 'ip or nft missing' : null;
if (netSkip) console.warn(`name proxy tests in namespaces skipped: ${netSkip}`);

describe.skipIf(netSkip !== null)('the name proxy on a bridge, with namespaces as sandboxes', () => {
  const tag = randomBytes(3).toString('hex');
  const bridge = `npb${tag}`;
  const subnet = `10.211.${randomInt(0, 256)}`;
  const gateway = `${subnet}.1`;
  const net = { bridge, gatewayCidr: `${gateway}/24`, networkCidr: `${subnet}.0/24` };
  /** Sandbox namespaces: `proxied` allows domains under egress deny (its ports 80 and 443 go to the proxy), `open` has egress allow. */
  const boxes = {
    proxied: { id: newId(), ns: `npp${tag}`, hostIf: `nph${tag}`, ip: `${subnet}.2`, policy: policy({ egress: 'deny', allow: ['allowed.test', 'host.test'] }) },
    open: { id: newId(), ns: `npo${tag}`, hostIf: `npj${tag}`, ip: `${subnet}.3`, policy: policy({}) },
  };
  let internet: TestInternet;
  let servers: ChildProcess;
  let hostService: Server;
  const hostHits: string[] = [];
  let egress: SandboxEgress | undefined;

  /** Runs bash `script` in the namespace of `box`; its stdout, or null when it failed. */
  const inBox = async (box: { ns: string }, script: string): Promise<string | null> => {
    try {
      return (await run('ip', ['netns', 'exec', box.ns, 'timeout', '10', 'bash', '-c', script])).stdout;
    } catch {
      return null;
    }
  };
  /** An HTTP/1.0 GET to `address`:`port` with `host` as its Host, from `box`: the raw answer, or null when it could not connect. */
  const httpGet = (box: { ns: string }, address: string, host: string, port = 80) =>
    inBox(box, `exec 3<>/dev/tcp/${address}/${port} && printf 'GET / HTTP/1.0\\r\\nHost: ${host}\\r\\n\\r\\n' >&3 && cat <&3`);

  beforeAll(async () => {
    internet = await startTestInternet({ name: `npi-${tag}`, hostIf: `npi${tag}`, testNet: '198.51.100' });
    // host.test names the host's own end of the test internet's link, where a "host service" listens.
    const names = { 'allowed.test': internet.address, 'host.test': internet.hostAddress };
    servers = spawn('ip', ['netns', 'exec', internet.ns, process.execPath, join(import.meta.dirname, 'fixtures', 'egress-internet.mjs'), JSON.stringify({ dns: internet.address, names, http: [], web: [internet.address] })]);
    await new Promise<void>((resolve, reject) => {
      servers.stdout!.on('data', (chunk: Buffer) => chunk.toString().split('\n').includes('ready') && resolve());
      servers.once('exit', (code) => reject(new Error(`test internet servers exited with ${code}`)));
    });
    hostService = createServer((s) => (hostHits.push(s.remoteAddress ?? ''), s.end('HTTP/1.0 200 OK\r\n\r\nhost service\n')));
    await new Promise<void>((r) => hostService.listen(80, internet.hostAddress, r));
    await setUp(net);
    egress = new SandboxEgress({ ...net, nameservers: [internet.address], log: pino({ level: 'silent' }) });
    await egress.start();
    for (const box of Object.values(boxes)) {
      await ip('netns', 'add', box.ns);
      await ip('link', 'add', box.hostIf, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', box.ns);
      await ip('link', 'set', box.hostIf, 'master', bridge, 'up');
      await ip('-n', box.ns, 'addr', 'add', `${box.ip}/24`, 'dev', 'eth0');
      for (const dev of ['eth0', 'lo']) await ip('-n', box.ns, 'link', 'set', dev, 'up');
      await ip('-n', box.ns, 'route', 'add', 'default', 'via', gateway);
      await egress.firewall.apply({ id: box.id, ip: box.ip, hostIf: box.hostIf }, box.policy);
    }
  }, 120_000);

  afterAll(async () => {
    await egress?.stop();
    for (const box of Object.values(boxes)) {
      await ip('netns', 'del', box.ns).catch(() => {});
      await ip('link', 'del', box.hostIf).catch(() => {});
    }
    await tearDown(net).catch(() => {});
    servers?.kill();
    hostService?.close();
    await internet?.close();
  }, 60_000);

  it("a name resolving to one of the host's addresses is not connected: the redirected request never reaches the host's service", async () => {
    // The proxy works for a name whose address is another host's.
    expect(await httpGet(boxes.proxied, internet.address, 'allowed.test')).toMatch(new RegExp(`"at":"${internet.address.replace(/\./g, '\\.')}"`));
    const answer = await httpGet(boxes.proxied, internet.address, 'host.test');
    expect(answer).toMatch(/^HTTP\/1\.1 502 .*host\.test does not resolve/s);
    expect(answer).not.toContain('host service');
    // A direct connection to that address is refused to the sandbox too.
    expect(await httpGet(boxes.proxied, internet.hostAddress, 'host.test')).not.toContain('host service');
    expect(hostHits).toEqual([]);
  }, 60_000);

  it("a sandbox dialling the name proxy's ports itself is refused: only connections the firewall redirected reach them", async () => {
    const { stdout } = await run('nft', ['-j', 'list', 'map', 'ip', tapGuardTable(bridge), 'proxy_ports']);
    const elem = (JSON.parse(stdout) as { nftables: Array<{ map?: { elem?: Array<[number, number]> } }> }).nftables.find((e) => e.map)!.map!.elem!;
    const ports = elem.map(([, to]) => to);
    expect(ports).toHaveLength(2);
    for (const box of [boxes.open, boxes.proxied]) {
      for (const port of ports) expect(await inBox(box, `exec 3<>/dev/tcp/${gateway}/${port} && echo connected`)).toBeNull();
    }
    // The redirected path still works.
    expect(await httpGet(boxes.proxied, internet.address, 'allowed.test')).toContain('"host":"allowed.test"');
    expect(hostHits).toEqual([]);
  }, 60_000);
});
