import type { IncomingMessage } from 'node:http';
import { connect, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { AGENT_REQUEST_HEADER } from '../../../shared/guest-protocol.js';
import { PORT_CLOSED_CODE, PORT_TUNNEL_PROTOCOL, portOfTunnelPath, splice } from '../../../shared/port-tunnel.js';

/** How long a connection to a port inside the sandbox may take to open. */
const CONNECT_TIMEOUT_MS = 10_000;

/**
 * The port tunnel (see shared/port-tunnel.ts): an upgrade on the agent's socket piped to a TCP
 * connection to the port on the sandbox's loopback. Resolves false when `req` is not a tunnel
 * request (the caller hands it to the WebSocket server).
 */
export function handlePortConnect(req: IncomingMessage, socket: Duplex, head: Buffer): boolean {
  const port = portOfTunnelPath(req.url ?? '');
  if (port === null) return false;
  socket.on('error', () => {});
  const nonce = req.headers[AGENT_REQUEST_HEADER];
  const echo = typeof nonce === 'string' && nonce.length <= 64 ? `${AGENT_REQUEST_HEADER}: ${nonce}\r\n` : '';
  const refuse = (status: number, reason: string, code: string, error: string) => {
    const body = JSON.stringify({ error, code });
    socket.end(`HTTP/1.1 ${status} ${reason}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n${echo}\r\n${body}`);
  };
  if (port < 1 || port > 65535) {
    refuse(400, 'Bad Request', 'BAD_REQUEST', `Invalid port ${port}: ports are 1 to 65535`);
    return true;
  }
  if ((req.headers.upgrade ?? '').toLowerCase() !== PORT_TUNNEL_PROTOCOL) {
    refuse(400, 'Bad Request', 'BAD_REQUEST', `A port tunnel needs Upgrade: ${PORT_TUNNEL_PROTOCOL}`);
    return true;
  }
  connectLocal(port).then(
    (upstream) => {
      if (socket.destroyed) return void upstream.destroy();
      socket.write(`HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: ${PORT_TUNNEL_PROTOCOL}\r\n${echo}\r\n`);
      if (head.length) upstream.write(head);
      splice(socket, upstream);
    },
    () => refuse(502, 'Bad Gateway', PORT_CLOSED_CODE, `Nothing listens on port ${port} in the sandbox`),
  );
  return true;
}

/** A connection to `port` on 127.0.0.1, else on ::1 (a server bound to the IPv6 loopback only). */
async function connectLocal(port: number): Promise<Socket> {
  try {
    return await open(port, '127.0.0.1');
  } catch {
    return open(port, '::1');
  }
}

function open(port: number, host: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ port, host, timeout: CONNECT_TIMEOUT_MS });
    s.once('connect', () => {
      s.setTimeout(0);
      s.off('error', reject);
      resolve(s);
    });
    s.once('timeout', () => s.destroy(new Error('connect timeout')));
    s.once('error', reject);
  });
}
