import type { ServerResponse } from 'node:http';
import { toWireError } from './envelope.js';
import { writeOrWait } from './response-writer.js';

export interface SseEvent {
  id?: string;
  event: string;
  data: string;
}

function format(e: SseEvent): string {
  let out = '';
  if (e.id) out += `id: ${e.id}\n`;
  out += `event: ${e.event}\n`;
  // A multi-line payload is one `data:` line per line (one event per chunk of output, however
  // many lines it holds); clients join them with "\n".
  return `${out}data: ${e.data.replaceAll('\n', '\ndata: ')}\n\n`;
}

/**
 * Writes events as Server-Sent Events, waiting for the socket to drain when it backs up (so a slow
 * reader slows the source instead of growing memory). A failure after the headers is one `error`
 * event whose data is the error body (`{error, code, details?}`). Resolves when the events end or
 * the client leaves.
 */
export async function writeSse(res: ServerResponse, first: SseEvent | null, rest: AsyncIterator<SseEvent>, signal: AbortSignal): Promise<void> {
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache, no-transform',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
  const write = async (e: SseEvent) => {
    if (!signal.aborted) await writeOrWait(res, format(e));
  };
  if (first) await write(first);
  while (!signal.aborted) {
    let next: IteratorResult<SseEvent>;
    try {
      next = await rest.next();
    } catch (err) {
      await write({ event: 'error', data: JSON.stringify(toWireError(err).body) });
      break;
    }
    if (next.done) break;
    await write(next.value);
  }
  await rest.return?.(undefined);
  res.end();
}
