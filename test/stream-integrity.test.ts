import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle } from '../client/index.js';
import { parseSse } from './helpers/http-streams.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/**
 * A streamed command loses nothing: the process is started and its output subscribed in one
 * agent call, and the output is pulled at the reader's pace, so a reader that keeps up gets every
 * byte however fast the command writes. The loss was intermittent, so each path runs three rounds.
 */

/** What `seq 1 1000000` prints: 6,888,896 bytes. */
const expected = Array.from({ length: 1_000_000 }, (_, i) => `${i + 1}\n`).join('');
const ROUNDS = 3;

describe.skipIf(!support.ok)('streamed output arrives whole', () => {
  let server: TestServer;
  let apiKey: string;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer();
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Streams', email: uniqueEmail('streams') })).apiKey;
    box = await server.client(apiKey).sandboxes.create({ name: 'stream-box' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it.each(Array.from({ length: ROUNDS }, (_, i) => i + 1))('seq 1 1000000 over SSE (POST /exec-stream) arrives byte for byte, with no gap (round %i)', async () => {
    const res = await server.http(`/api/sandboxes/${box.id}/exec-stream`, { method: 'POST', apiKey, json: { command: 'seq 1 1000000' } });
    expect(res.status).toBe(200);
    const events = parseSse(await res.text());
    expect(events.filter((e) => e.event === 'gap')).toEqual([]);
    expect(events[0]?.event).toBe('started');
    expect(events.at(-1)).toMatchObject({ event: 'exit' });
    expect(JSON.parse(events.at(-1)!.data)).toMatchObject({ exitCode: 0 });
    const stdout = events.filter((e) => e.event === 'stdout').map((e) => e.data).join('');
    expect(stdout.length).toBe(expected.length);
    expect(stdout === expected).toBe(true);
  }, 120_000);

  it.each(Array.from({ length: ROUNDS }, (_, i) => i + 1))('seq 1 1000000 over the tRPC subscription (exec.stream) arrives byte for byte, with no gap (round %i)', async () => {
    const parts: string[] = [];
    const types = new Set<string>();
    let exitCode: number | null = null;
    for await (const chunk of box.execStream('seq 1 1000000')) {
      types.add(chunk.type);
      if (chunk.type === 'stdout') parts.push(chunk.data);
      if (chunk.type === 'exit') exitCode = chunk.exitCode;
    }
    expect(types.has('gap')).toBe(false);
    expect(exitCode).toBe(0);
    const stdout = parts.join('');
    expect(stdout.length).toBe(expected.length);
    expect(stdout === expected).toBe(true);
  }, 120_000);
});
