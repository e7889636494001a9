import type { NetworkPolicy } from '../../../shared/schemas/network.js';
import type { NetworkBytes } from '../../../shared/schemas/sandbox.js';

/** Bytes through a sandbox's host interface (egress: sent by the sandbox), counted by the host's kernel. */
export type { NetworkBytes, NetworkPolicy };

/** One sandbox on the bridge as the firewall sees it. */
export interface FirewalledSandbox {
  id: string;
  /** Its leased IPv4 address on the bridge (the key of its rules). */
  ip: string;
  /** The host end of its link on the bridge (a container's veth, a VM's TAP). */
  hostIf: string;
}

/**
 * The egress policy's enforcement on the host. `apply` runs before the sandbox's host interface
 * comes up (so a sandbox never has unfiltered egress) and again whenever its policy changes;
 * `remove` when the sandbox leaves the bridge. Both are idempotent.
 */
export interface SandboxFirewall {
  apply(sandbox: FirewalledSandbox, policy: NetworkPolicy): Promise<void>;
  remove(id: string): Promise<void>;
}

/** A firewall that filters nothing: egress is only what the bridge's NAT allows. */
export const noFirewall: SandboxFirewall = {
  apply: async () => {},
  remove: async () => {},
};

/** Where an attached sandbox sits on the bridge. */
export interface SandboxAttachment {
  ip: string;
  /** The host end of its veth pair, on the bridge. */
  hostIf: string;
  /** Its network namespace (`/run/netns/vr-<bridge>-<id>`), which runc joins. */
  netnsPath: string;
  /** A sysfs mounted for that namespace, bound read-only at the sandbox's /sys. */
  sysfsPath: string;
  /** The sandbox's resolv.conf (`nameserver <gateway>`), bound read-only at its /etc/resolv.conf. */
  resolvConfPath: string;
}

/**
 * Container sandboxes' networking on the bridge: a network namespace per sandbox cabled to the
 * bridge by a veth pair, with an address from the persisted pool.
 */
export interface SandboxNetworking {
  /** Creates the sandbox's namespace and link (again, after a stop) with its leased address. */
  attach(id: string, policy: NetworkPolicy): Promise<SandboxAttachment>;
  /** Removes the namespace, link and firewall rules; the address stays leased. Idempotent. */
  detach(id: string): Promise<void>;
  /** `detach`, then frees the address (the sandbox is deleted). Idempotent. */
  release(id: string): Promise<void>;
  /** The sandbox's leased address, or null. */
  leaseOf(id: string): Promise<string | null>;
  /** Bytes through the sandbox's link since it was attached, or null when it has none. */
  bytesOf(id: string): Promise<NetworkBytes | null>;
  /**
   * Removes what sandboxes that are gone left on the host: namespaces and links of this bridge
   * whose sandbox is not in `attached`, and leases whose sandbox is not in `leased`.
   */
  reconcile(keep: { attached: ReadonlySet<string>; leased: ReadonlySet<string> }): Promise<string[]>;
}
