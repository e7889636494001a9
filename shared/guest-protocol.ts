import { createHmac, randomBytes } from 'node:crypto';

/*
 * How the host and the agent inside a microVM guest find each other (see
 * server/hypervisor/vm/guest.ts for the whole guest layout). Shared by the drivers and the agent.
 */

export const GUEST_AGENT_PORT = 1024;

/**
 * The header of the server's raw HTTP requests to an agent carrying a per-request nonce, which the
 * agent echoes on its answer (any transport, not only a guest's).
 */
export const AGENT_REQUEST_HEADER = 'x-voidrun-request';

/*
 * The agent handshake, a mutual challenge–response so the token itself never crosses the wire
 * (a local user who grabs a dead VM's forwarded port learns nothing reusable):
 *   agent → host   `VOIDRUN-AGENT-CHALLENGE <agentNonce>\n`
 *   host  → agent  `VOIDRUN-AGENT <proof(token, "host", agentNonce)> <hostNonce>\n`
 *   agent → host   `OK <proof(token, "agent", hostNonce)>\n`, then HTTP.
 * Anything else: the connection is closed.
 */
export const AGENT_CHALLENGE_PREFIX = 'VOIDRUN-AGENT-CHALLENGE ';
export const AGENT_RESPONSE_PREFIX = 'VOIDRUN-AGENT ';

/** HMAC-SHA256 of `<role>:<nonce>` keyed with the sandbox's token, hex. */
export function handshakeProof(token: string, role: 'host' | 'agent', nonce: string): string {
  return createHmac('sha256', token).update(`${role}:${nonce}`).digest('hex');
}

export function newNonce(): string {
  return randomBytes(16).toString('hex');
}

/** Written to the config disk (JSON, zero-padded); the agent reads it at boot. */
export interface GuestConfig {
  hostname: string;
  token: string;
  /** Environment for every command in the sandbox. */
  env: Record<string, string>;
  /** VOIDRUN_* settings for the agent itself. */
  agentSettings: Record<string, string>;
  /**
   * The NIC with the default route: on the bridge (a TAP: cloud-hypervisor, QEMU in bridge mode)
   * or QEMU's user-mode network. `mac` names the NIC; without it, eth0. None: the guest has no NIC
   * (a cloud-hypervisor sandbox with network mode `none`).
   */
  network?: GuestNic & { gateway: string };
  /** Further NICs, addressed without a route beyond their subnet (QEMU's user-mode NIC the host reaches the agent through, beside a TAP). */
  extraNetworks?: GuestNic[];
  /** Grow the root filesystem to fill its disk at boot (the overlay is larger than the image). */
  growRootFs: boolean;
  /** Resolvers written to the guest's /etc/resolv.conf at boot (DNS_NAMESERVERS); absent: left as the image has it. */
  nameservers?: string[];
}

/** One guest NIC's static IPv4 address. */
export interface GuestNic {
  address: string;
  prefixLength: number;
  /** The NIC's MAC (lowercase, colon-separated): which interface this is. */
  mac?: string;
}

/** Size of the config disk: a whole number of sectors, more than any config needs. */
export const CONFIG_DISK_BYTES = 1024 * 1024;

/** What `POST /identity` on a guest agent sets after a restore. */
export interface GuestIdentity {
  hostname: string;
  /** The new sandbox's id, which its commands see as VOIDRUN_SANDBOX_ID. */
  sandboxId: string;
  /** The restored NIC's new address; with `replacesMac`, the NIC that has that MAC now takes `mac`. */
  network?: NonNullable<GuestConfig['network']> & { replacesMac?: string };
}
