import { execFile } from 'node:child_process';
import { open, realpath } from 'node:fs/promises';
import type { Duplex } from 'node:stream';
import {
  AGENT_CHALLENGE_PREFIX,
  AGENT_RESPONSE_PREFIX,
  CONFIG_DISK_BYTES,
  handshakeProof,
  newNonce,
  type GuestConfig,
  type GuestIdentity,
} from '../../../shared/guest-protocol.js';
import { readReplyLine } from './reply-line.js';
import { agentHttpStatus } from '../../agent-client/agent-http.js';

/** What every microVM driver does with an instance's files and its agent connection. */

/** The config disk: the JSON, zero-padded to a fixed size; root-only (it holds the token). */
export async function writeConfigDisk(path: string, config: GuestConfig): Promise<void> {
  const json = Buffer.from(JSON.stringify(config));
  if (json.length >= CONFIG_DISK_BYTES) throw new Error(`the sandbox settings are too large (${json.length} bytes; at most ${CONFIG_DISK_BYTES - 1})`);
  const disk = Buffer.alloc(CONFIG_DISK_BYTES);
  json.copy(disk);
  const file = await open(path, 'w', 0o600);
  try {
    await file.writeFile(disk);
  } finally {
    await file.close();
  }
}

/** A copy-on-write qcow2 disk over the image's base, with the sandbox's disk size (never smaller than the base). */
export async function createOverlay(baseDisk: string, overlay: string, sizeMb: number): Promise<void> {
  // The overlay records its base's real path: a later image version never changes this sandbox's disk.
  baseDisk = await realpath(baseDisk);
  return new Promise((resolve, reject) =>
    execFile('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', baseDisk, '-F', 'qcow2', overlay, `${sizeMb}M`], (err, _out, stderr) => {
      if (!err) return resolve();
      // Smaller than the base: keep the base's size (qemu-img refuses to shrink a backing chain).
      if (/smaller|shrink/i.test(stderr)) {
        execFile('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', baseDisk, '-F', 'qcow2', overlay], (err2, _o, stderr2) =>
          err2 ? reject(new Error(`qemu-img create failed: ${stderr2.trim()}`)) : resolve(),
        );
        return;
      }
      reject(new Error(`qemu-img create failed: ${stderr.trim() || err.message}`));
    }),
  );
}

/**
 * The host's half of the agent handshake (shared/guest-protocol.ts) on a fresh connection to a
 * guest; resolves with the stream once both sides have proved they hold the token. Whatever the
 * agent sent after its last handshake line stays in the stream for the HTTP client.
 */
export async function agentHandshake(socket: Duplex, token: string, timeoutMs = 5000): Promise<Duplex> {
  try {
    const challenge = await readReplyLine(socket, { what: 'agent handshake', timeoutMs });
    if (!challenge.startsWith(AGENT_CHALLENGE_PREFIX)) throw new Error('the sandbox agent did not open the handshake');
    const hostNonce = newNonce();
    socket.write(`${AGENT_RESPONSE_PREFIX}${handshakeProof(token, 'host', challenge.slice(AGENT_CHALLENGE_PREFIX.length))} ${hostNonce}\n`);
    const accepted = await readReplyLine(socket, { what: 'agent handshake', timeoutMs });
    if (accepted !== `OK ${handshakeProof(token, 'agent', hostNonce)}`) throw new Error('the sandbox agent refused the handshake or could not prove it is the sandbox');
    return socket;
  } catch (err) {
    socket.destroy();
    throw err;
  }
}

/**
 * Tells a restored guest who it is now: a VM restored from memory still has the name (and, on
 * the bridge, the address) of the sandbox it was saved from.
 */
export async function reidentifyGuest(agent: Duplex, identity: GuestIdentity, timeoutMs = 10_000): Promise<void> {
  const status = await agentHttpStatus(agent, 'POST', '/identity', { body: identity, timeoutMs });
  if (status !== 204) throw new Error(`the restored guest did not take its new identity (HTTP ${status})`);
}
