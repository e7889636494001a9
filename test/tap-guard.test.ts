import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { applyTapGuard, guardedTaps, hostInterfaceBytes, removeTapGuard, removeTapGuardTable, runNft, tapGuardScript, tapGuardTable } from '../server/hypervisor/network/tap-guard.js';

const run = promisify(execFile);
const onPath = (name: string) => ['/usr/sbin', '/sbin', '/usr/bin', '/bin'].some((dir) => existsSync(`${dir}/${name}`));
const skip = process.getuid?.() !== 0 ? 'not root' : !['ip', 'nft'].every(onPath) ? 'ip or nft missing' : null;
if (skip) console.warn(`TAP guard tests in a network namespace skipped: ${skip}`);

const guard = { bridge: 'vmbr0', tap: 'vr0718293a4b5c', ip: '192.168.100.7', mac: '02:aa:bb:cc:dd:ee' };

describe('the TAP source check (pure script)', () => {
  it("admits only the guest's MAC, IPv4 from its lease and ARP claiming it; the policy drops every other ethertype", () => {
    expect(tapGuardScript(guard).trim().split('\n')).toEqual([
      'add table netdev voidrun_vmbr0',
      'add chain netdev voidrun_vmbr0 vr0718293a4b5c { type filter hook ingress device "vr0718293a4b5c" priority -500; policy drop; }',
      'flush chain netdev voidrun_vmbr0 vr0718293a4b5c',
      'add rule netdev voidrun_vmbr0 vr0718293a4b5c ether saddr != 02:aa:bb:cc:dd:ee drop',
      'add rule netdev voidrun_vmbr0 vr0718293a4b5c ether type arp arp htype 1 arp ptype ip arp saddr ether 02:aa:bb:cc:dd:ee arp saddr ip 192.168.100.7 accept',
      'add rule netdev voidrun_vmbr0 vr0718293a4b5c ether type ip ip saddr 192.168.100.7 accept',
    ]);
    // Bridge names may hold characters nft identifiers cannot; they are escaped one to one, so
    // bridges whose names differ only there never share a table.
    expect(tapGuardTable('br-test.1')).toBe('voidrun_br_dtest_p1');
    const names = ['vr-a', 'vr_a', 'vr.a', 'vr_da', 'vr__a', 'vra'];
    expect(new Set(names.map(tapGuardTable)).size).toBe(names.length);
    for (const name of names) expect(tapGuardTable(name)).toMatch(/^[A-Za-z][A-Za-z0-9_]*$/);
  });

  it('refuses what is not a TAP name, a MAC or an IPv4 address rather than writing it into a rule', () => {
    expect(() => tapGuardScript({ ...guard, tap: 'vr1; flush ruleset' })).toThrow(/not an interface name/);
    expect(() => tapGuardScript({ ...guard, mac: '02:AA:bb:cc:dd' })).toThrow(/MAC/);
    expect(() => tapGuardScript({ ...guard, ip: '192.168.100.7 accept' })).toThrow(/IPv4/);
  });

  it('host interface bytes: null for an interface that does not exist or a name that is a path', async () => {
    expect(await hostInterfaceBytes('vrnosuchif0')).toBeNull();
    expect(await hostInterfaceBytes('../../etc')).toBeNull();
    expect(await hostInterfaceBytes('lo')).toMatchObject({ egressBytes: expect.any(Number), ingressBytes: expect.any(Number) });
  });
});

describe.skipIf(skip !== null)('the TAP source check in a network namespace', () => {
  const ns = `vrtg-${randomBytes(3).toString('hex')}`;
  const tap = `vr${randomBytes(6).toString('hex')}`;
  const bridge = 'tgbr0';

  beforeAll(async () => {
    await run('ip', ['netns', 'add', ns]);
    await run('ip', ['-n', ns, 'tuntap', 'add', 'dev', tap, 'mode', 'tap']);
  });
  afterAll(async () => {
    await run('ip', ['netns', 'del', ns]).catch(() => {});
  });

  it('is installed once however often it is applied, replaced in place, and removed (twice is fine)', async () => {
    expect(await guardedTaps(bridge, ns)).toEqual([]);
    await applyTapGuard({ bridge, tap, ip: '10.9.0.2', mac: '02:00:00:00:00:01' }, ns);
    await applyTapGuard({ bridge, tap, ip: '10.9.0.3', mac: '02:00:00:00:00:01' }, ns);
    expect(await guardedTaps(bridge, ns)).toEqual([tap]);
    const listed = (await run('ip', ['netns', 'exec', ns, 'nft', 'list', 'chain', 'netdev', tapGuardTable(bridge), tap])).stdout;
    expect(listed).toContain('ip saddr 10.9.0.3 accept');
    expect(listed).not.toContain('10.9.0.2');
    await removeTapGuard(bridge, tap, ns);
    await removeTapGuard(bridge, tap, ns);
    expect(await guardedTaps(bridge, ns)).toEqual([]);
    // setup-net --down removes the (now empty) table; once gone there is nothing to remove.
    expect(await removeTapGuardTable(bridge, ns)).toBe(true);
    expect(await removeTapGuardTable(bridge, ns)).toBe(false);
    expect((await run('ip', ['netns', 'exec', ns, 'nft', 'list', 'tables'])).stdout).not.toContain(tapGuardTable(bridge));
  });

  it('a failed nft run names the command and the first line of its error', async () => {
    await expect(runNft('add rule netdev nosuchtable nosuchchain drop\n', ns)).rejects.toThrow(/^ip netns exec vrtg-\w+ nft -f - failed: .*No such file or directory/);
  });
});
