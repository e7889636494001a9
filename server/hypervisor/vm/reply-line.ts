import type { Duplex } from 'node:stream';

/** Longest reply line accepted; the handshakes (hybrid vsock, agent) exchange short lines. */
const MAX_REPLY_LINE_BYTES = 256;

export interface ReplyLineOptions {
  timeoutMs: number;
  /** Names the exchange in errors (e.g. "hybrid vsock CONNECT 1024"). */
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
export function readReplyLine(socket: Duplex, opts: ReplyLineOptions): Promise<string> {
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
