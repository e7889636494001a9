/**
 * The agent's port tunnel, spoken between the server's agent-client and the agent over the agent's
 * own transport (so it works for every driver and for sandboxes without a network):
 *
 *   server → agent  `GET /ports/<port>/connect` with `Connection: Upgrade`, `Upgrade: voidrun-tcp`
 *                   and the request nonce (AGENT_REQUEST_HEADER)
 *   agent  → server `101 Switching Protocols` echoing the nonce, once a TCP connection to
 *                   127.0.0.1:<port> (or [::1]:<port>) inside the sandbox is open; from then on the
 *                   socket carries that connection's bytes both ways.
 *   or              an error answer `{error, code}`: `PORT_CLOSED` (502) when nothing listens there,
 *                   `BAD_REQUEST` (400) for a port outside 1..65535.
 */

import type { Duplex } from 'node:stream';

/** The `Upgrade` token of a port tunnel. */
export const PORT_TUNNEL_PROTOCOL = 'voidrun-tcp';

/** The agent's error code when nothing accepts connections on the port. */
export const PORT_CLOSED_CODE = 'PORT_CLOSED';

/** The agent's path that opens a tunnel to `port`. */
export function portTunnelPath(port: number): string {
  return `/ports/${port}/connect`;
}

/** The port a tunnel path names, or null when `path` is not a tunnel path. */
export function portOfTunnelPath(path: string): number | null {
  const m = /^\/ports\/(\d{1,5})\/connect$/.exec(path);
  return m ? Number(m[1]) : null;
}

/** How long a side whose peer closed may take to flush what it still has to write. */
export const CLOSE_GRACE_MS = 5000;

/**
 * Pipes two byte streams into each other with flow control (each side's writes wait for the
 * other's drain). When one side finishes sending, the other's writable side is ended; when one
 * closes, the other is ended and destroyed once its writes are flushed, or after `graceMs` when
 * they are not (what it would still send has nowhere to go, and a peer that ignores the end, or
 * never reads what is left, must not hold it open); when one fails the other is destroyed.
 */
export function splice(a: Duplex, b: Duplex, graceMs = CLOSE_GRACE_MS): void {
  a.pipe(b);
  b.pipe(a);
  a.on('error', () => b.destroy());
  b.on('error', () => a.destroy());
  a.once('close', () => closeAfterFlush(b, graceMs));
  b.once('close', () => closeAfterFlush(a, graceMs));
}

function closeAfterFlush(s: Duplex, graceMs: number): void {
  if (s.destroyed) return;
  if (s.writableFinished) return void s.destroy();
  const timer = setTimeout(() => s.destroy(), graceMs);
  timer.unref();
  s.once('close', () => clearTimeout(timer));
  s.once('finish', () => s.destroy());
  s.end();
}
