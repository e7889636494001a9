import { Agent, request } from 'node:http';

export interface Summary {
  name: string;
  n: number;
  p50: number;
  p99: number;
  mean: number;
}

/** Median and p99 in milliseconds of `samples`. */
export function summarize(name: string, samples: number[]): Summary {
  const sorted = [...samples].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
  return { name, n: sorted.length, p50: at(0.5), p99: at(0.99), mean: sorted.reduce((a, b) => a + b, 0) / sorted.length };
}

/** Times `fn` `n` times after `warmup` untimed runs; milliseconds per call. */
export async function time(fn: () => Promise<unknown>, n: number, warmup = Math.min(200, n)): Promise<number[]> {
  for (let i = 0; i < warmup; i++) await fn();
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await fn();
    samples.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  return samples;
}

/**
 * Runs the timed functions interleaved in rounds, so drift on a noisy machine hits them alike.
 * Returns each one's samples.
 */
export async function interleaved(fns: Record<string, () => Promise<unknown>>, rounds: number, perRound: number, warmup = 200): Promise<Record<string, number[]>> {
  const out: Record<string, number[]> = Object.fromEntries(Object.keys(fns).map((k) => [k, []]));
  for (const fn of Object.values(fns)) await time(fn, 0, warmup);
  for (let r = 0; r < rounds; r++) {
    for (const [name, fn] of Object.entries(fns)) out[name]!.push(...(await time(fn, perRound, 0)));
  }
  return out;
}

const agent = new Agent({ keepAlive: true, maxSockets: 1 });

/** One GET over a kept-alive connection; resolves with the status once the body is read. */
export function get(url: string, headers: Record<string, string> = {}): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url, { agent, headers }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', reject);
    req.end();
  });
}

export function printTable(rows: Summary[], baseline: Summary): void {
  const pad = (s: string, w: number) => s.padEnd(w);
  const num = (x: number) => x.toFixed(3).padStart(9);
  console.log(`${pad('case', 44)}${'n'.padStart(7)}${'p50 ms'.padStart(10)}${'p99 ms'.padStart(10)}${'p50 ratio'.padStart(11)}`);
  for (const r of rows) {
    console.log(`${pad(r.name, 44)}${String(r.n).padStart(7)}${num(r.p50)} ${num(r.p99)} ${(r.p50 / baseline.p50).toFixed(2).padStart(10)}`);
  }
}

export function closeAgent(): void {
  agent.destroy();
}
