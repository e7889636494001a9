import { connect as netConnect, type Socket } from 'node:net';

/*
 * cloud-hypervisor's hybrid vsock (the Firecracker protocol): the VMM listens on a unix socket
 * on the host; a host program connects, sends `CONNECT <port>\n`, and the VMM answers
 * `OK <host-side port>\n` once the guest accepted a connection on that vsock port. From then on
 * the unix socket is a plain byte stream to the guest. When nothing listens on the port in the
 * guest, the VMM closes the connection without a reply.
 */

/** Longest reply line accepted; both handshakes answer a few bytes. */
const MAX_REPLY_LINE_BYTES = 256;

export interface ReplyLineOptions {
  timeoutMs: number;
  /** Names the exchange in errors ("hybrid vsock CONNECT 1024 on /…/vsock.sock"). */
  what: string;
}

/**
 * Reads one `\n`-terminated line from `socket` and returns it without the newline. Bytes that
 * arrived after the line are pushed back (`unshift`), so whoever reads the socket next sees the
 * stream exactly from the first byte after the line.
 *
 * Reads with `'readable'` + `read()` rather than `'data'`: a `'data'` listener switches the
 * stream to flowing mode, and pausing it afterwards would keep it paused for the caller's own
 * `'data'` listener; removing a `'readable'` listener leaves the stream as if never read.
 */
export function readReplyLine(socket: Socket, opts: ReplyLineOptions): Promise<string> {
  return new Promise((resolve, reject) => {
    let buffered = Buffer.alloc(0);
    const cleanup = () => {
      clearTimeout(timer);
      socket.off('readable', onReadable);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.off('error', onError);
    };
    const fail = (err: Error) => {
      cleanup();
      reject(err);
    };
    const timer = setTimeout(() => fail(new Error(`${opts.what}: no reply within ${opts.timeoutMs} ms`)), opts.timeoutMs);
    const onError = (err: Error) => fail(new Error(`${opts.what}: ${err.message}`, { cause: err }));
    const onEnd = () =>
      fail(new Error(`${opts.what}: the connection closed ${buffered.length ? `after a partial reply ${JSON.stringify(buffered.toString('utf8'))}` : 'without a reply'}`));
    const onReadable = () => {
      let chunk: Buffer | null;
      while ((chunk = socket.read() as Buffer | null) !== null) {
        buffered = Buffer.concat([buffered, chunk]);
        const newline = buffered.indexOf(0x0a);
        if (newline >= 0) {
          cleanup();
          const rest = buffered.subarray(newline + 1);
          if (rest.length) socket.unshift(rest);
          return resolve(buffered.subarray(0, newline).toString('utf8').replace(/\r$/, ''));
        }
        if (buffered.length > MAX_REPLY_LINE_BYTES) {
          return fail(new Error(`${opts.what}: the reply is not a line (${buffered.length} bytes without a newline)`));
        }
      }
    };
    socket.on('readable', onReadable);
    socket.once('end', onEnd);
    socket.once('close', onEnd);
    socket.once('error', onError);
  });
}

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
