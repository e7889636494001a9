import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { accessSync, constants, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DriverUnavailableError } from '../server/errors.js';
import { createTap, deleteTap, findLink, HostCommandError, tapNameFor } from '../server/hypervisor/network/host-network.js';
import { IpPool } from '../server/hypervisor/network/ip-pool.js';
import { newId } from '../server/store/ids.js';
import { openSqliteStore } from '../server/store/sqlite/store.js';
import type { Store } from '../server/store/types.js';

const run = promisify(execFile);
const repoRoot = join(import.meta.dirname, '..');

/** Why the namespace tests cannot run here, or null when they can. */
function hostNetworkSkipReason(): string | null {
  if (process.getuid?.() !== 0) return 'not root (network namespaces, bridges and iptables need root)';
  const found = (name: string) =>
    [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin'].some((dir) => {
      try {
        accessSync(join(dir, name), constants.X_OK);
        return true;
      } catch {
        return false;
      }
    });
  const missing = ['ip', 'iptables'].filter((name) => !found(name));
  return missing.length ? `${missing.join(' and ')} not installed (npm run setup installs iproute2 and iptables)` : null;
}

const skipReason = hostNetworkSkipReason();
if (skipReason) console.warn(`host-network tests skipped: ${skipReason}`);

/*
 * Everything below happens inside network namespaces created here, never in the host's own:
 *   host  = `vrt-<r>`: plays the sandbox host; gets the bridge, the rules and the TAPs
 *   up    = `vrt-<r>-up`: plays the internet, reachable from `host` over a veth pair
 *   guest = `vrt-<r>-vm`: plays a VM, cabled into the bridge by a veth pair
 * `up` has no route back to the guests' network, so a guest reaching it proves the masquerade.
 */
describe.skipIf(skipReason !== null)('host networking inside network namespaces', () => {
  const id = randomBytes(4).toString('hex');
  const host = `vrt-${id}`;
  const up = `vrt-${id}-up`;
  const guest = `vrt-${id}-vm`;
  const bridge = 'vmbr0';
  const env = { ...process.env, BRIDGE_NAME: bridge, GATEWAY_IP: '192.168.100.1/22', NETWORK_CIDR: '192.168.100.0/22' };
  const servers: ChildProcess[] = [];

  const ip = (...args: string[]) => run('ip', args);
  const inNs = async (netns: string, ...cmd: string[]) => (await run('ip', ['netns', 'exec', netns, ...cmd])).stdout;
  const setupNet = async (...args: string[]) =>
    (await run('npx', ['tsx', 'scripts/setup-net.ts', '--netns', host, ...args], { cwd: repoRoot, env })).stdout;
  /**
   * What a second run must leave exactly as it was: the firewall, every link's settings and every
   * IPv4 address. Left out is what the kernel changes on its own: iptables-save's timestamp
   * comments and the bridge's running timers (`gc_timer`, …).
   */
  const hostState = async () => {
    const links = JSON.parse(await inNs(host, 'ip', '-j', '-d', 'link'), (key, value: unknown) => (key.endsWith('_timer') ? undefined : value)) as unknown;
    const addresses = (JSON.parse(await inNs(host, 'ip', '-j', '-4', 'addr')) as Array<{ ifname: string; addr_info: Array<{ local: string; prefixlen: number }> }>).map(
      (l) => [l.ifname, l.addr_info.map((a) => `${a.local}/${a.prefixlen}`)],
    );
    const rules = (await inNs(host, 'iptables-save')).split('\n').filter((line) => !line.startsWith('#'));
    return { links, addresses, rules };
  };
  const link = async (netns: string, name: string) => findLink(name, netns);

  beforeAll(async () => {
    for (const ns of [host, up, guest]) await ip('netns', 'add', ns);
    // Created inside `host` with the peer moved straight into `up`: no host interface is involved.
    await ip('-n', host, 'link', 'add', 'vA', 'type', 'veth', 'peer', 'name', 'vU', 'netns', up);
    await ip('-n', host, 'addr', 'add', '10.200.0.2/24', 'dev', 'vA');
    await ip('-n', up, 'addr', 'add', '10.200.0.1/24', 'dev', 'vU');
    for (const [ns, dev] of [[host, 'vA'], [host, 'lo'], [up, 'vU'], [up, 'lo'], [guest, 'lo']] as const) await ip('-n', ns, 'link', 'set', dev, 'up');
    await ip('-n', host, 'route', 'add', 'default', 'via', '10.200.0.1');
    // As on hosts running Docker: forwarding is refused unless a rule accepts it.
    await inNs(host, 'iptables', '-P', 'FORWARD', 'DROP');
    // A new namespace inherits the host's IPv4 forwarding, which a server on this host may have turned on.
    await inNs(host, 'sysctl', '-q', '-w', 'net.ipv4.ip_forward=0');
  });

  afterAll(async () => {
    for (const server of servers) server.kill();
    // Deleting a namespace deletes its interfaces and its firewall with it.
    for (const ns of [guest, up, host]) await ip('netns', 'del', ns).catch(() => {});
  });

  it('setup-net creates the bridge with the gateway address and IPv6 off, enables forwarding and adds tagged NAT and FORWARD rules naming no uplink', async () => {
    const out = await setupNet();
    expect(out).toContain(`setup-net: created bridge ${bridge}`);
    expect(out).toContain(`setup-net: assigned 192.168.100.1/22 to ${bridge}`);
    expect(out).toContain('setup-net: enabled IPv4 forwarding');

    const br = await link(host, bridge);
    expect(br?.linkinfo?.info_kind).toBe('bridge');
    expect(br?.flags).toContain('UP');
    const [addr] = JSON.parse(await inNs(host, 'ip', '-j', 'addr', 'show', 'dev', bridge)) as Array<{ addr_info: Array<{ local: string; prefixlen: number }> }>;
    expect(addr!.addr_info).toContainEqual(expect.objectContaining({ local: '192.168.100.1', prefixlen: 22 }));
    expect((await inNs(host, 'sysctl', '-n', 'net.ipv4.ip_forward')).trim()).toBe('1');

    const rules = await inNs(host, 'iptables-save');
    expect(rules).toContain(`-A POSTROUTING -s 192.168.100.0/22 ! -o ${bridge} -m comment --comment voidrun -j MASQUERADE`);
    expect(rules).toContain(`-A FORWARD -i ${bridge} ! -o ${bridge} -m comment --comment voidrun -j ACCEPT`);
    expect(rules).toContain(`-A FORWARD ! -i ${bridge} -o ${bridge} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment voidrun -j ACCEPT`);
    expect(out).toContain(`setup-net: disabled IPv6 on ${bridge}`);
    expect((await inNs(host, 'sysctl', '-n', `net.ipv6.conf.${bridge}.disable_ipv6`)).trim()).toBe('1');
  });

  it('a second setup-net run changes nothing and says so', async () => {
    const before = await hostState();
    expect((await setupNet()).trim()).toBe('setup-net: nothing to change');
    expect(await hostState()).toEqual(before);
  });

  it('a guest on the bridge reaches the uplink, masqueraded behind the uplink address', async () => {
    await ip('-n', host, 'link', 'add', 'vgbr', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', guest);
    await ip('-n', host, 'link', 'set', 'vgbr', 'master', bridge, 'up');
    await ip('-n', guest, 'addr', 'add', '192.168.100.2/22', 'dev', 'eth0');
    await ip('-n', guest, 'link', 'set', 'eth0', 'up');
    await ip('-n', guest, 'route', 'add', 'default', 'via', '192.168.100.1');

    // A TCP server on the "internet" that answers with the address it sees the client come from.
    const server = spawn('ip', ['netns', 'exec', up, process.execPath, '-e', `
      require('node:net').createServer((s) => s.end(s.remoteAddress)).listen(8080, '10.200.0.1', () => console.log('listening'));
    `]);
    servers.push(server);
    await new Promise<void>((resolve, reject) => {
      server.stdout!.on('data', () => resolve());
      server.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
    });
    const seen = await inNs(guest, process.execPath, '-e', `
      const s = require('node:net').connect(8080, '10.200.0.1');
      let got = ''; s.on('data', (d) => (got += d)); s.on('end', () => console.log(got));
      s.setTimeout(5000, () => { console.error('timed out'); process.exit(1); });
    `);
    expect(seen.trim()).toBe('10.200.0.2');
  });

  it('creates a TAP attached to the bridge and deletes it; deleting a missing TAP is fine', async () => {
    const tap = tapNameFor(newId());
    await createTap(tap, bridge, host);
    const created = await link(host, tap);
    // An isolated bridge port: sandboxes cannot reach each other at L2.
    expect(created).toMatchObject({ master: bridge, linkinfo: { info_kind: 'tun', info_data: { type: 'tap' } } });
    expect(JSON.parse(await inNs(host, 'ip', '-j', '-d', 'link', 'show', 'dev', tap))[0].linkinfo.info_slave_data.isolated).toBe(true);
    expect(created?.flags).toContain('UP');
    // A TAP left behind (a VM that died) is reused, not an error.
    await createTap(tap, bridge, host);
    expect(await deleteTap(tap, host)).toBe(true);
    expect(await link(host, tap)).toBeNull();
    expect(await deleteTap(tap, host)).toBe(false);
  });

  it('a failed command names itself and the first line of its stderr, and a TAP that cannot be attached is removed', async () => {
    const tap = tapNameFor(newId());
    const err = await createTap(tap, 'vrnobridge', host).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HostCommandError);
    expect((err as Error).message).toMatch(new RegExp(`^ip netns exec ${host} ip link set ${tap} master vrnobridge up failed: .+$`));
    expect((err as Error).message).not.toContain('\n');
    expect(await link(host, tap)).toBeNull();
  });

  it('refuses to delete an interface that is not a TAP', async () => {
    await expect(deleteTap(bridge, host)).rejects.toThrow(/not a TAP device/);
    expect(await link(host, bridge)).not.toBeNull();
  });

  it('setup-net --down removes the bridge and exactly our rules, leaves forwarding on, and a second --down changes nothing', async () => {
    await inNs(host, 'iptables', '-A', 'FORWARD', '-i', 'vA', '-j', 'ACCEPT', '-m', 'comment', '--comment', 'not-ours');
    const out = await setupNet('--down');
    expect(out).toContain(`setup-net: deleted bridge ${bridge}`);
    expect(out.match(/setup-net: removed /g)).toHaveLength(3);
    expect(await link(host, bridge)).toBeNull();
    const rules = await inNs(host, 'iptables-save');
    expect(rules).not.toContain('voidrun');
    expect(rules).toContain('not-ours');
    expect((await inNs(host, 'sysctl', '-n', 'net.ipv4.ip_forward')).trim()).toBe('1');
    expect((await setupNet('--down')).trim()).toBe('setup-net: nothing to change');
  });

  it('setup-net needs no default route (its rules name no uplink) and --down undoes it', async () => {
    await ip('-n', host, 'route', 'del', 'default');
    expect(await setupNet()).toContain(`setup-net: created bridge ${bridge}`);
    expect(await inNs(host, 'iptables-save')).toContain(`-A POSTROUTING -s 192.168.100.0/22 ! -o ${bridge} -m comment --comment voidrun -j MASQUERADE`);
    expect(await setupNet('--down')).toContain(`setup-net: deleted bridge ${bridge}`);
    expect(await link(host, bridge)).toBeNull();
  });
});

describe('tapNameFor', () => {
  it('derives a name within IFNAMSIZ from the sandbox id and the prefix (NET_PREFIX, TAP_PREFIX)', () => {
    expect(tapNameFor('65a1b2c3d4e5f60718293a4b')).toBe('vrf60718293a4b');
    expect(tapNameFor(newId()).length).toBeLessThanOrEqual(15);
    expect(() => tapNameFor('not-an-id')).toThrow(/24 hex digits/);
    expect(tapNameFor('65a1b2c3d4e5f60718293a4b', 'tp')).toBe('tpf60718293a4b');
    expect(tapNameFor('65a1b2c3d4e5f60718293a4b', 'abc').length).toBe(15);
    expect(() => tapNameFor('65a1b2c3d4e5f60718293a4b', 'toolong')).toThrow(/one to three/);
  });
});

describe('IpPool over the sqlite store', () => {
  let dir: string;
  let store: Store;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'voidrun-ip-pool-'));
    store = openSqliteStore(dir);
  });
  afterAll(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  // 10.9.0.0/29: .0 is the network, .1 the gateway, .7 the broadcast; .2–.6 are the guests'.
  const tinyPool = () => new IpPool({ networkCidr: '10.9.0.0/29', gatewayCidr: '10.9.0.1/29', leases: store.ipLeases });

  it('hands out every address but the network, gateway and broadcast, then refuses with a 503-class error', async () => {
    const pool = tinyPool();
    expect(pool).toMatchObject({ gateway: '10.9.0.1', prefixLength: 29, capacity: 5 });
    const sandboxes = Array.from({ length: 5 }, () => newId());
    const ips = [];
    for (const id of sandboxes) ips.push(await pool.allocate(id));
    expect(ips).toEqual(['10.9.0.2', '10.9.0.3', '10.9.0.4', '10.9.0.5', '10.9.0.6']);
    const err = await pool.allocate(newId()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DriverUnavailableError);
    expect((err as Error).message).toMatch(/No free guest address: all 5 addresses of NETWORK_CIDR 10\.9\.0\.0\/29 are leased/);
    for (const id of sandboxes) await pool.release(id);
  });

  it('gives a sandbox the same address however often, and concurrently, it asks', async () => {
    const pool = tinyPool();
    const id = newId();
    const [a, b] = await Promise.all([pool.allocate(id), pool.allocate(id)]);
    expect(a).toBe(b);
    expect(await pool.allocate(id)).toBe(a);
    expect(await pool.leaseOf(id)).toBe(a);
    expect((await store.ipLeases.list()).filter((l) => l.sandboxId === id)).toHaveLength(1);
    await pool.release(id);
  });

  it('never hands out a leased address again after a restart, and frees an address on release', async () => {
    const first = tinyPool();
    const kept = newId();
    const freed = newId();
    const keptIp = await first.allocate(kept);
    const freedIp = await first.allocate(freed);
    await first.release(freed);
    expect(await first.leaseOf(freed)).toBeNull();

    // A restarted server: a new pool over a newly opened store on the same data directory.
    await store.close();
    store = openSqliteStore(dir);
    const restarted = tinyPool();
    expect(await restarted.leaseOf(kept)).toBe(keptIp);
    const others = [];
    for (let i = 0; i < 4; i++) others.push(await restarted.allocate(newId()));
    expect(others).not.toContain(keptIp);
    expect(others).toContain(freedIp);
    await expect(restarted.allocate(newId())).rejects.toBeInstanceOf(DriverUnavailableError);
    for (const lease of await store.ipLeases.list()) await store.ipLeases.releaseBySandbox(lease.sandboxId);
  });

  it('two pools racing for the last address: one gets it, the other is refused', async () => {
    const a = tinyPool();
    const b = tinyPool();
    for (let i = 0; i < 4; i++) await a.allocate(newId());
    const results = await Promise.allSettled([a.allocate(newId()), b.allocate(newId())]);
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    expect(results.filter((r) => r.status === 'rejected').map((r) => (r as PromiseRejectedResult).reason)).toEqual([expect.any(DriverUnavailableError)]);
    for (const lease of await store.ipLeases.list()) await store.ipLeases.releaseBySandbox(lease.sandboxId);
  });

  it('rejects a gateway outside the network', () => {
    expect(() => new IpPool({ networkCidr: '10.9.0.0/29', gatewayCidr: '10.9.1.1/24', leases: store.ipLeases })).toThrow(/GATEWAY_IP.*inside NETWORK_CIDR 10\.9\.0\.0\/29/);
  });
});
