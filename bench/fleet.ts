/**
 * `npm run bench:fleet`: what the fleet's API node adds (README "Fleet"). One API node and one host
 * as separate server processes on loopback, on one MongoDB-wire store (MONGO_URI, else a private
 * FerretDB started here: scripts/ferretdb.sh).
 *   1. exec `true` through the API node vs straight to the host's internal listener (what the API
 *      node itself calls, with the cluster token): interleaved, p50/p99, and what proxying adds;
 *      and through a minimal Node pass-through proxy process (bench/lib/pass-through-proxy.mjs),
 *      the floor of any Node hop on this machine;
 *   2. create throughput: BENCH_FLEET_CREATES creates (BENCH_FLEET_CONCURRENCY at a time) through
 *      the API node (placement + forwarding) and straight to the host, each then deleted (untimed).
 * Needs root and runc (npm run setup) and the debian image.
 */
import { Agent, request } from 'node:http';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PrivateFerretDb } from '../test/helpers/ferretdb.js';
import { FleetProcesses, json, stopNode } from '../test/helpers/fleet-nodes.js';
import { interleaved, printTable, summarize } from './lib/measure.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const EXECS = Number(process.env.BENCH_EXECS ?? 300);
const CREATES = Number(process.env.BENCH_FLEET_CREATES ?? 12);
const CONCURRENCY = Number(process.env.BENCH_FLEET_CONCURRENCY ?? 3);

const ferret = process.env.MONGO_URI ? null : await PrivateFerretDb.start(mkdtempSync(join(tmpdir(), 'bench-fleet-ferret-')));
const fleet = new FleetProcesses(process.env.MONGO_URI ?? ferret!.uri, {
  HOST_SLOTS: String(CREATES * 2 + 4),
  // Quotas and the host's commit sized for the creates (1 GiB disks: what a sandbox is promised, not what it costs).
  ORG_MAX_SANDBOXES: '64',
  ORG_MAX_VCPUS: '64',
  ORG_MAX_MEMORY_MB: String(64 * 1024),
  ORG_MAX_DISK_MB: String(64 * 1024),
  SANDBOX_DEFAULT_DISK_MB: '1024',
  HOST_MEMORY_COMMIT_PERCENT: '1000',
});
const api = await fleet.start('api', 'api');
const host = await fleet.start('host', 'host');
const internal = `http://127.0.0.1:${host.internalPort}`;
const floor = await startPassThroughProxy(internal);
const agent = new Agent({ keepAlive: true, maxSockets: 8 });

/** bench/lib/pass-through-proxy.mjs in front of `target`, as a process of its own (plain node). */
async function startPassThroughProxy(target: string): Promise<{ url: string; child: ChildProcess }> {
  const child = spawn(process.execPath, [fileURLToPath(new URL('./lib/pass-through-proxy.mjs', import.meta.url)), target], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<string>((resolve, reject) => {
    child.stdout!.once('data', (c: Buffer) => resolve(c.toString().trim()));
    child.once('exit', (code) => reject(new Error(`the pass-through proxy exited with ${code}`)));
  });
  return { url: `http://127.0.0.1:${port}`, child };
}

/** A POST over kept-alive connections; resolves with the parsed body (throws on a non-2xx). */
function post(url: string, headers: Record<string, string>, body: unknown): Promise<any> {
  const text = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(text)), ...headers } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const parsed = JSON.parse(Buffer.concat(chunks).toString());
        if ((res.statusCode ?? 500) >= 300) reject(new Error(`${url}: ${res.statusCode} ${JSON.stringify(parsed)}`));
        else resolve(parsed.data);
      });
    });
    req.on('error', reject);
    req.end(text);
  });
}

try {
  const { apiKey } = (await json(`${api.url}/api/register`, { method: 'POST', body: JSON.stringify({ name: 'Bench', email: `bench-${Date.now()}@example.com` }) })).body.data;
  const viaApi = { 'x-api-key': apiKey as string };
  const direct = { ...viaApi, 'x-voidrun-cluster-token': fleet.token };
  const box = await post(`${api.url}/api/sandboxes`, viaApi, { name: 'bench-fleet' });

  const execs = await interleaved(
    {
      direct: () => post(`${internal}/api/sandboxes/${box.id}/exec`, direct, { command: 'true' }),
      api: () => post(`${api.url}/api/sandboxes/${box.id}/exec`, viaApi, { command: 'true' }),
      floor: () => post(`${floor.url}/api/sandboxes/${box.id}/exec`, direct, { command: 'true' }),
    },
    10,
    Math.ceil(EXECS / 10),
    50,
  );
  const straight = summarize("POST /exec 'true', straight to the host", execs.direct!);
  const proxied = summarize("POST /exec 'true', through the API node", execs.api!);
  const passed = summarize("the same through a minimal Node proxy", execs.floor!);
  console.log(`\nexec through an API node vs straight to the host (${EXECS} each, interleaved):`);
  printTable([straight, proxied, passed], straight);
  console.log(`proxying adds ${(proxied.p50 - straight.p50).toFixed(3)} ms at p50, ${(proxied.p99 - straight.p99).toFixed(3)} ms at p99 (target: ≤ 1 ms at p50)`);
  console.log(`a minimal Node pass-through proxy process (the floor of any Node hop here: no auth, no routing, no logging) adds ${(passed.p50 - straight.p50).toFixed(3)} ms at p50`);

  /** Creates `n` sandboxes `concurrency` at a time at `base`; creates per second (deletes untimed). */
  const creates = async (label: string, base: string, headers: Record<string, string>) => {
    const ids: string[] = [];
    const latencies: number[] = [];
    let next = 0;
    const t0 = process.hrtime.bigint();
    await Promise.all(
      Array.from({ length: CONCURRENCY }, async () => {
        while (next < CREATES) {
          const i = next++;
          const s = process.hrtime.bigint();
          ids.push((await post(`${base}/api/sandboxes`, headers, { name: `${label.replace(/[^a-z]+/g, '-')}-${i}` })).id);
          latencies.push(Number(process.hrtime.bigint() - s) / 1e6);
        }
      }),
    );
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    for (const id of ids) await fetch(`${api.url}/api/sandboxes/${id}`, { method: 'DELETE', headers: viaApi });
    return { perSecond: CREATES / seconds, summary: summarize(`create (${CONCURRENCY} at a time), ${label}`, latencies) };
  };
  const straightCreates = await creates('straight to the host', internal, direct);
  const apiCreates = await creates('through the API node', api.url, viaApi);
  console.log(`\ncreate throughput (${CREATES} creates, ${CONCURRENCY} at a time):`);
  printTable([straightCreates.summary, apiCreates.summary], straightCreates.summary);
  console.log(`straight to the host ${straightCreates.perSecond.toFixed(2)} creates/s; through the API node (placement + forwarding) ${apiCreates.perSecond.toFixed(2)} creates/s (${(apiCreates.perSecond / straightCreates.perSecond).toFixed(2)}×)`);
  await fetch(`${api.url}/api/sandboxes/${box.id}`, { method: 'DELETE', headers: viaApi });
} finally {
  agent.destroy();
  floor.child.kill();
  await stopNode(api);
  await stopNode(host);
  fleet.cleanup();
  await ferret?.stop();
}
