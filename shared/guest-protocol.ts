/*
 * How the host and the agent inside a microVM guest find each other (see
 * server/hypervisor/vm/guest.ts for the whole guest layout). Shared by the drivers and the agent.
 */

export const GUEST_AGENT_PORT = 1024;

/** The line a host sends first on every new connection to a guest agent. */
export function agentPreamble(token: string): string {
  return `VOIDRUN-AGENT ${token}\n`;
}
export const AGENT_PREAMBLE_OK = 'OK\n';

/** Written to the config disk (JSON, zero-padded); the agent reads it at boot. */
export interface GuestConfig {
  hostname: string;
  token: string;
  /** Environment for every command in the sandbox. */
  env: Record<string, string>;
  /** VOIDRUN_* settings for the agent itself. */
  agentSettings: Record<string, string>;
  /** eth0's address: on the bridge (cloud-hypervisor, TAP) or QEMU's user-mode network. */
  network: { address: string; prefixLength: number; gateway: string };
  /** Grow the root filesystem to fill its disk at boot (the overlay is larger than the image). */
  growRootFs: boolean;
}

/** Size of the config disk: a whole number of sectors, more than any config needs. */
export const CONFIG_DISK_BYTES = 1024 * 1024;

/** What `POST /identity` on a guest agent sets after a restore. */
export interface GuestIdentity {
  hostname: string;
  network?: GuestConfig['network'];
}
