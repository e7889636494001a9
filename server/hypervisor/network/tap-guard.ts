import { readFile } from 'node:fs/promises';
import { runNetworkCommand } from './host-network.js';

/*
 * The source check on a VM's TAP. A VM guest runs its own kernel: its root can set any address or
 * MAC and send raw frames, so the egress firewall (keyed by the sandbox's IPv4 source address)
 * only holds if nothing but the leased address leaves the TAP. One netdev-family table per bridge
 * (`netdev voidrun_<bridge>`, ours alone), one base chain per TAP on its ingress hook (what the VM
 * sends, before the bridge sees it): frames from any MAC but the VM's, IPv4 from any address but
 * its lease, ARP claiming any other address, and every other ethertype (IPv6 included) are dropped.
 */

/**
 * The nftables table name of `bridge` (`voidrun_<bridge>`; the TAP guards' in the netdev family,
 * the egress firewall's in the ip family). nft identifiers hold letters, digits and `_`, and a
 * bridge name may also hold `-` and `.`, so those are escaped one to one (`_` → `__`, `-` → `_d`,
 * `.` → `_p`): two bridges never share a table.
 */
export function tapGuardTable(bridge: string): string {
  const escaped = bridge.replace(/[^A-Za-z0-9]/g, (c) => (c === '_' ? '__' : c === '-' ? '_d' : c === '.' ? '_p' : `_x${c.charCodeAt(0).toString(16)}_`));
  return `voidrun_${escaped}`;
}

/** What one TAP may send: the guest's MAC and leased IPv4 address. */
export interface TapGuard {
  bridge: string;
  tap: string;
  ip: string;
  mac: string;
}

// TAP names (tapNameFor: a prefix and hex digits) double as nft chain names, which are bare identifiers.
const TAP_NAME = /^[A-Za-z][A-Za-z0-9_]{0,14}$/;
const INTERFACE_NAME = /^[A-Za-z0-9_.-]{1,15}$/;
const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const IPV4 = /^\d{1,3}(\.\d{1,3}){3}$/;

function checked(guard: TapGuard): TapGuard {
  if (!TAP_NAME.test(guard.tap)) throw new Error(`TAP name ${JSON.stringify(guard.tap)} is not an interface name`);
  if (!MAC.test(guard.mac)) throw new Error(`MAC ${JSON.stringify(guard.mac)} is not six lowercase hex octets`);
  if (!IPV4.test(guard.ip)) throw new Error(`${JSON.stringify(guard.ip)} is not an IPv4 address`);
  return guard;
}

/**
 * The nft script that installs (or replaces, in one transaction) the guard of one TAP. Pure: table
 * tested; `applyTapGuard` runs it.
 */
export function tapGuardScript(guard: TapGuard): string {
  const { bridge, tap, ip, mac } = checked(guard);
  const table = tapGuardTable(bridge);
  const chain = `netdev ${table} ${tap}`;
  return [
    `add table netdev ${table}`,
    `add chain ${chain} { type filter hook ingress device "${tap}" priority -500; policy drop; }`,
    `flush chain ${chain}`,
    `add rule ${chain} ether saddr != ${mac} drop`,
    `add rule ${chain} ether type arp arp htype 1 arp ptype ip arp saddr ether ${mac} arp saddr ip ${ip} accept`,
    `add rule ${chain} ether type ip ip saddr ${ip} accept`,
    '',
  ].join('\n');
}

/** Runs `nft -f -` with `script` on stdin (inside `netns` when given); rejects with nft's first error line. */
export function runNft(script: string, netns?: string): Promise<string> {
  return runNetworkCommand('nft', ['-f', '-'], netns, script);
}

/** Installs or replaces the guard of `guard.tap`; the TAP must exist. */
export async function applyTapGuard(guard: TapGuard, netns?: string): Promise<void> {
  await runNft(tapGuardScript(guard), netns);
}

/** Removes the guard of `tap` (nothing happens when it has none). */
export async function removeTapGuard(bridge: string, tap: string, netns?: string): Promise<void> {
  if (!TAP_NAME.test(tap)) throw new Error(`TAP name ${JSON.stringify(tap)} is not an interface name`);
  if (!(await guardedTaps(bridge, netns)).includes(tap)) return;
  await runNft(`delete chain netdev ${tapGuardTable(bridge)} ${tap}\n`, netns).catch(async (err: Error) => {
    // Removed in between by another caller: the outcome asked for.
    if ((await guardedTaps(bridge, netns)).includes(tap)) throw err;
  });
}

/** Removes `bridge`'s whole guard table (setup-net --down); false when there was none. */
export async function removeTapGuardTable(bridge: string, netns?: string): Promise<boolean> {
  try {
    await runNetworkCommand('nft', ['list', 'table', 'netdev', tapGuardTable(bridge)], netns);
  } catch (err) {
    if (/No such file or directory/.test((err as Error).message)) return false;
    throw err;
  }
  await runNft(`delete table netdev ${tapGuardTable(bridge)}\n`, netns);
  return true;
}

/** The TAPs of `bridge` with a guard installed (the chains of its table; none when it has no table). */
export async function guardedTaps(bridge: string, netns?: string): Promise<string[]> {
  let out: string;
  try {
    out = await runNetworkCommand('nft', ['-j', 'list', 'table', 'netdev', tapGuardTable(bridge)], netns);
  } catch (err) {
    if (/No such file or directory/.test((err as Error).message)) return [];
    throw err;
  }
  const parsed = JSON.parse(out) as { nftables?: Array<{ chain?: { name?: unknown } }> };
  return (parsed.nftables ?? []).map((e) => e.chain?.name).filter((n): n is string => typeof n === 'string');
}

/** Bytes through one host interface, as the host counts them (the guest cannot change these). */
export interface InterfaceBytes {
  /** What the sandbox sent: the host interface's receive counter. */
  egressBytes: number;
  /** What the sandbox received: the host interface's transmit counter. */
  ingressBytes: number;
}

/** The sandbox-side byte counts of host interface `ifname` (a TAP or a veth's host end); null when it does not exist. */
export async function hostInterfaceBytes(ifname: string): Promise<InterfaceBytes | null> {
  if (!INTERFACE_NAME.test(ifname) || ifname === '.' || ifname === '..') return null;
  const read = (name: string) => readFile(`/sys/class/net/${ifname}/statistics/${name}`, 'utf8').then((t) => Number(t.trim()));
  try {
    const [rx, tx] = await Promise.all([read('rx_bytes'), read('tx_bytes')]);
    return { egressBytes: rx, ingressBytes: tx };
  } catch {
    return null;
  }
}
