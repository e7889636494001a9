import { existsSync } from 'node:fs';
import { mkdir, readdir, rm, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import type { IpLeaseRepository } from '../../store/types.js';
import { mountedAt } from '../container/mounts.js';
import { findLink, runNetworkCommand, setUp, tapNameFor } from './host-network.js';
import type { IpPool } from './ip-pool.js';
import { hostInterfaceBytes } from './tap-guard.js';
import { noFirewall, type NetworkBytes, type NetworkPolicy, type SandboxAttachment, type SandboxFirewall, type SandboxNetworking } from './types.js';

/** What `BridgeNetworking` needs: the bridge, its address pool and the firewall. */
export interface BridgeNetworkingOptions {
  /** BRIDGE_NAME: the bridge setup-net made, whose address (the pool's gateway) is the sandboxes' default route. */
  bridge: string;
  /** Addresses on the bridge (NETWORK_CIDR, GATEWAY_IP), persisted in the store. */
  pool: IpPool;
  /** The pool's lease records, for reconciling leases whose sandbox is gone. */
  leases: IpLeaseRepository;
  /** NET_PREFIX / TAP_PREFIX: host link names are `tapNameFor(id, prefix)`, as a VM's TAP. */
  linkPrefix: string;
  /** Enforces each sandbox's egress policy; filters nothing when omitted. */
  firewall?: SandboxFirewall;
  /** Where each sandbox's sysfs mount and resolv.conf live (default `/run/voidrun-net/<bridge>`). */
  stateDir?: string;
  log: Logger;
}

/** Named network namespaces live here (`ip netns add`). */
const NETNS_DIR = '/run/netns';

const LinkListSchema = z.array(z.object({ ifname: z.string(), linkinfo: z.object({ info_kind: z.string().optional() }).optional() }));

/**
 * Container sandboxes on the bridge. Each one gets a network namespace `vr-<bridge>-<id>` made
 * here, so it belongs to the host's user namespace: sandbox root (root of its own user namespace
 * only) has no CAP_NET_ADMIN over it, and cannot change its address, routes or firewall, nor open
 * raw sockets. A veth pair cables it to the bridge: the host end, named as a VM's TAP would be, is
 * a bridge port with `isolated on` (isolated ports cannot talk to each other, so sandboxes cannot
 * reach one another at layer 2); the sandbox end is `eth0` with the leased address and a default
 * route via the gateway. IPv6 is off in the namespace. Because a sysfs can only be mounted by a
 * user namespace owning the network namespace, the host mounts one for the sandbox's namespace and
 * runc binds it read-only at /sys.
 *
 * The firewall's rules are in place before the host end comes up, so a sandbox never has a moment
 * of unfiltered egress.
 */
export class BridgeNetworking implements SandboxNetworking {
  readonly #firewall: SandboxFirewall;
  readonly #stateDir: string;

  constructor(private readonly opts: BridgeNetworkingOptions) {
    this.#firewall = opts.firewall ?? noFirewall;
    this.#stateDir = opts.stateDir ?? join('/run/voidrun-net', opts.bridge);
  }

  /** The sandbox's network namespace name: ours alone, by bridge (parallel servers use their own bridges). */
  netnsName(id: string): string {
    return `vr-${this.opts.bridge}-${id}`;
  }

  /** The host end of the sandbox's veth pair. */
  hostIfName(id: string): string {
    return tapNameFor(id, this.opts.linkPrefix);
  }

  #files(id: string) {
    const dir = join(this.#stateDir, id);
    return { dir, sysfs: join(dir, 'sys'), resolvConf: join(dir, 'resolv.conf') };
  }

  async attach(id: string, policy: NetworkPolicy): Promise<SandboxAttachment> {
    const { pool, bridge } = this.opts;
    const ip = await pool.allocate(id);
    const netns = this.netnsName(id);
    const netnsPath = join(NETNS_DIR, netns);
    const hostIf = this.hostIfName(id);
    const files = this.#files(id);
    // A namespace or link left by a sandbox that died with the host process is made afresh.
    await this.detach(id);
    // Batched (`ip -batch`): each process spawned costs milliseconds on a busy host.
    try {
      await ip_('netns', 'add', netns);
      // Before eth0 exists, so it is made with IPv6 off.
      await runNetworkCommand('nsenter', [`--net=${netnsPath}`, 'sysctl', '-e', '-q', '-w', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);
      await ipBatch(undefined, [`link add ${hostIf} type veth peer name eth0 netns ${netns}`, `link set ${hostIf} master ${bridge}`, `link set ${hostIf} type bridge_slave isolated on`]);
      await writeFile(`/proc/sys/net/ipv6/conf/${hostIf}/disable_ipv6`, '1').catch(() => {}); // absent without IPv6
      await ipBatch(netns, ['link set lo up', `addr add ${ip}/${pool.prefixLength} dev eth0`, 'link set eth0 up', `route add default via ${pool.gateway}`]);
      await this.#writeFiles(id, netnsPath);
      await this.#firewall.apply({ id, ip, hostIf }, policy);
      await ip_('link', 'set', hostIf, 'up');
    } catch (err) {
      await this.detach(id).catch((e: Error) => this.opts.log.error({ sandbox: id, err: e.message }, 'could not undo a failed network attach'));
      throw err;
    }
    return { ip, hostIf, netnsPath, sysfsPath: files.sysfs, resolvConfPath: files.resolvConf };
  }

  /**
   * The sandbox's sysfs (mounted from inside its namespace, so /sys/class/net shows its own links)
   * and its resolv.conf, naming the gateway: the server's DNS resolver there answers by its policy.
   * The directories are searchable by others, as runc resolves mount sources as the sandbox's root.
   */
  async #writeFiles(id: string, netnsPath: string): Promise<void> {
    const files = this.#files(id);
    await mkdir(files.sysfs, { recursive: true, mode: 0o711 });
    await runNetworkCommand('nsenter', [`--net=${netnsPath}`, 'mount', '-t', 'sysfs', '-o', 'ro,nosuid,nodev,noexec', 'sysfs', files.sysfs]);
    await writeFile(files.resolvConf, `nameserver ${this.opts.pool.gateway}\n`, { mode: 0o644 });
  }

  async detach(id: string): Promise<void> {
    const hostIf = this.hostIfName(id);
    const netns = this.netnsName(id);
    const files = this.#files(id);
    await this.#firewall.remove(id);
    const link = existsSync(`/sys/class/net/${hostIf}`) ? await findLink(hostIf) : null;
    if (link?.linkinfo?.info_kind === 'veth') await ip_('link', 'del', 'dev', hostIf);
    // The sysfs mount holds a reference to the namespace: it goes first.
    if (mountedAt(files.sysfs)) await runNetworkCommand('umount', [files.sysfs]).catch(() => runNetworkCommand('umount', ['-l', files.sysfs]));
    await rm(files.dir, { recursive: true, force: true });
    // The bridge's directory goes with its last sandbox (rmdir refuses while others are in it).
    await rmdir(this.#stateDir).catch(() => {});
    if (existsSync(join(NETNS_DIR, netns))) await ip_('netns', 'del', netns);
  }

  async release(id: string): Promise<void> {
    await this.detach(id);
    await this.opts.pool.release(id);
  }

  leaseOf(id: string): Promise<string | null> {
    return this.opts.pool.leaseOf(id);
  }

  async bytesOf(id: string): Promise<NetworkBytes | null> {
    // What the host end receives, the sandbox sent.
    const bytes = await hostInterfaceBytes(this.hostIfName(id));
    return bytes && { egress: bytes.egressBytes, ingress: bytes.ingressBytes };
  }

  async reconcile(keep: { attached: ReadonlySet<string>; leased: ReadonlySet<string> }): Promise<string[]> {
    const changes: string[] = [];
    const gone = new Set<string>();
    const ourNetns = new RegExp(`^${escapeRegExp(this.netnsName(''))}([0-9a-f]{24})$`);
    for (const name of existsSync(NETNS_DIR) ? await readdir(NETNS_DIR) : []) {
      const id = ourNetns.exec(name)?.[1];
      if (id && !keep.attached.has(id)) gone.add(id);
    }
    for (const id of existsSync(this.#stateDir) ? await readdir(this.#stateDir) : []) if (/^[0-9a-f]{24}$/.test(id) && !keep.attached.has(id)) gone.add(id);
    for (const id of gone) {
      await this.detach(id);
      changes.push(`removed the network namespace of sandbox ${id}`);
    }
    // Links on our bridge named like a sandbox's whose sandbox is gone (their namespace already was).
    const keptLinks = new Set([...keep.attached].map((id) => this.hostIfName(id)));
    const ourLink = new RegExp(`^${escapeRegExp(this.opts.linkPrefix)}[0-9a-f]{12}$`);
    const links = LinkListSchema.parse(JSON.parse((await ip_('-j', '-d', 'link', 'show', 'master', this.opts.bridge).catch(() => '')) || '[]'));
    for (const link of links) {
      if (link.linkinfo?.info_kind !== 'veth' || !ourLink.test(link.ifname) || keptLinks.has(link.ifname)) continue;
      await ip_('link', 'del', 'dev', link.ifname);
      changes.push(`removed link ${link.ifname} from ${this.opts.bridge}`);
    }
    for (const lease of await this.opts.leases.list()) {
      if (keep.leased.has(lease.sandboxId)) continue;
      await this.opts.pool.release(lease.sandboxId);
      changes.push(`freed address ${lease.ip} of sandbox ${lease.sandboxId}`);
    }
    return changes;
  }
}

function ip_(...args: string[]): Promise<string> {
  return runNetworkCommand('ip', args);
}

/** Several `ip` commands (one per line, without `ip`) in one process, in `netns` when given; the first failure stops it. */
function ipBatch(netns: string | undefined, lines: string[]): Promise<string> {
  return runNetworkCommand('ip', [...(netns ? ['-n', netns] : []), '-batch', '-'], undefined, `${lines.join('\n')}\n`);
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** What SANDBOX_NETWORK resolved to on this host. */
export interface SandboxNetworkChoice {
  mode: 'bridge' | 'none';
  /** Why, in one line (logged at startup). */
  reason: string;
  /** Why `bridge` cannot run here; unset when it can. */
  bridgeUnavailable?: string;
  /** The bridge networking, with `mode` bridge. */
  networking: BridgeNetworking | null;
}

/** `chooseSandboxNetwork`'s inputs: SANDBOX_NETWORK, and the bridge's settings for setup-net and `BridgeNetworking`. */
export interface SandboxNetworkChoiceOptions extends Omit<BridgeNetworkingOptions, 'pool'> {
  /** SANDBOX_NETWORK; unset: bridge where the host can do it. */
  requested: 'bridge' | 'none' | undefined;
  pool: IpPool;
  gatewayCidr: string;
  networkCidr: string;
}

/**
 * Resolves SANDBOX_NETWORK: `bridge` needs root, `ip` and `nft`, and runs setup-net's `setUp`
 * (idempotent: the bridge, its address, forwarding, NAT) so the bridge is there before any sandbox
 * needs it. When the host cannot, sandboxes get loopback only and `reason` says why.
 */
export async function chooseSandboxNetwork(opts: SandboxNetworkChoiceOptions): Promise<SandboxNetworkChoice> {
  if (opts.requested === 'none') return { mode: 'none', reason: 'SANDBOX_NETWORK=none: sandboxes have loopback only', bridgeUnavailable: 'SANDBOX_NETWORK is none', networking: null };
  const missing = process.getuid?.() !== 0 ? 'the server does not run as root' : (['ip', 'nft', 'nsenter'].filter((c) => !onPath(c)).join(', ') || null);
  const cannot = missing && (missing.startsWith('the server') ? missing : `${missing} not installed (npm run setup installs them)`);
  const asked = opts.requested === 'bridge' ? 'SANDBOX_NETWORK=bridge' : 'SANDBOX_NETWORK unset';
  if (cannot) return { mode: 'none', reason: `${asked}, but ${cannot}: sandboxes have loopback only`, bridgeUnavailable: cannot, networking: null };
  try {
    const changes = await setUp({ bridge: opts.bridge, gatewayCidr: opts.gatewayCidr, networkCidr: opts.networkCidr });
    for (const change of changes) opts.log.info(`setup-net: ${change}`);
  } catch (err) {
    const why = `setting up bridge ${opts.bridge} failed (${(err as Error).message})`;
    return { mode: 'none', reason: `${asked}, but ${why}: sandboxes have loopback only`, bridgeUnavailable: why, networking: null };
  }
  return { mode: 'bridge', reason: `${asked}: sandboxes on bridge ${opts.bridge} (${opts.networkCidr})`, networking: new BridgeNetworking(opts) };
}

function onPath(command: string): boolean {
  return [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin'].some((dir) => dir && existsSync(join(dir, command)));
}
