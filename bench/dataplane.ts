/**
 * `npm run bench:dataplane`: the data plane against the raw baselines of issue 13, measured in the
 * same run, interleaved where they can be. The real server runs as its own process (container
 * driver, LOG_LEVEL=info: access lines are written as in production), so its CPU is its own.
 *
 * Sections (`BENCH_ONLY=exec,rest` runs some):
 *   exec  `true` to completion: host `spawn('true')`, the agent alone (tRPC over its socket, no
 *         server), `POST /api/sandboxes/{id}/exec`; server and agent CPU per call.
 *   streams  `seq 1 1000000` over SSE and tRPC against a bare Node SSE server; a reader stalled
 *         10 s under `yes` (server and agent RSS growth); see bench/lib/streams-section.ts.
 *   files  1 GiB upload and download against a bare Node HTTP server (MiB/s, server CPU per GiB);
 *         1,000 × 4 KiB uploads one request each, and as one tar upload; see bench/lib/files-section.ts.
 *   rest  closed-loop request rate with 8 kept-alive connections (like `wrk -c8`): unauthenticated
 *         `GET /api/version` beside `GET /api/orgs/me`.
 * A section adds its rows with `row(...)`; the table is printed at the end.
 * Needs root and runc (npm run setup) and the debian image (npm run image:build).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { connect } from 'node:net';
import { join } from 'node:path';
import WebSocket from 'ws';
import { interleaved, summarize } from './lib/measure.js';
import { closedLoop, cpuMsOf } from './lib/load.js';
import { startMinimalProxy, startServerProcess, type ServerProcess } from './lib/server-process.js';
import { streamsSection } from './lib/streams-section.js';
import { filesSection } from './lib/files-section.js';
import type { DataplaneRow as Row } from './lib/dataplane-row.js';

const EXECS = Number(process.env.BENCH_EXECS ?? 500);
const REST_SECONDS = Number(process.env.BENCH_REST_SECONDS ?? 3);
const REST_ROUNDS = Number(process.env.BENCH_REST_ROUNDS ?? 3);
const CONNECTIONS = Number(process.env.BENCH_CONNECTIONS ?? 8);
const only = process.env.BENCH_ONLY ? new Set(process.env.BENCH_ONLY.split(',')) : null;

const rows: Row[] = [];
function row(r: Row): void {
  rows.push(r);
}

const keepAlive = new Agent({ keepAlive: true, maxSockets: 1 });

/** One JSON request to the server over a kept-alive connection; the parsed body. */
function call(server: ServerProcess, method: string, path: string, body?: unknown, apiKey?: string): Promise<{ status: number; json: unknown }> {
  const text = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      server.url + path,
      { method, agent: keepAlive, headers: { ...(text ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) } : {}), ...(apiKey ? { 'x-api-key': apiKey } : {}) } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const raw = Buffer.concat(chunks).toString('utf8');
          try {
            resolve({ status: res.statusCode ?? 0, json: raw ? JSON.parse(raw) : null });
          } catch {
            reject(new Error(`${method} ${path}: ${res.statusCode} ${raw.slice(0, 200)}`));
          }
        });
      },
    );
    req.on('error', reject);
    req.end(text);
  });
}

async function ok(server: ServerProcess, method: string, path: string, body?: unknown, apiKey?: string): Promise<unknown> {
  const r = await call(server, method, path, body, apiKey);
  if (r.status >= 300) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(r.json)}`);
  return r.json;
}

function hostSpawnTrue(): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('true', { stdio: 'ignore' });
    child.once('error', reject);
    child.once('exit', () => resolve());
  });
}

/**
 * The sandbox's agent called directly over its socket, as the server calls it (tRPC's WebSocket
 * protocol), without the server: the agent-alone baseline.
 */
async function agentAlone(server: ServerProcess, sandboxId: string) {
  const ws = new WebSocket('ws://agent/', { createConnection: () => connect(join(server.instancesDir, sandboxId, 'agent.sock')) as never, perMessageDeflate: false });
  await new Promise<void>((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  const waiting = new Map<number, (msg: { result?: { data?: unknown }; error?: unknown }) => void>();
  ws.on('message', (raw) => {
    const msg = JSON.parse(raw.toString()) as { id: number; result?: { data?: unknown }; error?: unknown };
    waiting.get(msg.id)?.(msg);
    waiting.delete(msg.id);
  });
  let nextId = 1;
  return {
    mutate(path: string, input: unknown): Promise<unknown> {
      const id = nextId++;
      return new Promise((resolve, reject) => {
        waiting.set(id, (msg) => (msg.error ? reject(new Error(JSON.stringify(msg.error))) : resolve(msg.result?.data)));
        ws.send(JSON.stringify({ id, method: 'mutation', params: { path, input } }));
      });
    },
    close: () => ws.close(),
  };
}

/** The agent's pid on the host: the first child of the sandbox's init (tini). */
function agentPidOf(server: ServerProcess, sandboxId: string): string | null {
  try {
    const tini = readFileSync(join(server.instancesDir, sandboxId, 'init.pid'), 'utf8').trim();
    return readFileSync(`/proc/${tini}/task/${tini}/children`, 'utf8').trim().split(' ')[0] || null;
  } catch {
    return null;
  }
}

async function execSection(server: ServerProcess, apiKey: string): Promise<void> {
  const box = (await ok(server, 'POST', '/api/sandboxes', { name: 'bench-dataplane-exec' }, apiKey)) as { data: { id: string } };
  const id = box.data.id;
  const agent = await agentAlone(server, id);
  // What the server's exec sends the agent for `{command: "true"}` (see ExecService).
  const spec = { command: 'true', timeoutMs: 30_000, maxOutputBytes: 10 * 1024 * 1024 };
  const rest = () => ok(server, 'POST', `/api/sandboxes/${id}/exec`, { command: 'true' }, apiKey);
  // The floor for any Node server here: a bare HTTP server sending the agent one WebSocket message per request.
  const proxy = await startMinimalProxy(join(server.instancesDir, id, 'agent.sock'), spec);
  const minimal = () => ok({ ...server, url: proxy.url }, 'POST', '/exec', { command: 'true' });
  try {
    const samples = await interleaved({ host: hostSpawnTrue, agent: () => agent.mutate('process.run', spec), minimal, rest }, 10, EXECS / 10);
    const host = summarize('host', samples.host!);
    const alone = summarize('agent', samples.agent!);
    const ours = summarize('rest', samples.rest!);
    const floor = summarize('minimal', samples.minimal!);
    console.log(`exec p50/p99 ms: host spawn ${host.p50.toFixed(2)}/${host.p99.toFixed(2)}, agent alone ${alone.p50.toFixed(2)}/${alone.p99.toFixed(2)}, minimal Node proxy ${floor.p50.toFixed(2)}/${floor.p99.toFixed(2)}, POST /exec ${ours.p50.toFixed(2)}/${ours.p99.toFixed(2)}`);
    row({ section: 'exec', case: '`true` via POST /exec, p50', ours: ours.p50, baseline: alone.p50, unit: 'ms', baselineName: 'agent alone', target: '≤ 1.3×', met: ours.p50 <= 1.3 * alone.p50 });
    row({ section: 'exec', case: '`true` via POST /exec, p50', ours: ours.p50, baseline: host.p50, unit: 'ms', baselineName: "host spawn('true')", target: '≤ baseline + 1 ms', met: ours.p50 <= host.p50 + 1 });
    row({ section: 'exec', case: '`true` via POST /exec, p99', ours: ours.p99, baseline: alone.p99, unit: 'ms', baselineName: 'agent alone', target: '—', met: true });
    row({ section: 'exec', case: '`true` via minimal Node proxy, p50', ours: floor.p50, baseline: alone.p50, unit: 'ms', baselineName: 'agent alone', target: 'floor', met: true });

    // CPU per call: a run of REST execs alone, the server's and the agent's CPU time across it.
    const agentPid = agentPidOf(server, id);
    const n = EXECS;
    const server0 = cpuMsOf(server.pid);
    const agent0 = agentPid ? cpuMsOf(agentPid) : 0;
    for (let i = 0; i < n; i++) await rest();
    const serverCpu = (cpuMsOf(server.pid) - server0) / n;
    const agentCpu = agentPid ? (cpuMsOf(agentPid) - agent0) / n : NaN;
    const aloneAgent0 = agentPid ? cpuMsOf(agentPid) : 0;
    for (let i = 0; i < n; i++) await agent.mutate('process.run', spec);
    const aloneAgentCpu = agentPid ? (cpuMsOf(agentPid) - aloneAgent0) / n : NaN;
    // The floor on this machine: the server's CPU per request, one at a time, for the cheapest
    // route (no key, no store, no agent): what any call costs in wake-ups, parsing and writing.
    const floor0 = cpuMsOf(server.pid);
    for (let i = 0; i < n; i++) await call(server, 'GET', '/api/version');
    const floorCpu = (cpuMsOf(server.pid) - floor0) / n;
    const proxy0 = cpuMsOf(proxy.pid);
    for (let i = 0; i < n; i++) await minimal();
    const proxyCpu = (cpuMsOf(proxy.pid) - proxy0) / n;
    console.log(`exec CPU per call: server ${serverCpu.toFixed(3)} ms, agent ${agentCpu.toFixed(3)} ms (agent when called alone ${aloneAgentCpu.toFixed(3)} ms); server per GET /api/version, one at a time: ${floorCpu.toFixed(3)} ms; minimal Node proxy per exec ${proxyCpu.toFixed(3)} ms`);
    row({ section: 'exec', case: 'server CPU per `true`', ours: serverCpu, baseline: floorCpu, unit: 'ms', baselineName: 'GET /api/version, serial', target: '≤ 0.5 ms', met: serverCpu <= 0.5 });
    row({ section: 'exec', case: 'server CPU per `true`', ours: serverCpu, baseline: proxyCpu, unit: 'ms', baselineName: 'minimal Node proxy', target: 'floor', met: true });
    row({ section: 'exec', case: 'agent CPU per `true` (via server)', ours: agentCpu, baseline: aloneAgentCpu, unit: 'ms', baselineName: 'agent called alone', target: '—', met: true });
  } finally {
    agent.close();
    proxy.stop();
    await call(server, 'DELETE', `/api/sandboxes/${id}`, undefined, apiKey).catch(() => {});
  }
}

async function restSection(server: ServerProcess, apiKey: string): Promise<void> {
  const runs = { version: [] as Awaited<ReturnType<typeof closedLoop>>[], me: [] as Awaited<ReturnType<typeof closedLoop>>[] };
  await closedLoop(server.url, { path: '/api/orgs/me', headers: { 'x-api-key': apiKey }, connections: CONNECTIONS, seconds: 1 }); // warm-up
  await closedLoop(server.url, { path: '/api/version', connections: CONNECTIONS, seconds: 1 });
  for (let r = 0; r < REST_ROUNDS; r++) {
    runs.version.push(await closedLoop(server.url, { path: '/api/version', connections: CONNECTIONS, seconds: REST_SECONDS }));
    runs.me.push(await closedLoop(server.url, { path: '/api/orgs/me', headers: { 'x-api-key': apiKey }, connections: CONNECTIONS, seconds: REST_SECONDS }));
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  for (const [name, rs] of Object.entries(runs)) {
    const errors = rs.reduce((a, r) => a + r.errors, 0);
    console.log(`GET /api/${name === 'me' ? 'orgs/me' : 'version'}: ${rs.map((r) => `${Math.round(r.perSecond)}/s (p50 ${r.p50.toFixed(2)}, p99 ${r.p99.toFixed(2)} ms)`).join(', ')}${errors ? `, ${errors} non-2xx` : ''}`);
  }
  const me = median(runs.me.map((r) => r.perSecond));
  const version = median(runs.version.map((r) => r.perSecond));
  row({ section: 'rest', case: `GET /api/orgs/me, -c${CONNECTIONS}, req/s`, ours: me, baseline: version, unit: '/s', baselineName: '/api/version (no auth)', target: '≥ 6,000/s', met: me >= 6000 });
  row({ section: 'rest', case: `GET /api/orgs/me, -c${CONNECTIONS}, p99`, ours: median(runs.me.map((r) => r.p99)), baseline: median(runs.version.map((r) => r.p99)), unit: 'ms', baselineName: '/api/version (no auth)', target: 'reported', met: true });
}

/** Every section, in the order the table prints; a section owns its rows. */
const sections: Record<string, (server: ServerProcess, apiKey: string) => Promise<void>> = {
  exec: execSection,
  rest: restSection,
  streams: (server, apiKey) => streamsSection(server, apiKey, row),
  files: (server, apiKey) => filesSection(server, apiKey, row),
};

const server = await startServerProcess({ LOG_LEVEL: 'info' });
try {
  const reg = (await ok(server, 'POST', '/api/register', { name: 'Bench', email: `bench-dataplane-${Date.now()}@example.com` })) as { data: { apiKey: string } };
  for (const [name, run] of Object.entries(sections)) {
    if (only && !only.has(name)) continue;
    await run(server, reg.data.apiKey);
  }
} finally {
  keepAlive.destroy();
  await server.stop();
}

const fmt = (x: number, unit: string) => (Number.isNaN(x) ? 'n/a' : unit === '/s' ? `${Math.round(x)}/s` : `${x.toFixed(unit === 'ms' ? 3 : 1)} ${unit}`);
const width = [8, 40, 14, 26, 14, 8, 18];
const line = (cells: string[]) => console.log(cells.map((c, i) => c.padEnd(width[i]!)).join(' '));
console.log('');
line(['section', 'case', 'ours', 'baseline', 'value', 'ratio', 'target']);
for (const r of rows) line([r.section, r.case, fmt(r.ours, r.unit), r.baselineName, fmt(r.baseline, r.unit), (r.ours / r.baseline).toFixed(2), `${r.target}${r.target === '—' || r.target === 'reported' || r.target === 'floor' ? '' : r.met ? ' met' : ' NOT met'}`]);
