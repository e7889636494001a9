/**
 * `npm run bench:auth`: the cost of authenticating a request with 10,000 API keys in the store.
 * Runs in one process, interleaved, against the real server (embedded store, or MongoDB when
 * MONGO_URI is set): an unauthenticated request (/api/version, the baseline), an authenticated one
 * (/api/orgs/me, which also reads the org), and AuthService.authenticate alone.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { createApp } from '../server/app.js';
import { loadConfig } from '../server/config.js';
import { displayPrefix, generatePlainKey, hashKey } from '../server/services/api-key-material.js';
import { closeAgent, get, interleaved, printTable, summarize } from './lib/measure.js';

const KEYS = Number(process.env.BENCH_KEYS ?? 10_000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 20);
const PER_ROUND = Number(process.env.BENCH_PER_ROUND ?? 250);

const dataDir = mkdtempSync(join(tmpdir(), 'voidrun-bench-'));
const app = await createApp(loadConfig({ ...process.env, SERVER_PORT: '0', SERVER_HOST: '127.0.0.1', DATA_DIR: dataDir }), {
  log: pino({ level: 'silent' }),
});
try {
  const { port } = await app.listen();
  const base = `http://127.0.0.1:${port}`;

  const reg = await app.services.orgs.register({ name: 'Bench', email: `bench-${Date.now()}@example.com` });
  process.stdout.write(`store: ${app.store.kind}; inserting ${KEYS} API keys… `);
  const started = Date.now();
  const plainKeys: string[] = [];
  for (let i = 0; i < KEYS - 1; i++) {
    const plain = generatePlainKey();
    plainKeys.push(plain);
    await app.store.apiKeys.create({
      orgId: reg.orgId,
      name: `k${i}`,
      keyHash: hashKey(plain),
      prefix: displayPrefix(plain),
      createdBy: reg.userId,
      isActive: true,
      lastUsedAt: null,
    });
  }
  console.log(`${Date.now() - started} ms`);
  // A key from the middle of the set, so nothing benefits from being first or last.
  const key = plainKeys[Math.floor(plainKeys.length / 2)]!;

  const samples = await interleaved(
    {
      unauth: () => get(`${base}/api/version`),
      authed: () => get(`${base}/api/orgs/me`, { 'x-api-key': key }),
      authOnly: () => app.services.auth.authenticate(key),
    },
    ROUNDS,
    PER_ROUND,
  );
  const baseline = summarize('GET /api/version (no key) [baseline]', samples.unauth!);
  const authed = summarize('GET /api/orgs/me (X-API-Key)', samples.authed!);
  const authOnly = summarize('AuthService.authenticate() alone', samples.authOnly!);
  console.log(`\n${KEYS} keys in the store; ${ROUNDS}×${PER_ROUND} requests per case, interleaved; keep-alive loopback\n`);
  printTable([baseline, authed, authOnly], baseline);
  const overhead = authed.p50 - baseline.p50;
  console.log(`\np50 overhead of an authenticated request: ${overhead.toFixed(3)} ms (target ≤ 0.3 ms): ${overhead <= 0.3 ? 'met' : 'NOT met'}`);
} finally {
  closeAgent();
  await app.close();
  rmSync(dataDir, { recursive: true, force: true });
}
