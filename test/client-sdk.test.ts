import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { CommandExitError, createClient, FileNotFoundError, Sandbox, SandboxFiles, SandboxNotFoundError, type VoidRunClient } from '../client/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/** The E2B-style layer of the typed client (`Sandbox`), through the real server and real sandboxes. */
describe.skipIf(!support.ok)('the client SDK: Sandbox.create, commands.run, files, await using', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let sbx: Sandbox;
  const savedEnv = { url: process.env.VOIDRUN_API_URL, key: process.env.VOIDRUN_API_KEY };

  beforeAll(async () => {
    server = await startTestServer();
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'SDK User', email: uniqueEmail('sdk') })).apiKey;
    vr = server.client(apiKey);
    process.env.VOIDRUN_API_URL = server.url;
    process.env.VOIDRUN_API_KEY = apiKey;
    sbx = await Sandbox.create({ labels: { suite: 'sdk' }, envVars: { GREETING: 'hello' } });
  }, 180_000);
  afterAll(async () => {
    await sbx?.close();
    for (const [name, value] of [['VOIDRUN_API_URL', savedEnv.url], ['VOIDRUN_API_KEY', savedEnv.key]] as const) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    await server?.close();
  });

  it('Sandbox.create takes its connection from VOIDRUN_API_URL / VOIDRUN_API_KEY and applies the create fields', async () => {
    expect(sbx.info.status).toBe('running');
    expect(sbx.info.labels).toEqual({ suite: 'sdk' });
    expect(sbx.info.name).toMatch(/^sandbox-[0-9a-f]{8}$/);
    const listed = await Sandbox.list({ labels: { suite: 'sdk' } });
    expect(listed.sandboxes.map((s) => s.id)).toContain(sbx.sandboxId);
  });

  it('names the missing setting when neither an argument nor the environment gives the URL or the key', async () => {
    delete process.env.VOIDRUN_API_URL;
    try {
      await expect(Sandbox.create()).rejects.toThrow(/VOIDRUN_API_URL/);
      await expect(Sandbox.connect(sbx.sandboxId, { apiKey })).rejects.toThrow(/VOIDRUN_API_URL/);
      // Arguments win over (and stand in for) the environment.
      const again = await Sandbox.connect(sbx.sandboxId, { apiUrl: server.url, apiKey });
      expect(again.sandboxId).toBe(sbx.sandboxId);
      await again.close();
    } finally {
      process.env.VOIDRUN_API_URL = server.url;
    }
    delete process.env.VOIDRUN_API_KEY;
    try {
      await expect(Sandbox.list()).rejects.toThrow(/VOIDRUN_API_KEY/);
    } finally {
      process.env.VOIDRUN_API_KEY = apiKey;
    }
  });

  it('commands.run in the foreground resolves with stdout, stderr and exitCode', async () => {
    const r = await sbx.commands.run('echo "$GREETING"; echo oops >&2');
    expect(r).toMatchObject({ stdout: 'hello\n', stderr: 'oops\n', exitCode: 0, timedOut: false });
    const program = await sbx.commands.run('printf', { args: ['%s|', 'a b', 'c'] });
    expect(program.stdout).toBe('a b|c|');
  });

  it('a non-zero exit is a result by default, and a CommandExitError carrying the output with throwOnError', async () => {
    const r = await sbx.commands.run('echo out; echo err >&2; exit 3');
    expect(r).toMatchObject({ stdout: 'out\n', stderr: 'err\n', exitCode: 3 });
    const err = await sbx.commands.run('echo out; echo err >&2; exit 3', { throwOnError: true }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CommandExitError);
    expect(err).toMatchObject({ stdout: 'out\n', stderr: 'err\n', exitCode: 3 });
    // Streamed (with callbacks) fails the same way.
    const streamed = await sbx.commands.run('echo out; exit 5', { throwOnError: true, onStdout: () => {} }).catch((e: unknown) => e);
    expect(streamed).toMatchObject({ name: 'CommandExitError', stdout: 'out\n', exitCode: 5 });
  });

  it('streams output to onStdout / onStderr as it comes, and the result holds all of it', async () => {
    const out: string[] = [];
    const errs: string[] = [];
    const r = await sbx.commands.run('for i in 1 2 3; do echo line$i; echo e$i >&2; sleep 0.05; done', { onStdout: (d) => out.push(d), onStderr: (d) => errs.push(d) });
    expect(r.exitCode).toBe(0);
    expect(out.length).toBeGreaterThan(0);
    expect(out.join('')).toBe('line1\nline2\nline3\n');
    expect(errs.join('')).toBe('e1\ne2\ne3\n');
    expect(r.stdout).toBe(out.join(''));
  });

  it('timeoutMs bounds a foreground command (rounded up to seconds)', async () => {
    const r = await sbx.commands.run('sleep 30', { timeoutMs: 900 });
    expect(r.timedOut).toBe(true);
    expect(r.exitCode).not.toBe(0);
  });

  it('background: true gives a handle whose wait() resolves with the result, and kill() ends it', async () => {
    const seen: string[] = [];
    const proc = await sbx.commands.run('echo started; read line; echo "got $line"; exit 4', { background: true, onStdout: (d) => seen.push(d) });
    expect(proc.pid).toBeGreaterThan(0);
    expect((await sbx.commands.list()).map((p) => p.pid)).toContain(proc.pid);
    await proc.sendStdin('ping\n');
    const r = await proc.wait();
    expect(r).toMatchObject({ stdout: 'started\ngot ping\n', exitCode: 4 });
    expect(seen.join('')).toBe('started\ngot ping\n');
    // With throwOnError, the same exit is a CommandExitError from wait().
    const strict = await sbx.commands.run('exit 6', { background: true, throwOnError: true });
    await expect(strict.wait()).rejects.toMatchObject({ name: 'CommandExitError', exitCode: 6 });

    const sleeper = await sbx.commands.run('sleep 600', { background: true });
    expect(await sleeper.kill()).toBe(true);
    expect((await sleeper.wait()).exitCode).not.toBe(0);
    expect(await sbx.commands.kill(999_999)).toBe(false);
  });

  it('files write and read through fetch (the browser path), from strings, bytes, Blobs and streams', async () => {
    const viaFetch = await Sandbox.connect(sbx.sandboxId, { fetch: globalThis.fetch });
    try {
      await viaFetch.files.write('/root/sdk/a.txt', 'text in');
      expect(await viaFetch.files.readText('/root/sdk/a.txt')).toBe('text in');
      await viaFetch.files.write('/root/sdk/b.bin', new Uint8Array([0, 1, 2, 255]));
      expect([...(await viaFetch.files.read('/root/sdk/b.bin'))]).toEqual([0, 1, 2, 255]);
      await viaFetch.files.write('/root/sdk/c.txt', new Blob(['blob ', 'parts']));
      const stream = new Blob(['from a ReadableStream']).stream();
      await viaFetch.files.write('/root/sdk/d.txt', stream);
      expect(await new Response(await viaFetch.files.downloadStream('/root/sdk/d.txt')).text()).toBe('from a ReadableStream');
      await viaFetch.files.write('/root/sdk/r.txt', new Response('a fetch Response body'));
      expect(await viaFetch.files.readText('/root/sdk/r.txt')).toBe('a fetch Response body');
      await viaFetch.files.writeMany('/root/sdk/many', { 'x.txt': 'x', 'sub/y.txt': 'y' });
      expect((await sbx.commands.run('cat /root/sdk/c.txt /root/sdk/many/x.txt /root/sdk/many/sub/y.txt')).stdout).toBe('blob partsxy');
      await expect(viaFetch.files.read('/root/sdk/missing')).rejects.toBeInstanceOf(FileNotFoundError);
    } finally {
      await viaFetch.close();
    }
    // The default (node:http) path takes the same web sources.
    await sbx.files.write('/root/sdk/e.txt', new Blob(['node path']));
    expect(await sbx.files.readText('/root/sdk/e.txt')).toBe('node path');
    await sbx.files.write('/root/sdk/f.txt', new Response(new Blob(['streamed Response']).stream()));
    expect(await sbx.files.readText('/root/sdk/f.txt')).toBe('streamed Response');
  });

  it('await using deletes a created sandbox at the end of its scope, and releases a connected one', async () => {
    let id: string;
    {
      await using scoped = await Sandbox.create({ name: 'scoped' });
      id = scoped.sandboxId;
      {
        await using attached = await Sandbox.connect(id);
        expect((await attached.commands.run('echo in scope')).stdout).toBe('in scope\n');
      }
      // Leaving the connected one's scope released it: the sandbox is still there.
      expect((await vr.sandboxes.get(id)).info.status).toBe('running');
    }
    await expect(vr.sandboxes.get(id)).rejects.toBeInstanceOf(SandboxNotFoundError);
  });

  it('the end of an await using scope is no error when the sandbox is already gone (killed in the scope, or deleted elsewhere)', async () => {
    {
      await using killed = await Sandbox.create({ name: 'killed-in-scope' });
      await killed.kill();
    }
    let id: string;
    {
      await using elsewhere = await Sandbox.create({ name: 'deleted-elsewhere' });
      id = elsewhere.sandboxId;
      await (await vr.sandboxes.get(id)).delete();
    }
    await expect(vr.sandboxes.get(id)).rejects.toBeInstanceOf(SandboxNotFoundError);
  });

  it('Sandbox.create takes timeout and idle, and setTimeout() moves expiresAt from now (0 removes it)', async () => {
    await using box = await Sandbox.create({ name: 'timed', timeout: 60, onTimeout: 'stop', idle: { after: 600, action: 'stop' } });
    expect(box.info).toMatchObject({ timeout: 60, onTimeout: 'stop', idle: { after: 600, action: 'stop' } });
    const first = Date.parse(box.info.expiresAt ?? '');
    expect(first).toBeGreaterThan(Date.now());
    const longer = await box.setTimeout(600);
    expect(longer.timeout).toBe(600);
    expect(Date.parse(longer.expiresAt ?? '')).toBeGreaterThan(first);
    expect((await box.getInfo()).expiresAt).toBe(longer.expiresAt);
    const none = await box.setTimeout(0);
    expect(none).toMatchObject({ timeout: 0, expiresAt: null });
  });

  it('events() replays the stream from its start, resumes after an id, and ends at sandbox.deleted', async () => {
    const box = await Sandbox.create({ name: 'evented' });
    try {
      const live = box.events();
      const next = async (type: string) => {
        for (;;) {
          const { value, done } = await live.next();
          if (done) throw new Error(`the stream ended before ${type}`);
          if (value.type === type) return value;
        }
      };
      const created = await next('sandbox.created');
      expect(created.sandboxId).toBe(box.sandboxId);
      await box.pause();
      await box.resume();
      const paused = await next('sandbox.paused');
      const resumed = await next('sandbox.resumed');
      expect(resumed.id).toBeGreaterThan(paused.id);
      expect(paused.id).toBeGreaterThan(created.id);
      await live.return(undefined);

      // Resuming after the created event: what followed it, in order, the first with a larger id.
      const resumedStream = box.events({ after: created.id });
      const replay: string[] = [];
      for await (const e of resumedStream) {
        expect(e.id).toBeGreaterThan(created.id);
        replay.push(e.type);
        if (e.type === 'sandbox.resumed') break;
      }
      expect(replay.indexOf('sandbox.paused')).toBeLessThan(replay.indexOf('sandbox.resumed'));
      expect(replay).not.toContain('sandbox.created');

      // An iterator open while the sandbox is deleted ends after sandbox.deleted.
      const tail = box.events({ after: resumed.id });
      const rest = (async () => {
        const types: string[] = [];
        for await (const e of tail) types.push(e.type);
        return types;
      })();
      await (await vr.sandboxes.get(box.sandboxId)).delete();
      expect((await rest).at(-1)).toBe('sandbox.deleted');
    } finally {
      await box.close();
    }
  });

  it('events() resumes after the last event received when the WebSocket drops and reconnects (no gap, no repeat)', async () => {
    const sockets: WebSocket[] = [];
    class CountedWebSocket extends WebSocket {
      constructor(...args: ConstructorParameters<typeof WebSocket>) {
        super(...args);
        sockets.push(this);
      }
    }
    const box = await Sandbox.create({ name: 'reconnecting', WebSocket: CountedWebSocket as unknown as typeof globalThis.WebSocket });
    try {
      const seen: Array<{ id: number; type: string }> = [];
      const live = box.events();
      const next = async (type: string) => {
        for (;;) {
          const { value, done } = await live.next();
          if (done) throw new Error(`the stream ended before ${type}`);
          seen.push({ id: value.id, type: value.type });
          if (value.type === type) return value;
        }
      };
      await next('sandbox.started');
      expect(sockets).toHaveLength(1);
      sockets[0]!.terminate(); // the connection drops
      await sbx.client.sandboxes.get(box.sandboxId).then((h) => h.pause()); // while it is down, on another connection
      await next('sandbox.paused');
      expect(sockets.length).toBeGreaterThan(1);
      const ids = seen.map((e) => e.id);
      expect(ids).toEqual([...new Set(ids)].sort((a, b) => a - b));
      await live.return(undefined);
    } finally {
      await box.kill();
    }
  });

  it("disconnect() stops following a background command's output without ending it; a later wait() follows it again", async () => {
    const proc = await sbx.commands.run('echo one; read x; echo two', { background: true, onStdout: () => {} });
    const pending = proc.wait();
    proc.disconnect();
    await expect(pending).rejects.toThrow(/disconnect/);
    const again = sbx.commands.connect(proc.pid);
    await proc.sendStdin('go\n');
    expect(await again.wait()).toMatchObject({ stdout: 'one\ntwo\n', exitCode: 0 });
    expect((await proc.wait()).stdout).toBe('one\ntwo\n');
  });
});

/** A loopback server answering every request with `answer`; resolves once it listens. */
async function loopback(answer: (req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse) => void): Promise<{ server: Server; url: string }> {
  const server = createServer(answer);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

describe('the client never follows a redirect with the API key', () => {
  it("a 302 to another origin is an error naming it, on tRPC calls and fetch and node:http transfers; the key never arrives there", async () => {
    const seen: IncomingHttpHeaders[] = [];
    const elsewhere = await loopback((req, res) => {
      seen.push(req.headers);
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"data":{}}');
    });
    const redirecting = await loopback((req, res) => {
      req.resume();
      res.writeHead(302, { location: `${elsewhere.url}${req.url ?? '/'}` }).end();
    });
    const client = createClient({ url: redirecting.url, apiKey: 'vr-key-that-must-stay', fetch: (...a) => globalThis.fetch(...a) });
    try {
      const redirect = new RegExp(`with a redirect \\(302 to ${elsewhere.url.replace(/[.]/g, '\\.')}/`);
      await expect(client.sandboxes.list()).rejects.toThrow(redirect);
      const viaFetch = new SandboxFiles(client.trpc, client.http, 'a'.repeat(24));
      await expect(viaFetch.write('/root/x', 'bytes')).rejects.toThrow(redirect);
      await expect(viaFetch.read('/root/x')).rejects.toThrow(redirect);
      await expect(viaFetch.downloadStream('/root/x')).rejects.toThrow(redirect);
      // node:http (the default where Node's modules exist) does not follow one either: the 302 is the answer.
      const viaNode = new SandboxFiles(client.trpc, { ...client.http, fetch: undefined }, 'a'.repeat(24));
      await expect(viaNode.write('/root/x', 'bytes')).rejects.toThrow();
      await expect(viaNode.read('/root/x')).rejects.toThrow();
      expect(seen).toEqual([]);
    } finally {
      await client.close();
      redirecting.server.close();
      elsewhere.server.close();
    }
  });
});
