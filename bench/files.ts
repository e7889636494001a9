/**
 * `npm run bench:files`: file transfer and watch costs through the real server (container driver).
 *   1. upload and download of a 1 GiB file through the API — with curl and with our TypeScript
 *      client — next to a raw `cat` copy of the same file on the same disk (the baseline), with the
 *      throughput ratio. Two more references put that ratio in context: GNU cat copies
 *      file-to-file inside the kernel (copy_file_range), so a user-space copy through a pipe
 *      (`cat | cat`) and a bare HTTP download (a minimal Node server streaming the file from disk
 *      to curl: no API, no sandbox, no agent) are measured too — the best any HTTP transfer can do;
 *   2. the server process's resident memory, sampled during the transfers: growth;
 *   3. watch event latency over 1,000 writes: from sending `echo >> file` through POST /exec to
 *      the `modified` event arriving on the watch stream.
 * Needs root and runc (npm run setup) and the debian image (npm run image:build).
 */
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { createWriteStream, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { randomBytes } from 'node:crypto';
import { createClient } from '../client/index.js';
import type { WatchMessage } from '../shared/index.js';
import { summarize } from './lib/measure.js';
import { startServerProcess } from './lib/server-process.js';

const SIZE_MB = Number(process.env.BENCH_FILE_MB ?? 1024);
const WRITES = Number(process.env.BENCH_WATCH_WRITES ?? 1000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

// Asynchronously: the RSS sampler below must keep running while curl and cat work.
const sh = (script: string) => promisify(execFile)('sh', ['-c', script], { maxBuffer: 1024 * 1024 });

const server = await startServerProcess();
const scratch = mkdtempSync(join(server.instancesDir, '..', 'bench-files-'));
try {
  const reg = await createClient({ url: server.url }).trpc.auth.register.mutate({ name: 'Bench', email: `bench-files-${Date.now()}@example.com` });
  const vr = createClient({ url: server.url, apiKey: reg.apiKey });
  const box = await vr.sandboxes.create({ name: 'bench-files' });

  const src = join(scratch, 'src.bin');
  process.stdout.write(`writing a ${SIZE_MB} MiB random file… `);
  await pipeline(
    (async function* () {
      const block = randomBytes(1024 * 1024);
      for (let i = 0; i < SIZE_MB; i++) {
        block.writeUInt32LE(i, 0); // not all blocks alike
        yield Buffer.from(block);
      }
    })(),
    createWriteStream(src),
  );
  console.log('done');

  const rssBefore = server.rss();
  let peak = rssBefore;
  const sampler = setInterval(() => (peak = Math.max(peak, server.rss())), 20);
  const timeIt = async (fn: () => Promise<unknown>) => {
    const t0 = process.hrtime.bigint();
    await fn();
    return Number(process.hrtime.bigint() - t0) / 1e9;
  };

  // Three rounds, the cases interleaved in each, medians reported: single runs of a 1 GiB copy
  // swing widely with the page cache and the other core's load.
  const auth = ['-H', `X-API-Key: ${reg.apiKey}`];
  const api = `${server.url}/api/sandboxes/${box.id}/files`;
  const copy = join(scratch, 'copy.bin');
  // The bare HTTP reference: its own process (this one's event loop is busy timing).
  const bare = spawn(
    process.execPath,
    ['-e', `const fs=require('fs');const s=require('http').createServer((q,r)=>{r.writeHead(200,{'content-length':fs.statSync(process.argv[1]).size});fs.createReadStream(process.argv[1],{highWaterMark:1<<20}).pipe(r)});s.listen(0,'127.0.0.1',()=>console.log(s.address().port))`, src],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const barePort = await new Promise<number>((resolve) => bare.stdout.once('data', (d: Buffer) => resolve(Number(d.toString().trim()))));
  // Every case ends with a global `sync`, so each pays for writing its own bytes to disk (an upload
  // writes the file inside the sandbox) and none for the writeback of the case before it.
  const cases: Record<string, () => Promise<unknown>> = {
    raw: () => sh(`cat "${src}" > "${copy}" && sync && rm "${copy}"`),
    pipe: () => sh(`cat "${src}" | cat > "${copy}" && sync && rm "${copy}"`),
    bareHttp: () => sh(`curl -sf -o "${copy}" http://127.0.0.1:${barePort}/ && sync && rm "${copy}"`),
    curlUp: () => sh(`curl -sf -o /dev/null -X POST -H "X-API-Key: ${reg.apiKey}" -H 'content-type: application/octet-stream' -T "${src}" "${api}/upload?path=/root/curl.bin" && sync`),
    curlDown: () => sh(`curl -sf -o "${copy}" -H "X-API-Key: ${reg.apiKey}" "${api}/download?path=/root/curl.bin" && sync && rm "${copy}"`),
    up: async () => {
      await box.files.upload('/root/big.bin', { path: src });
      await sh('sync');
    },
    down: async () => {
      await pipeline(await box.files.download('/root/big.bin'), createWriteStream(copy, { highWaterMark: 1024 * 1024 }));
      await sh(`sync && rm "${copy}"`);
    },
  };
  const seconds: Record<string, number[]> = {};
  for (let round = 0; round < ROUNDS; round++) {
    for (const [name, fn] of Object.entries(cases)) (seconds[name] ??= []).push(await timeIt(fn));
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  bare.kill();
  const [raw, pipeCopy, bareHttp, curlUp, curlDown, up, down] = ['raw', 'pipe', 'bareHttp', 'curlUp', 'curlDown', 'up', 'down'].map((k) => median(seconds[k]!)) as [
    number, number, number, number, number, number, number,
  ];
  await pipeline(await box.files.download('/root/big.bin'), createWriteStream(join(scratch, 'back.bin')));
  clearInterval(sampler);
  const same = statSync(join(scratch, 'back.bin')).size === statSync(src).size;
  rmSync(join(scratch, 'back.bin'));

  const mbps = (s: number) => (SIZE_MB / s).toFixed(0);
  console.log(`\n${SIZE_MB} MiB file, container driver, same disk; medians of ${ROUNDS} interleaved rounds\n`);
  console.log(`${'case'.padEnd(44)}${'seconds'.padStart(9)}${'MiB/s'.padStart(8)}${'vs raw'.padStart(9)}${'vs pipe'.padStart(9)}${'vs bare HTTP'.padStart(14)}`);
  for (const [name, s] of [
    ['cat copy on the host [baseline]', raw],
    ['cat | cat copy (user space) [reference]', pipeCopy],
    ['bare HTTP download, curl [reference]', bareHttp],
    ['upload with curl', curlUp],
    ['download with curl', curlDown],
    ['upload with the TS client', up],
    ['download with the TS client', down],
  ] as const) {
    console.log(`${name.padEnd(44)}${s.toFixed(2).padStart(9)}${mbps(s).padStart(8)}${(raw / s).toFixed(2).padStart(9)}${(pipeCopy / s).toFixed(2).padStart(9)}${(bareHttp / s).toFixed(2).padStart(14)}`);
  }
  console.log(`download size matches: ${same}`);
  console.log(`server RSS: before ${(rssBefore / 2 ** 20).toFixed(0)} MiB, peak during transfers ${(peak / 2 ** 20).toFixed(0)} MiB, growth ${((peak - rssBefore) / 2 ** 20).toFixed(0)} MiB (target ≤ 64 MB)`);

  // Watch latency
  await box.files.mkdir('/root/watched');
  await box.files.create('/root/watched/f', '');
  const pending = new Map<number, bigint>();
  const latencies: number[] = [];
  let waiting: (() => void) | undefined;
  const events = box.files.watch('/root/watched');
  const it = events[Symbol.asyncIterator]();
  const first = it.next(); // opens the subscription
  await new Promise((r) => setTimeout(r, 500));
  void first.then(function onEvent(r: IteratorResult<WatchMessage>): void {
    if (r.done) return;
    if (r.value.type === 'modified') {
      const t0 = pending.values().next().value;
      if (t0 !== undefined) {
        latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
        pending.delete(pending.keys().next().value!);
        waiting?.();
      }
    }
    void it.next().then(onEvent);
  });
  for (let i = 0; i < WRITES; i++) {
    const done = new Promise<void>((r) => (waiting = r));
    pending.set(i, process.hrtime.bigint());
    await fetch(`${server.url}/api/sandboxes/${box.id}/exec`, {
      method: 'POST',
      headers: { 'x-api-key': reg.apiKey, 'content-type': 'application/json' },
      body: JSON.stringify({ command: `echo ${i} >> /root/watched/f` }),
    });
    await Promise.race([done, new Promise((r) => setTimeout(r, 1000))]);
    pending.clear();
    // chokidar merges changes of one file that come closer together than ~50 ms: space the writes.
    await new Promise((r) => setTimeout(r, 60));
  }
  const w = summarize('watch', latencies);
  console.log(`\nwatch latency over ${WRITES} writes (${latencies.length} events seen): p50 ${w.p50.toFixed(1)} ms, p99 ${w.p99.toFixed(1)} ms (target p50 ≤ 50 ms)`);
  // The iterator has a read pending; closing the client ends the subscription under it.
  void it.return(undefined);
  await vr.close();
} finally {
  rmSync(scratch, { recursive: true, force: true });
  await server.stop();
}
