import { execFile } from 'node:child_process';
import { z } from 'zod';
import { isObjectIdHex } from '../../store/ids.js';
import { formatIpv4, formatIpv4Network, parseIpv4Cidr } from './ip-pool.js';
import { removeEgressTable } from './egress-firewall.js';
import { removeTapGuardTable, tapGuardTable } from './tap-guard.js';

/*
 * The host side of sandbox networking: one Linux bridge whose address is the guests' gateway,
 * IPv4 forwarding, NAT out of any other interface, and one TAP device per VM attached to the
 * bridge (containers' veth pairs: sandbox-net.ts). Everything runs `ip`, `iptables` and `sysctl` with argument arrays (never a shell),
 * optionally inside a network namespace (`ip netns exec <netns> …`), which is how the tests keep
 * the host's own interfaces and firewall untouched.
 *
 * setUp/tearDown are idempotent: each step looks before it changes anything and reports what it
 * changed, so a second run reports nothing.
 */

/** Every iptables rule we add carries this comment, so our rules can be told from anyone else's. */
export const RULE_COMMENT = 'voidrun';

/** Linux's IFNAMSIZ is 16 bytes including the terminating NUL. */
const MAX_INTERFACE_NAME = 15;

const INSTALL_HINT = 'npm run setup installs iproute2 and iptables';

/** A host command that failed; the message names the command and the first line of its stderr. */
export class HostCommandError extends Error {
  override name = 'HostCommandError';
  constructor(
    message: string,
    readonly command: string,
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super(message);
  }
}

export interface HostNetworkOptions {
  /** BRIDGE_NAME, e.g. `vmbr0`. */
  bridge: string;
  /** GATEWAY_IP: the bridge's address with the guests' prefix length, e.g. `192.168.100.1/22`. */
  gatewayCidr: string;
  /** NETWORK_CIDR: the guests' network, masqueraded on the way out, e.g. `192.168.100.0/22`. */
  networkCidr: string;
  /** Run every command inside this network namespace instead of the host's own. */
  netns?: string;
}

interface CommandOutcome {
  exitCode: number;
  stdout: string;
  stderr: string;
}

// `ip`, `iptables` and `sysctl` live in sbin, which a non-root user's PATH often lacks.
const commandEnv = { ...process.env, PATH: [process.env.PATH, '/usr/sbin', '/sbin'].filter(Boolean).join(':') };

/** Runs one command (in `netns` when given) and reports how it ended; throws only when it cannot start. */
function exec(netns: string | undefined, command: string, args: readonly string[], input?: string): Promise<CommandOutcome> {
  const [file, ...argv] = inNamespace(netns, command, args);
  const shown = [file, ...argv].join(' ');
  return new Promise((resolve, reject) => {
    const child = execFile(file, argv, { env: commandEnv, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err && typeof err.code === 'string') {
        // The binary itself is missing (ENOENT) or not executable.
        reject(new HostCommandError(`${file} cannot be run (${err.code}): ${INSTALL_HINT}`, shown, null, stderr));
        return;
      }
      const exitCode = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      // `ip netns exec` reports a command it cannot start on stderr rather than by ENOENT.
      const notStarted = netns && exitCode !== 0 ? /^exec of "[^"]+" failed: (.*)$/m.exec(stderr) : null;
      if (notStarted) {
        reject(new HostCommandError(`${command} cannot be run (${notStarted[1]}): ${INSTALL_HINT}`, shown, exitCode, stderr));
        return;
      }
      resolve({ exitCode, stdout, stderr });
    });
    // A command that never reads its input (or is gone) must not fail the write.
    child.stdin?.on('error', () => {});
    child.stdin?.end(input);
  });
}

/** The argv that runs `command` in `netns`, or on the host when there is none. */
function inNamespace(netns: string | undefined, command: string, args: readonly string[]): [string, ...string[]] {
  return netns ? ['ip', 'netns', 'exec', netns, command, ...args] : [command, ...args];
}

function firstLine(text: string): string {
  return text.trim().split('\n')[0] ?? '';
}

/** Runs one command and returns its stdout; a non-zero exit throws `HostCommandError`. */
async function run(netns: string | undefined, command: string, args: readonly string[], input?: string): Promise<string> {
  const outcome = await exec(netns, command, args, input);
  if (outcome.exitCode !== 0) throw failure(netns, command, args, outcome);
  return outcome.stdout;
}

/**
 * Runs `command` on the host (or in `netns`), `input` on its stdin (e.g. `ip -batch -` lines),
 * and returns its stdout; a non-zero exit throws `HostCommandError` naming it.
 */
export function runNetworkCommand(command: string, args: readonly string[], netns?: string, input?: string): Promise<string> {
  return run(netns, command, args, input);
}

function failure(netns: string | undefined, command: string, args: readonly string[], outcome: CommandOutcome): HostCommandError {
  const shown = inNamespace(netns, command, args).join(' ');
  const reason = firstLine(outcome.stderr) || `exit code ${outcome.exitCode}`;
  return new HostCommandError(`${shown} failed: ${reason}`, shown, outcome.exitCode, outcome.stderr);
}

// The parts of `ip -j` output we read.
const IpLinkSchema = z.object({
  ifname: z.string(),
  flags: z.array(z.string()).default([]),
  master: z.string().optional(),
  linkinfo: z.object({ info_kind: z.string().optional(), info_data: z.object({ type: z.string().optional() }).optional() }).optional(),
});
const IpAddrSchema = z.object({
  ifname: z.string(),
  addr_info: z.array(z.object({ family: z.string(), local: z.string(), prefixlen: z.number() })).default([]),
});

export type IpLink = z.infer<typeof IpLinkSchema>;

function parseJson<T>(schema: z.ZodType<T>, text: string, what: string): T {
  let value: unknown;
  try {
    value = JSON.parse(text.trim() || '[]');
  } catch (err) {
    throw new Error(`Unexpected output from ${what}: not JSON`, { cause: err });
  }
  const result = schema.safeParse(value);
  if (!result.success) throw new Error(`Unexpected output from ${what}: ${result.error.issues[0]?.message ?? 'wrong shape'}`);
  return result.data;
}

/** The link named `name` with its details (`ip -j -d link show`), or null when there is none. */
export async function findLink(name: string, netns?: string): Promise<IpLink | null> {
  const args = ['-j', '-d', 'link', 'show', 'dev', name];
  const outcome = await exec(netns, 'ip', args);
  if (outcome.exitCode !== 0) {
    if (/does not exist/.test(outcome.stderr)) return null;
    throw failure(netns, 'ip', args, outcome);
  }
  return parseJson(z.array(IpLinkSchema), outcome.stdout, 'ip link show')[0] ?? null;
}

/** One iptables rule: where it goes and its match-and-target part, without `-A`/`-C`/`-D`. */
export interface IptablesRule {
  table: 'filter' | 'nat';
  chain: string;
  spec: string[];
}

/**
 * The rules `setUp` adds for guests on `bridge` reaching the internet through any other interface
 * (as Docker does: whichever uplink the host's routes pick, also one that changes later), and
 * replies coming back.
 */
export function voidrunRules(opts: { bridge: string; networkCidr: string }): IptablesRule[] {
  const tag = ['-m', 'comment', '--comment', RULE_COMMENT];
  return [
    { table: 'nat', chain: 'POSTROUTING', spec: ['-s', normalizedNetwork(opts.networkCidr), '!', '-o', opts.bridge, ...tag, '-j', 'MASQUERADE'] },
    { table: 'filter', chain: 'FORWARD', spec: ['-i', opts.bridge, '!', '-o', opts.bridge, ...tag, '-j', 'ACCEPT'] },
    {
      table: 'filter',
      chain: 'FORWARD',
      spec: ['!', '-i', opts.bridge, '-o', opts.bridge, '-m', 'conntrack', '--ctstate', 'RELATED,ESTABLISHED', ...tag, '-j', 'ACCEPT'],
    },
  ];
}

function normalizedNetwork(cidr: string): string {
  const parsed = parseIpv4Cidr(cidr);
  if (!parsed) throw new Error(`${JSON.stringify(cidr)} is not an IPv4 CIDR like 192.168.100.0/22`);
  return formatIpv4Network(parsed.network);
}

function showRule(verb: '-A' | '-D', rule: IptablesRule): string {
  return ['iptables', '-t', rule.table, verb, rule.chain, ...rule.spec].join(' ');
}

// `-w` waits for the xtables lock instead of failing when another iptables runs at the same time.
async function ruleExists(rule: IptablesRule, netns?: string): Promise<boolean> {
  const args = ['-w', '-t', rule.table, '-C', rule.chain, ...rule.spec];
  const outcome = await exec(netns, 'iptables', args);
  // `-C` exits 1 when no rule matches; anything else is a real failure.
  if (outcome.exitCode === 1) return false;
  if (outcome.exitCode !== 0) throw failure(netns, 'iptables', args, outcome);
  return true;
}

/**
 * Brings up the bridge (IPv6 off: guests have IPv4 only), its address, IPv4 forwarding and the NAT
 * and FORWARD rules, changing only what is missing. Resolves to one line per change made (empty
 * when everything was in place).
 */
export async function setUp(opts: HostNetworkOptions): Promise<string[]> {
  const { bridge, netns } = opts;
  const gateway = parseIpv4Cidr(opts.gatewayCidr);
  if (!gateway) throw new Error(`${JSON.stringify(opts.gatewayCidr)} is not an IPv4 address with a prefix length like 192.168.100.1/22`);
  checkInterfaceName(bridge);
  const rules = voidrunRules({ bridge, networkCidr: opts.networkCidr });
  const changes: string[] = [];

  const link = await findLink(bridge, netns);
  if (!link) {
    await run(netns, 'ip', ['link', 'add', 'name', bridge, 'type', 'bridge']);
    changes.push(`created bridge ${bridge}`);
  } else if (link.linkinfo?.info_kind !== 'bridge') {
    throw new Error(`${bridge} exists and is not a bridge (${link.linkinfo?.info_kind ?? 'a physical interface'}): choose another BRIDGE_NAME`);
  }

  // A bridge whose address was never set takes the lowest MAC of its ports, so a sandbox joining
  // or leaving changes the gateway's MAC under every other sandbox's ARP cache (cut off until it
  // expires). Setting it (to the one it has) keeps it whatever the ports do.
  const assigned = await exec(netns, 'cat', [`/sys/class/net/${bridge}/addr_assign_type`]);
  if (assigned.exitCode === 0 && assigned.stdout.trim() !== '3') {
    const mac = (await exec(netns, 'cat', [`/sys/class/net/${bridge}/address`])).stdout.trim();
    if (/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/.test(mac)) {
      await run(netns, 'ip', ['link', 'set', 'dev', bridge, 'address', mac]);
      changes.push(`pinned the MAC address of ${bridge} (${mac})`);
    }
  }

  const gatewayAddress = formatIpv4(gateway.address);
  const [addresses] = parseJson(z.array(IpAddrSchema), await run(netns, 'ip', ['-j', 'addr', 'show', 'dev', bridge]), 'ip addr show');
  const hasGateway = (addresses?.addr_info ?? []).some((a) => a.family === 'inet' && a.local === gatewayAddress && a.prefixlen === gateway.network.prefixLength);
  if (!hasGateway) {
    const cidr = `${gatewayAddress}/${gateway.network.prefixLength}`;
    await run(netns, 'ip', ['addr', 'add', cidr, 'dev', bridge]);
    changes.push(`assigned ${cidr} to ${bridge}`);
  }

  // Absent when the kernel has no IPv6 at all.
  const ipv6 = await exec(netns, 'sysctl', ['-n', `net.ipv6.conf.${bridge}.disable_ipv6`]);
  if (ipv6.exitCode === 0 && ipv6.stdout.trim() !== '1') {
    await run(netns, 'sysctl', ['-q', '-w', `net.ipv6.conf.${bridge}.disable_ipv6=1`]);
    changes.push(`disabled IPv6 on ${bridge}`);
  }

  if (!(link?.flags.includes('UP') ?? false)) {
    await run(netns, 'ip', ['link', 'set', bridge, 'up']);
    changes.push(`brought ${bridge} up`);
  }

  if ((await run(netns, 'sysctl', ['-n', 'net.ipv4.ip_forward'])).trim() !== '1') {
    await run(netns, 'sysctl', ['-q', '-w', 'net.ipv4.ip_forward=1']);
    changes.push('enabled IPv4 forwarding (net.ipv4.ip_forward=1)');
  }

  for (const rule of rules) {
    if (await ruleExists(rule, netns)) continue;
    await run(netns, 'iptables', ['-w', '-t', rule.table, '-A', rule.chain, ...rule.spec]);
    changes.push(`added ${showRule('-A', rule)}`);
  }
  return changes;
}

/**
 * Removes what `setUp` added: our tagged rules for this bridge and network (also those of earlier
 * versions, which named the uplink) and the bridge. IPv4 forwarding stays on:
 * other things on the host (containers, VPNs, other VMs) may rely on it, and we cannot know whether
 * it was on before. Resolves to one line per change made.
 */
export async function tearDown(opts: HostNetworkOptions): Promise<string[]> {
  const { bridge, netns } = opts;
  const network = normalizedNetwork(opts.networkCidr);
  const changes: string[] = [];

  for (const [table, chain] of [['nat', 'POSTROUTING'], ['filter', 'FORWARD']] as const) {
    const listing = await run(netns, 'iptables', ['-w', '-t', table, '-S', chain]);
    for (const rule of ourRules(listing, table, chain)) {
      const mentions = (flag: string, value: string) => rule.spec.some((token, i) => token === flag && rule.spec[i + 1] === value);
      const ours = chain === 'POSTROUTING' ? mentions('-s', network) : mentions('-i', bridge) || mentions('-o', bridge);
      if (!ours) continue;
      await run(netns, 'iptables', ['-w', '-t', table, '-D', chain, ...rule.spec]);
      changes.push(`removed ${showRule('-D', rule)}`);
    }
  }

  if (await removeEgressTable(bridge, netns)) changes.push(`deleted the egress firewall (nftables table ip ${tapGuardTable(bridge)})`);
  if (await removeTapGuardTable(bridge, netns)) changes.push(`deleted the VM TAPs' source checks (nftables table netdev ${tapGuardTable(bridge)})`);

  const link = await findLink(bridge, netns);
  if (link) {
    if (link.linkinfo?.info_kind !== 'bridge') throw new Error(`${bridge} is not a bridge; leaving it alone`);
    await run(netns, 'ip', ['link', 'del', 'dev', bridge]);
    changes.push(`deleted bridge ${bridge}`);
  }
  return changes;
}

/** Our tagged rules in one chain of `iptables -S` output. */
function ourRules(listing: string, table: IptablesRule['table'], chain: string): IptablesRule[] {
  return listing
    .split('\n')
    .map((line) => line.trim().split(/\s+/))
    .filter((tokens) => tokens[0] === '-A' && tokens[1] === chain)
    .map((tokens) => ({ table, chain, spec: tokens.slice(2) }))
    .filter((rule) => rule.spec.some((token, i) => token === '--comment' && rule.spec[i + 1] === RULE_COMMENT));
}

function checkInterfaceName(name: string): void {
  if (!/^[A-Za-z0-9_.-]+$/.test(name) || name.length > MAX_INTERFACE_NAME) {
    throw new Error(`${JSON.stringify(name)} is not a usable interface name: at most ${MAX_INTERFACE_NAME} letters, digits, '_', '.' or '-'`);
  }
}

/**
 * The TAP device name of a sandbox: `prefix` (NET_PREFIX / TAP_PREFIX, one to three characters,
 * `vr` by default) and the last 12 hex digits of its id (an ObjectId, whose tail is a per-process
 * random part and a counter), at most 15 characters, within IFNAMSIZ.
 */
export function tapNameFor(sandboxId: string, prefix = 'vr'): string {
  if (!isObjectIdHex(sandboxId)) throw new Error(`Sandbox id ${JSON.stringify(sandboxId)} is not 24 hex digits`);
  if (!/^[a-z][a-z0-9]{0,2}$/.test(prefix)) throw new Error(`TAP prefix ${JSON.stringify(prefix)} must be one to three lowercase letters or digits`);
  return `${prefix}${sandboxId.slice(-12)}`;
}

/**
 * Creates TAP device `name` attached to `bridge` as an isolated port (`isolated on`: it exchanges
 * frames with the bridge itself, the gateway, and never with another isolated port, i.e. another
 * sandbox) and up. A TAP of that name left behind by a VM that died is reused; if attaching fails,
 * the TAP just created is removed again.
 */
export async function createTap(name: string, bridge: string, netns?: string): Promise<void> {
  checkInterfaceName(name);
  const existing = await findLink(name, netns);
  if (existing && !isTap(existing)) throw new Error(`${name} exists and is not a TAP device; leaving it alone`);
  if (!existing) await run(netns, 'ip', ['tuntap', 'add', 'dev', name, 'mode', 'tap']);
  try {
    await run(netns, 'ip', ['link', 'set', name, 'master', bridge, 'up']);
    await run(netns, 'ip', ['link', 'set', 'dev', name, 'type', 'bridge_slave', 'isolated', 'on']);
  } catch (err) {
    if (!existing) await exec(netns, 'ip', ['link', 'del', 'dev', name]).catch(() => {});
    throw err;
  }
}

/** Deletes TAP device `name`; resolves to false when there was none. Refuses to delete anything but a TAP. */
export async function deleteTap(name: string, netns?: string): Promise<boolean> {
  checkInterfaceName(name);
  const link = await findLink(name, netns);
  if (!link) return false;
  if (!isTap(link)) throw new Error(`${name} is not a TAP device; leaving it alone`);
  const args = ['link', 'del', 'dev', name];
  const outcome = await exec(netns, 'ip', args);
  // Gone in between (another delete won): the outcome callers asked for.
  if (outcome.exitCode !== 0 && /Cannot find device/.test(outcome.stderr)) return false;
  if (outcome.exitCode !== 0) throw failure(netns, 'ip', args, outcome);
  return true;
}

function isTap(link: IpLink): boolean {
  return link.linkinfo?.info_kind === 'tun' && link.linkinfo.info_data?.type === 'tap';
}
