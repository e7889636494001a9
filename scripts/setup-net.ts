/**
 * `npm run setup-net -- [--down] [--netns <name>]`: prepares this host's networking for microVM
 * sandboxes — the bridge BRIDGE_NAME with address GATEWAY_IP, IPv4 forwarding, and NAT of
 * NETWORK_CIDR out of any other interface — or, with `--down`, removes it again. The server does
 * the same at startup when it runs as root with SANDBOX_NETWORK=bridge.
 * Prints one line per change, or that there was nothing to change; safe to run any number of times.
 * `--netns` confines everything to a network namespace (the tests use it).
 */
import { parseArgs } from 'node:util';
import { loadConfig } from '../server/config.js';
import { setUp, tearDown } from '../server/hypervisor/network/host-network.js';

try {
  const { values } = parseArgs({ options: { down: { type: 'boolean', default: false }, netns: { type: 'string' } } });
  const config = loadConfig();
  if (process.getuid?.() !== 0) throw new Error('needs root: it changes network interfaces, sysctl and iptables');
  const opts = { bridge: config.BRIDGE_NAME, gatewayCidr: config.GATEWAY_IP, networkCidr: config.NETWORK_CIDR, netns: values.netns };
  const changes = values.down ? await tearDown(opts) : await setUp(opts);
  for (const change of changes) console.log(`setup-net: ${change}`);
  if (changes.length === 0) console.log('setup-net: nothing to change');
} catch (err) {
  // One line, no stack: every failure here is about the host or the configuration.
  console.error(`setup-net: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
}
