import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { findLink, tapNameFor, tearDown } from '../server/hypervisor/network/host-network.js';
import { loadConfig } from '../server/config.js';
import { chooseSandboxNetwork } from '../server/hypervisor/network/sandbox-net.js';
import { newId } from '../server/store/ids.js';
import { openSqliteStore } from '../server/store/sqlite/store.js';
import type { Sandbox } from '../shared/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { fetchCommand, ip, onPath, startTestInternet, type TestInternet } from './helpers/test-internet.js';

const repoRoot = join(import.meta.dirname, '..');
const run = promisify(execFile);
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

  const netnsPath = (id: string) => `/run/netns/vr-${bridge}-${id}`;
  const leases = async () => server.app.store.ipLeases.list();
  const restSandbox = async (id: string) => ((await (await server.http(`/api/sandboxes/${id}`, { apiKey })).json()) as { data: Sandbox }).data;

  it('a sandbox with the default policy fetches from the test internet by IP, masqueraded behind the host', async () => {
    const res = await box.exec(fetchCommand(internet.address));
    expect(res.exitCode, res.stderr).toBe(0);
    expect(JSON.parse(res.stdout)).toEqual({ from: internet.hostAddress, received: 0 });
  }, 60_000);

  it('answers (REST and tRPC) carry the address eth0 has inside; resolv.conf names the gateway; /sys shows its own links; no IPv6', async () => {
    const rest = await restSandbox(box.id);
    expect(rest.ip).toMatch(new RegExp(`^${subnet.replaceAll('.', '\\.')}\\.\\d+$`));
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).ip).toBe(rest.ip);
    expect((await box.exec('hostname -I')).stdout.trim()).toBe(rest.ip);
    expect((await box.exec('cat /etc/resolv.conf')).stdout).toBe(`nameserver ${subnet}.1\n`);
    expect((await box.exec('ls /sys/class/net')).stdout.split(/\s+/).filter(Boolean).sort()).toEqual(['eth0', 'lo']);
    expect((await box.exec('ls /sys/devices/virtual/net')).stdout.split(/\s+/).filter(Boolean).sort()).toEqual(['eth0', 'lo']);
    // The masked paths stay masked on the host-mounted sysfs (other sandboxes' disks are not listed).
    expect((await box.exec('ls -A /sys/class/block /sys/devices/virtual/block')).stdout.replace(/\S+:\n/g, '').trim()).toBe('');
    // IPv4 only: no IPv6 address on any interface, IPv6 off on eth0 and on the host end of its link.
    expect((await box.exec('cat /proc/net/if_inet6; cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6')).stdout).toBe('1\n');
    expect(readFileSync(`/proc/sys/net/ipv6/conf/${tapNameFor(box.id)}/disable_ipv6`, 'utf8')).toBe('1\n');
    expect(await leases()).toContainEqual(expect.objectContaining({ sandboxId: box.id, ip: rest.ip }));
  }, 60_000);

  it('sandbox root holds no capability over its network namespace: it cannot change its address', async () => {
    // perl is in the image; SIOCSIFADDR on eth0 needs CAP_NET_ADMIN in the namespace's owner (the host's user namespace).
    const res = await box.exec(`perl -e 'use Socket; socket(my $s, AF_INET, SOCK_DGRAM, 0) or die; my $req = pack("a16 s n a4 x8", "eth0", AF_INET, 0, inet_aton("${subnet}.250")); ioctl($s, 0x8916, $req) or die "ioctl: $!\\n"; print "changed\\n"'`);
    expect(res.stdout).not.toContain('changed');
    expect(res.stderr).toMatch(/ioctl: Operation not permitted/);
    expect((await box.exec('hostname -I')).stdout.trim()).toBe((await restSandbox(box.id)).ip);
  }, 60_000);

  it('counts the bytes a sandbox sends and receives on the host: in its answer and in /metrics', async () => {
    const before = (await restSandbox(box.id)).networkBytes;
    const sent = 200_000;
    const res = await box.exec(fetchCommand(internet.address, sent));
    expect(JSON.parse(res.stdout)).toEqual({ from: internet.hostAddress, received: sent });
    const after = (await restSandbox(box.id)).networkBytes;
    expect(after.egress - before.egress).toBeGreaterThanOrEqual(sent);
    expect(after.ingress).toBeGreaterThan(before.ingress);
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).networkBytes.egress).toBeGreaterThanOrEqual(after.egress);
    const metrics = await (await server.http('/metrics', { headers: { authorization: 'Bearer metrics-secret' } })).text();
    const value = (name: string) => Number(new RegExp(`^${name}\\{[^}]*sbx_id="${box.id}"[^}]*\\} (\\d+)$`, 'm').exec(metrics)?.[1]);
    expect(value('voidrun_sbx_network_egress_bytes')).toBeGreaterThanOrEqual(after.egress);
    expect(value('voidrun_sbx_network_ingress_bytes')).toBeGreaterThanOrEqual(after.ingress);
    expect(value('voidrun_sbx_net_tx_bytes')).toBe(value('voidrun_sbx_network_egress_bytes'));
  }, 60_000);

  it('a sandbox created with network mode none has loopback only, no address, link or namespace', async () => {
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'offline-box', network: { mode: 'none' } } });
    expect(res.status).toBe(201);
    const sb = ((await res.json()) as { data: Sandbox }).data;
    try {
      expect(sb).toMatchObject({ ip: '', network: { mode: 'none' }, networkBytes: { egress: 0, ingress: 0 } });
      const ls = await server.http(`/api/sandboxes/${sb.id}/exec`, { method: 'POST', apiKey, json: { command: 'ls /sys/class/net; cat /etc/resolv.conf' } });
      expect(((await ls.json()) as { data: { stdout: string } }).data.stdout).toBe('lo\nnameserver 10.255.255.53\n');
      expect(existsSync(netnsPath(sb.id))).toBe(false);
      expect(await findLink(tapNameFor(sb.id))).toBeNull();
      expect((await leases()).map((l) => l.sandboxId)).not.toContain(sb.id);
    } finally {
      await server.http(`/api/sandboxes/${sb.id}`, { method: 'DELETE', apiKey });
    }
  }, 60_000);

  it('stop removes the link and namespace; start brings them back with the same address', async () => {
    const other = await vr.sandboxes.create({ name: 'stop-box' });
    const address = (await restSandbox(other.id)).ip;
    await other.stop();
    expect(existsSync(netnsPath(other.id))).toBe(false);
    expect(await findLink(tapNameFor(other.id))).toBeNull();
    expect((await restSandbox(other.id)).networkBytes).toEqual({ egress: 0, ingress: 0 });
    await other.start();
    expect((await restSandbox(other.id)).ip).toBe(address);
    expect((await other.exec('hostname -I')).stdout.trim()).toBe(address);
    expect(JSON.parse((await other.exec(fetchCommand(internet.address))).stdout)).toMatchObject({ from: internet.hostAddress });
    await other.delete();
  }, 120_000);

  it('sandboxes cannot reach each other on the bridge: their ports are isolated, and a listener answers its own sandbox only', async () => {
    const peer = await vr.sandboxes.create({ name: 'peer-box' });
    try {
      const peerIp = (await restSandbox(peer.id)).ip;
      for (const id of [box.id, peer.id]) {
        const [port] = JSON.parse((await run('bridge', ['-j', '-d', 'link', 'show', 'dev', tapNameFor(id)])).stdout) as Array<{ master: string; isolated: boolean }>;
        expect(port).toMatchObject({ master: bridge, isolated: true });
      }
      await peer.exec(`perl -MIO::Socket::INET -e '$l = IO::Socket::INET->new(LocalPort => 9000, Listen => 5, ReuseAddr => 1) or die; open(STDOUT, ">/tmp/ready"); close(STDOUT); while ($c = $l->accept) { print $c "hello\\n"; close $c }' >/dev/null 2>&1 &`);
      await peer.exec('while [ ! -e /tmp/ready ]; do sleep 0.05; done');
      const own = await peer.exec(`timeout 10 bash -c 'exec 3<>/dev/tcp/${peerIp}/9000 && cat <&3'`);
      expect(own.stdout).toBe('hello\n');
      const other = await box.exec(`timeout 10 bash -c 'exec 3<>/dev/tcp/${peerIp}/9000 && cat <&3'`);
      expect(other.exitCode).not.toBe(0);
      expect(other.stdout).toBe('');
    } finally {
      await peer.delete();
    }
  }, 120_000);

  it('delete frees the address and leaves no link, namespace or sysfs mount behind', async () => {
    const doomed = await vr.sandboxes.create({ name: 'doomed-box' });
    const address = (await restSandbox(doomed.id)).ip;
    expect(existsSync(netnsPath(doomed.id))).toBe(true);
    expect((await findLink(tapNameFor(doomed.id)))?.master).toBe(bridge);
    await doomed.delete();
    expect(existsSync(netnsPath(doomed.id))).toBe(false);
    expect(await findLink(tapNameFor(doomed.id))).toBeNull();
    expect((await leases()).map((l) => l.ip)).not.toContain(address);
    expect(readFileSync('/proc/self/mounts', 'utf8')).not.toContain(doomed.id);
    expect(existsSync(`/run/voidrun-net/${bridge}/${doomed.id}`)).toBe(false);
  }, 120_000);
});

describe('SANDBOX_NETWORK', () => {
  it('is bridge or none; anything else stops startup naming the variable', () => {
    expect(loadConfig({ SANDBOX_NETWORK: 'none' }).SANDBOX_NETWORK).toBe('none');
    expect(loadConfig({}).SANDBOX_NETWORK).toBeUndefined();
    expect(() => loadConfig({ SANDBOX_NETWORK: 'host' })).toThrow(/SANDBOX_NETWORK="host" — expected one of bridge, none/);
  });

  it('none keeps sandboxes on loopback without touching the host, and says so', async () => {
    const choice = await chooseSandboxNetwork({
      requested: 'none',
      bridge: 'vrnever0',
      gatewayCidr: '10.215.0.1/24',
      networkCidr: '10.215.0.0/24',
      pool: undefined as never,
      leases: undefined as never,
      linkPrefix: 'vr',
      log: pino({ level: 'silent' }),
    });
    expect(choice).toMatchObject({ mode: 'none', networking: null, reason: 'SANDBOX_NETWORK=none: sandboxes have loopback only' });
    expect(await findLink('vrnever0')).toBeNull();
  });
});

describe.skipIf(netSkip !== null)('SANDBOX_NETWORK=bridge where the bridge cannot be set up', () => {
  const tag = randomBytes(3).toString('hex');
  const notABridge = `vrnb${tag}`;
  let server: TestServer;

  beforeAll(async () => {
    // BRIDGE_NAME names an interface that is not a bridge: setup-net refuses it.
    await ip('link', 'add', notABridge, 'type', 'veth', 'peer', 'name', `vrnp${tag}`);
    server = await startTestServer({ SANDBOX_DRIVER: 'container', SANDBOX_NETWORK: 'bridge', BRIDGE_NAME: notABridge, GATEWAY_IP: '10.217.0.1/24', NETWORK_CIDR: '10.217.0.0/24' });
  }, 60_000);
  afterAll(async () => {
    await server?.close();
    await ip('link', 'del', notABridge).catch(() => {});
  });

  it('starts with loopback-only sandboxes, says why in one warning, and refuses a bridge sandbox with 400 naming it', async () => {
    const lines = server.logLines.map((l) => JSON.parse(l) as { level: number; msg: string }).filter((l) => l.msg.startsWith('sandbox network:'));
    expect(lines).toHaveLength(1);
    expect(lines[0]!.level).toBe(40);
    expect(lines[0]!.msg).toMatch(new RegExp(`^sandbox network: SANDBOX_NETWORK=bridge, but setting up bridge ${notABridge} failed \\(${notABridge} exists and is not a bridge.*\\): sandboxes have loopback only$`));
    expect(await findLink(notABridge)).toMatchObject({ linkinfo: { info_kind: 'veth' } });
    const { apiKey } = await server.client().trpc.auth.register.mutate({ name: 'No Bridge', email: uniqueEmail('nobridge') });
    const res = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'wants-bridge', network: { mode: 'bridge' } } });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: string }).error).toContain(`${notABridge} exists and is not a bridge`);
  });
});

/**
 * The server as its own process (server/main.ts under tsx), so it can be killed with SIGKILL and
 * started again on the same state.
 */
async function startServerProcess(env: Record<string, string>): Promise<{ url: string; child: ChildProcess; output: string[] }> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(repoRoot, 'server', 'main.ts')], {
    cwd: repoRoot,
    env: { ...process.env, SERVER_PORT: '0', SERVER_HOST: '127.0.0.1', MONGO_URI: '', LOG_LEVEL: 'info', HEALTH_ENABLED: 'false', PREPARE_DEFAULT_IMAGE: 'false', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const output: string[] = [];
  child.stderr!.on('data', (d: Buffer) => output.push(d.toString()));
  const url = await new Promise<string>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`the server exited with ${code}: ${output.join('')}`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      output.push(line);
      const m = /VoidRun listening on http:\/\/[^:]+:(\d+)/.exec(line);
      if (m) resolve(`http://127.0.0.1:${m[1]}`);
    });
  });
  return { url, child, output };
}

describe.skipIf(netSkip !== null)('container networking after the server is killed with SIGKILL', () => {
  const tag = randomBytes(3).toString('hex');
  const bridge = `vrtk${tag}`;
  const subnet = `10.219.${randomInt(0, 256)}`;
  const root = mkdtempSync(join(tmpdir(), 'voidrun-net-kill-'));
  chmodSync(root, 0o711);
  const env = {
    DATA_DIR: join(root, 'data'),
    INSTANCES_DIR: join(root, 'instances'),
    SNAPSHOTS_DIR: join(root, 'snapshots'),
    RUNC_ROOT: join('/run/voidrun-test', root.split('/').pop()!),
    SANDBOX_DRIVER: 'container',
    SANDBOX_NETWORK: 'bridge',
    BRIDGE_NAME: bridge,
    GATEWAY_IP: `${subnet}.1/24`,
    NETWORK_CIDR: `${subnet}.0/24`,
  };
  let internet: TestInternet;
  let server: Awaited<ReturnType<typeof startServerProcess>> | null = null;

  beforeAll(async () => {
    internet = await startTestInternet({ name: `vrki-${tag}`, hostIf: `vki${tag}`, testNet: '198.51.100' });
  }, 60_000);

  afterAll(async () => {
    try {
      if (server && server.child.exitCode === null) {
        const exited = new Promise((r) => server!.child.once('exit', r));
        server.child.kill('SIGTERM');
        await exited;
      }
    } finally {
      await tearDown({ bridge, gatewayCidr: env.GATEWAY_IP, networkCidr: env.NETWORK_CIDR });
      await internet?.close();
      rmSync(root, { recursive: true, force: true });
      rmSync(env.RUNC_ROOT, { recursive: true, force: true });
    }
  }, 60_000);

  it('a restart keeps the running sandbox on the bridge and removes namespaces, links and leases no sandbox owns', async () => {
    server = await startServerProcess(env);
    const call = async (path: string, init: { method?: string; json?: unknown; apiKey?: string } = {}) => {
      const res = await fetch(server!.url + path, {
        method: init.method ?? 'GET',
        headers: { 'content-type': 'application/json', ...(init.apiKey ? { 'x-api-key': init.apiKey } : {}) },
        ...(init.json !== undefined ? { body: JSON.stringify(init.json) } : {}),
      });
      return { status: res.status, body: (await res.json()) as { data: Record<string, unknown> & { stdout?: string } } };
    };
    const apiKey = (await call('/api/register', { method: 'POST', json: { name: 'Kill Test', email: uniqueEmail('kill') } })).body.data.apiKey as string;
    const created = await call('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'survivor' } });
    expect(created.status).toBe(201);
    const { id, ip: address } = created.body.data as unknown as Sandbox;

    // Killed outright: nothing of its own cleanup runs. What a crash mid-delete leaves is made here:
    // a namespace, a link on the bridge and a lease, all of a sandbox that no longer exists.
    const killed = new Promise((r) => server!.child.once('exit', r));
    server.child.kill('SIGKILL');
    await killed;
    const ghost = newId();
    await ip('netns', 'add', `vr-${bridge}-${ghost}`);
    await ip('link', 'add', tapNameFor(ghost), 'type', 'veth', 'peer', 'name', `g${tag}`);
    await ip('link', 'set', tapNameFor(ghost), 'master', bridge);
    const store = openSqliteStore(env.DATA_DIR);
    expect(await store.ipLeases.claim(`${subnet}.200`, ghost)).toBe(true);
    await store.close();

    server = await startServerProcess(env);
    expect(existsSync(`/run/netns/vr-${bridge}-${ghost}`)).toBe(false);
    expect(await findLink(tapNameFor(ghost))).toBeNull();
    expect(await findLink(`g${tag}`)).toBeNull();
    expect(server.output.join('\n')).toContain(`freed address ${subnet}.200 of sandbox ${ghost}`);

    // The sandbox that kept running kept its namespace, link and address.
    expect((await call(`/api/sandboxes/${id}`, { apiKey })).body.data).toMatchObject({ status: 'running', ip: address });
    const fetched = await call(`/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, json: { command: fetchCommand(internet.address) } });
    expect(JSON.parse(fetched.body.data.stdout!)).toEqual({ from: internet.hostAddress, received: 0 });

    expect((await call(`/api/sandboxes/${id}`, { method: 'DELETE', apiKey })).status).toBe(200);
    expect(existsSync(`/run/netns/vr-${bridge}-${id}`)).toBe(false);
    expect(await findLink(tapNameFor(id))).toBeNull();
  }, 180_000);
});
