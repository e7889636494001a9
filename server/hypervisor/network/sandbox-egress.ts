import type { Logger } from 'pino';
import { egressCapOrCeiling, type NetworkPolicy } from '../../../shared/schemas/network.js';
import { DnsProxy } from './dns-proxy.js';
import { addressUsable, EgressFirewall } from './egress-firewall.js';
import { NameProxy } from './name-proxy.js';
import type { NetworkBytes } from './types.js';

export interface SandboxEgressOptions {
  bridge: string;
  /** GATEWAY_IP (address/prefix): the resolver listens on the address. */
  gatewayCidr: string;
  networkCidr: string;
  /** DNS_NAMESERVERS: where allowed queries go. */
  nameservers: readonly string[];
  /** SANDBOX_PRIVATE_ALLOW: the private CIDRs policies' allow CIDRs may open; absent: none. */
  privateAllow?: readonly string[];
  /** SANDBOX_EGRESS_BYTES_MAX when set: the byte cap no policy's exceeds (a policy stored without one or above it gets it). */
  egressCeiling?: number | null;
  log: Logger;
}

/** What the byte-cap watch needs from the rest of the server. */
export interface EgressCapHooks {
  /** Bytes through the sandbox's link, counted by the host; null when it has none. */
  bytesOf(id: string): Promise<NetworkBytes | null>;
  /** Cuts the sandbox's egress (records it and applies it); called once it sent more than its cap. */
  cut(id: string, egressBytes: number): Promise<void>;
  intervalMs?: number;
}

/**
 * Egress policy enforcement for one bridge: the nftables firewall (egress-firewall.ts), the DNS
 * resolver on the gateway that opens allowed names' addresses (dns-proxy.ts), the SNI/Host check
 * of ports 80 and 443 for domain policies (name-proxy.ts), and the watch that cuts a sandbox's
 * egress past its byte cap.
 */
export class SandboxEgress {
  readonly firewall: EgressFirewall;
  readonly #proxy: DnsProxy;
  readonly #names: NameProxy;
  #capTimer: NodeJS.Timeout | null = null;
  #capTick: Promise<void> | null = null;

  constructor(private readonly opts: SandboxEgressOptions) {
    const gateway = opts.gatewayCidr.split('/')[0]!;
    this.firewall = new EgressFirewall({ bridge: opts.bridge, gateway, networkCidr: opts.networkCidr, privateAllow: opts.privateAllow ?? [], onChange: (ip) => this.#names.reevaluate(ip), log: opts.log });
    this.#proxy = new DnsProxy({
      address: gateway,
      upstreams: opts.nameservers.filter((ns) => /^\d+\.\d+\.\d+\.\d+$/.test(ns)),
      policyAt: (ip) => this.firewall.policyAt(ip)?.policy ?? null,
      allowResolved: (ip, addresses, policy) => this.firewall.allowResolved(ip, addresses, policy),
      log: opts.log,
    });
    this.#names = new NameProxy({
      address: gateway,
      policyAt: (ip) => this.firewall.policyAt(ip)?.policy ?? null,
      resolve: async (name, policy) => (await this.#proxy.resolveA(name)).map((a) => a.address).filter((ip) => addressUsable(ip, policy, opts.networkCidr, opts.privateAllow)),
      connectable: (ip, policy) => addressUsable(ip, policy, opts.networkCidr, opts.privateAllow),
      log: opts.log,
    });
  }

  /**
   * Installs the firewall's fixed part and starts the resolver on the gateway (the bridge must
   * exist). Rejects with a message saying what failed: a bridge without its firewall must not
   * carry sandboxes.
   */
  async start(): Promise<void> {
    const gateway = this.opts.gatewayCidr.split('/')[0];
    try {
      await this.#proxy.start();
      await this.#names.start();
    } catch (err) {
      throw new Error(`the sandboxes' DNS resolver or name proxy could not listen on ${gateway} (${(err as Error).message})`, { cause: err });
    }
    try {
      await this.firewall.setUp(this.#names.ports ?? undefined, this.#proxy.port ?? undefined);
    } catch (err) {
      throw new Error(`the egress firewall of bridge ${this.opts.bridge} could not be set up (${(err as Error).message}); set SANDBOX_NETWORK=none to run sandboxes without networking`, { cause: err });
    }
  }

  /** Applies a changed policy to a sandbox on the bridge now; one not attached gets it when it is. */
  async enforce(id: string, policy: NetworkPolicy): Promise<void> {
    await this.firewall.update(id, policy);
  }

  /**
   * At startup: takes up the rules of sandboxes that ran through a restart (`running`, with their
   * policies) and removes the rules of every sandbox not in `known`. Resolves to one line per change.
   */
  async adopt(running: ReadonlyArray<{ id: string; policy: NetworkPolicy }>, known: ReadonlySet<string>): Promise<string[]> {
    const removed = await this.firewall.reconcile(known);
    const restored = await this.firewall.restore(running);
    return [...removed, ...restored.map((id) => `took up the egress rules of sandbox ${id}`)];
  }

  /**
   * Every `intervalMs` (1 s), compares the host's egress counter of each sandbox on the bridge
   * with a byte cap (its own, at most `egressCeiling`) against it, and cuts the ones past it.
   */
  watchCaps(hooks: EgressCapHooks): void {
    if (this.#capTimer) return;
    const tick = async () => {
      for (const { id, policy } of this.firewall.sandboxes()) {
        const cap = egressCapOrCeiling(policy.maxEgressBytes, this.opts.egressCeiling ?? null);
        if (cap == null || policy.egressCut) continue;
        const bytes = await hooks.bytesOf(id).catch(() => null);
        if (bytes && bytes.egress > cap) {
          await hooks.cut(id, bytes.egress).catch((err: Error) => this.opts.log.error({ sandbox: id, err: err.message }, 'could not cut egress at the byte cap'));
        }
      }
    };
    this.#capTimer = setInterval(() => {
      // One pass at a time: a slow pass skips the ticks that fall inside it.
      this.#capTick ??= tick().finally(() => (this.#capTick = null));
    }, hooks.intervalMs ?? 1000);
    this.#capTimer.unref();
  }

  async stop(): Promise<void> {
    if (this.#capTimer) clearInterval(this.#capTimer);
    this.#capTimer = null;
    await this.#capTick;
    await this.#proxy.stop();
    await this.#names.stop();
  }
}
