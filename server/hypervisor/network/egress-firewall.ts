import { execFile } from 'node:child_process';
import { networkInterfaces } from 'node:os';
import type { Logger } from 'pino';
import { cidrBounds, cidrWithin, insidePrivateRange, isCidrRule, PRIVATE_RANGES, type NetworkPolicy } from '../../../shared/schemas/network.js';
import { viaProxy } from './name-proxy.js';
import { runNft, tapGuardTable } from './tap-guard.js';
import type { FirewalledSandbox, SandboxFirewall } from './types.js';

/*
 * The egress firewall: one nftables table per bridge, `ip voidrun_<bridge>`, ours alone (the TAP
 * guards' netdev table of the same name is another family's). Every change is one `nft -f -`
 * transaction, so a sandbox's rules are never half written.
 *
 *   prerouting (nat)  DNS from the bridge to any address, UDP and TCP port 53, goes to the
 *                     server's resolver on the gateway (dns-proxy.ts); for sandboxes allowing
 *                     domains under `egress: deny` (`sni_by_source` → `n_<id>`), TCP 80 and 443
 *                     except to their allow CIDRs go to the name proxy (name-proxy.ts).
 *   input             from the bridge: only that resolver (and the name proxy) and replies to the host's own
 *                     connections; nothing else of the host (the API port, any other port, any
 *                     of its addresses) is reachable from a sandbox.
 *   forward           into the bridge: only replies; out of the bridge: `from_sandbox`.
 *   from_sandbox      always refused (`refused`: this host's sandbox network, loopback, 0/8,
 *                     link-local 169.254/16, multicast, reserved), then the sandbox's own chain
 *                     by source address (`by_source`); an address without one is dropped.
 *   s_<id>            the sandbox's policy: its deny CIDRs, its allow CIDRs (the only way into
 *                     the private ranges, within SANDBOX_PRIVATE_ALLOW), the private ranges, the addresses its DNS answers
 *                     opened (with the record's TTL), then its default (`egress`). Cut at the byte
 *                     cap, it refuses everything.
 *
 * Every packet out of a sandbox is checked (not only a connection's first), so a changed policy
 * or a cut stops connections already open. The source address is a sound key: a container has no
 * CAP_NET_ADMIN over its namespace, and a VM's TAP drops frames from any other address
 * (tap-guard.ts).
 */

/** Ranges no sandbox reaches whatever its policy (the sandbox network itself is added per bridge). */
export const ALWAYS_REFUSED = ['0.0.0.0/8', '127.0.0.0/8', '169.254.0.0/16', '224.0.0.0/4', '240.0.0.0/4'];
/** The private ranges: refused unless a CIDR in the sandbox's `allow` and SANDBOX_PRIVATE_ALLOW both name them. */
export { PRIVATE_RANGES };
/**
 * What a refused packet from a sandbox gets: an ICMP "administratively prohibited", so its
 * programs fail at once ("No route to host") instead of waiting out a timeout. Packets from an
 * address that is no sandbox's are dropped without an answer.
 */
const REJECT = 'reject with icmp type admin-prohibited';
/** How long a DNS answer opens an address at least and at most, in seconds. */
export const DNS_TIMEOUT_MIN_SEC = 30;
export const DNS_TIMEOUT_MAX_SEC = 3600;
/** The most addresses one sandbox's DNS answers hold open at once. */
const MAX_RESOLVED_PER_SANDBOX = 4096;

const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
const CIDR = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}\/\d{1,2}$/;
const SANDBOX_ID = /^[a-z0-9]{1,64}$/;
const INTERFACE = /^[A-Za-z0-9_.-]{1,15}$/;

export interface EgressFirewallOptions {
  /** BRIDGE_NAME. */
  bridge: string;
  /** The gateway's address (GATEWAY_IP without its prefix length): where the DNS resolver listens. */
  gateway: string;
  /** NETWORK_CIDR: the sandboxes' network, never a destination. */
  networkCidr: string;
  /** The resolver's port on the gateway (53). */
  dnsPort?: number;
  /** Run nft inside this network namespace (the tests' namespaces). */
  netns?: string;
  /** Called with a sandbox's address after its rules changed or went (the name proxy drops what is no longer allowed). */
  onChange?: (ip: string) => void;
  /** SANDBOX_PRIVATE_ALLOW: the private CIDRs a policy's allow CIDRs may open; absent: none. */
  privateAllow?: readonly string[];
  log?: Logger;
}

/** Where the name proxy (name-proxy.ts) listens on the gateway, for ports 80 and 443. */
export interface ProxyPorts {
  http: number;
  tls: number;
}

/** One address a DNS answer gave a sandbox, with its TTL in seconds. */
export interface ResolvedAddress {
  address: string;
  ttl: number;
}

function checkedAddress(ip: string): string {
  if (!IPV4.test(ip)) throw new Error(`${JSON.stringify(ip)} is not an IPv4 address`);
  return ip;
}

function checkedId(id: string): string {
  if (!SANDBOX_ID.test(id)) throw new Error(`sandbox id ${JSON.stringify(id)} is not lowercase letters and digits`);
  return id;
}

/** The chain of sandbox `id`; its sets are `<chain>_deny`, `<chain>_allow` and `<chain>_dns`. */
export function sandboxChain(id: string): string {
  return `s_${checkedId(id)}`;
}

/** The chain of sandbox `id` that redirects its ports 80 and 443 to the name proxy. */
function natChain(id: string): string {
  return `n_${checkedId(id)}`;
}

const elements = (items: readonly string[]) => `{ ${items.join(', ')} }`;

/**
 * The transaction that creates or refreshes the table's fixed part. Sandbox chains, their sets and
 * the `by_source` map are kept, so sandboxes running through a server restart keep their rules.
 * Pure: table tested; `EgressFirewall.setUp` runs it.
 */
export function egressBaseScript(opts: EgressFirewallOptions, proxy?: ProxyPorts): string {
  const table = `ip ${tapGuardTable(opts.bridge)}`;
  const bridge = opts.bridge;
  if (!INTERFACE.test(bridge)) throw new Error(`bridge ${JSON.stringify(bridge)} is not an interface name`);
  const gateway = checkedAddress(opts.gateway);
  if (!CIDR.test(opts.networkCidr)) throw new Error(`${JSON.stringify(opts.networkCidr)} is not an IPv4 CIDR`);
  const port = opts.dnsPort ?? 53;
  const lines = [
    `add table ${table}`,
    `add set ${table} refused { type ipv4_addr; flags interval; auto-merge; }`,
    `flush set ${table} refused`,
    `add element ${table} refused ${elements([...ALWAYS_REFUSED, opts.networkCidr])}`,
    `add set ${table} private { type ipv4_addr; flags interval; auto-merge; }`,
    `flush set ${table} private`,
    `add element ${table} private ${elements(PRIVATE_RANGES)}`,
    `add map ${table} by_source { type ipv4_addr : verdict; }`,
    // Sandboxes whose ports 80 and 443 go through the name proxy, and where it listens.
    `add map ${table} sni_by_source { type ipv4_addr : verdict; }`,
    `add map ${table} proxy_ports { type inet_service : inet_service; }`,
    `flush map ${table} proxy_ports`,
    ...(proxy ? [`add element ${table} proxy_ports { 80 : ${proxy.http}, 443 : ${proxy.tls} }`] : []),
    `add chain ${table} from_sandbox`,
    `flush chain ${table} from_sandbox`,
    `add rule ${table} from_sandbox ip daddr @refused ${REJECT}`,
    `add rule ${table} from_sandbox ip saddr vmap @by_source`,
    `add rule ${table} from_sandbox drop`,
    `add chain ${table} prerouting { type nat hook prerouting priority dstnat - 10; policy accept; }`,
    `flush chain ${table} prerouting`,
    `add rule ${table} prerouting iifname "${bridge}" meta l4proto { tcp, udp } th dport 53 dnat to ${gateway}:${port}`,
    `add rule ${table} prerouting iifname "${bridge}" ip saddr vmap @sni_by_source`,
    `add chain ${table} input { type filter hook input priority filter - 10; policy accept; }`,
    `flush chain ${table} input`,
    `add rule ${table} input iifname != "${bridge}" accept`,
    `add rule ${table} input ct state established,related accept`,
    `add rule ${table} input ip daddr ${gateway} meta l4proto { tcp, udp } th dport ${port} accept`,
    // The name proxy only for connections the prerouting redirect sent there: a sandbox dialling its ports is refused.
    ...(proxy ? [`add rule ${table} input ip daddr ${gateway} tcp dport { ${proxy.http}, ${proxy.tls} } ct status dnat accept`] : []),
    `add rule ${table} input ${REJECT}`,
    `add chain ${table} forward { type filter hook forward priority filter - 10; policy accept; }`,
    `flush chain ${table} forward`,
    `add rule ${table} forward iifname "${bridge}" jump from_sandbox`,
    `add rule ${table} forward oifname "${bridge}" ct state established,related accept`,
    `add rule ${table} forward oifname "${bridge}" drop`,
  ];
  return lines.join('\n') + '\n';
}

/** One DNS answer's additions to its sandbox's set of opened addresses. */
interface DnsAddition {
  ip: string;
  /** The policy that allowed the name: nothing is written once the sandbox has another. */
  policy: NetworkPolicy;
  lines: string[];
}

/** What `sandboxScript` needs to know of the table as it is and of the name proxy. */
export interface SandboxScriptContext {
  /** Addresses mapped in `by_source` now that must go first (the sandbox's old ones, and its new one if another sandbox held it). */
  unmap?: readonly string[];
  /** The same for `sni_by_source`. */
  unmapProxied?: readonly string[];
  /** Set when the name proxy runs: its gateway address, to which ports 80 and 443 are redirected. */
  proxyGateway?: string;
  /** SANDBOX_PRIVATE_ALLOW: what of the private ranges the policy's allow CIDRs may open; absent: none. */
  privateAllow?: readonly string[];
}

/**
 * The transaction that installs (or replaces) one sandbox's rules and points its address at them;
 * with the name proxy running and domains allowed under `egress: deny`, also its redirect of ports
 * 80 and 443 (chain `n_<id>`, except to its allow CIDRs). Allow CIDRs inside private ranges open
 * only what `context.privateAllow` holds of them, whatever the policy stored says. Pure: table tested.
 */
export function sandboxScript(bridge: string, sandbox: { id: string; ip: string }, policy: NetworkPolicy, context: SandboxScriptContext = {}): string {
  const table = `ip ${tapGuardTable(bridge)}`;
  const chain = sandboxChain(sandbox.id);
  const ip = checkedAddress(sandbox.ip);
  const cidrs = (rules: readonly string[]) => rules.filter(isCidrRule).map((r) => (CIDR.test(r) ? r : checkedAddress(r)));
  const deny = cidrs(policy.deny);
  const allow = cidrs(policy.allow).flatMap((cidr) => allowedParts(cidr, context.privateAllow));
  const lines = [
    `add chain ${table} ${chain}`,
    `flush chain ${table} ${chain}`,
    `add set ${table} ${chain}_deny { type ipv4_addr; flags interval; auto-merge; }`,
    `flush set ${table} ${chain}_deny`,
    `add set ${table} ${chain}_allow { type ipv4_addr; flags interval; auto-merge; }`,
    `flush set ${table} ${chain}_allow`,
    // A changed policy drops what earlier answers opened: names it still allows open again when looked up.
    `add set ${table} ${chain}_dns { type ipv4_addr; flags timeout; size ${MAX_RESOLVED_PER_SANDBOX}; }`,
    `flush set ${table} ${chain}_dns`,
  ];
  if (deny.length) lines.push(`add element ${table} ${chain}_deny ${elements(deny)}`);
  if (allow.length) lines.push(`add element ${table} ${chain}_allow ${elements(allow)}`);
  if (policy.egressCut) {
    lines.push(`add rule ${table} ${chain} counter ${REJECT} comment "egress cut: maxEgressBytes reached"`);
  } else {
    lines.push(
      `add rule ${table} ${chain} ip daddr @${chain}_deny ${REJECT}`,
      `add rule ${table} ${chain} ip daddr @${chain}_allow accept`,
      `add rule ${table} ${chain} ip daddr @private ${REJECT}`,
      `add rule ${table} ${chain} ip daddr @${chain}_dns accept`,
      `add rule ${table} ${chain} ${policy.egress === 'allow' ? 'accept' : REJECT}`,
    );
  }
  for (const old of context.unmap ?? []) lines.push(`delete element ${table} by_source { ${checkedAddress(old)} }`);
  lines.push(`add element ${table} by_source { ${ip} : jump ${chain} }`);
  const nat = natChain(sandbox.id);
  for (const old of context.unmapProxied ?? []) lines.push(`delete element ${table} sni_by_source { ${checkedAddress(old)} }`);
  if (context.proxyGateway && viaProxy(policy)) {
    lines.push(
      `add chain ${table} ${nat}`,
      `flush chain ${table} ${nat}`,
      `add rule ${table} ${nat} ip daddr @refused return`,
      `add rule ${table} ${nat} ip daddr @${chain}_allow return`,
      `add rule ${table} ${nat} tcp dport { 80, 443 } dnat to ${checkedAddress(context.proxyGateway)} : tcp dport map @proxy_ports`,
      `add element ${table} sni_by_source { ${ip} : jump ${nat} }`,
    );
  } else {
    // Adding before deleting makes the delete safe whether or not the chain existed.
    lines.push(`add chain ${table} ${nat}`, `delete chain ${table} ${nat}`);
  }
  return lines.join('\n') + '\n';
}

function ipv4Number(ip: string): number {
  return ip.split('.').reduce((n, octet) => n * 256 + Number(octet), 0);
}

function ipv4String(n: number): string {
  return [24, 16, 8, 0].map((shift) => Math.floor(n / 2 ** shift) % 256).join('.');
}

/**
 * What an allow CIDR opens, as set elements: when it lies inside a private range (it names that
 * range explicitly), its overlap with `privateAllow` (SANDBOX_PRIVATE_ALLOW: none when absent);
 * else itself without the private ranges it contains — so `0.0.0.0/0` ("all of the internet")
 * opens public addresses only, never the host's private networks.
 */
export function allowedParts(cidr: string, privateAllow: readonly string[] = []): string[] {
  // Two CIDRs overlap only when one lies inside the other: the overlap is the smaller one.
  if (insidePrivateRange(cidr)) return privateAllow.flatMap((allowed) => (cidrWithin(cidr, allowed) ? [cidr] : cidrWithin(allowed, cidr) ? [allowed] : []));
  const [first, last] = cidrBounds(cidr);
  const contained = PRIVATE_RANGES.map(cidrBounds).filter(([lo, hi]) => lo >= first && hi <= last);
  if (contained.length === 0) return [cidr];
  let parts: Array<[number, number]> = [[first, last]];
  for (const [lo, hi] of contained) {
    parts = parts.flatMap(([a, b]): Array<[number, number]> => {
      if (lo > b || hi < a) return [[a, b]];
      const kept: Array<[number, number]> = [];
      if (a < lo) kept.push([a, lo - 1]);
      if (b > hi) kept.push([hi + 1, b]);
      return kept;
    });
  }
  return parts.map(([a, b]) => (a === b ? ipv4String(a) : `${ipv4String(a)}-${ipv4String(b)}`));
}

/** Whether `ip` lies in `cidr` (both IPv4, the CIDR canonical). */
export function inCidr(ip: string, cidr: string): boolean {
  const [base = '', bits = '32'] = cidr.split('/');
  const size = 2 ** (32 - Number(bits));
  return Math.floor(ipv4Number(ip) / size) === Math.floor(ipv4Number(base) / size);
}

/** The IPv4 addresses of this host's interfaces (in the server's network namespace), read now. */
export function hostAddresses(): Set<string> {
  const own = new Set<string>();
  for (const addresses of Object.values(networkInterfaces())) for (const a of addresses ?? []) if (a.family === 'IPv4') own.add(a.address);
  return own;
}

/**
 * Whether the sandbox may be connected to `ip` on a name's behalf (the name proxy, which connects
 * from the host itself, past the input hook that keeps sandboxes off the host): never an address
 * of the host (read at each call), an always-refused address or the sandbox network, a private one
 * only inside an allow CIDR lying in a private range (`0.0.0.0/0` opens none) and inside
 * `privateAllow` (SANDBOX_PRIVATE_ALLOW: none when absent), never inside its deny CIDRs.
 */
export function addressUsable(ip: string, policy: NetworkPolicy, networkCidr: string, privateAllow: readonly string[] = []): boolean {
  if (!IPV4.test(ip) || [...ALWAYS_REFUSED, networkCidr].some((c) => inCidr(ip, c)) || hostAddresses().has(ip)) return false;
  if (policy.deny.some((r) => isCidrRule(r) && inCidr(ip, r))) return false;
  if (!PRIVATE_RANGES.some((c) => inCidr(ip, c))) return true;
  return privateAllow.some((c) => inCidr(ip, c)) && policy.allow.some((r) => isCidrRule(r) && insidePrivateRange(r) && inCidr(ip, r));
}

/** The transaction that removes one sandbox's rules: its address mapping, chain and sets. */
export function removalScript(bridge: string, id: string, held: { ips: readonly string[]; proxiedIps?: readonly string[]; chain: boolean; natChain?: boolean; sets: readonly string[] }): string {
  const table = `ip ${tapGuardTable(bridge)}`;
  const chain = sandboxChain(id);
  const lines = held.ips.map((ip) => `delete element ${table} by_source { ${checkedAddress(ip)} }`);
  for (const ip of held.proxiedIps ?? []) lines.push(`delete element ${table} sni_by_source { ${checkedAddress(ip)} }`);
  // The chains go before the sets their rules name.
  if (held.chain) lines.push(`delete chain ${table} ${chain}`);
  if (held.natChain) lines.push(`delete chain ${table} ${natChain(id)}`);
  for (const set of held.sets) if (set.startsWith(`${chain}_`)) lines.push(`delete set ${table} ${set}`);
  return lines.join('\n') + '\n';
}

/** What the table holds of sandboxes: their chains' ids and which address maps to which id. */
export interface EgressTableState {
  exists: boolean;
  /** Sandbox ids with a chain. */
  chains: string[];
  /** Set names of sandboxes (`s_<id>_…`). */
  sets: string[];
  /** Address → sandbox id, from `by_source`. */
  sources: Map<string, string>;
  /** Sandbox ids with a redirect chain (`n_<id>`) for the name proxy. */
  natChains: string[];
  /** Address → sandbox id, from `sni_by_source`. */
  proxied: Map<string, string>;
}

interface NftJsonEntry {
  chain?: { name?: unknown };
  set?: { name?: unknown; type?: unknown };
  map?: { name?: unknown; elem?: unknown };
}

/** Reads the table's sandbox chains, sets and address mappings (an empty state when there is no table). */
export async function readEgressTable(bridge: string, netns?: string): Promise<EgressTableState> {
  const table = tapGuardTable(bridge);
  const out = await listTable(table, netns);
  if (out === null) return { exists: false, chains: [], sets: [], sources: new Map(), natChains: [], proxied: new Map() };
  const entries = ((JSON.parse(out) as { nftables?: NftJsonEntry[] }).nftables ?? []) as NftJsonEntry[];
  const chains: string[] = [];
  const sets: string[] = [];
  const sources = new Map<string, string>();
  const natChains: string[] = [];
  const proxied = new Map<string, string>();
  for (const e of entries) {
    const chain = typeof e.chain?.name === 'string' ? /^s_([a-z0-9]+)$/.exec(e.chain.name)?.[1] : undefined;
    if (chain) chains.push(chain);
    const nat = typeof e.chain?.name === 'string' ? /^n_([a-z0-9]+)$/.exec(e.chain.name)?.[1] : undefined;
    if (nat) natChains.push(nat);
    if (typeof e.set?.name === 'string' && /^s_[a-z0-9]+_(deny|allow|dns)$/.test(e.set.name)) sets.push(e.set.name);
    const into = e.map?.name === 'by_source' ? sources : e.map?.name === 'sni_by_source' ? proxied : null;
    if (into && Array.isArray(e.map!.elem)) {
      for (const pair of e.map!.elem as unknown[]) {
        // [address, { jump: { target: "s_<id>" } }]
        if (!Array.isArray(pair) || typeof pair[0] !== 'string') continue;
        const target = (pair[1] as { jump?: { target?: unknown } } | undefined)?.jump?.target;
        const id = typeof target === 'string' ? /^[sn]_([a-z0-9]+)$/.exec(target)?.[1] : undefined;
        if (id) into.set(pair[0], id);
      }
    }
  }
  return { exists: true, chains, sets, sources, natChains, proxied };
}

/** `nft -j list table ip <table>` (in `netns`), or null when there is no such table. */
function listTable(table: string, netns?: string): Promise<string | null> {
  const argv = [...(netns ? ['ip', 'netns', 'exec', netns] : []), 'nft', '-j', 'list', 'table', 'ip', table];
  const env = { ...process.env, PATH: [process.env.PATH, '/usr/sbin', '/sbin'].filter(Boolean).join(':') };
  return new Promise((resolve, reject) => {
    execFile(argv[0]!, argv.slice(1), { env, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (!err) resolve(stdout);
      // No such table, or no nft at all (then there can be no table either).
      else if (/No such file or directory/.test(stderr) || (err as NodeJS.ErrnoException).code === 'ENOENT') resolve(null);
      else reject(new Error(`nft list table ip ${table} failed: ${stderr.trim().split('\n')[0] || err.message}`));
    });
  });
}

/** Deletes the bridge's egress table (setup-net --down); false when there was none. */
export async function removeEgressTable(bridge: string, netns?: string): Promise<boolean> {
  if (!(await readEgressTable(bridge, netns)).exists) return false;
  await runNft(`delete table ip ${tapGuardTable(bridge)}\n`, netns);
  return true;
}

/**
 * `SandboxFirewall` with nftables, plus what the DNS resolver needs: which sandbox (and policy) an
 * address belongs to, and opening the addresses its answers gave.
 */
export class EgressFirewall implements SandboxFirewall {
  readonly #bySource = new Map<string, { id: string; policy: NetworkPolicy }>();
  readonly #ipOf = new Map<string, string>();
  /** By sandbox id: the addresses its DNS answers opened, and when each closes (ms). */
  readonly #opened = new Map<string, Map<string, number>>();
  /** One transaction at a time, in order: a later policy always lands after an earlier one. */
  #queue: Promise<unknown> = Promise.resolve();
  #proxy: ProxyPorts | undefined;
  /** DNS answers' additions waiting for their transaction (all sandboxes in one); null when none waits. */
  #batch: { entries: DnsAddition[]; done: Promise<Map<DnsAddition, true | Error>> } | null = null;
  /** Additions being written, by `<sandbox id> <address>`: a concurrent answer naming the address waits for that write. */
  readonly #writing = new Map<string, Promise<boolean>>();
  /** nft transactions run for DNS answers so far. */
  dnsTransactions = 0;

  constructor(private readonly opts: EgressFirewallOptions) {}

  get bridge(): string {
    return this.opts.bridge;
  }

  /** Runs `fn` after every change queued before it and before any queued after (reads and writes of the table in order). */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn);
    this.#queue = run.catch(() => {});
    return run;
  }

  #nft(script: string): Promise<string> {
    return this.#exclusive(() => runNft(script, this.opts.netns));
  }

  /**
   * Creates or refreshes the table's fixed part (idempotent); sandboxes' rules are kept. DNS goes
   * to the resolver's `dnsPort` (53 unless given). With `proxy`, ports 80 and 443 of sandboxes that allow domains under `egress: deny` go to the name
   * proxy there.
   */
  async setUp(proxy?: ProxyPorts, dnsPort?: number): Promise<void> {
    await this.#nft(egressBaseScript({ ...this.opts, ...(dnsPort ? { dnsPort } : {}) }, proxy));
    this.#proxy = proxy;
  }

  async apply(sandbox: FirewalledSandbox, policy: NetworkPolicy): Promise<void> {
    checkedAddress(sandbox.ip);
    const previousIp = await this.#exclusive(async () => {
      const { sources, proxied } = await readEgressTable(this.opts.bridge, this.opts.netns);
      const stale = (map: Map<string, string>) => [...map].filter(([ip, owner]) => owner === sandbox.id || ip === sandbox.ip).map(([ip]) => ip);
      const context = { unmap: stale(sources), unmapProxied: stale(proxied), privateAllow: this.opts.privateAllow ?? [], ...(this.#proxy ? { proxyGateway: this.opts.gateway } : {}) };
      await runNft(sandboxScript(this.opts.bridge, sandbox, policy, context), this.opts.netns);
      // Known before the next queued change runs (allowResolved checks the policy it was given is still this one).
      const previous = this.#ipOf.get(sandbox.id);
      if (previous) this.#bySource.delete(previous);
      // The transaction emptied its set of opened addresses.
      this.#opened.delete(sandbox.id);
      this.#ipOf.set(sandbox.id, sandbox.ip);
      this.#bySource.set(sandbox.ip, { id: sandbox.id, policy });
      return previous;
    });
    if (previousIp && previousIp !== sandbox.ip) this.opts.onChange?.(previousIp);
    this.opts.onChange?.(sandbox.ip);
  }

  async remove(id: string): Promise<void> {
    checkedId(id);
    const known = this.#ipOf.get(id);
    this.#ipOf.delete(id);
    this.#opened.delete(id);
    if (known && this.#bySource.get(known)?.id === id) this.#bySource.delete(known);
    if (known) this.opts.onChange?.(known);
    await this.#exclusive(async () => {
      const state = await readEgressTable(this.opts.bridge, this.opts.netns);
      const owned = (map: Map<string, string>) => [...map].filter(([, owner]) => owner === id).map(([ip]) => ip);
      const held = { ips: owned(state.sources), proxiedIps: owned(state.proxied), chain: state.chains.includes(id), natChain: state.natChains.includes(id), sets: state.sets.filter((s) => s.startsWith(`${sandboxChain(id)}_`)) };
      if (held.chain || held.natChain || held.ips.length > 0 || held.proxiedIps.length > 0 || held.sets.length > 0) await runNft(removalScript(this.opts.bridge, id, held), this.opts.netns);
    });
  }

  /**
   * Replaces the policy of a sandbox whose rules are in (its address known); a sandbox without
   * rules gets its policy when it is next attached. False when it has none.
   */
  async update(id: string, policy: NetworkPolicy): Promise<boolean> {
    const ip = this.#ipOf.get(id);
    if (!ip) return false;
    await this.apply({ id, ip, hostIf: '' }, policy);
    return true;
  }

  /**
   * Takes up the rules a previous server process left for sandboxes that still run: each listed
   * sandbox whose address is mapped in the table is known again (for the resolver and `update`)
   * and its rules are rewritten with `policy`. Resolves to the ids taken up.
   */
  async restore(sandboxes: ReadonlyArray<{ id: string; policy: NetworkPolicy }>): Promise<string[]> {
    const { sources } = await readEgressTable(this.opts.bridge, this.opts.netns);
    const ipOf = new Map([...sources].map(([ip, id]) => [id, ip]));
    const restored: string[] = [];
    for (const { id, policy } of sandboxes) {
      const ip = ipOf.get(id);
      if (!ip) continue;
      await this.apply({ id, ip, hostIf: '' }, policy);
      restored.push(id);
    }
    return restored;
  }

  /** Every sandbox whose rules are in, with its policy as last applied. */
  sandboxes(): Array<{ id: string; ip: string; policy: NetworkPolicy }> {
    return [...this.#bySource].map(([ip, { id, policy }]) => ({ id, ip, policy }));
  }

  /** The sandbox at `ip` and its policy, as last applied; null for an address that is no sandbox's. */
  policyAt(ip: string): { id: string; policy: NetworkPolicy } | null {
    return this.#bySource.get(ip) ?? null;
  }

  /**
   * Opens `addresses` for the sandbox at `ip` for their TTLs (clamped to 30 s .. 1 h), refreshing
   * the timeout of addresses already open; with `asked` (the policy the query was allowed under),
   * only while that is still the policy at `ip`. Resolves once the rules are in, so the answer that
   * named them can be sent. Nothing is written when it would change nothing: under `egress: allow`
   * (every public address is open anyway) and for addresses open for at least half their new TTL,
   * so a sandbox repeating a lookup costs no nft run; an answer naming an address whose write is
   * under way waits for that write. The additions of all answers arriving while a transaction runs
   * go into the next one together, so a flood of answers never queues a transaction per answer
   * in front of a policy change.
   */
  async allowResolved(ip: string, addresses: readonly ResolvedAddress[], asked?: NetworkPolicy): Promise<void> {
    const owner = this.#bySource.get(ip);
    // An answer to a query asked under another policy (or by the address's previous sandbox) opens nothing.
    if (!owner || (asked && owner.policy !== asked) || owner.policy.egress === 'allow' || owner.policy.egressCut) return;
    const opened = this.#opened.get(owner.id) ?? new Map<string, number>();
    this.#opened.set(owner.id, opened);
    const now = Date.now();
    const waits: Promise<boolean>[] = [];
    const due = addresses
      .filter((a) => IPV4.test(a.address))
      .slice(0, 64)
      .map(({ address, ttl }) => ({ address, timeout: Math.min(DNS_TIMEOUT_MAX_SEC, Math.max(DNS_TIMEOUT_MIN_SEC, Math.floor(ttl))) }))
      .filter(({ address, timeout }) => (opened.get(address) ?? 0) < now + (timeout * 1000) / 2)
      .filter(({ address }) => {
        const pending = this.#writing.get(`${owner.id} ${address}`);
        if (pending) waits.push(pending);
        return !pending;
      });
    if (due.length === 0) {
      await Promise.all(waits);
      return;
    }
    const set = `ip ${tapGuardTable(this.opts.bridge)} ${sandboxChain(owner.id)}_dns`;
    const lines: string[] = [];
    for (const { address, timeout } of due) {
      // Add, delete, add: refreshes the timeout of an address already open.
      lines.push(`add element ${set} { ${address} timeout ${timeout}s }`, `delete element ${set} { ${address} }`, `add element ${set} { ${address} timeout ${timeout}s }`);
    }
    const write = this.#addDns({ ip, policy: owner.policy, lines }).then((written) => {
      if (written) {
        if (opened.size > MAX_RESOLVED_PER_SANDBOX) for (const [address, expires] of opened) if (expires <= now) opened.delete(address);
        for (const { address, timeout } of due) opened.set(address, now + timeout * 1000);
      }
      return written;
    });
    const keys = due.map(({ address }) => `${owner.id} ${address}`);
    for (const key of keys) this.#writing.set(key, write);
    const forget = () => keys.forEach((key) => this.#writing.get(key) === write && this.#writing.delete(key));
    write.then(forget, forget);
    await Promise.all([write, ...waits]);
  }

  /**
   * Queues `addition` for the next DNS transaction (started after the changes queued before it);
   * true once written, false when the policy that allowed the name was replaced first. A batch
   * nft refuses is retried one sandbox at a time, so one sandbox's failing addition (its set
   * full) fails only its own answers.
   */
  #addDns(addition: DnsAddition): Promise<boolean> {
    if (!this.#batch) {
      const batch: { entries: DnsAddition[]; done: Promise<Map<DnsAddition, true | Error>> } = { entries: [], done: Promise.resolve(new Map()) };
      batch.done = this.#exclusive(async () => {
        if (this.#batch === batch) this.#batch = null;
        // Written only if the policy that allowed the name is still the sandbox's when its turn comes.
        const live = batch.entries.filter((e) => this.#bySource.get(e.ip)?.policy === e.policy);
        const outcome = new Map<DnsAddition, true | Error>();
        if (live.length === 0) return outcome;
        try {
          this.dnsTransactions++;
          await runNft(live.flatMap((e) => e.lines).join('\n') + '\n', this.opts.netns);
          for (const e of live) outcome.set(e, true);
        } catch (err) {
          if (live.length === 1) outcome.set(live[0]!, err as Error);
          else {
            for (const e of live) {
              this.dnsTransactions++;
              await runNft(e.lines.join('\n') + '\n', this.opts.netns).then(
                () => outcome.set(e, true),
                (failed: Error) => outcome.set(e, failed),
              );
            }
          }
        }
        return outcome;
      });
      this.#batch = batch;
    }
    this.#batch.entries.push(addition);
    return this.#batch.done.then((outcome) => {
      const result = outcome.get(addition);
      if (result instanceof Error) throw result;
      return result === true;
    });
  }

  /** Removes the rules of sandboxes not in `keep` (those gone while no server ran); one line per removal. */
  async reconcile(keep: ReadonlySet<string>): Promise<string[]> {
    const state = await readEgressTable(this.opts.bridge, this.opts.netns);
    const setOwners = state.sets.map((s) => /^s_([a-z0-9]+)_/.exec(s)![1]!);
    const gone = new Set([...state.chains, ...state.natChains, ...state.sources.values(), ...state.proxied.values(), ...setOwners].filter((id) => !keep.has(id)));
    for (const id of gone) await this.remove(id);
    return [...gone].map((id) => `removed the egress rules of sandbox ${id}`);
  }
}
