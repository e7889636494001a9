import { connect as netConnect, type Socket } from 'node:net';
import { readReplyLine } from '../vm/reply-line.js';

export { readReplyLine };

/*
 * cloud-hypervisor's hybrid vsock (the Firecracker protocol): the VMM listens on a unix socket
 * on the host; a host program connects, sends `CONNECT <port>\n`, and the VMM answers
 * `OK <host-side port>\n` once the guest accepted a connection on that vsock port. From then on
 * the unix socket is a plain byte stream to the guest. When nothing listens on the port in the
 * guest, the VMM closes the connection without a reply.
 */

export interface HybridVsockOptions {
  /** Deadline for connecting to the unix socket, and again for the VMM's reply. */
  timeoutMs: number;
}

/**
 * A byte stream to vsock `port` in the guest behind the hybrid vsock socket at `socketPath`.
 * Rejects with a message saying which step failed: the unix socket (VMM not running), no reply
 * (nothing listens on the port in the guest yet), or a reply that is not `OK <port>`.
 */
export async function connectHybridVsock(socketPath: string, port: number, opts: HybridVsockOptions): Promise<Socket> {
  const what = `hybrid vsock CONNECT ${port} on ${socketPath}`;
  const socket = await new Promise<Socket>((resolve, reject) => {
    const s = netConnect(socketPath);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`${what}: could not connect within ${opts.timeoutMs} ms`));
    }, opts.timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.off('error', onError);
      resolve(s);
    });
    const onError = (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new Error(`${what}: ${err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? `the VMM is not listening (${err.code})` : err.message}`, { cause: err }));
    };
    s.once('error', onError);
  });
  try {
    socket.write(`CONNECT ${port}\n`);
    const reply = await readReplyLine(socket, { what, timeoutMs: opts.timeoutMs });
    if (!/^OK \d+$/.test(reply)) throw new Error(`${what}: refused, the VMM answered ${JSON.stringify(reply)} instead of "OK <port>"`);
    return socket;
  } catch (err) {
    socket.destroy();
    throw err;
  }
}
