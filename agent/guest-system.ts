import { execFile, spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { timingSafeEqual } from 'node:crypto';
import { createServer, type Server as NetServer, type Socket } from 'node:net';
import type { Server as HttpServer } from 'node:http';
import {
  AGENT_CHALLENGE_PREFIX,
  AGENT_RESPONSE_PREFIX,
  GUEST_AGENT_PORT,
  handshakeProof,
  newNonce,
  type GuestConfig,
  type GuestIdentity,
  type GuestNic,
} from '../shared/guest-protocol.js';

/*
 * What the agent does only inside a microVM guest, where it is the first real program after
 * init: read its config disk, name the machine, bring up the network, grow the root filesystem,
 * and accept connections only from a host that knows the sandbox's token.
 */

/** The config disk holds JSON followed by zero padding. */
export function readGuestConfig(device: string): GuestConfig {
  const raw = readFileSync(device);
  const end = raw.indexOf(0);
  return JSON.parse(raw.subarray(0, end < 0 ? raw.length : end).toString('utf8')) as GuestConfig;
}

function run(busybox: string, args: string[]): Promise<void> {
  return new Promise((resolve) =>
    execFile(busybox, args, (err, _stdout, stderr) => {
      if (err) console.error(`agent: ${args.join(' ')} failed: ${stderr.trim() || err.message}`);
      resolve();
    }),
  );
}

/** The interface with MAC `mac`, or eth0 when there is no MAC or no such interface. */
function interfaceOf(mac: string | undefined): string {
  if (!mac) return 'eth0';
  try {
    for (const name of readdirSync('/sys/class/net')) {
      if (readFileSync(`/sys/class/net/${name}/address`, 'utf8').trim().toLowerCase() === mac.toLowerCase()) return name;
    }
  } catch {
    // No sysfs: the one NIC a guest without it can have.
  }
  console.error(`agent: no interface has MAC ${mac}; configuring eth0`);
  return 'eth0';
}

/** Addresses one NIC; with a gateway, the default route goes through it. */
async function setNetwork(network: GuestNic & { gateway?: string }, busybox: string): Promise<void> {
  const { address, prefixLength, gateway } = network;
  const dev = interfaceOf(network.mac);
  await run(busybox, ['ip', 'addr', 'flush', 'dev', dev]);
  await run(busybox, ['ip', 'addr', 'add', `${address}/${prefixLength}`, 'dev', dev]);
  await run(busybox, ['ip', 'link', 'set', dev, 'up']);
  if (gateway) await run(busybox, ['ip', 'route', 'replace', 'default', 'via', gateway, 'dev', dev]);
}

/** After a restore from memory: the new sandbox's name and address replace the saved one's. */
export async function applyGuestIdentity(identity: GuestIdentity, busybox: string): Promise<void> {
  writeFileSync('/proc/sys/kernel/hostname', identity.hostname);
  if (!identity.network) return;
  const { replacesMac, ...nic } = identity.network;
  // The NIC came back from the snapshot with the saved sandbox's MAC: it takes this sandbox's.
  if (replacesMac && nic.mac && replacesMac !== nic.mac) await run(busybox, ['ip', 'link', 'set', 'dev', interfaceOf(replacesMac), 'address', nic.mac]);
  await setNetwork(nic, busybox);
}

export async function configureGuest(config: GuestConfig, busybox: string): Promise<void> {
  writeFileSync('/proc/sys/kernel/hostname', config.hostname);
  await run(busybox, ['ip', 'link', 'set', 'lo', 'up']);
  for (const nic of config.extraNetworks ?? []) await setNetwork(nic, busybox);
  if (config.network) await setNetwork(config.network, busybox);
  if (config.nameservers?.length) writeResolvConf(config.nameservers);
  // Online, in the background: commands can run meanwhile.
  if (config.growRootFs) execFile('/sbin/resize2fs', ['/dev/vda'], () => {});
  if (hasVirtioVsock()) bridgeVsock();
}

/** The guest's resolvers (an /etc/resolv.conf that is a symlink, e.g. to systemd-resolved's, is replaced by a file). */
function writeResolvConf(nameservers: string[]): void {
  try {
    rmSync('/etc/resolv.conf', { force: true });
    writeFileSync('/etc/resolv.conf', nameservers.map((n) => `nameserver ${n}\n`).join(''), { mode: 0o644 });
  } catch (err) {
    console.error(`agent: writing /etc/resolv.conf failed: ${(err as Error).message}`);
  }
}

/** Whether the VM has a virtio vsock device (cloud-hypervisor's hybrid vsock; QEMU here has none). */
function hasVirtioVsock(): boolean {
  try {
    return readdirSync('/sys/bus/virtio/drivers/vmw_vsock_virtio_transport').some((e) => e.startsWith('virtio'));
  } catch {
    return false;
  }
}

/**
 * Forwards vsock port GUEST_AGENT_PORT to the agent's TCP port, so the host reaches the agent
 * through cloud-hypervisor's hybrid vsock socket (Node cannot open AF_VSOCK sockets itself).
 * The token handshake still applies: it travels through the bridge.
 */
function bridgeVsock(): void {
  if (!existsSync('/usr/bin/socat')) {
    console.error('agent: this VM has a vsock device but no socat; the host cannot reach the agent over vsock');
    return;
  }
  const start = () => {
    const child = spawn('/usr/bin/socat', [`VSOCK-LISTEN:${GUEST_AGENT_PORT},fork,reuseaddr`, `TCP:127.0.0.1:${GUEST_AGENT_PORT}`], { stdio: 'ignore' });
    child.once('exit', () => setTimeout(start, 1000).unref());
  };
  start();
}

/**
 * A TCP listener in front of the agent's HTTP server: the agent's half of the handshake
 * (shared/guest-protocol.ts); a connection that proves it holds the token is handed to the HTTP
 * server, anything else is closed without a word.
 */
export function listenWithToken(http: HttpServer, port: number, token: string): NetServer {
  const server = createServer((socket: Socket) => {
    const agentNonce = newNonce();
    const expected = Buffer.from(`${AGENT_RESPONSE_PREFIX}${handshakeProof(token, 'host', agentNonce)} `);
    let received = Buffer.alloc(0);
    const timer = setTimeout(() => socket.destroy(), 10_000);
    const onData = (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      const newline = received.indexOf(10);
      if (newline < 0) {
        if (received.length > 256) socket.destroy();
        return;
      }
      socket.off('data', onData);
      clearTimeout(timer);
      const line = received.subarray(0, newline).toString('latin1').replace(/\r$/, '');
      const proof = Buffer.from(line.slice(0, expected.length), 'latin1');
      const hostNonce = line.slice(expected.length);
      if (proof.length !== expected.length || !timingSafeEqual(proof, expected) || !/^[0-9a-f]{16,128}$/.test(hostNonce)) {
        socket.destroy();
        return;
      }
      socket.pause();
      const rest = received.subarray(newline + 1);
      if (rest.length) socket.unshift(rest);
      socket.write(`OK ${handshakeProof(token, 'agent', hostNonce)}\n`);
      http.emit('connection', socket);
      socket.resume();
    };
    socket.on('data', onData);
    socket.on('error', () => {});
    socket.write(`${AGENT_CHALLENGE_PREFIX}${agentNonce}\n`);
  });
  server.listen(port, '0.0.0.0');
  return server;
}
