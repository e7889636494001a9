/**
 * The `files` section of bench:dataplane: file bytes through the server against a bare Node HTTP
 * server on the same disk, measured in the same run, interleaved.
 *   - 1 GiB (BENCH_FILE_MB) upload and download, each followed by a global `sync`: ours (curl
 *     through POST …/files/upload and GET …/files/download) against the bare server receiving the
 *     file into a file and streaming it back (curl too); MiB/s, and the server's CPU per GiB
 *     against the bare server's; and against the floor for a server in front of the agent, a
 *     minimal Node pass-through (bench/lib/minimal-proxy.mjs: one pipe to the agent's file route).
 *   - 1,000 (BENCH_SMALL_FILES) files of 4 KiB, one request each over a kept-alive connection,
 *     against the bare server writing each to a file and against the minimal pass-through (the
 *     agent writing each); and the same files as one tar upload.
 */
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, mkdtempSync, rmSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import { createClient } from '../../client/index.js';
import { cpuMsOf } from './load.js';
import { startMinimalProxy, type ServerProcess } from './server-process.js';
import type { StreamRow } from './streams-section.js';

const SIZE_MB = Number(process.env.BENCH_FILE_MB ?? 1024);
const ROUNDS = Number(process.env.BENCH_FILE_ROUNDS ?? 2);
const SMALL_FILES = Number(process.env.BENCH_SMALL_FILES ?? 1000);
const sh = (script: string) => promisify(execFile)('sh', ['-c', script], { maxBuffer: 1024 * 1024 });
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** The bare reference: PUT /<name> writes the body to DIR/<name>, GET /<name> streams it back. */
const BARE_SERVER = `const fs=require('fs'),p=require('path'),d=process.argv[1];
require('http').createServer((q,r)=>{const f=p.join(d,decodeURIComponent(q.url.slice(1)));
if(q.method==='PUT'){q.pipe(fs.createWriteStream(f,{highWaterMark:1<<20})).on('finish',()=>r.end('{}'));return}
r.writeHead(200,{'content-length':fs.statSync(f).size});fs.createReadStream(f,{highWaterMark:1<<20}).pipe(r)})
.listen(0,'127.0.0.1',function(){console.log(this.address().port)})`;

const keepAlive = new Agent({ keepAlive: true, maxSockets: 1 });

/** One request with a small body over the kept-alive connection; resolves with the status once read. */
function put(url: string, method: string, body: Buffer, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method, agent: keepAlive, headers: { ...headers, 'content-length': String(body.length) } }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? resolve(200) : reject(new Error(`${method} ${url}: ${res.statusCode}`))));
    });
    req.on('error', reject);
    req.end(body);
  });
}

export async function filesSection(server: ServerProcess, apiKey: string, row: (r: StreamRow) => void): Promise<void> {
  const vr = createClient({ url: server.url, apiKey });
  const box = await vr.sandboxes.create({ name: 'bench-dataplane-files' });
  const scratch = mkdtempSync(join(server.instancesDir, '..', 'bench-files-'));
  const bareDir = join(scratch, 'bare');
  await sh(`mkdir -p "${bareDir}"`);
  const bare = spawn(process.execPath, ['-e', BARE_SERVER, bareDir], { stdio: ['ignore', 'pipe', 'inherit'] });
  // The floor for any Node server in front of the agent: one pipe to its file route, nothing else.
  const proxy = await startMinimalProxy(join(server.instancesDir, box.id, 'agent.sock'));
  try {
    const barePort = await new Promise<number>((resolve) => bare.stdout.once('data', (d: Buffer) => resolve(Number(d.toString().trim()))));
    const bareUrl = `http://127.0.0.1:${barePort}`;
    const src = join(scratch, 'src.bin');
    await pipeline(
      (async function* () {
        const block = randomBytes(1024 * 1024);
        for (let i = 0; i < SIZE_MB; i++) {
          block.writeUInt32LE(i, 0);
          yield Buffer.from(block);
        }
      })(),
      createWriteStream(src),
    );
    const copy = join(scratch, 'copy.bin');
    const api = `${server.url}/api/sandboxes/${box.id}/files`;
    const key = `-H "X-API-Key: ${apiKey}"`;
    // Each case: [seconds, CPU ms of the serving process (ours: the server; bare: the bare server)].
    const cases: Record<string, { pid: number; run: () => Promise<unknown> }> = {
      bareUp: { pid: bare.pid!, run: () => sh(`curl -sf -o /dev/null -T "${src}" ${bareUrl}/big.bin && sync`) },
      up: { pid: server.pid, run: () => sh(`curl -sf -o /dev/null -X POST ${key} -H 'content-type: application/octet-stream' -T "${src}" "${api}/upload?path=/root/big.bin" && sync`) },
      minUp: { pid: proxy.pid, run: () => sh(`curl -sf -o /dev/null -T "${src}" "${proxy.url}/files?path=/root/big.bin" && sync`) },
      bareDown: { pid: bare.pid!, run: () => sh(`curl -sf -o "${copy}" ${bareUrl}/big.bin && sync && rm "${copy}"`) },
      down: { pid: server.pid, run: () => sh(`curl -sf -o "${copy}" ${key} "${api}/download?path=/root/big.bin" && sync && rm "${copy}"`) },
      minDown: { pid: proxy.pid, run: () => sh(`curl -sf -o "${copy}" "${proxy.url}/files?path=/root/big.bin" && sync && rm "${copy}"`) },
    };
    const secs: Record<string, number[]> = {};
    const cpu: Record<string, number[]> = {};
    for (let r = 0; r < ROUNDS; r++) {
      for (const [name, c] of Object.entries(cases)) {
        const c0 = cpuMsOf(c.pid);
        const t0 = process.hrtime.bigint();
        await c.run();
        (secs[name] ??= []).push(Number(process.hrtime.bigint() - t0) / 1e9);
        (cpu[name] ??= []).push((cpuMsOf(c.pid) - c0) / 1000 / (SIZE_MB / 1024));
      }
    }
    const mibps = (name: string) => SIZE_MB / median(secs[name]!);
    const label = SIZE_MB === 1024 ? '1 GiB' : `${SIZE_MB} MiB`;
    for (const dir of ['up', 'down'] as const) {
      const bareName = dir === 'up' ? 'bareUp' : 'bareDown';
      const what = dir === 'up' ? 'upload' : 'download';
      row({ section: 'files', case: `${label} ${what} + sync, MiB/s`, ours: mibps(dir), baseline: mibps(bareName), unit: 'MiB/s', baselineName: `bare HTTP ${what}`, target: '≥ 0.8× bare', met: mibps(dir) >= 0.8 * mibps(bareName) });
      const ours = median(cpu[dir]!);
      row({ section: 'files', case: `server CPU per GiB ${what}ed`, ours, baseline: median(cpu[bareName]!), unit: 's', baselineName: 'bare server CPU', target: '≤ 0.6 s', met: ours <= 0.6 });
      const minName = dir === 'up' ? 'minUp' : 'minDown';
      row({ section: 'files', case: `${label} ${what} + sync, MiB/s`, ours: mibps(dir), baseline: mibps(minName), unit: 'MiB/s', baselineName: 'minimal Node pass-through', target: 'floor', met: true });
      row({ section: 'files', case: `server CPU per GiB ${what}ed`, ours, baseline: median(cpu[minName]!), unit: 's', baselineName: 'minimal pass-through CPU', target: 'floor', met: true });
    }
    await sh(`rm -f "${src}" "${bareDir}/big.bin"`);

    // Small files, one request each, interleaved rounds of a quarter each.
    const small = randomBytes(4096);
    const perRound = Math.ceil(SMALL_FILES / 4);
    let ours = 0;
    let bareSecs = 0;
    let oursSecs = 0;
    let minimalSecs = 0;
    for (let r = 0; r < 4; r++) {
      let t0 = process.hrtime.bigint();
      for (let i = 0; i < perRound; i++) await put(`${bareUrl}/s-${r}-${i}`, 'PUT', small, {});
      bareSecs += Number(process.hrtime.bigint() - t0) / 1e9;
      t0 = process.hrtime.bigint();
      for (let i = 0; i < perRound; i++) await put(`${api}/upload?path=/root/small/${r}-${i}`, 'POST', small, { 'x-api-key': apiKey, 'content-type': 'application/octet-stream' });
      oursSecs += Number(process.hrtime.bigint() - t0) / 1e9;
      t0 = process.hrtime.bigint();
      for (let i = 0; i < perRound; i++) await put(`${proxy.url}/files?path=/root/small-min/${r}-${i}`, 'PUT', small, {});
      minimalSecs += Number(process.hrtime.bigint() - t0) / 1e9;
      ours += perRound;
    }
    const oursRate = ours / oursSecs;
    row({ section: 'files', case: `${ours} × 4 KiB, one request each, files/s`, ours: oursRate, baseline: ours / bareSecs, unit: '/s', baselineName: 'bare HTTP, file per request', target: '≥ 1,000/s', met: oursRate >= 1000 });
    row({ section: 'files', case: `${ours} × 4 KiB, one request each, files/s`, ours: oursRate, baseline: ours / minimalSecs, unit: '/s', baselineName: 'minimal Node pass-through', target: 'floor', met: true });
    const many: Record<string, Buffer> = {};
    for (let i = 0; i < SMALL_FILES; i++) many[`d${i % 10}/f${i}`] = small;
    await box.files.writeMany('/root/warm', { a: small });
    const t0 = process.hrtime.bigint();
    await box.files.writeMany('/root/batch', many);
    const batchRate = SMALL_FILES / (Number(process.hrtime.bigint() - t0) / 1e9);
    row({ section: 'files', case: `${SMALL_FILES} × 4 KiB as one tar upload, files/s`, ours: batchRate, baseline: oursRate, unit: '/s', baselineName: 'ours, one request each', target: '≥ 5,000/s', met: batchRate >= 5000 });
    console.log(`files: up ${secs.up!.map((s) => s.toFixed(2)).join('/')} s (bare ${secs.bareUp!.map((s) => s.toFixed(2)).join('/')}, minimal pass-through ${secs.minUp!.map((s) => s.toFixed(2)).join('/')}), down ${secs.down!.map((s) => s.toFixed(2)).join('/')} s (bare ${secs.bareDown!.map((s) => s.toFixed(2)).join('/')}, minimal pass-through ${secs.minDown!.map((s) => s.toFixed(2)).join('/')}); small ${Math.round(oursRate)}/s, batch ${Math.round(batchRate)}/s`);
  } finally {
    bare.kill();
    proxy.stop();
    keepAlive.destroy();
    rmSync(scratch, { recursive: true, force: true });
    await vr.close();
  }
}
