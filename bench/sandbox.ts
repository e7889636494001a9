/**
 * `npm run bench:sandbox`: sandbox costs on the container driver, against the real server.
 *   1. create → first exec, 30 cold creates (each sandbox deleted after, untimed);
 *   2. exec `true` over REST, 500 calls, interleaved with `child_process.spawn('true')` on the host
 *      (the raw baseline, same process);
 *   3. host memory per idle sandbox with 50 running: the agent's and tini's resident memory, and
 *      the host's MemAvailable drop divided by 50.
 * Needs root and runc (npm run setup) and the debian image (npm run image:build).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startTestServer } from '../test/helpers/server.js';
import { interleaved, printTable, summarize } from './lib/measure.js';

const CREATES = Number(process.env.BENCH_CREATES ?? 30);
const EXECS = Number(process.env.BENCH_EXECS ?? 500);
const IDLE = Number(process.env.BENCH_IDLE ?? 50);

// Quotas and the host's pid, memory and disk capacity sized for the idle case's sandboxes in one
// org (1 GiB disks: what an idle sandbox is promised is not what it costs, which is measured).
const server = await startTestServer({
  LOG_LEVEL: 'silent',
  ORG_MAX_SANDBOXES: String(IDLE + 5),
  ORG_MAX_VCPUS: String(IDLE + 5),
  ORG_MAX_MEMORY_MB: String((IDLE + 5) * 1024),
  ORG_MAX_DISK_MB: String((IDLE + 5) * 1024),
  SANDBOX_DEFAULT_DISK_MB: '1024',
  HOST_MEMORY_COMMIT_PERCENT: '1000',
  SANDBOX_PIDS_LIMIT: '512',
});
const reg = await server.client().trpc.auth.register.mutate({ name: 'Bench', email: `bench-${Date.now()}@example.com` });
const apiKey = reg.apiKey;

async function post(path: string, body: unknown): Promise<unknown> {
  const res = await server.http(path, { method: 'POST', apiKey, json: body });
  const json = (await res.json()) as { data: unknown };
  if (res.status >= 300) throw new Error(`${path}: ${res.status} ${JSON.stringify(json)}`);
  return json.data;
}

function hostSpawnTrue(): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('true', { stdio: 'ignore' });
    child.once('error', reject);
    child.once('exit', () => resolve());
  });
}

function memAvailableKb(): number {
  return Number(/MemAvailable:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))![1]);
}

/** Proportional set size: private memory plus a fair share of pages shared with other sandboxes (node's code). */
function pssKb(pid: string): number {
  return Number(/Pss:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1] ?? 0);
}

try {
  // 1. create → first exec (the delete after each is not timed)
  const createSamples: number[] = [];
  for (let i = 0; i < CREATES + 2; i++) {
    const t0 = process.hrtime.bigint();
    const sb = (await post('/api/sandboxes', { name: `cold-${i}` })) as { id: string };
    await post(`/api/sandboxes/${sb.id}/exec`, { command: 'true' });
    if (i >= 2) createSamples.push(Number(process.hrtime.bigint() - t0) / 1e6); // 2 warm-ups
    await server.http(`/api/sandboxes/${sb.id}`, { method: 'DELETE', apiKey });
  }

  // 2. exec round trip vs host spawn
  const box = (await post('/api/sandboxes', { name: 'exec-bench' })) as { id: string };
  const execs = await interleaved(
    {
      host: hostSpawnTrue,
      rest: () => post(`/api/sandboxes/${box.id}/exec`, { command: 'true' }),
      restNoShell: () => post(`/api/sandboxes/${box.id}/exec`, { command: '/bin/true', args: [] }),
    },
    10,
    EXECS / 10,
  );

  // 3. idle memory
  const before = memAvailableKb();
  const idle: string[] = [];
  for (let i = 0; i < IDLE; i++) idle.push(((await post('/api/sandboxes', { name: `idle-${i}` })) as { id: string }).id);
  await new Promise((r) => setTimeout(r, 2000));
  const after = memAvailableKb();
  const perProcess = idle.map((id) => {
    const tini = readFileSync(join(server.dirs.instancesDir, id, 'init.pid'), 'utf8').trim();
    const agent = readFileSync(`/proc/${tini}/task/${tini}/children`, 'utf8').trim().split(' ')[0]!;
    return (pssKb(tini) + pssKb(agent)) / 1024;
  });

  const create = summarize('create → first exec (ms)', createSamples);
  console.log(`\ncontainer driver, debian image; ${CREATES} cold creates; ${EXECS} execs per case, interleaved\n`);
  console.log(`create → first exec: p50 ${create.p50.toFixed(1)} ms, p99 ${create.p99.toFixed(1)} ms (target p50 ≤ 150 ms)`);
  console.log('');
  const host = summarize("spawn('true') on the host [baseline]", execs.host!);
  printTable([host, summarize('POST /exec {command: "true"} (via sh -c)', execs.rest!), summarize('POST /exec {command: "/bin/true", args: []}', execs.restNoShell!)], host);
  const rss = summarize('idle', perProcess);
  console.log(`\nidle sandbox memory with ${IDLE} running: agent+tini PSS p50 ${rss.p50.toFixed(1)} MiB (max ${Math.max(...perProcess).toFixed(1)}); host MemAvailable drop ${((before - after) / 1024 / IDLE).toFixed(1)} MiB per sandbox (target ≤ 40 MB)`);
} finally {
  await server.close();
}
