import type { ServerResponse } from 'node:http';
import { toWireError } from './envelope.js';
import { writeOrWait } from './response-writer.js';

export interface SseEvent {
  id?: string;
  event: string;
  data: string;
}

/**
 * One event's bytes. A multi-line payload is one `data:` line per line (one event per chunk of
 * output, however many lines it holds); clients join them with "\n". The prefixes are inserted by
 * one pass over the payload's UTF-8 bytes into a buffer sized up front: output of many short lines
 * (`seq`) costs a byte copy per byte instead of a string piece per line.
 */
function format(e: SseEvent): Buffer {
  const head = `${e.id ? `id: ${e.id}\n` : ''}event: ${e.event}\ndata: `;
  const data = Buffer.from(e.data, 'utf8');
  let newlines = 0;
  for (let i = 0; i < data.length; i++) if (data[i] === 0x0a) newlines++;
  const headBytes = Buffer.byteLength(head);
  const out = Buffer.allocUnsafe(headBytes + data.length + newlines * 6 + 2);
  out.write(head, 0, 'utf8');
  if (newlines === 0) {
    data.copy(out, headBytes);
  } else {
    let o = headBytes;
    for (let i = 0; i < data.length; i++) {
      const b = data[i]!;
      out[o++] = b;
      if (b === 0x0a) {
        // `data: `, one byte at a time (a loop over a constant array runs markedly slower here).
        out[o++] = 0x64;
        out[o++] = 0x61;
        out[o++] = 0x74;
        out[o++] = 0x61;
        out[o++] = 0x3a;
        out[o++] = 0x20;
      }
    }
  }
  out[out.length - 2] = 0x0a;
  out[out.length - 1] = 0x0a;
  return out;
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
  // Without a first event the headers are sent now: a stream may wait long for its first (sandbox events).
  if (!first) res.flushHeaders();
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
