import { connect, type Socket } from 'node:net';
import { readFileSync } from 'node:fs';

/** What a closed-loop load run measured. */
export interface LoadResult {
  requests: number;
  /** Answers whose status was not 2xx. */
  errors: number;
  seconds: number;
  perSecond: number;
  p50: number;
  p99: number;
}

/**
 * A closed-loop HTTP/1.1 load generator in the manner of `wrk -c<connections>`: each kept-alive
 * connection sends `GET path`, reads the whole answer (Content-Length framing), sends the next.
 * It parses no more than the status line and Content-Length, so on a small machine it costs far
 * less CPU than the server it loads (a Node http client would cost about as much as the server).
 */
export async function closedLoop(url: string, opts: { path: string; headers?: Record<string, string>; connections: number; seconds: number }): Promise<LoadResult> {
  const { hostname, port } = new URL(url);
  const head = [`GET ${opts.path} HTTP/1.1`, `host: ${hostname}:${port}`, ...Object.entries(opts.headers ?? {}).map(([k, v]) => `${k}: ${v}`), '', ''].join('\r\n');
  const request = Buffer.from(head);
  const latencies: number[] = [];
  let errors = 0;
  const deadline = process.hrtime.bigint() + BigInt(Math.round(opts.seconds * 1e9));
  const started = process.hrtime.bigint();

  const one = () =>
    new Promise<void>((resolve, reject) => {
      const socket: Socket = connect(Number(port), hostname);
      socket.setNoDelay(true);
      let buf: Buffer = Buffer.alloc(0);
      let sentAt = 0n;
      const send = () => {
        if (process.hrtime.bigint() >= deadline) {
          socket.end();
          return resolve();
        }
        sentAt = process.hrtime.bigint();
        socket.write(request);
      };
      socket.on('connect', send);
      socket.on('error', reject);
      socket.on('data', (chunk: Buffer) => {
        buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
        for (;;) {
          const end = buf.indexOf('\r\n\r\n');
          if (end < 0) return;
          const headText = buf.subarray(0, end).toString('latin1');
          const length = Number(/\r\ncontent-length:\s*(\d+)/i.exec(headText)?.[1] ?? NaN);
          if (!Number.isFinite(length)) return reject(new Error(`an answer without Content-Length: ${headText.split('\r\n')[0]}`));
          if (buf.length < end + 4 + length) return;
          const status = Number(headText.slice(9, 12));
          if (status < 200 || status >= 300) errors++;
          buf = buf.subarray(end + 4 + length);
          latencies.push(Number(process.hrtime.bigint() - sentAt) / 1e6);
          send();
        }
      });
    });

  await Promise.all(Array.from({ length: opts.connections }, one));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  latencies.sort((a, b) => a - b);
  const at = (q: number) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? NaN;
  return { requests: latencies.length, errors, seconds, perSecond: latencies.length / seconds, p50: at(0.5), p99: at(0.99) };
}

/** A process's user + system CPU time so far, in milliseconds (from /proc/<pid>/stat). */
export function cpuMsOf(pid: number | string): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces), counted from field 3.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]);
  return (ticks * 1000) / CLOCK_TICKS;
}

/** USER_HZ: 100 on every Linux this runs on. */
const CLOCK_TICKS = 100;
