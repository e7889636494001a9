import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { macForSandbox } from '../server/hypervisor/cloud-hypervisor/vm-config.js';
import { findLink, tapNameFor, tearDown } from '../server/hypervisor/network/host-network.js';
import { guardedTaps, runNft, tapGuardTable } from '../server/hypervisor/network/tap-guard.js';
import { GUEST_AGENT_DIR } from '../server/hypervisor/vm/guest-boot-files.js';
import { GUEST_AGENT_PORT } from '../shared/guest-protocol.js';
import { qemuSupport } from './helpers/qemu-support.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { fetchCommand, ip, onPath, startTestInternet, type TestInternet } from './helpers/test-internet.js';

const qemu = qemuSupport();
if (!qemu.ok) console.warn(`[qemu sandboxes] SKIPPED: ${qemu.reason}`);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The running QEMU processes of a sandbox. */
function qemuProcesses(sandboxId: string): number {
  try {
    return execFileSync('pgrep', ['-f', `voidrun-${sandboxId}`], { encoding: 'utf8' }).trim().split('\n').filter(Boolean).length;
  } catch {
    return 0;
  }
}

describe.skipIf(!qemu.ok)('sandboxes on the qemu driver (microVMs; TCG where KVM cannot run a guest)', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer({ SANDBOX_DRIVER: 'qemu' });
    const reg = await server.client().trpc.auth.register.mutate({ name: 'VM User', email: uniqueEmail('vm') });
    vr = server.client(reg.apiKey);
    box = await vr.sandboxes.create({ name: 'vm-box', envVars: { GREETING: 'hello from a VM' } });
  }, 240_000);
  afterAll(async () => {
    await server?.close();
  });

  it('says which driver and accelerator it runs on', async () => {
    const version = (await (await server.http('/api/version')).json()) as { driver: { name: string; accelerator: string; reason: string } };
    expect(version.driver).toMatchObject({ name: 'qemu', accelerator: expect.stringMatching(/^(kvm|tcg)$/) });
    expect(version.driver.reason).toMatch(/KVM|TCG/);
  });

  it("runs commands in the guest's own kernel with the sandbox's name, env and disk size", async () => {
    const r = await box.exec('uname -r; hostname; echo "$GREETING"; df -m / | tail -1');
    const [kernel, hostname, greeting, df] = r.stdout.trim().split('\n');
    expect(kernel).toMatch(/cloud-amd64$/); // Debian's cloud kernel, not the host's
    expect(hostname).toBe('vm-box');
    expect(greeting).toBe('hello from a VM');
    // The root filesystem grows to the sandbox's disk size (SANDBOX_DEFAULT_DISK_MB, 5120) at boot.
    const sizeMb = Number(df!.split(/\s+/)[1]);
    expect(sizeMb).toBeGreaterThan(4000);
    expect(qemuProcesses(box.id)).toBe(1);
  });

  it("refuses a connection to the guest's agent that cannot prove it holds the sandbox's token", async () => {
    const { port } = JSON.parse(readFileSync(join(server.dirs.instancesDir, box.id, 'instance.json'), 'utf8')) as { port: number };
    const exchange = await new Promise<string>((resolve) => {
      const socket = connect(port, '127.0.0.1');
      let received = '';
      socket.on('data', (chunk) => {
        received += chunk.toString();
        // Answer the challenge with a made-up proof, then try to talk HTTP anyway.
        if (received.endsWith('\n') && !received.includes('HTTP')) socket.write(`VOIDRUN-AGENT ${'0'.repeat(64)} ${'1'.repeat(32)}\nGET /ready HTTP/1.1\r\n\r\n`);
      });
      socket.on('close', () => resolve(received));
      socket.on('error', () => resolve(received));
    });
    // The agent opened with a challenge (the token never crosses the wire) and closed without a word more.
    expect(exchange).toMatch(/^VOIDRUN-AGENT-CHALLENGE [0-9a-f]{32}\n$/);
  });

  it('moves files in and out and runs a terminal', async () => {
    await box.files.upload('/root/data.bin', Buffer.from('bytes into a VM'));
    const chunks: Buffer[] = [];
    for await (const chunk of await box.files.download('/root/data.bin')) chunks.push(chunk as Buffer);
    expect(Buffer.concat(chunks).toString()).toBe('bytes into a VM');

    const term = await box.pty.create({ cols: 91, rows: 33 });
    let seen = '';
    const sized = new Promise<void>((resolve) => {
      const stop = term.onData((data) => {
        seen += data;
        if (seen.includes('33 91')) {
          stop();
          resolve();
        }
      });
    });
    await term.write('stty size\n');
    await sized;
    await term.kill();
  });

  it('pauses (the clock inside stops advancing its work) and resumes', async () => {
    await box.commands.run(`sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/ticks; sleep 0.1; done'`);
    await sleep(500);
    await box.pause();
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).status).toBe('paused');
    const read = async () => Number((await box.exec('cat /root/ticks').catch(() => null))?.stdout ?? NaN);
    await box.resume();
    const a = await read();
    await sleep(600);
    expect(await read()).toBeGreaterThan(a);
  }, 60_000);

  it('snapshots memory and disk: a restored VM continues its running processes', async () => {
    await box.commands.run(`sh -c 'n=0; while true; do n=$((n+1)); echo $n > /root/counter; sleep 0.2; done'`);
    await sleep(1000);
    await box.files.write('/root/before.txt', 'written before the snapshot');
    const beforeSnapshot = Number((await box.exec('cat /root/counter')).stdout);
    expect(beforeSnapshot).toBeGreaterThan(0);
    const snap = await box.snapshot();
    expect(snap.kind).toBe('memory+filesystem');
    await box.files.write('/root/after.txt', 'written after the snapshot');

    const restored = await vr.sandboxes.restore({ snapshot_path: snap.full_path, new_id: 'vm-restored' });
    // The counter process came back with the memory: it is still counting, from where it was when
    // the snapshot was taken (not from 0, as a fresh boot would). (The original's count after the
    // snapshot says little: its guest clock catches up on the time it was paused.)
    const first = Number((await restored.exec('cat /root/counter')).stdout);
    expect(first).toBeGreaterThanOrEqual(beforeSnapshot);
    await sleep(1000);
    const second = Number((await restored.exec('cat /root/counter')).stdout);
    expect(second).toBeGreaterThan(first);
    expect((await restored.exec('hostname; echo $VOIDRUN_SANDBOX_ID')).stdout).toBe(`vm-restored\n${restored.id}\n`);
    expect((await restored.exec('cat /root/before.txt; test -e /root/after.txt && echo after-exists || echo no-after')).stdout).toBe(
      'written before the snapshotno-after\n',
    );
    await restored.delete();
    expect(qemuProcesses(restored.id)).toBe(0);
  }, 240_000);

  it('stops and starts with its disk kept, and delete leaves no VM and no files', async () => {
    await box.files.write('/root/kept.txt', 'survives a stop');
    await box.stop();
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).status).toBe('stopped');
    expect(qemuProcesses(box.id)).toBe(0);
    await box.start();
    expect((await box.exec('cat /root/kept.txt')).stdout).toBe('survives a stop');
    await box.delete();
    expect(qemuProcesses(box.id)).toBe(0);
    expect(existsSync(join(server.dirs.instancesDir, box.id))).toBe(false);
  }, 120_000);
});

const netSkip = !qemu.ok ? qemu.reason : process.getuid?.() !== 0 ? 'not root' : !['ip', 'nft', 'bridge'].every(onPath) ? 'ip, nft or bridge missing' : null;
if (qemu.ok && netSkip) console.warn(`[qemu sandboxes on the bridge] SKIPPED: ${netSkip}`);

/** A TCP server in namespace `ns` on `address`:8081 that answers each connection with how many reached it so far. */
async function startConnectionCounter(ns: string, address: string): Promise<ChildProcess> {
  const counter = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', `
    let n = 0;
    require('node:net').createServer((s) => s.end(++n + '\\n')).listen(8081, ${JSON.stringify(address)}, () => console.log('listening'));
  `]);
  await new Promise<void>((resolve, reject) => {
    counter.stdout!.once('data', () => resolve());
    counter.once('exit', (code) => reject(new Error(`connection counter exited with ${code}`)));
  });
  return counter;
}

describe.skipIf(netSkip !== null)('a qemu sandbox on the bridge (a second NIC on a TAP)', () => {
  const tag = randomBytes(3).toString('hex');
  const bridge = `vrqb${tag}`;
  // Apart from the other network test files' subnets (10.213-10.214, 10.219): parallel files never share a NETWORK_CIDR.
  const subnet = `10.215.${randomInt(0, 256)}`;
  const busybox = `${GUEST_AGENT_DIR}/busybox`;
  let internet: TestInternet;
  let counter: ChildProcess;
  /** The test internet's DNS server (test/fixtures/egress-internet.mjs): allowed.test and blocked.test. */
  let dns: ChildProcess;
  /** A listener on every host address: "any other host port" a sandbox must not reach. */
  let hostPort: Server;
  let server: TestServer;
  let apiKey: string;
  let vr: VoidRunClient;
  let box: SandboxHandle;
  let tap: string;
  const sh = async (script: string) => box.exec('bash', { args: ['-c', script] });
  const env = () => ({
    SANDBOX_DRIVER: 'qemu',
    SANDBOX_NETWORK: 'bridge',
    BRIDGE_NAME: bridge,
    GATEWAY_IP: `${subnet}.1/24`,
    NETWORK_CIDR: `${subnet}.0/24`,
    DNS_NAMESERVERS: internet.address,
    HEALTH_ENABLED: 'false',
  });

  beforeAll(async () => {
    internet = await startTestInternet({ name: `vrqi-${tag}`, hostIf: `vqi${tag}`, testNet: '203.0.113' });
    counter = await startConnectionCounter(internet.ns, internet.address);
    const names = { 'allowed.test': internet.address, 'blocked.test': `192.0.2.${randomInt(1, 255)}` };
    dns = spawn('ip', ['netns', 'exec', internet.ns, process.execPath, join(import.meta.dirname, 'fixtures', 'egress-internet.mjs'), JSON.stringify({ dns: internet.address, names, http: [] })]);
    await new Promise<void>((resolve, reject) => {
      dns.stdout!.on('data', (chunk: Buffer) => chunk.toString().includes('ready') && resolve());
      dns.once('exit', (code) => reject(new Error(`the test internet's DNS server exited with ${code}`)));
    });
    hostPort = createServer((s) => s.end('host\n'));
    await new Promise<void>((resolve) => hostPort.listen(0, '0.0.0.0', resolve));
    server = await startTestServer(env());
    const reg = await server.client().trpc.auth.register.mutate({ name: 'VM Net User', email: uniqueEmail('vmnet') });
    apiKey = reg.apiKey;
    vr = server.client(apiKey);
    box = await vr.sandboxes.create({ name: 'vm-net-box' });
    tap = tapNameFor(box.id);
  }, 300_000);

  afterAll(async () => {
    try {
      await server?.close();
    } finally {
      hostPort?.close();
      // The bridge, its NAT and FORWARD rules, the egress table and the TAP guards' table (setup-net --down).
      await tearDown({ bridge, gatewayCidr: `${subnet}.1/24`, networkCidr: `${subnet}.0/24` }).catch(() => {});
      counter?.kill();
      dns?.kill();
      await internet?.close();
    }
  }, 60_000);

  it('has its leased address on a TAP NIC with the default route, DNS via the gateway, and the user-mode NIC only for its agent', async () => {
    const record = await vr.trpc.sandbox.get.query({ id: box.id });
    expect(record.ip).toMatch(new RegExp(`^${subnet.replace(/\./g, '\\.')}\\.\\d+$`));
    const mac = macForSandbox(box.id);
    const r = await sh(`${busybox} ip -o -4 addr show; ${busybox} ip route show default; cat /sys/class/net/*/address; cat /etc/resolv.conf`);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout).toContain(`inet ${record.ip}/24`);
    expect(r.stdout).toContain('inet 10.0.2.15/24');
    expect(r.stdout).toMatch(new RegExp(`^default via ${subnet}\\.1 dev \\w+`, 'm'));
    expect(r.stdout).toContain(mac);
    expect(r.stdout).toContain(`nameserver ${subnet}.1`);
    // On the host: the TAP is an isolated port of the bridge, with its source check.
    const link = JSON.parse(await ip('-j', '-d', 'link', 'show', 'dev', tap))[0];
    expect(link).toMatchObject({ master: bridge, linkinfo: { info_kind: 'tun', info_slave_data: { isolated: true } } });
    expect(await guardedTaps(bridge)).toEqual([tap]);
  }, 120_000);

  it('reaches the test internet over the TAP, masqueraded behind the host, and the TAP counts the bytes', async () => {
    const before = await vr.trpc.sandbox.get.query({ id: box.id });
    const rx = () => Number(readFileSync(`/sys/class/net/${tap}/statistics/rx_bytes`, 'utf8'));
    const sentBefore = rx();
    const r = await sh(fetchCommand(internet.address, 100_000));
    expect(r.exitCode, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ from: internet.hostAddress, received: 100_000 });
    expect(rx() - sentBefore).toBeGreaterThanOrEqual(100_000);
    // The sandbox's answer reports the TAP's counters: what the VM sent is its egress.
    const after = await vr.trpc.sandbox.get.query({ id: box.id });
    expect(after.networkBytes.egress - before.networkBytes.egress).toBeGreaterThanOrEqual(100_000);
    expect(after.networkBytes.ingress).toBeGreaterThan(before.networkBytes.ingress);
  }, 120_000);

  it('reaches no port of the host: neither the gateway nor any other host address', async () => {
    const port = (hostPort.address() as AddressInfo).port;
    const apiPort = new URL(server.url).port;
    for (const [address, p] of [[`${subnet}.1`, port], [internet.hostAddress, port], [`${subnet}.1`, Number(apiPort)], ['10.0.2.2', port]] as const) {
      const r = await sh(`timeout 5 bash -c 'exec 3<>/dev/tcp/${address}/${p} && head -1 <&3'`);
      expect(r.stdout, `${address}:${p}`).not.toContain('host');
      expect(r.exitCode, `${address}:${p}`).not.toBe(0);
    }
  }, 120_000);

  it("drops what the guest sends from an address that is not its lease (the VM's root controls its own kernel)", async () => {
    const spoofed = `${subnet}.250`;
    const count = `timeout 10 bash -c 'exec 3<>/dev/tcp/${internet.address}/8081 && head -1 <&3'`;
    const nic = (await sh(`${busybox} ip -o -4 addr show | grep ' ${subnet}\\.' | ${busybox} awk '{print $2}'`)).stdout.trim();
    expect(nic).toMatch(/^\w+$/);
    const before = Number((await sh(count)).stdout);
    expect(before).toBeGreaterThan(0);
    const spoof = await sh(`${busybox} ip addr add ${spoofed}/32 dev ${nic} && ${busybox} ip route add ${internet.address}/32 via ${subnet}.1 dev ${nic} src ${spoofed} && ${count}; echo "exit=$?"`);
    expect(spoof.stdout).toMatch(/^exit=[1-9]/m);
    const after = await sh(`${busybox} ip route del ${internet.address}/32; ${busybox} ip addr del ${spoofed}/32 dev ${nic}; ${count}`);
    expect(after.exitCode, after.stderr).toBe(0);
    // The spoofed connection never reached the test internet: this one is the next after the first.
    expect(Number(after.stdout)).toBe(before + 1);
  }, 120_000);

  it('a policy change applies to the running VM at once: egress deny cuts the test internet off, allow opens it again', async () => {
    await vr.trpc.sandbox.updateNetwork.mutate({ id: box.id, egress: 'deny' });
    const denied = await sh(fetchCommand(internet.address));
    expect(denied.stdout).not.toContain('"from"');
    expect(denied.exitCode).not.toBe(0);
    await vr.trpc.sandbox.updateNetwork.mutate({ id: box.id, egress: 'allow' });
    const allowed = await sh(fetchCommand(internet.address));
    expect(allowed.exitCode, allowed.stderr).toBe(0);
    expect(JSON.parse(allowed.stdout)).toMatchObject({ from: internet.hostAddress });
  }, 120_000);

  it('allow: ["allowed.test"] with egress deny: the VM resolves and reaches allowed.test through the gateway resolver, not its address before that, nor blocked.test', async () => {
    await vr.trpc.sandbox.updateNetwork.mutate({ id: box.id, egress: 'deny', allow: ['allowed.test'] });
    try {
      expect((await sh(fetchCommand(internet.address))).exitCode).not.toBe(0);
      const byName = await sh(fetchCommand('allowed.test'));
      expect(byName.exitCode, byName.stderr).toBe(0);
      expect(JSON.parse(byName.stdout)).toMatchObject({ from: internet.hostAddress });
      expect((await sh('getent ahostsv4 blocked.test')).exitCode).not.toBe(0);
    } finally {
      await vr.trpc.sandbox.updateNetwork.mutate({ id: box.id, egress: 'allow', allow: [] });
    }
  }, 120_000);

  it("past maxEgressBytes (counted on its TAP) the VM's egress is cut and its answer says so; lifting the cap opens it again", async () => {
    const { networkBytes } = await vr.trpc.sandbox.get.query({ id: box.id });
    const cap = networkBytes.egress + 200_000;
    await vr.trpc.sandbox.updateNetwork.mutate({ id: box.id, maxEgressBytes: cap });
    expect((await sh(fetchCommand(internet.address, 300_000))).exitCode).toBe(0);
    await expect.poll(async () => (await vr.trpc.sandbox.get.query({ id: box.id })).network.egressCut, { timeout: 30_000, interval: 200 }).toBe(true);
    expect((await sh(fetchCommand(internet.address))).exitCode).not.toBe(0);
    await vr.trpc.sandbox.updateNetwork.mutate({ id: box.id, maxEgressBytes: null });
    const r = await sh(fetchCommand(internet.address));
    expect(r.exitCode, r.stderr).toBe(0);
  }, 120_000);

  it('a server in the VM is listed among its ports and answers through /ports/{port}/ (the agent socket, not the bridge)', async () => {
    await box.files.write('/root/port-server.pl', readFileSync(join(import.meta.dirname, 'fixtures', 'port-server.pl'), 'utf8'));
    const handle = await box.commands.run('perl /root/port-server.pl http 8000');
    for await (const chunk of handle.output()) {
      if (chunk.type === 'stdout' && chunk.data.includes('listening 8000')) break;
      if (chunk.type === 'exit') throw new Error('the port server exited');
    }
    try {
      const { ports } = await box.ports.list();
      expect(ports.map((p) => p.port)).toContain(8000);
      // The agent's own port in the guest is not the sandbox's.
      expect(ports.map((p) => p.port)).not.toContain(GUEST_AGENT_PORT);
      const res = await server.http(`/api/sandboxes/${box.id}/ports/8000/hello?x=1`, { apiKey });
      expect(res.status).toBe(200);
      expect(await res.text()).toContain('target=/hello?x=1');
    } finally {
      await handle.kill();
    }
  }, 120_000);

  it("a VM restored from its snapshot gets its own address and MAC on the bridge (its guest's NIC takes them) and reaches the test internet", async () => {
    const { ip: sourceIp } = await vr.trpc.sandbox.get.query({ id: box.id });
    const snap = await box.snapshot();
    const restored = await vr.sandboxes.restore({ snapshot_path: snap.full_path, new_id: 'vm-net-restored' });
    const restoredTap = tapNameFor(restored.id);
    try {
      const { ip: restoredIp } = await vr.trpc.sandbox.get.query({ id: restored.id });
      expect(restoredIp).toMatch(new RegExp(`^${subnet.replace(/\./g, '\\.')}\\.\\d+$`));
      expect(restoredIp).not.toBe(sourceIp);
      const r = await restored.exec('bash', { args: ['-c', `cat /sys/class/net/*/address; ${busybox} ip -o -4 addr show; ${fetchCommand(internet.address)}`] });
      expect(r.stdout).toContain(macForSandbox(restored.id));
      expect(r.stdout).not.toContain(macForSandbox(box.id));
      expect(r.stdout).toContain(`inet ${restoredIp}/24`);
      expect(r.stdout).not.toContain(`inet ${sourceIp}/`);
      expect(JSON.parse(r.stdout.trim().split('\n').at(-1)!)).toMatchObject({ from: internet.hostAddress });
      expect((await guardedTaps(bridge)).sort()).toEqual([tap, restoredTap].sort());
      // The source VM is still reachable on its own address.
      expect((await sh(fetchCommand(internet.address))).exitCode).toBe(0);
    } finally {
      await restored.delete();
    }
    expect(await findLink(restoredTap)).toBeNull();
    expect(await guardedTaps(bridge)).toEqual([tap]);
    expect(await server.app.store.ipLeases.findBySandbox(restored.id)).toBeNull();
  }, 300_000);

  it('a restarted server keeps a running VM on the bridge (TAP, address, rules) and removes the TAP, source check and address of a sandbox that is gone', async () => {
    const { ip: leased } = await vr.trpc.sandbox.get.query({ id: box.id });
    const goneId = `${'f'.repeat(12)}${randomBytes(6).toString('hex')}`;
    const goneTap = tapNameFor(goneId);
    await ip('tuntap', 'add', 'dev', goneTap, 'mode', 'tap');
    await ip('link', 'set', goneTap, 'master', bridge);
    await runNft(`add chain netdev ${tapGuardTable(bridge)} ${goneTap} { type filter hook ingress device "${goneTap}" priority -500; policy drop; }\n`);
    expect(await server.app.store.ipLeases.claim(`${subnet}.200`, goneId)).toBe(true);

    await server.close({ keepState: true });
    server = await startTestServer(env(), server.dirs);
    vr = server.client(apiKey);
    box = await vr.sandboxes.get(box.id);
    expect(await findLink(goneTap)).toBeNull();
    expect(await guardedTaps(bridge)).toEqual([tap]);
    expect(await server.app.store.ipLeases.findBySandbox(goneId)).toBeNull();
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).ip).toBe(leased);
    const r = await sh(fetchCommand(internet.address));
    expect(r.exitCode, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ from: internet.hostAddress });
  }, 300_000);

  it('stop takes the VM off the bridge and keeps its address; start puts it back with the same one', async () => {
    const { ip: leased } = await vr.trpc.sandbox.get.query({ id: box.id });
    await box.stop();
    expect(await findLink(tap)).toBeNull();
    expect(await guardedTaps(bridge)).toEqual([]);
    expect(await server.app.store.ipLeases.findBySandbox(box.id)).toMatchObject({ ip: leased });
    await box.start();
    expect((await vr.trpc.sandbox.get.query({ id: box.id })).ip).toBe(leased);
    expect(await guardedTaps(bridge)).toEqual([tap]);
    const r = await sh(fetchCommand(internet.address));
    expect(r.exitCode, r.stderr).toBe(0);
  }, 300_000);

  it('delete frees the address and leaves no TAP and no source check behind', async () => {
    const record = await vr.trpc.sandbox.get.query({ id: box.id });
    expect(await server.app.store.ipLeases.findBySandbox(box.id)).toMatchObject({ ip: record.ip });
    await box.delete();
    expect(await findLink(tap)).toBeNull();
    expect(await guardedTaps(bridge)).toEqual([]);
    expect(await server.app.store.ipLeases.findBySandbox(box.id)).toBeNull();
    expect(qemuProcesses(box.id)).toBe(0);
  }, 120_000);
});
