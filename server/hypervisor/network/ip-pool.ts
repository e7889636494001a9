import { ConfigError } from '../../config.js';
import { DriverUnavailableError } from '../../errors.js';
import type { IpLeaseRepository } from '../../store/types.js';
import { runNetworkCommand } from './host-network.js';

/** An IPv4 network: its first address as a 32-bit unsigned number and its prefix length. */
export interface Ipv4Network {
  /** The network address (host bits cleared), as an unsigned 32-bit number. */
  base: number;
  prefixLength: number;
}

/** Parses dotted-quad IPv4 text into an unsigned 32-bit number; null when it is not one. */
export function parseIpv4(text: string): number | null {
  const parts = text.split('.');
  if (parts.length !== 4 || !parts.every((p) => /^\d{1,3}$/.test(p) && Number(p) <= 255)) return null;
  return parts.reduce((n, p) => n * 256 + Number(p), 0);
}

export function formatIpv4(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/**
 * Splits `a.b.c.d/n` into the address and the network it belongs to (host bits of the network
 * cleared, so `192.168.100.1/22` lies in `192.168.100.0/22`); null when the text is not one.
 */
export function parseIpv4Cidr(text: string): { address: number; network: Ipv4Network } | null {
  const match = /^([\d.]+)\/(\d{1,2})$/.exec(text);
  if (!match) return null;
  const address = parseIpv4(match[1]!);
  const prefixLength = Number(match[2]);
  if (address === null || prefixLength > 32) return null;
  const size = 2 ** (32 - prefixLength);
  return { address, network: { base: address - (address % size), prefixLength } };
}

/** `192.168.100.0/22` for any address of that network. */
export function formatIpv4Network(network: Ipv4Network): string {
  return `${formatIpv4(network.base)}/${network.prefixLength}`;
}

export interface IpPoolOptions {
  /** NETWORK_CIDR: the guests' network, e.g. `192.168.100.0/22`. */
  networkCidr: string;
  /** GATEWAY_IP: the bridge's address with its prefix length, e.g. `192.168.100.1/22`; never leased. */
  gatewayCidr: string;
  leases: IpLeaseRepository;
}

/**
 * Hands out guest addresses from NETWORK_CIDR, never the network address, the gateway or the
 * broadcast address. Every lease is a store record keyed by the address, so a restarted server (or
 * a second server on the same store) never hands out a live address again, and an address is free
 * once its sandbox's lease is released.
 */
export class IpPool {
  /** The gateway guests route through (the bridge's address), without a prefix length. */
  readonly gateway: string;
  /** The guests' prefix length (from NETWORK_CIDR). */
  readonly prefixLength: number;
  /** How many addresses guests can have in all. */
  readonly capacity: number;

  readonly #network: Ipv4Network;
  readonly #networkCidr: string;
  readonly #gateway: number;
  readonly #leases: IpLeaseRepository;
  /** Allocations in flight, so concurrent calls for one sandbox share one lease. */
  readonly #pending = new Map<string, Promise<string>>();

  constructor(opts: IpPoolOptions) {
    const network = parseIpv4Cidr(opts.networkCidr)?.network;
    if (!network) throw new ConfigError(`Invalid configuration: NETWORK_CIDR=${JSON.stringify(opts.networkCidr)} — expected an IPv4 CIDR, like 192.168.100.0/22`);
    const gateway = parseIpv4Cidr(opts.gatewayCidr)?.address;
    if (gateway === undefined) {
      throw new ConfigError(`Invalid configuration: GATEWAY_IP=${JSON.stringify(opts.gatewayCidr)} — expected an IPv4 address with a prefix length, like 192.168.100.1/22`);
    }
    this.#network = network;
    this.#networkCidr = formatIpv4Network(network);
    if (!this.#contains(gateway)) {
      throw new ConfigError(`Invalid configuration: GATEWAY_IP=${JSON.stringify(opts.gatewayCidr)} — expected an address inside NETWORK_CIDR ${this.#networkCidr}`);
    }
    this.#gateway = gateway;
    this.#leases = opts.leases;
    this.gateway = formatIpv4(gateway);
    this.prefixLength = network.prefixLength;
    const gatewayIsHostAddress = gateway > network.base && gateway < network.base + this.#size() - 1;
    this.capacity = Math.max(0, this.#size() - 2 - (gatewayIsHostAddress ? 1 : 0));
  }

  /**
   * The sandbox's address: its existing lease, or else the lowest free address, claimed in the
   * store. A claim another process won in the meantime just moves on to the next address.
   * @throws DriverUnavailableError when every address is leased.
   */
  allocate(sandboxId: string): Promise<string> {
    const pending = this.#pending.get(sandboxId);
    if (pending) return pending;
    const allocation = this.#allocate(sandboxId).finally(() => this.#pending.delete(sandboxId));
    this.#pending.set(sandboxId, allocation);
    return allocation;
  }

  /**
   * Frees the sandbox's address; nothing happens when it has none. The connections the host
   * tracks for the address are forgotten first, so its next owner is never delivered replies to them.
   */
  async release(sandboxId: string): Promise<void> {
    const ip = await this.leaseOf(sandboxId);
    if (ip) await forgetConnections(ip);
    await this.#leases.releaseBySandbox(sandboxId);
  }

  /** The sandbox's leased address in this pool's network, or null. */
  async leaseOf(sandboxId: string): Promise<string | null> {
    const lease = await this.#leases.findBySandbox(sandboxId);
    if (!lease) return null;
    const ip = parseIpv4(lease.ip);
    return ip !== null && this.#isCandidate(ip) ? lease.ip : null;
  }

  /** The sandboxes holding an address of this pool's network (leases under another NETWORK_CIDR are another server's). */
  async leasedSandboxes(): Promise<string[]> {
    return (await this.#leases.list()).filter((l) => {
      const ip = parseIpv4(l.ip);
      return ip !== null && this.#isCandidate(ip);
    }).map((l) => l.sandboxId);
  }

  async #allocate(sandboxId: string): Promise<string> {
    const existing = await this.#leases.findBySandbox(sandboxId);
    if (existing) {
      const ip = parseIpv4(existing.ip);
      if (ip !== null && this.#isCandidate(ip)) return existing.ip;
      // Leased under an earlier NETWORK_CIDR or GATEWAY_IP: no guest can use that address on this
      // bridge any more, so it gives way to one from the current network.
      await this.#leases.releaseBySandbox(sandboxId);
    }
    const taken = new Set((await this.#leases.list()).map((l) => l.ip));
    for (const candidate of this.#candidates()) {
      const ip = formatIpv4(candidate);
      if (taken.has(ip)) continue;
      if (await this.#leases.claim(ip, sandboxId)) return ip;
    }
    throw new DriverUnavailableError(
      `No free guest address: all ${this.capacity} addresses of NETWORK_CIDR ${this.#networkCidr} are leased; delete sandboxes or widen NETWORK_CIDR`,
    );
  }

  #size(): number {
    return 2 ** (32 - this.#network.prefixLength);
  }

  #contains(ip: number): boolean {
    return ip >= this.#network.base && ip < this.#network.base + this.#size();
  }

  /** Inside the network and neither its network address, its broadcast address nor the gateway. */
  #isCandidate(ip: number): boolean {
    return ip > this.#network.base && ip < this.#network.base + this.#size() - 1 && ip !== this.#gateway;
  }

  /** Every leasable address, lowest first (lazily: a /8 has 16 million). */
  *#candidates(): Generator<number> {
    for (let ip = this.#network.base + 1; ip < this.#network.base + this.#size() - 1; ip++) if (ip !== this.#gateway) yield ip;
  }
}

/**
 * Deletes the host's connection-tracking entries from and to `ip` (`conntrack`, from setup-host);
 * best effort: without the tool, or with no entry to delete, nothing happens.
 */
export async function forgetConnections(ip: string): Promise<void> {
  if (parseIpv4(ip) === null) return;
  for (const side of ['--orig-src', '--orig-dst']) await runNetworkCommand('conntrack', ['-D', side, ip]).catch(() => {});
}
