import { z } from 'zod';
import { createTap, deleteTap, findLink, runNetworkCommand } from './host-network.js';
import type { IpPool } from './ip-pool.js';
import { applyTapGuard, guardedTaps, hostInterfaceBytes, removeTapGuard } from './tap-guard.js';
import type { NetworkBytes, NetworkPolicy, SandboxFirewall } from './types.js';

/** The policy of a VM whose spec has none: on the bridge, under the firewall's defaults. */
export const VM_DEFAULT_POLICY: NetworkPolicy = { mode: 'bridge', egress: 'allow', allow: [], deny: [], maxEgressBytes: null, egressCut: false };

/** A guest's static IPv4 address on the sandbox bridge. */
export interface GuestAddress {
  ip: string;
  prefixLength: number;
  gateway: string;
}

/** Where a VM sits on the bridge once attached. */
export interface VmAttachment {
  /** Its TAP device, an isolated port of the bridge. */
  tap: string;
  address: GuestAddress;
}

/**
 * Host networking for microVMs (qemu's second NIC, cloud-hypervisor's only one): a TAP per VM on
 * BRIDGE_NAME with an address from the persisted pool, the egress firewall keyed by that address,
 * and a source check on the TAP (tap-guard.ts), since a VM's own kernel could otherwise send from
 * any address.
 */
export interface VmHostNetwork {
  /**
   * Leases the sandbox's address (the same one for as long as it stays leased), creates its TAP,
   * pins the TAP to `mac` and the address and applies the firewall — all before the VM boots, so
   * it never has unfiltered egress. Again after a stop, with the same address.
   */
  attach(id: string, guest: { mac: string; policy: NetworkPolicy }): Promise<VmAttachment>;
  /** Removes the firewall rules, the TAP's guard and the TAP; the address stays leased. Idempotent. */
  detach(id: string): Promise<void>;
  /** `detach`, then frees the address (the sandbox is deleted). Idempotent. */
  release(id: string): Promise<void>;
  /** The sandbox's address if it has one (never allocates). */
  leaseOf(id: string): Promise<string | null>;
  /** Bytes through the sandbox's TAP, as the host counts them; null when it has none. */
  bytesOf(id: string): Promise<NetworkBytes | null>;
  /** The TAP name of a sandbox (≤ 15 characters, the kernel's limit). */
  tapNameFor(id: string): string;
  /**
   * Removes what VMs that are gone left: TAPs on this bridge (and their guards) of sandboxes not in
   * `attached`, and leases of sandboxes not in `leased`. Resolves to one line per removal.
   */
  reconcile(keep: { attached: ReadonlySet<string>; leased: ReadonlySet<string> }): Promise<string[]>;
}

export interface BridgeVmNetworkOptions {
  bridge: string;
  pool: IpPool;
  firewall: SandboxFirewall;
  tapNameFor: (id: string) => string;
  /** TAP names this server makes match this (reconcile never touches another's interfaces). */
  tapPattern: RegExp;
}

const LinkList = z.array(z.object({ ifname: z.string(), linkinfo: z.object({ info_kind: z.string().optional() }).optional() }));

/** The TAP devices attached to `bridge` (none when there is no such bridge). */
async function tapsOnBridge(bridge: string): Promise<string[]> {
  if (!(await findLink(bridge))) return [];
  const links = LinkList.parse(JSON.parse((await runNetworkCommand('ip', ['-j', '-d', 'link', 'show', 'master', bridge])).trim() || '[]'));
  return links.filter((l) => l.linkinfo?.info_kind === 'tun').map((l) => l.ifname);
}

/** The real VmHostNetwork: TAPs on `bridge`, leases from `pool`, rules from `firewall`. */
export function bridgeVmNetwork(opts: BridgeVmNetworkOptions): VmHostNetwork {
  const { bridge, pool, firewall, tapNameFor } = opts;
  const detach = async (id: string) => {
    const tap = tapNameFor(id);
    await firewall.remove(id);
    await removeTapGuard(bridge, tap);
    await deleteTap(tap);
  };
  return {
    async attach(id, guest) {
      const ip = await pool.allocate(id);
      const tap = tapNameFor(id);
      await createTap(tap, bridge);
      try {
        await applyTapGuard({ bridge, tap, ip, mac: guest.mac });
        await firewall.apply({ id, ip, hostIf: tap }, guest.policy);
      } catch (err) {
        await detach(id).catch(() => {});
        throw err;
      }
      return { tap, address: { ip, prefixLength: pool.prefixLength, gateway: pool.gateway } };
    },
    detach,
    async release(id) {
      await detach(id);
      await pool.release(id);
    },
    leaseOf: (id) => pool.leaseOf(id),
    bytesOf: async (id) => {
      const bytes = await hostInterfaceBytes(tapNameFor(id));
      return bytes && { egress: bytes.egressBytes, ingress: bytes.ingressBytes };
    },
    tapNameFor,
    async reconcile(keep) {
      const removed: string[] = [];
      const wanted = new Set([...keep.attached].map(tapNameFor));
      for (const tap of await tapsOnBridge(bridge)) {
        if (!opts.tapPattern.test(tap) || wanted.has(tap)) continue;
        await removeTapGuard(bridge, tap);
        if (await deleteTap(tap)) removed.push(`deleted TAP ${tap}`);
      }
      for (const tap of await guardedTaps(bridge)) {
        if (!opts.tapPattern.test(tap) || wanted.has(tap)) continue;
        await removeTapGuard(bridge, tap);
        removed.push(`removed the guard of TAP ${tap}`);
      }
      for (const id of await pool.leasedSandboxes()) {
        if (keep.leased.has(id)) continue;
        await firewall.remove(id);
        await pool.release(id);
        removed.push(`released the address of sandbox ${id}`);
      }
      return removed;
    },
  };
}
