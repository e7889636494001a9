import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { SandboxHandle } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/** A FileEvent as the watch WebSocket sends it. */
interface FileEvent {
  type: string;
  path: string;
}

/**
 * Found by reading issue 12 as a user of the original VoidRun: behaviours its bullets promise,
 * checked through plain HTTP and WebSockets against a real server and a real sandbox.
 */
describe.skipIf(!support.ok)('issue 12 review: file watch', () => {
  let server: TestServer;
  let apiKey: string;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Review User', email: uniqueEmail('review12') });
    apiKey = reg.apiKey;
    box = await server.client(apiKey).sandboxes.create({ name: 'review-watch' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  /** Starts a watch session on `path` and connects to its stream; resolves once the socket is open. */
  async function watchStream(path: string): Promise<{ ws: WebSocket; seen: FileEvent[]; next: (predicate: (e: FileEvent) => boolean) => Promise<FileEvent> }> {
    const res = await server.http(`/api/sandboxes/${box.id}/files/watch`, { method: 'POST', apiKey, json: { path, recursive: true } });
    expect(res.status).toBe(200);
    const { sessionId } = ((await res.json()) as { data: { sessionId: string } }).data;
    const ws = new WebSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch/${sessionId}/stream?apiKey=${apiKey}`);
    const seen: FileEvent[] = [];
    const waiters: { predicate: (e: FileEvent) => boolean; resolve: (e: FileEvent) => void }[] = [];
    ws.on('message', (data) => {
      const event = JSON.parse(data.toString()) as FileEvent;
      seen.push(event);
      for (const w of [...waiters]) if (w.predicate(event)) (waiters.splice(waiters.indexOf(w), 1), w.resolve(event));
    });
    await new Promise<void>((resolve, reject) => (ws.once('open', () => resolve()), ws.once('error', reject)));
    const next = (predicate: (e: FileEvent) => boolean) =>
      new Promise<FileEvent>((resolve) => {
        const hit = seen.find(predicate);
        if (hit) resolve(hit);
        else waiters.push({ predicate, resolve });
      });
    return { ws, seen, next };
  }

  /**
   * Two watch sessions on `dir`, one after the other: the first sees `a` created and its client
   * leaves, `between` runs, then the second must see `b` created.
   */
  async function watchTwice(dir: string, between: () => Promise<unknown>): Promise<void> {
    await box.exec(`mkdir -p ${dir}`);
    const first = await watchStream(dir);
    const created = first.next((e) => e.type === 'created' && e.path === `${dir}/a`);
    await box.exec(`touch ${dir}/a`);
    await created;
    first.ws.close(); // the client leaves; the session idles until WATCH_IDLE_TIMEOUT_SEC
    await between();
    const second = await watchStream(dir);
    const again = second.next((e) => e.type === 'created' && e.path === `${dir}/b`);
    await box.exec(`touch ${dir}/b`);
    await again;
    second.ws.close();
  }

  it('a second watch session on a directory an earlier session watched reports files created in it', async () => {
    await watchTwice('/root/kept', async () => {});
  }, 20_000);

  // chokidar shares one fs.watch handle per path among the agent's watches: a session left idle on
  // a directory that is then deleted and recreated must let go of its handle on the dead directory,
  // or every later session on that path shares it and receives no event at all. The stale handle
  // shows only once the first session has held the path for a while (about a second, chokidar's
  // readdir throttle; no event marks the moment), hence the wait.
  it('a new watch session on a directory deleted and recreated after an earlier session left reports files created in it (regression: silent session)', async () => {
    await watchTwice('/root/recreated', async () => {
      await new Promise((r) => setTimeout(r, 1500));
      await box.exec('rm -rf /root/recreated && mkdir /root/recreated');
    });
  }, 20_000);

  // chokidar keeps watching a subdirectory that was replaced between two reads of its parent (the
  // name is there both times), i.e. the dead one. Reads of a directory are at most one a second,
  // hence the wait: the replacement lands between two of them (no event marks the moment).
  it('a recursive watch reports files created in a subdirectory deleted and recreated under it (regression: silent subdirectory)', async () => {
    await box.exec('mkdir -p /root/parent/child && touch /root/parent/child/a');
    const { ws, seen, next } = await watchStream('/root/parent');
    await new Promise((r) => setTimeout(r, 1500));
    const gone = next((e) => e.type === 'deleted' && e.path === '/root/parent/child/a');
    await box.exec('rm -rf /root/parent/child && mkdir /root/parent/child');
    await gone;
    const inside = next((e) => e.type === 'created' && e.path === '/root/parent/child/b');
    await box.exec('touch /root/parent/child/b');
    await inside;
    ws.close();
    expect(seen.map((e) => `${e.type} ${e.path.slice('/root/parent/'.length)}`)).toEqual(['deleted child/a', 'deleted child', 'created child', 'created child/b']);
  }, 20_000);

  it('a watch session whose directory is deleted reports what it held as deleted and ends, instead of going silent', async () => {
    await box.exec('mkdir -p /root/doomed/sub && touch /root/doomed/sub/f');
    const { ws, next } = await watchStream('/root/doomed');
    const closed = new Promise<number>((resolve) => ws.once('close', (code) => resolve(code)));
    await box.exec('rm -rf /root/doomed');
    await next((e) => e.type === 'deleted' && e.path === '/root/doomed/sub/f');
    await next((e) => e.type === 'deleted' && e.path === '/root/doomed/sub');
    expect(await closed).toBe(1000); // the session ended
  }, 20_000);
});
