/**
 * `npm run bench:pty`: terminal costs through the real server (its own process), container driver.
 *   1. keystroke → echo round trip over the WebSocket terminal, 500 keystrokes, next to the same
 *      round trip to a bare WebSocket echo server in this process (the raw baseline);
 *   2. throughput of `head -c <N>M /dev/zero | base64` through an attached client, with the server's
 *      and the agent's resident memory before and after.
 * Needs root and runc (npm run setup) and the debian image (npm run image:build).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import WebSocket, { WebSocketServer } from 'ws';
import { createClient } from '../client/index.js';
import { printTable, summarize } from './lib/measure.js';
import { startServerProcess } from './lib/server-process.js';

const KEYS = Number(process.env.BENCH_KEYS ?? 500);
const MB = Number(process.env.BENCH_PTY_MB ?? 200);

const rssOf = (pid: number | string) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;

const server = await startServerProcess();
const echo = new WebSocketServer({ port: 0, host: '127.0.0.1' });
echo.on('connection', (ws) => ws.on('message', (m) => ws.send(m.toString())));
try {
  const reg = await createClient({ url: server.url }).trpc.auth.register.mutate({ name: 'Bench', email: `bench-pty-${Date.now()}@example.com` });
  const vr = createClient({ url: server.url, apiKey: reg.apiKey });
  const box = await vr.sandboxes.create({ name: 'bench-pty' });
  const tini = readFileSync(join(server.instancesDir, box.id, 'init.pid'), 'utf8').trim();
  const agentPid = readFileSync(`/proc/${tini}/task/${tini}/children`, 'utf8').trim().split(' ')[0]!;

  const open = (url: string) =>
    new Promise<WebSocket>((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.once('open', () => resolve(ws));
      ws.once('error', reject);
    });
  /** Sends one key and resolves when it comes back; milliseconds. */
  const roundTrip = (ws: WebSocket, key: string) =>
    new Promise<number>((resolve) => {
      const t0 = process.hrtime.bigint();
      const onMessage = (m: WebSocket.RawData) => {
        if (m.toString().includes(key)) {
          ws.off('message', onMessage);
          resolve(Number(process.hrtime.bigint() - t0) / 1e6);
        }
      };
      ws.on('message', onMessage);
      ws.send(key);
    });

  const term = await open(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/pty?apiKey=${reg.apiKey}`);
  await new Promise((r) => setTimeout(r, 500)); // the shell's prompt
  const raw = await open(`ws://127.0.0.1:${(echo.address() as { port: number }).port}`);
  const samples = { raw: [] as number[], pty: [] as number[] };
  for (let i = 0; i < KEYS; i++) {
    const key = String.fromCharCode(97 + (i % 26));
    samples.raw.push(await roundTrip(raw, key));
    samples.pty.push(await roundTrip(term, key));
    if (i % 50 === 49) term.send('\x15'); // Ctrl-U: clear the typed line
  }
  term.send('\x15');
  const base = summarize('WebSocket echo in this process [baseline]', samples.raw);
  console.log(`\n${KEYS} keystrokes, interleaved\n`);
  printTable([base, summarize('keystroke → echo through the terminal', samples.pty)], base);

  // Throughput
  const before = { server: server.rss(), agent: rssOf(agentPid) };
  let peak = { ...before };
  const sampler = setInterval(() => {
    peak = { server: Math.max(peak.server, server.rss()), agent: Math.max(peak.agent, rssOf(agentPid)) };
  }, 50);
  let bytes = 0;
  const t0 = process.hrtime.bigint();
  await new Promise<void>((resolve) => {
    let tail = '';
    term.on('message', (m) => {
      const s = m.toString();
      bytes += s.length;
      tail = (tail + s).slice(-64);
      if (tail.includes('DONE-2')) resolve();
    });
    term.send(`head -c ${MB}M /dev/zero | base64; echo DONE-$((1+1))\n`);
  });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  clearInterval(sampler);
  const mib = (b: number) => (b / 2 ** 20).toFixed(0);
  console.log(`\n${MB} MiB through base64 (${mib(bytes)} MiB of terminal output) in ${seconds.toFixed(1)} s: ${(bytes / 2 ** 20 / seconds).toFixed(0)} MiB/s`);
  console.log(`server RSS ${mib(before.server)} → peak ${mib(peak.server)} MiB (+${mib(peak.server - before.server)}); agent RSS ${mib(before.agent)} → peak ${mib(peak.agent)} MiB (+${mib(peak.agent - before.agent)}) (target growth ≤ 64 MB)`);
  term.close();
  raw.close();
  await vr.close();
} finally {
  echo.close();
  await server.stop();
}
