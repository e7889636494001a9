import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { SandboxHandle } from '../client/index.js';
import { MAX_JSON_DEPTH } from '../server/http/json-body.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const KiB = 1024;
/** `n` nested arrays: `[[[…]]]`. */
const nested = (n: number) => '['.repeat(n) + ']'.repeat(n);

/** Status and parsed body of a response; `error` is the original VoidRun's error field. */
async function answer(res: Response): Promise<{ status: number; text: string; error: string }> {
  const text = await res.text();
  let error = '';
  try {
    error = (JSON.parse(text) as { error?: unknown }).error as string;
  } catch {}
  return { status: res.status, text, error: typeof error === 'string' ? error : JSON.stringify(error) };
}

describe('inputs as existing VoidRun clients send them (plain HTTP)', () => {
  let server: TestServer;
  let apiKey: string;
  /** A POST with a raw body and the given Content-Type (none when null). */
  const post = (path: string, body: string, type: string | null, key = apiKey) =>
    fetch(server.url + path, { method: 'POST', headers: { 'x-api-key': key, ...(type ? { 'content-type': type } : {}) }, body }).then(answer);

  beforeAll(async () => {
    server = await startTestServer();
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Input User', email: uniqueEmail('inputs') })).apiKey;
  });
  afterAll(async () => {
    await server?.close();
  });

  it("a JSON body sent as text/plain, as curl's default form type or with no Content-Type is read as JSON; a body that is not JSON gets 415 saying to send JSON", async () => {
    for (const type of ['text/plain', 'application/x-www-form-urlencoded', null]) {
      const r = await post('/api/register', JSON.stringify({ name: 'Curl User', email: uniqueEmail('curl') }), type, '');
      expect(r.status, `${type}: ${r.text}`).toBeLessThan(300);
      expect(r.text).toMatch(/"apiKey":"vr_/);
      // Raw routes read their bodies the same way: the body is valid, so the sandbox is what is missing.
      const raw = await post('/api/sandboxes/65ae1234567890abcdef1234/exec-stream', JSON.stringify({ command: 'true' }), type);
      expect(raw.status, `${type}: ${raw.text}`).toBe(404);
    }
    for (const [type, body] of [
      ['application/x-www-form-urlencoded', 'name=Form+User&email=form%40example.com'],
      ['text/plain', 'hello'],
      [null, '{"name":'],
      ['multipart/form-data; boundary=x', '--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--x--\r\n'],
    ] as const) {
      for (const path of ['/api/register', '/api/sandboxes/65ae1234567890abcdef1234/exec-stream']) {
        const r = await post(path, body, type);
        expect(r.status, `${type} ${path}: ${r.text}`).toBe(415);
        expect(r.error).toMatch(/send a JSON body, with Content-Type: application\/json/);
      }
    }
    const malformed = await post('/api/register', '{"name":', 'application/json', '');
    expect(malformed.status).toBe(400);
    expect(malformed.error).toBe('Malformed JSON body');
  });

  it('a key named __proto__ (an env var, a label) is refused with 400 on REST, raw routes and tRPC, never silently dropped', async () => {
    for (const body of ['{"name":"protobox","labels":{"__proto__":"x"}}', '{"name":"protobox","envVars":{"__proto__":{"polluted":"1"}}}']) {
      const r = await post('/api/sandboxes', body, 'application/json');
      expect(r.status, r.text).toBe(400);
      expect(r.error).toMatch(/"__proto__" is not accepted/);
    }
    const raw = await post('/api/sandboxes/65ae1234567890abcdef1234/exec-stream', '{"command":"true","env":{"__proto__":"x"}}', 'application/json');
    expect(raw.status, raw.text).toBe(400);
    const trpc = await fetch(`${server.url}/trpc/sandbox.create`, {
      method: 'POST',
      headers: { 'x-api-key': apiKey, 'content-type': 'application/json' },
      body: '{"json":{"name":"protobox","labels":{"__proto__":"x"}}}',
    });
    expect(trpc.status).toBe(400);
    expect(await trpc.text()).toMatch(/__proto__/);
  });

  it("a malformed JSON body's error says where it breaks in our words, never the parser's message quoting the body", async () => {
    const cases: Array<[string, RegExp]> = [
      ['{"name": "x", "email": sEcReT}', /^The body is not valid JSON: unexpected "s"$/],
      ['{"name": "x"}}', /^The body is not valid JSON: unexpected "}" at line 1, column 14$/],
      ['{"name":\n  "x",\n  oops}', /^The body is not valid JSON: unexpected "o" at line 3, column 3$/],
      ['{"name": "x"', /ends before the value is complete|unexpected the end of the body/],
    ];
    for (const [body, details] of cases) {
      const r = await post('/api/register', body, 'application/json', '');
      expect(r.status, body).toBe(400);
      expect((JSON.parse(r.text) as { details: string }).details, body).toMatch(details);
      expect(r.text).not.toMatch(/sEcReT|is not valid JSON"|position \d/);
    }
  });

  it(`nested JSON past ${MAX_JSON_DEPTH} levels cannot crash a REST, raw or tRPC (HTTP and WebSocket) call: 400 naming the limit`, async () => {
    const limit = new RegExp(`more than ${MAX_JSON_DEPTH} levels deep`);
    for (const depth of [5_000, 200_000]) {
      const rest = await post('/api/sandboxes', `{"name":${nested(depth)}}`, 'application/json');
      expect(rest.status, rest.text).toBe(400);
      expect(rest.error).toMatch(limit);
      const raw = await post('/api/sandboxes/65ae1234567890abcdef1234/exec-stream', `{"command":"true","env":{"A":${nested(depth)}}}`, 'application/json');
      expect(raw.status, raw.text).toBe(400);
      expect(raw.error).toMatch(limit);
      const trpc = await post('/trpc/sandbox.create', `{"json":{"name":${nested(depth)}}}`, 'application/json');
      expect(trpc.status, trpc.text).toBe(400);
      expect(trpc.text).toMatch(limit);
    }
    // Shallow enough is read as usual (the name is then refused for what it is).
    const shallow = await post('/api/sandboxes', `{"name":${nested(MAX_JSON_DEPTH - 1)}}`, 'application/json');
    expect(shallow.status).toBe(400);
    expect(shallow.error).toMatch(/^Invalid name/);

    const ws = new WebSocket(`${server.url.replace('http', 'ws')}/trpc?apiKey=${apiKey}`);
    await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
    const reply = new Promise<string>((resolve) => ws.once('message', (m) => resolve(String(m))));
    ws.send(`{"id":1,"method":"mutation","params":{"path":"sandbox.create","input":{"json":{"name":${nested(200_000)}}}}}`);
    const answer1 = await reply;
    expect(answer1).toMatch(limit);
    expect(answer1).toMatch(/^\{"id":1,/); // the call's own id, so the caller's promise settles
    // The socket still serves calls.
    const next = new Promise<string>((resolve) => ws.once('message', (m) => resolve(String(m))));
    ws.send('{"id":2,"method":"query","params":{"path":"system.version","input":{"json":null}}}');
    expect(await next).toMatch(/"id":2/);
    ws.close();
    expect(server.logLines.join('\n')).not.toMatch(/Maximum call stack/);
  });

  it('a multipart/form-data upload without a boundary is refused with 400 saying what is missing, not 500', async () => {
    const r = await post('/api/sandboxes/65ae1234567890abcdef1234/files/upload?path=/root/a.txt', 'abc', 'multipart/form-data');
    expect(r.status, r.text).toBe(400);
    expect(r.error).toMatch(/needs a boundary parameter/);
  });

  it('null optional fields read as absent on REST and raw routes; a required field given null is refused with 400 naming it', async () => {
    const missing = '/api/sandboxes/65ae1234567890abcdef1234';
    // Valid input: the unknown sandbox is the answer.
    const exec = await post(`${missing}/exec`, JSON.stringify({ command: 'true', args: null, env: null, cwd: null, timeout: null, background: null }), 'application/json');
    expect(exec.status, exec.text).toBe(404);
    const stream = await post(`${missing}/exec-stream`, JSON.stringify({ command: 'true', env: null, cwd: null, args: null, timeout: null }), 'application/json');
    expect(stream.status, stream.text).toBe(404);
    for (const path of [`${missing}/exec`, `${missing}/exec-stream`]) {
      const r = await post(path, JSON.stringify({ command: null, env: null }), 'application/json');
      expect(r.status, r.text).toBe(400);
      expect(r.error).toMatch(/^Invalid command/);
    }
    const create = await post('/api/sandboxes', JSON.stringify({ name: null, templateId: null }), 'application/json');
    expect(create.status).toBe(400);
    expect(create.error).toMatch(/^Invalid name/);
  });

  it('a REST body is taken as sent: autoResume "false" is a 400, not true; timeout "" is a 400, not "no timeout" (as over tRPC)', async () => {
    const missing = '65ae1234567890abcdef1234';
    const send = (method: string, path: string, body: string) =>
      fetch(`${server.url}/api${path}`, { method, headers: { 'x-api-key': apiKey, 'content-type': 'application/json' }, body }).then(answer);
    const cases: Array<[string, string, string, RegExp]> = [
      ['PATCH', `/sandboxes/${missing}`, '{"autoResume":"false"}', /^Invalid autoResume/],
      ['PATCH', `/sandboxes/${missing}`, '{"autoResume":"yes"}', /^Invalid autoResume/],
      ['POST', `/sandboxes/${missing}/timeout`, '{"timeout":""}', /^Invalid timeout: timeout must be a whole number of seconds/],
      ['POST', `/sandboxes/${missing}/timeout`, '{"timeout":"60"}', /^Invalid timeout: timeout must be a whole number of seconds/],
      ['POST', '/sandboxes', '{"name":"coerced","autoResume":"false"}', /^Invalid autoResume/],
      ['POST', '/sandboxes', '{"name":"coerced","cpu":"2"}', /^Invalid cpu/],
      // idle: null is a value (no idle policy), so with autoSleep it is the "not both" 400.
      ['PATCH', `/sandboxes/${missing}`, '{"autoSleep":true,"idle":null}', /^Invalid autoSleep: send autoSleep or idle, not both/],
      // A body that is not an object, and fields a sandbox update does not change, are refused, never ignored.
      ['PATCH', `/sandboxes/${missing}`, '[]', /^The body must be a JSON object .*not an array/],
      ['POST', `/sandboxes/${missing}/timeout`, '"60"', /^The body must be a JSON object .*not a string/],
      ['PATCH', `/sandboxes/${missing}`, '{"name":"renamed","cpu":64}', /a sandbox update changes only timeout, onTimeout, idle, autoResume and autoSleep; not name, cpu/],
      ['PATCH', `/sandboxes/${missing}`, '{}', /send at least one of timeout, onTimeout, idle, autoResume and autoSleep/],
      // A null field reads as absent (as the original's Go handlers read it): a PATCH of timeout null alone changes nothing, as POST /timeout without one.
      ['PATCH', `/sandboxes/${missing}`, '{"timeout":null}', /send at least one of/],
      ['POST', `/sandboxes/${missing}/timeout`, '{"timeout":null}', /^Invalid timeout/],
    ];
    for (const [method, path, body, message] of cases) {
      const r = await send(method, path, body);
      expect(r.status, `${method} ${path} ${body}: ${r.text}`).toBe(400);
      expect(r.error, `${method} ${path} ${body}`).toMatch(message);
    }
    // Well-typed, the same calls reach the (missing) sandbox.
    for (const [method, path, body] of [
      ['PATCH', `/sandboxes/${missing}`, '{"autoResume":false}'],
      ['PATCH', `/sandboxes/${missing}`, '{"idle":null}'],
      ['PATCH', `/sandboxes/${missing}`, '{"timeout":null,"autoResume":true}'],
      ['POST', `/sandboxes/${missing}/timeout`, '{"timeout":60}'],
    ]) {
      const r = await send(method!, path!, body!);
      expect(r.status, `${method} ${path} ${body}: ${r.text}`).toBe(404);
    }
    // tRPC answers the same bodies the same way.
    const trpc = await post('/trpc/sandbox.update', JSON.stringify({ json: { id: missing, autoResume: 'false' } }), 'application/json');
    expect(trpc.status).toBe(400);
  });

  it('query strings and path parameters are read as their fields\' types: "false" and "0" are false, a number that is not one (or "") is a 400 naming the field', async () => {
    const missing = '65ae1234567890abcdef1234';
    const call = (method: string, path: string) => fetch(`${server.url}/api${path}`, { method, headers: { 'x-api-key': apiKey } }).then(answer);
    // Read as typed: the sandbox is what is missing.
    for (const query of ['keepSnapshots=false', 'keepSnapshots=0', 'keepSnapshots=true', 'keepSnapshots=1', 'keepSnapshots=True', 'keepSnapshots=F']) expect((await call('DELETE', `/sandboxes/${missing}?${query}`)).status, query).toBe(404);
    expect((await call('POST', `/sandboxes/${missing}/ports/8000/token`)).status).toBe(404);
    const cases: Array<[string, string, RegExp]> = [
      ['DELETE', `/sandboxes/${missing}?keepSnapshots=yes`, /^Invalid keepSnapshots: "yes" is not a boolean; send true or false \(or 1 or 0\)$/],
      ['GET', '/sandboxes?page=', /^Invalid page: "" is not a number$/],
      ['GET', '/sandboxes?limit=0x10', /^Invalid limit: "0x10" is not a number$/],
      ['GET', `/sandboxes/${missing}/events?after=`, /^Invalid after: "" is not a number$/],
      ['POST', `/sandboxes/${missing}/ports/eighty/token`, /^Invalid port: "eighty" is not a number$/],
    ];
    for (const [method, path, message] of cases) {
      const r = await call(method, path);
      expect(r.status, `${method} ${path}: ${r.text}`).toBe(400);
      expect(r.error, path).toMatch(message);
    }
  });

  it('orgId "" and userId "" on create and restore mean "the key\'s" (not a 400); another org\'s id is still refused', async () => {
    const restore = await post('/api/sandboxes/restore', JSON.stringify({ snapshot_path: '65ae1234567890abcdef1234/snap-65ae1234567890abcdef1234', orgId: '', userId: '' }), 'application/json');
    expect(restore.status, restore.text).toBe(404);
    const other = await post('/api/sandboxes/restore', JSON.stringify({ snapshot_path: '65ae1234567890abcdef1234/snap-65ae1234567890abcdef1234', orgId: '65ae1234567890abcdef1234' }), 'application/json');
    expect(other.status, other.text).toBe(403);
  });
});

describe.skipIf(!support.ok)('inputs that reach the sandbox agent (container sandbox)', () => {
  let server: TestServer;
  let apiKey: string;
  let orgId: string;
  let box: SandboxHandle;
  const post = (path: string, json: unknown) => server.http(`/api/sandboxes/${box.id}${path}`, { method: 'POST', apiKey, json }).then(answer);
  const get = (path: string) => server.http(`/api/sandboxes/${box.id}${path}`, { apiKey }).then(answer);

  beforeAll(async () => {
    // Bodies past the kernel's ARG_MAX (about 2 MiB) must reach the agent.
    server = await startTestServer({ MAX_JSON_BODY_BYTES: String(8 * 1024 * KiB) });
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Agent Input User', email: uniqueEmail('agent-inputs') });
    apiKey = reg.apiKey;
    orgId = reg.orgId;
    // Created over REST as a common client does: orgId, userId and templateId always sent, empty.
    const created = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'inputs-box', orgId: '', userId: '', templateId: '' } });
    expect(created.status, await created.clone().text()).toBe(201);
    const id = ((await created.json()) as { data: { id: string; orgId: string } }).data.id;
    box = await server.client(apiKey).sandboxes.get(id);
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it('a sandbox created with orgId, userId and templateId "" belongs to the key\'s org, runs the default image, and runs commands given null optional fields (REST and exec-stream)', async () => {
    expect(box.info.orgId).toBe(orgId);
    expect(box.info.imageId).toBe((await server.client(apiKey).trpc.images.list.query()).find((i) => i.name === 'debian')?.id);
    const exec = await post('/exec', { command: 'echo "$HOME:$PWD"', args: null, env: null, cwd: null, timeout: null });
    expect(exec.status, exec.text).toBe(200);
    expect(exec.text).toContain('/root:/root');
    const stream = await post('/exec-stream', { command: 'echo streamed', env: null, cwd: null, args: null, timeout: null });
    expect(stream.status, stream.text).toBe(200);
    expect(stream.text).toMatch(/data: streamed/);
    // An empty cwd (sent by clients that always send the field) is the default directory.
    const emptyCwd = await post('/exec', { command: 'pwd', cwd: '' });
    expect(emptyCwd.status, emptyCwd.text).toBe(200);
    expect(emptyCwd.text).toContain('/root');
  }, 60_000);

  it("zero values as clients built on the original's Go structs always send them mean absent: exec timeout 0, session-exec shell \"\", cols and rows 0", async () => {
    // The original's ExecRequest: {command, args, timeout, env?, cwd?}, with nil args as null.
    const exec = await post('/exec', { command: 'echo zero', args: null, timeout: 0, cwd: '' });
    expect(exec.status, exec.text).toBe(200);
    expect(exec.text).toContain('zero');
    const stream = await post('/exec-stream', { command: 'echo zero-stream', args: null, timeout: 0 });
    expect(stream.status, stream.text).toBe(200);
    expect(stream.text).toContain('data: zero-stream');
    // Its SessionExecRequest has no omitempty: every field comes, empty or 0.
    const created = await post('/session-exec', { action: 'create', sessionId: '', shell: '', command: '', input: '', cols: 0, rows: 0 });
    expect(created.status, created.text).toBe(200);
    const body = JSON.parse(created.text) as { sessionId?: string; data?: { sessionId: string } };
    const sessionId = body.sessionId ?? body.data?.sessionId; // bare, as the original answers, or enveloped
    expect(sessionId).toBeTruthy();
    const ran = await post('/session-exec', { action: 'exec', sessionId, shell: '', command: 'echo in-session', input: '', cols: 0, rows: 0 });
    expect(ran.status, ran.text).toBe(200);
    expect(ran.text).toContain('in-session');
    expect((await post('/session-exec', { action: 'close', sessionId, shell: '', command: '', input: '', cols: 0, rows: 0 })).status).toBe(200);
  }, 60_000);

  it('a Last-Event-ID no command stream sent (a pid past the safe integers, a sequence that is not a number) is refused with 400 saying what to send, not a validation dump from the agent', async () => {
    const run = await post('/commands/run', { command: 'sleep 30' });
    const pid = (JSON.parse(run.text) as { pid?: number; data?: { pid: number } }).pid ?? (JSON.parse(run.text) as { data: { pid: number } }).data.pid;
    for (const [path, lastEventId] of [
      ['/exec-stream', '99999999999999999999:1'],
      ['/exec-stream', '0:1'],
      ['/exec-stream', 'abc'],
      ['/commands/attach', `${pid}:abc`],
    ] as const) {
      const r = await server.http(`/api/sandboxes/${box.id}${path}`, { method: 'POST', apiKey, json: { command: 'true', pid }, headers: { 'last-event-id': lastEventId } }).then(answer);
      expect(r.status, `${path} ${lastEventId}: ${r.text}`).toBe(400);
      expect(r.error).toMatch(/^Invalid Last-Event-ID .*<pid>:<seq>/);
    }
    await post('/commands/kill', { pid });
  }, 60_000);

  it('a NUL byte in any string bound for the agent is refused with 400 naming the field, not a 502 with Node internals', async () => {
    const nul = 'a\u0000b';
    const nulPath = encodeURIComponent('/root/a\u0000b');
    const cases: [string, Promise<{ status: number; text: string; error: string }>][] = [
      ['command', post('/exec', { command: `echo ${nul}` })],
      ['args.0', post('/exec', { command: 'echo', args: [nul] })],
      ['env.A', post('/exec', { command: 'true', env: { A: nul } })],
      ['env', post('/exec', { command: 'true', env: { [nul]: 'x' } })],
      ['cwd', post('/exec', { command: 'true', cwd: nul })],
      ['command', post('/exec-stream', { command: nul })],
      ['cwd', post('/commands/run', { command: 'sleep 1', cwd: nul })],
      ['shell', post('/session-exec', { action: 'create', shell: `/bin/sh${nul}` })],
      ['path', get(`/files?path=${nulPath}`)],
      ['path', get(`/files/stat?path=${nulPath}`)],
      ['path', post('/files/mkdir', { path: '/root/a\u0000b' })],
      ['to', post('/files/copy', { from: '/root', to: '/tmp/a\u0000b' })],
      ['pattern', get(`/files/search?path=/root&pattern=${encodeURIComponent(nul)}`)],
      ['path', post('/files/watch', { path: '/root/a\u0000b' })],
      ['path', get(`/files/download?path=${nulPath}`)],
      ['path', server.http(`/api/sandboxes/${box.id}/files/upload?path=${nulPath}`, { method: 'POST', apiKey, body: 'x' }).then(answer)],
      ['command', post('/pty/sessions/no-such-session/execute', { command: `ls${nul}` })],
      ['envVars.A', server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'nul-env', envVars: { A: nul } } }).then(answer)],
    ];
    for (const [field, pending] of cases) {
      const r = await pending;
      expect(r.status, `${field}: ${r.text}`).toBe(400);
      expect(r.error, field).toMatch(new RegExp(`^Invalid ${field.replace('.', '\\.')}.*NUL byte`));
      expect(r.text).not.toMatch(/ERR_INVALID_ARG|null bytes/);
    }
  }, 60_000);

  it('a cwd that is a file or missing, or a command past the kernel\'s argument limits, is refused with 400 saying what to fix, not a 502 spawn error; a relative cwd is inside /root', async () => {
    expect((await post('/files/create', { path: '/root/plain-file', content: 'x' })).status).toBe(200);
    for (const spec of [{ command: 'true', cwd: '/root/plain-file' }, { command: '/bin/true', args: ['x'], cwd: '/root/plain-file' }]) {
      const r = await post('/exec', spec);
      expect(r.status, r.text).toBe(400);
      expect(r.error).toBe('Invalid cwd: /root/plain-file is not a directory');
    }
    // A relative cwd is inside /root, as relative file paths are.
    expect((await post('/files/mkdir', { path: '/root/sub' })).status).toBe(200);
    expect((await post('/exec', { command: 'pwd', cwd: 'sub' })).text).toContain('"stdout":"/root/sub\\n"');
    const missing = await post('/commands/run', { command: 'true', cwd: '/root/no-such-dir' });
    expect(missing.status, missing.text).toBe(400);
    expect(missing.error).toBe('Invalid cwd: /root/no-such-dir does not exist');
    // One argument or NAME=value past 128 KiB: refused by the schema.
    const big = 'x'.repeat(128 * KiB);
    for (const [field, spec] of [
      ['command', { command: `echo ${big}` }],
      ['args.0', { command: 'echo', args: [big] }],
      ['env.BIG', { command: 'true', env: { BIG: big } }],
    ] as const) {
      const r = await post('/exec', spec);
      expect(r.status, r.text).toBe(400);
      expect(r.error).toMatch(new RegExp(`^Invalid ${field.replace('.', '\\.')}: .*128 KiB`));
    }
    // Each piece within limits, all together past ARG_MAX: the agent's E2BIG comes back as a 400.
    const env = Object.fromEntries(Array.from({ length: 40 }, (_, i) => [`V${i}`, 'y'.repeat(100 * KiB)]));
    const tooMuch = await post('/exec', { command: 'true', env });
    expect(tooMuch.status, tooMuch.text.slice(0, 300)).toBe(400);
    expect(tooMuch.error).toMatch(/too large for the kernel \(E2BIG\)/);
    const stream = await post('/exec-stream', { command: 'true', env });
    expect(stream.status).toBe(400);
    expect(stream.error).toMatch(/E2BIG/);
    // The sandbox still serves commands.
    const ok = await post('/exec', { command: 'echo still-here' });
    expect(ok.text).toContain('still-here');
  }, 60_000);
});
