import type { Readable } from 'node:stream';

/**
 * A stream's bytes to its end, read by its events (an async iterator costs a promise per chunk and
 * more to set up: this runs for every JSON request and every agent answer). Past `limit` bytes
 * reading stops — `onTooLarge` says how (pause it or destroy it) and gives the error to reject
 * with. A stream that errors rejects with its error; one closed before its end rejects as a
 * premature close (code `ERR_STREAM_PREMATURE_CLOSE`, as an iterator would).
 */
export function readAtMost(stream: Readable, limit: number, onTooLarge: () => Error): Promise<Buffer> {
  if (stream.readableEnded) return Promise.resolve(Buffer.alloc(0));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const settle = (err: Error | null) => {
      stream.off('data', onData);
      stream.off('end', onEnd);
      stream.off('error', settle);
      stream.off('close', onClose);
      if (err) reject(err);
      else resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size));
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        settle(onTooLarge());
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => settle(null);
    const onClose = () => settle(Object.assign(new Error('Premature close'), { code: 'ERR_STREAM_PREMATURE_CLOSE' }));
    stream.on('data', onData);
    stream.once('end', onEnd);
    stream.once('error', settle);
    stream.once('close', onClose);
  });
}
