import { execFile } from 'node:child_process';
import { request as httpRequest } from 'node:http';
import { open, realpath } from 'node:fs/promises';
import type { Duplex } from 'node:stream';
import { AGENT_PREAMBLE_OK, agentPreamble, CONFIG_DISK_BYTES, type GuestConfig, type GuestIdentity } from '../../../shared/guest-protocol.js';

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
 * Sends the agent handshake on a fresh connection to a guest and resolves with the stream once
 * the agent has accepted it; from then on it speaks HTTP. Read with `read()` rather than 'data'
 * so the stream never starts flowing: whoever takes it over (http, ws) gets every byte after
 * `OK\n`, which is pushed back.
 */
export function agentHandshake(socket: Duplex, token: string, timeoutMs = 5000): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    let received = Buffer.alloc(0);
    const timer = setTimeout(() => fail(new Error('the sandbox agent did not answer the handshake')), timeoutMs);
    const cleanup = () => {
      clearTimeout(timer);
      socket.off('readable', onReadable);
      socket.off('error', fail);
      socket.off('end', onEnd);
    };
    const fail = (err: Error) => {
      cleanup();
      socket.destroy();
      reject(err);
    };
    const onEnd = () => fail(new Error('the sandbox agent closed the connection during the handshake'));
    const onReadable = () => {
      let chunk: Buffer | null;
      while ((chunk = socket.read() as Buffer | null) !== null) received = Buffer.concat([received, chunk]);
      if (received.length < AGENT_PREAMBLE_OK.length) return;
      if (received.subarray(0, AGENT_PREAMBLE_OK.length).toString() !== AGENT_PREAMBLE_OK) return fail(new Error('the sandbox agent refused the handshake'));
      cleanup();
      const rest = received.subarray(AGENT_PREAMBLE_OK.length);
      if (rest.length) socket.unshift(rest);
      resolve(socket);
    };
    socket.on('readable', onReadable);
    socket.once('error', fail);
    socket.once('end', onEnd);
    socket.write(agentPreamble(token));
  });
}

/**
 * Tells a restored guest who it is now: a VM restored from memory still has the name (and, on
 * the bridge, the address) of the sandbox it was saved from.
 */
export function reidentifyGuest(agent: Duplex, identity: GuestIdentity, timeoutMs = 10_000): Promise<void> {
  const body = JSON.stringify(identity);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      { method: 'POST', path: '/identity', createConnection: () => agent as never, timeout: timeoutMs, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } },
      (res) => {
        res.resume();
        if (res.statusCode === 204) resolve();
        else reject(new Error(`the restored guest did not take its new identity (HTTP ${res.statusCode})`));
      },
    );
    req.once('timeout', () => req.destroy(new Error('the restored guest did not answer in time')));
    req.once('error', reject);
    req.end(body);
  });
}
