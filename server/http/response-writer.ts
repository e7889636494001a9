import type { ServerResponse } from 'node:http';

/**
 * Writes a chunk of a streamed response; when the socket is backed up, waits until it drains (or
 * the client leaves), so a slow reader slows the source instead of growing memory.
 */
export async function writeOrWait(res: ServerResponse, chunk: string | Uint8Array): Promise<void> {
  if (res.destroyed || res.write(chunk)) return;
  await new Promise<void>((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.once('drain', done);
    res.once('close', done);
  });
}
