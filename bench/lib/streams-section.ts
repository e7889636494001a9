/**
 * The `streams` section of `npm run bench:dataplane`: `seq 1 1000000` (6.9 MB) streamed end to end
 * over SSE (`POST /api/sandboxes/{id}/exec-stream`) and over the tRPC subscription (`exec.stream`,
 * through our client), interleaved with the raw baseline — the same command's bytes sent as SSE
 * (one event per chunk) by a bare Node HTTP server in this process; then a reader that stalls for
 * 10 s under `yes`, with the server's and the agent's resident memory sampled throughout, and
 * whether the streamed output arrived whole.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer, request, type IncomingMessage } from 'node:http';
import { join } from 'node:path';
import { createClient } from '../../client/index.js';
import { cpuMsOf } from './load.js';
import type { ServerProcess } from './server-process.js';
import type { DataplaneRow } from './dataplane-row.js';

const ROUNDS = Number(process.env.BENCH_STREAM_ROUNDS ?? 5);
const STALL_SECONDS = Number(process.env.BENCH_STALL_SECONDS ?? 10);
const SEQ = 'seq 1 1000000';
const SEQ_BYTES = 6_888_896;
const MiB = 2 ** 20;

/** A row of the dataplane table, as the section hands it over. */
export type StreamRow = DataplaneRow;

const rssOf = (pid: string | number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const seconds = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e9;

/** POSTs `body` and resolves with the response, unread. */
function post(url: string, body: unknown, apiKey?: string): Promise<IncomingMessage> {
  const text = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...(apiKey ? { 'x-api-key': apiKey } : {}) } }, resolve);
    req.on('error', reject);
    req.end(text);
  });
}

/** Reads an SSE response to its end; with `keep`, the joined data of its stdout events and the names of all events. */
async function readSse(res: IncomingMessage, keep: boolean): Promise<{ stdout: string; events: Set<string> }> {
  if (!keep) {
    for await (const _ of res);
    return { stdout: '', events: new Set() };
  }
  let text = '';
  res.setEncoding('utf8');
  for await (const c of res) text += c as string;
  const events = new Set<string>();
  const parts: string[] = [];
  for (const block of text.split('\n\n')) {
    const lines = block.split('\n');
    const event = lines.find((l) => l.startsWith('event: '))?.slice(7) ?? 'message';
    events.add(event);
    if (event === 'stdout') parts.push(lines.filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n'));
  }
  return { stdout: parts.join(''), events };
}

/** The raw baseline: the command's output as SSE from a bare Node HTTP server, one event per chunk, with backpressure. */
function bareSseServer(): Promise<{ url: string; close(): void }> {
  const server = createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    const child = spawn('sh', ['-c', SEQ], { stdio: ['ignore', 'pipe', 'ignore'] });
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (data: string) => {
      if (!res.write(`event: stdout\ndata: ${data.replaceAll('\n', '\ndata: ')}\n\n`)) {
        child.stdout.pause();
        res.once('drain', () => child.stdout.resume());
      }
    });
    child.once('close', (code) => res.end(`event: exit\ndata: {"exitCode":${code}}\n\n`));
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ url: `http://127.0.0.1:${(server.address() as { port: number }).port}/`, close: () => server.close() })));
}

export async function streamsSection(server: ServerProcess, apiKey: string, row: (r: StreamRow) => void): Promise<void> {
  const vr = createClient({ url: server.url, apiKey });
  const box = await vr.sandboxes.create({ name: 'bench-dataplane-streams' });
  const bare = await bareSseServer();
  const expected = Array.from({ length: 1_000_000 }, (_, i) => `${i + 1}\n`).join('');
  const sse = async (keep = false) => readSse(await post(`${server.url}/api/sandboxes/${box.id}/exec-stream`, { command: SEQ }, apiKey), keep);
  const trpc = async (keep = false) => {
    const parts: string[] = [];
    const events = new Set<string>();
    for await (const c of box.execStream(SEQ)) {
      events.add(c.type);
      if (keep && c.type === 'stdout') parts.push(c.data);
    }
    return { stdout: parts.join(''), events };
  };
  try {
    // Whole and without a gap, checked once per path (outside the timed runs).
    const whole: Record<string, string> = {};
    for (const [name, run] of Object.entries({ sse, trpc })) {
      let lost = 0;
      for (let i = 0; i < 3; i++) {
        const r = await run(true);
        if (r.stdout !== expected || r.events.has('gap')) lost++;
      }
      whole[name] = `${3 - lost}/3 whole`;
    }
    const tini = readFileSync(join(server.instancesDir, box.id, 'init.pid'), 'utf8').trim();
    const agentPid = readFileSync(`/proc/${tini}/task/${tini}/children`, 'utf8').trim().split(' ')[0]!;
    const rate: Record<'bare' | 'sse' | 'trpc', number[]> = { bare: [], sse: [], trpc: [] };
    // CPU per stream (less sensitive to a loaded machine than wall time): the server's and the agent's.
    const cpu = { sse: { server: 0, agent: 0 }, trpc: { server: 0, agent: 0 } };
    const charge = async (path: 'sse' | 'trpc', fn: () => Promise<unknown>) => {
      const s0 = cpuMsOf(server.pid);
      const a0 = cpuMsOf(agentPid);
      const t0 = process.hrtime.bigint();
      await fn();
      rate[path].push(SEQ_BYTES / MiB / seconds(t0));
      cpu[path].server += (cpuMsOf(server.pid) - s0) / ROUNDS;
      cpu[path].agent += (cpuMsOf(agentPid) - a0) / ROUNDS;
    };
    for (let r = 0; r < ROUNDS; r++) {
      const t0 = process.hrtime.bigint();
      await readSse(await post(bare.url, {}), false);
      rate.bare.push(SEQ_BYTES / MiB / seconds(t0));
      await charge('sse', () => sse());
      await charge('trpc', () => trpc());
    }
    const bareRate = median(rate.bare);
    console.log(`streams ${SEQ}, MiB/s per run: bare SSE ${rate.bare.map((x) => x.toFixed(0)).join(' ')}; SSE ${rate.sse.map((x) => x.toFixed(0)).join(' ')} (${whole.sse}); tRPC ${rate.trpc.map((x) => x.toFixed(0)).join(' ')} (${whole.trpc})`);
    for (const [name, xs] of [['SSE', rate.sse], ['tRPC subscription', rate.trpc]] as const) {
      const ours = median(xs);
      row({ section: 'streams', case: `${SEQ} over ${name}, MiB/s`, ours, baseline: bareRate, unit: 'MiB/s', baselineName: 'bare Node HTTP SSE', target: '≥ 60 MiB/s', met: ours >= 60 });
    }
    console.log(`streams CPU per ${SEQ}: SSE server ${cpu.sse.server.toFixed(0)} ms, agent ${cpu.sse.agent.toFixed(0)} ms; tRPC server ${cpu.trpc.server.toFixed(0)} ms, agent ${cpu.trpc.agent.toFixed(0)} ms`);
    row({ section: 'streams', case: `server CPU per ${SEQ} over SSE`, ours: cpu.sse.server, baseline: 6.57 / 60 * 1000, unit: 'ms', baselineName: '60 MiB/s of one core', target: 'reported', met: true });
    row({ section: 'streams', case: `${SEQ} arrives whole (SSE / tRPC)`, ours: Number(whole.sse!.startsWith('3/')) + Number(whole.trpc!.startsWith('3/')), baseline: 2, unit: 'of 2', baselineName: 'both paths', target: 'zero bytes lost', met: whole.sse!.startsWith('3/') && whole.trpc!.startsWith('3/') });

    // A reader that stalls: `yes` streamed over SSE, 1 MiB read, then nothing for STALL_SECONDS.
    const before = { server: server.rss(), agent: rssOf(agentPid) };
    const res = await post(`${server.url}/api/sandboxes/${box.id}/exec-stream`, { command: 'yes', timeout: STALL_SECONDS + 30 }, apiKey);
    let read = 0;
    await new Promise<void>((resolve) => {
      const onData = (c: Buffer) => {
        read += c.length;
        if (read < MiB) return;
        res.off('data', onData);
        res.pause();
        resolve();
      };
      res.on('data', onData);
    });
    let peak = { ...before };
    const sample = () => (peak = { server: Math.max(peak.server, server.rss()), agent: Math.max(peak.agent, rssOf(agentPid)) });
    const sampler = setInterval(sample, 100);
    await new Promise((r) => setTimeout(r, STALL_SECONDS * 1000));
    clearInterval(sampler);
    sample();
    res.destroy();
    const growth = { server: (peak.server - before.server) / MiB, agent: (peak.agent - before.agent) / MiB };
    console.log(`stalled reader, ${STALL_SECONDS} s under yes: server RSS ${(before.server / MiB).toFixed(0)} → peak ${(peak.server / MiB).toFixed(0)} MiB, agent RSS ${(before.agent / MiB).toFixed(0)} → peak ${(peak.agent / MiB).toFixed(0)} MiB`);
    row({ section: 'streams', case: `server RSS growth, reader stalled ${STALL_SECONDS} s`, ours: growth.server, baseline: 16, unit: 'MiB', baselineName: 'target', target: '≤ 16 MiB', met: growth.server <= 16 });
    row({ section: 'streams', case: `agent RSS growth, reader stalled ${STALL_SECONDS} s`, ours: growth.agent, baseline: 16, unit: 'MiB', baselineName: 'target', target: '≤ 16 MiB', met: growth.agent <= 16 });
  } finally {
    bare.close();
    await box.delete().catch(() => {});
    await vr.close();
  }
}
