/**
 * Conformance with the original VoidRun contract (../shared/reference/voidrun-openapi.yml, read at
 * test time): every operation it documents, run in one realistic flow against the real server with a
 * real sandbox, each answer's status and body checked against the contract's schema for that status
 * (test/helpers/contract.ts). Then the original's behaviours that are more than shapes, as named
 * tests. Skipped, with the reason printed, when the contract is not beside the clone.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { VoidRunClient } from '../client/index.js';
import { loadOurDocument, loadReferenceContract, operationKey, operationsOf } from './helpers/contract.js';
import { openSocket, parseSse, type OpenSocket } from './helpers/http-streams.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const { contract, reason } = loadReferenceContract();
if (!contract) console.warn(`[conformance tests] SKIPPED: ${reason}`);

describe.skipIf(!contract)('our openapi.yml covers the original contract', () => {
  it('documents every operation (path + method) of the original contract', () => {
    const ours = new Set(operationsOf(loadOurDocument()).map((o) => o.key));
    const missing = contract!.operations.filter((o) => !ours.has(o.key)).map((o) => o.key);
    expect(missing, `operations of the original contract missing from openapi.yml:\n${missing.join('\n')}`).toEqual([]);
  });

  it('checks answers strictly: another envelope, a missing field, a value outside an enum and an undocumented status fail; extra fields pass', () => {
    const c = contract!;
    const sandbox = { id: 'a', name: 'n', imageId: 'i', ip: '', cpu: 1, mem: 1024, status: 'running', createdAt: '2024-01-27T09:12:34Z', createdBy: 'u', orgId: 'o', envVars: {} };
    expect(c.check('GET', '/sandboxes/{id}', 200, { success: true, message: null, data: { ...sandbox, phase: 'running' } })).toEqual([]);
    expect(c.check('GET', '/sandboxes/{id}', 200, { success: true, data: { ...sandbox, status: 'creating' } }).join()).toContain('allowed values');
    expect(c.check('POST', '/sandboxes/{id}/commands/run', 200, { status: 'success', data: { pid: 1, command: 'x' } }).join()).toContain("'pid'");
    expect(c.check('GET', '/images', 200, { status: 'success', data: [] }).join()).toContain('must be array');
    expect(c.check('GET', '/orgs/me', 418, {}).join()).toContain('not documented');
    expect(c.checkSchema('FileEvent', { type: 'created', path: '/x', timestamp: 'yesterday' }).join()).toContain('date-time');
  });
});

/** A REST answer with what was asked, for the assertion messages. */
interface Answer {
  method: string;
  template: string;
  url: string;
  status: number;
  headers: Headers;
  text: string;
  body: any;
}

interface Call {
  path?: Record<string, string>;
  query?: Record<string, string | number | boolean>;
  json?: unknown;
  body?: RequestInit['body'];
  headers?: Record<string, string>;
  /** The API key to send (default: the flow's); `null` sends none. */
  key?: string | null;
}

describe.skipIf(!contract || !support.ok)('the original contract, operation by operation, in one flow', () => {
  const c = contract!;
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey = '';
  let orgId = '';
  const exercised = new Set<string>();
  const state: Record<string, string | undefined> = {};
  const flowBox = 'conf-main';
  let boxId = '';
  /** Every sandbox status the flow saw over REST. */
  const statusesSeen = new Set<string>();

  beforeAll(async () => {
    server = await startTestServer();
  }, 60_000);
  afterAll(async () => {
    await server?.close();
  });

  function fill(template: string, params: Record<string, string>): string {
    return template.replace(/\{([^}]+)\}/g, (_m, name: string) => encodeURIComponent(params[name] ?? `missing-${name}`));
  }

  async function call(method: string, template: string, options: Call = {}): Promise<Answer> {
    exercised.add(operationKey(method, template));
    if (options.key === undefined) await account();
    const params = { id: boxId, orgId, ...options.path };
    const search = new URLSearchParams(Object.entries(options.query ?? {}).map(([k, v]): [string, string] => [k, String(v)]));
    const url = `/api${fill(template, params)}${search.size ? `?${search}` : ''}`;
    const key = options.key === undefined ? apiKey : options.key;
    const res = await server.http(url, { method, headers: options.headers, json: options.json, body: options.body, ...(key ? { apiKey: key } : {}) });
    const text = await res.text();
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON: kept as text
    }
    return { method, template, url, status: res.status, headers: res.headers, text, body };
  }

  /** Asserts the answer has `status` and a body the contract's schema for that status accepts. */
  function conforms(a: Answer, status: number): void {
    const problems = a.status === status ? c.check(a.method, a.template, a.status, a.body) : [`status ${a.status}, expected ${status}`];
    const report = `${a.method} ${a.url} → ${a.status}\n  ${problems.join('\n  ')}\n  body: ${a.text.slice(0, 800)}${a.status >= 500 ? serverErrors() : ''}`;
    expect(problems, report).toEqual([]);
  }

  /** The server's last logged errors, for the message of a 5xx. */
  function serverErrors(): string {
    const errors = server.logLines.map((l) => JSON.parse(l) as { level: number; msg?: string; err?: { message?: string; stack?: string } }).filter((l) => l.level >= 50);
    return errors
      .slice(-2)
      .map((e) => `\n  server log: ${e.msg ?? ''}: ${(e.err?.stack ?? e.err?.message ?? '').split('\n').slice(0, 4).join(' | ')}`)
      .join('');
  }

  /** Opens a WebSocket operation of the contract and asserts the upgrade (101). */
  async function socket(template: string, params: Record<string, string> = {}): Promise<OpenSocket> {
    exercised.add(operationKey('GET', template));
    const url = `${server.url.replace(/^http/, 'ws')}/api${fill(template, { id: boxId, ...params })}`;
    const opened = await openSocket(url, { 'x-api-key': apiKey });
    expect(opened.status, `GET ${template} (WebSocket): ${'body' in opened ? opened.body : ''}`).toBe(101);
    return (opened as { socket: OpenSocket }).socket;
  }

  /** The flow's account: the one registered over REST, or (when that failed, or a test runs alone) one registered with our client. */
  async function account(): Promise<void> {
    if (apiKey) return;
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Conformance Fallback', email: uniqueEmail('conf') });
    apiKey = reg.apiKey;
    orgId = reg.orgId;
    vr = server.client(apiKey);
  }

  /** The flow's sandbox: the one created over REST, or (when that failed) one made with our client so the rest of the flow still runs. */
  async function box(): Promise<string> {
    if (!boxId) {
      await account();
      boxId = (await vr.sandboxes.create({ name: flowBox })).id;
    }
    return boxId;
  }

  async function execText(command: string): Promise<string> {
    const a = await server.http(`/api/sandboxes/${await box()}/exec`, { method: 'POST', apiKey, json: { command } });
    return ((await a.json()) as { data: { stdout: string } }).data.stdout;
  }

  // ── Authentication and organizations ────────────────────────────────────────────────────────────

  it('POST /register (register)', async () => {
    const a = await call('POST', '/register', { json: { name: 'Conformance User', email: uniqueEmail('conf') }, key: null });
    apiKey = a.body?.data?.apiKey ?? '';
    orgId = a.body?.data?.orgId ?? '';
    if (apiKey) vr = server.client(apiKey);
    conforms(a, 200);
  });

  it('a duplicate registration answers 400, as the contract and the original do', async () => {
    const email = uniqueEmail('dup');
    expect((await call('POST', '/register', { json: { name: 'First', email }, key: null })).status).toBeLessThan(300);
    const again = await call('POST', '/register', { json: { name: 'Second', email }, key: null });
    conforms(again, 400);
    expect(again.body.error).toMatch(/email|registered|exists/i);
  });

  it('GET /orgs/me (getCurrentOrg)', async () => {
    conforms(await call('GET', '/orgs/me'), 200);
  });

  it('GET /orgs/me serves the bare Organization and the original envelope in one body', async () => {
    const a = await call('GET', '/orgs/me');
    expect(a.body, a.text).toMatchObject({ id: orgId, data: { id: orgId } });
    expect(a.body.status, a.text).toBe('success');
  });

  it('POST /orgs/{orgId}/apikeys (generateAPIKey)', async () => {
    const a = await call('POST', '/orgs/{orgId}/apikeys', { json: { orgId, keyName: 'CI key' } });
    state.ciKeyId = a.body.keyId ?? a.body.data?.keyId ?? a.body.data?.id;
    state.ciKey = a.body.plainKey ?? a.body.data?.plainKey ?? a.body.data?.apiKey;
    conforms(a, 200);
    expect(a.body.keyName).toBe('CI key');
    expect((await call('GET', '/orgs/me', { key: a.body.plainKey })).status).toBe(200);
  });

  it('GET /orgs/{orgId}/apikeys (listAPIKeys)', async () => {
    conforms(await call('GET', '/orgs/{orgId}/apikeys'), 200);
  });

  it('GET /orgs/{orgId}/apikeys lists keys newest first', async () => {
    const newest = await call('POST', '/orgs/{orgId}/apikeys', { json: { orgId, keyName: 'newest key' } });
    expect(newest.status, newest.text).toBeLessThan(300);
    const list = await call('GET', '/orgs/{orgId}/apikeys');
    expect(Array.isArray(list.body), list.text).toBe(true);
    const names = (list.body as Array<{ name: string }>).map((k) => k.name);
    expect(names[0], list.text).toBe('newest key');
    expect(names.indexOf('CI key')).toBeGreaterThan(0);
  });

  it('DELETE /orgs/{orgId}/apikeys/{keyId} (revokeAPIKey)', async () => {
    conforms(await call('DELETE', '/orgs/{orgId}/apikeys/{keyId}', { path: { keyId: state.ciKeyId ?? 'none' } }), 200);
    const revoked = await call('GET', '/orgs/me', { key: state.ciKey ?? 'vr_none' });
    conforms(revoked, 401);
  });

  it('answers the routes the current client libraries call: /orgs/apikeys, /users/me, /orgs/users, /orgs/{orgId}/users', async () => {
    const generated = await server.http('/api/orgs/apikeys', { method: 'POST', apiKey, json: { keyName: 'lib key' } });
    expect(generated.status, await generated.clone().text()).toBeLessThan(300);
    const g = (await generated.json()) as Record<string, any>;
    const keyId = g.keyId ?? g.data?.keyId ?? g.id ?? g.data?.id;
    const listed = await server.http('/api/orgs/apikeys', { apiKey });
    expect(listed.status).toBe(200);
    expect(JSON.stringify(await listed.json())).toContain('lib key');
    expect((await server.http(`/api/orgs/apikeys/${keyId}`, { method: 'DELETE', apiKey })).status).toBe(200);
    for (const path of ['/api/users/me', '/api/orgs/users', `/api/orgs/${orgId}/users`]) {
      const res = await server.http(path, { apiKey });
      expect(res.status, `${path}: ${await res.clone().text()}`).toBe(200);
    }
  });

  it('answers a CORS preflight allowing any origin, as the original configures it by default', async () => {
    const res = await server.http('/api/sandboxes', {
      method: 'OPTIONS',
      headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST', 'access-control-request-headers': 'x-api-key, content-type' },
    });
    expect(res.status).toBeLessThan(300);
    expect(res.headers.get('access-control-allow-origin')).toMatch(/^(\*|https:\/\/app\.example\.com)$/);
    expect((res.headers.get('access-control-allow-headers') ?? '').toLowerCase()).toContain('x-api-key');
  });

  it('redirects a trailing-slash path like the original', async () => {
    const res = await server.http('/api/sandboxes/', { apiKey, redirect: 'manual' });
    expect([301, 307, 308]).toContain(res.status);
    expect(res.headers.get('location')).toMatch(/\/api\/sandboxes$/);
  });

  // ── Sandboxes ───────────────────────────────────────────────────────────────────────────────────

  it('POST /sandboxes (createSandbox) with orgId:"", userId:"" and sync:false', async () => {
    const a = await call('POST', '/sandboxes', { json: { name: flowBox, orgId: '', userId: '', sync: false, labels: { suite: 'conformance' } } });
    if (a.body?.data?.status) statusesSeen.add(a.body.data.status);
    boxId = a.body?.data?.id ?? '';
    conforms(a, 201);
    // A client of the original polls until the sandbox runs.
    for (let i = 0; i < 600; i++) {
      const got = await server.http(`/api/sandboxes/${boxId}`, { apiKey });
      const s = ((await got.json()) as { data?: { status?: string } }).data?.status;
      if (s) statusesSeen.add(s);
      if (s === 'running') {
        const exec = await server.http(`/api/sandboxes/${boxId}/exec`, { method: 'POST', apiKey, json: { command: 'echo ready' } });
        if (exec.status === 200 && ((await exec.json()) as { data: { stdout: string } }).data.stdout === 'ready\n') break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }, 120_000);

  it('POST /sandboxes (createSandbox) with sync:true answers a running sandbox', async () => {
    await box();
    const a = await call('POST', '/sandboxes', { json: { name: 'conf-sync', orgId: '', sync: true } });
    if (a.body?.data?.id) await vr.trpc.sandbox.delete.mutate({ id: a.body.data.id });
    conforms(a, 201);
    expect(a.body.data.status).toBe('running');
  }, 120_000);

  it('never answers status "creating" over REST (create with sync:false, get, list)', async () => {
    await box();
    const list = await call('GET', '/sandboxes');
    for (const s of (list.body?.data ?? []) as Array<{ status: string }>) statusesSeen.add(s.status);
    expect([...statusesSeen].filter((s) => !['running', 'stopped', 'paused', 'error'].includes(s))).toEqual([]);
  });

  it('GET /sandboxes/{id} (getSandbox)', async () => {
    await box();
    conforms(await call('GET', '/sandboxes/{id}'), 200);
  });

  it('GET /sandboxes/{id} carries success:true beside status:"success"', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}');
    expect(a.body, a.text).toMatchObject({ success: true, status: 'success', data: { id: boxId } });
  });

  it('GET /sandboxes (listSandboxes)', async () => {
    await box();
    const a = await call('GET', '/sandboxes', { query: { page: 1, limit: 10 } });
    conforms(a, 200);
    expect((a.body.data as Array<{ id: string }>).map((s) => s.id)).toContain(boxId);
  });

  it('clamps page and limit out of range like the original instead of answering 400', async () => {
    const a = await call('GET', '/sandboxes', { query: { page: 0, limit: 1000 } });
    conforms(a, 200);
    expect(a.body.meta.page).toBe(1);
    expect(a.body.meta.limit).toBeLessThanOrEqual(100);
  });

  it('keeps labels from create in every sandbox answer and filters GET /sandboxes?labels=k=v', async () => {
    await box();
    const got = await call('GET', '/sandboxes/{id}');
    expect(got.body.data?.labels, got.text).toEqual({ suite: 'conformance' });
    const matching = await call('GET', '/sandboxes', { query: { labels: 'suite=conformance' } });
    expect((matching.body.data as Array<{ id: string; labels?: object }>).map((s) => s.id), matching.text).toEqual([boxId]);
    const other = await call('GET', '/sandboxes', { query: { labels: 'suite=other' } });
    expect(other.body.data, other.text).toEqual([]);
  });

  // ── Execution ───────────────────────────────────────────────────────────────────────────────────

  it('POST /sandboxes/{id}/exec (execCommand)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/exec', { json: { command: 'echo hello; echo oops >&2; exit 3' } });
    conforms(a, 200);
    expect(a.body.data).toMatchObject({ stdout: 'hello\n', stderr: 'oops\n', exitCode: 3 });
  });

  it('POST /sandboxes/{id}/exec-stream (execCommandStream, SSE)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/exec-stream', { json: { command: 'echo out; echo err >&2; exit 2' } });
    expect(a.status, a.text).toBe(200);
    expect(a.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const events = parseSse(a.text);
    expect(events.filter((e) => e.event === 'stdout').map((e) => e.data).join('')).toContain('out');
    expect(events.filter((e) => e.event === 'stderr').map((e) => e.data).join('')).toContain('err');
    const exit = events.find((e) => e.event === 'exit');
    expect(exit, a.text).toBeDefined();
    expect(JSON.parse(exit!.data)).toMatchObject({ exitCode: 2 });
  });

  it('reads null for an optional field as absent (exec and exec-stream with env, cwd, args, timeout null)', async () => {
    await box();
    const nulls = { env: null, cwd: null, args: null, timeout: null };
    const exec = await call('POST', '/sandboxes/{id}/exec', { json: { command: 'echo nulls', ...nulls } });
    conforms(exec, 200);
    const stream = await call('POST', '/sandboxes/{id}/exec-stream', { json: { command: 'echo nulls', ...nulls } });
    expect(stream.status, stream.text).toBe(200);
    expect(parseSse(stream.text).some((e) => e.event === 'stdout' && e.data.includes('nulls'))).toBe(true);
  });

  it('reads a JSON body sent as text/plain or application/x-www-form-urlencoded as JSON', async () => {
    await box();
    for (const type of ['text/plain', 'application/x-www-form-urlencoded']) {
      const a = await call('POST', '/sandboxes/{id}/exec', { body: JSON.stringify({ command: 'echo typed' }), headers: { 'content-type': type } });
      expect(a.status, `${type}: ${a.text}`).toBe(200);
      expect(a.body.data.stdout).toBe('typed\n');
    }
  });

  it('accepts the API key as ?apiKey= and never logs it', async () => {
    await box();
    const res = await server.http(`/api/sandboxes/${boxId}?apiKey=${encodeURIComponent(apiKey)}`);
    expect(res.status).toBe(200);
    expect(server.logLines.join('\n')).not.toContain(apiKey);
  });

  // ── Background commands ─────────────────────────────────────────────────────────────────────────

  it('POST /sandboxes/{id}/commands/run (runBackgroundCommand)', async () => {
    await box();
    // As the client libraries send it: `timeout: 0` (no timeout) and `env`/`cwd` left out.
    const a = await call('POST', '/sandboxes/{id}/commands/run', { json: { command: 'sleep 300', timeout: 0 } });
    state.sleepPid = String(a.body.pid ?? a.body.data?.pid);
    conforms(a, 200);
    expect(a.body.pid, a.text).toBeGreaterThan(0);
  });

  it('GET /sandboxes/{id}/commands/list (listBackgroundProcesses)', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/commands/list');
    conforms(a, 200);
    expect(a.body.processes?.find((p: { pid: number }) => String(p.pid) === state.sleepPid), a.text).toMatchObject({ running: true });
  });

  it('POST /sandboxes/{id}/commands/attach (attachToBackgroundProcess, SSE)', async () => {
    await box();
    const run = await server.http(`/api/sandboxes/${boxId}/commands/run`, { method: 'POST', apiKey, json: { command: 'echo one; sleep 0.2; echo two' } });
    const r = (await run.json()) as { pid?: number; data?: { pid: number } };
    const a = await call('POST', '/sandboxes/{id}/commands/attach', { json: { pid: r.pid ?? r.data?.pid } });
    expect(a.status, a.text).toBe(200);
    expect(a.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const events = parseSse(a.text);
    expect(events.filter((e) => e.event === 'stdout').map((e) => e.data).join('\n')).toMatch(/one[\s\S]*two/);
    expect(JSON.parse(events.find((e) => e.event === 'exit')?.data ?? '{}')).toMatchObject({ exitCode: 0 });
  });

  it('POST /sandboxes/{id}/commands/wait (waitForBackgroundProcess)', async () => {
    await box();
    const run = await server.http(`/api/sandboxes/${boxId}/commands/run`, { method: 'POST', apiKey, json: { command: 'sleep 0.1; exit 4' } });
    const r = (await run.json()) as { pid?: number; data?: { pid: number } };
    const a = await call('POST', '/sandboxes/{id}/commands/wait', { json: { pid: r.pid ?? r.data?.pid } });
    conforms(a, 200);
    expect(a.body.exitCode, a.text).toBe(4);
  });

  it('POST /sandboxes/{id}/commands/kill (killBackgroundProcess)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/commands/kill', { json: { pid: Number(state.sleepPid) } });
    conforms(a, 200);
  });

  it('answers commands/kill after the process is reaped: a list right after shows it not running', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/commands/list');
    const processes = (a.body.processes ?? a.body.data?.processes ?? []) as Array<{ pid: number; running: boolean }>;
    expect(processes.find((p) => String(p.pid) === state.sleepPid), a.text).toMatchObject({ running: false });
  });

  // ── Terminals ───────────────────────────────────────────────────────────────────────────────────

  it('GET /sandboxes/{id}/pty (connectPTY, WebSocket)', async () => {
    await box();
    const s = await socket('/sandboxes/{id}/pty');
    s.ws.send('echo "pty-$((6*7))"\n');
    await s.until(/pty-42/);
    await s.close();
  });

  it('POST /sandboxes/{id}/pty/sessions (createPTYSession)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/pty/sessions', { json: { cols: 80, rows: 24 } });
    state.ptySession = a.body.data?.sessionId;
    conforms(a, 200);
  });

  it('GET /sandboxes/{id}/pty/sessions (listPTYSessions)', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/pty/sessions');
    conforms(a, 200);
    expect((a.body.data.sessions as Array<{ id: string }>).map((s) => s.id)).toContain(state.ptySession);
  });

  it('GET /sandboxes/{id}/pty/sessions/{sessionId} (connectPTYSession, WebSocket)', async () => {
    await box();
    const s = await socket('/sandboxes/{id}/pty/sessions/{sessionId}', { sessionId: state.ptySession ?? 'none' });
    s.ws.send('echo "attached-$((40+2))"\n');
    await s.until(/attached-42/);
    await s.close();
  });

  it('POST /sandboxes/{id}/pty/sessions/{sessionId}/execute (executeInPTYSession)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/pty/sessions/{sessionId}/execute', { path: { sessionId: state.ptySession ?? 'none' }, json: { command: 'echo "sess-$((2*21))"' } });
    conforms(a, 200);
  });

  it('GET /sandboxes/{id}/pty/sessions/{sessionId}/buffer (getPTYBuffer)', async () => {
    await box();
    let a: Answer | undefined;
    for (let i = 0; i < 100; i++) {
      a = await call('GET', '/sandboxes/{id}/pty/sessions/{sessionId}/buffer', { path: { sessionId: state.ptySession ?? 'none' } });
      if (a.status !== 200 || String(a.body.data?.output).includes('sess-42')) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    conforms(a!, 200);
    expect(a!.body.data.output).toContain('sess-42');
  });

  it('POST /sandboxes/{id}/pty/sessions/{sessionId}/resize (resizeTerminal)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/pty/sessions/{sessionId}/resize', { path: { sessionId: state.ptySession ?? 'none' }, json: { cols: 100, rows: 40 } }), 200);
  });

  it('DELETE /sandboxes/{id}/pty/sessions/{sessionId} (deletePTYSession)', async () => {
    await box();
    conforms(await call('DELETE', '/sandboxes/{id}/pty/sessions/{sessionId}', { path: { sessionId: state.ptySession ?? 'none' } }), 200);
  });

  // ── Files ───────────────────────────────────────────────────────────────────────────────────────

  it('POST /sandboxes/{id}/files/mkdir (createDirectory)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/files/mkdir', { query: { path: '/root/cf' } }), 200);
  });

  it('POST /sandboxes/{id}/files/upload (uploadFile) as multipart/form-data', async () => {
    await box();
    const form = new FormData();
    form.append('file', new Blob(['alpha\nbeta\ngamma\n']), 'notes.txt');
    conforms(await call('POST', '/sandboxes/{id}/files/upload', { query: { path: '/root/cf/notes.txt' }, body: form }), 200);
  });

  it('POST /sandboxes/{id}/files/upload (uploadFile) as application/octet-stream', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/files/upload', { query: { path: '/root/cf/raw.bin' }, body: 'raw bytes', headers: { 'content-type': 'application/octet-stream' } });
    conforms(a, 200);
    expect(await execText('cat /root/cf/raw.bin')).toBe('raw bytes');
  });

  it('GET /sandboxes/{id}/files (listFiles)', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/files', { query: { path: '/root/cf' } });
    conforms(a, 200);
    expect((a.body.data.files as Array<{ name: string }>).map((f) => f.name).sort()).toEqual(['notes.txt', 'raw.bin']);
  });

  it('GET /sandboxes/{id}/files/stat (statFile)', async () => {
    await box();
    conforms(await call('GET', '/sandboxes/{id}/files/stat', { query: { path: '/root/cf/notes.txt' } }), 200);
  });

  it('prints files/stat stdout as one JSON object {path,size,mode,mtime,type}, as the original does', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/files/stat', { query: { path: '/root/cf/notes.txt' } });
    const stat = JSON.parse(a.body.data.stdout) as Record<string, unknown>;
    expect(stat).toMatchObject({ path: '/root/cf/notes.txt', size: 17, type: expect.stringMatching(/regular file/) });
    expect(Object.keys(stat)).toEqual(expect.arrayContaining(['path', 'size', 'mode', 'mtime', 'type']));
  });

  it('GET /sandboxes/{id}/files/du (diskUsage)', async () => {
    await box();
    conforms(await call('GET', '/sandboxes/{id}/files/du', { query: { path: '/root/cf' } }), 200);
  });

  it('prints files/du stdout as `du -sh` does: "<size>\\t<path>"', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/files/du', { query: { path: '/root/cf' } });
    expect(a.body.data.stdout).toMatch(/^\d+(\.\d+)?[KMGTPE]?\t\/root\/cf\n?$/);
  });

  it('GET /sandboxes/{id}/files/search (searchFiles)', async () => {
    await box();
    conforms(await call('GET', '/sandboxes/{id}/files/search', { query: { path: '/root/cf', pattern: 'notes' } }), 200);
  });

  it('matches a plain files/search pattern as a substring, and still takes globs', async () => {
    await box();
    const plain = await call('GET', '/sandboxes/{id}/files/search', { query: { path: '/root/cf', pattern: 'ote' } });
    expect(plain.body.data.stdout, plain.text).toContain('/root/cf/notes.txt');
    expect(plain.body.data.stdout).not.toContain('raw.bin');
    const glob = await call('GET', '/sandboxes/{id}/files/search', { query: { path: '/root/cf', pattern: '*.bin' } });
    expect(glob.body.data.stdout, glob.text).toContain('/root/cf/raw.bin');
    expect(glob.body.data.stdout).not.toContain('notes.txt');
  });

  it('GET /sandboxes/{id}/files/head-tail (headTail)', async () => {
    await box();
    const tail = await call('GET', '/sandboxes/{id}/files/head-tail', { query: { path: '/root/cf/notes.txt', lines: 2, head: false } });
    conforms(tail, 200);
    expect(tail.body.data.stdout).toBe('beta\ngamma\n');
    const head = await call('GET', '/sandboxes/{id}/files/head-tail', { query: { path: '/root/cf/notes.txt', lines: 1 } });
    expect(head.body.data.stdout).toBe('alpha\n');
  });

  it('POST /sandboxes/{id}/files/create (createFile)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/files/create', { query: { path: '/root/cf/made.txt' }, json: { content: 'made' } }), 200);
    expect(await execText('cat /root/cf/made.txt')).toBe('made');
  });

  it('POST /sandboxes/{id}/files/copy (copyFile)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/files/copy', { query: { from: '/root/cf/notes.txt', to: '/root/cf/copy.txt' } }), 200);
  });

  it('POST /sandboxes/{id}/files/move (moveFile)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/files/move', { query: { from: '/root/cf/copy.txt', to: '/root/cf/moved.txt' } }), 200);
    expect(await execText('ls /root/cf')).toBe('made.txt\nmoved.txt\nnotes.txt\nraw.bin\n');
  });

  it('POST /sandboxes/{id}/files/chmod (changePermissions)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/files/chmod', { query: { path: '/root/cf/moved.txt', mode: '755' } }), 200);
    expect(await execText('stat -c %a /root/cf/moved.txt')).toBe('755\n');
  });

  it('POST /sandboxes/{id}/files/compress (compressFile)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/files/compress', { query: { path: '/root/cf', format: 'tar.gz' } }), 200);
    expect(await execText('tar -tzf /root/cf.tar.gz | sort | head -n 2')).toMatch(/cf\//);
  });

  it('POST /sandboxes/{id}/files/extract (extractArchive)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/files/extract', { query: { archive: '/root/cf.tar.gz', dest: '/root/cf-out' } }), 200);
    expect(await execText('cat /root/cf-out/cf/notes.txt')).toBe('alpha\nbeta\ngamma\n');
  });

  it('GET /sandboxes/{id}/files/download (downloadFile)', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/files/download', { query: { path: '/root/cf/notes.txt' } });
    expect(a.status, a.text).toBe(200);
    expect(a.headers.get('content-type')).toMatch(/^application\/octet-stream/);
    expect(a.text).toBe('alpha\nbeta\ngamma\n');
  });

  it('DELETE /sandboxes/{id}/files (deleteFile)', async () => {
    await box();
    conforms(await call('DELETE', '/sandboxes/{id}/files', { query: { path: '/root/cf-out' } }), 200);
    expect(await execText('test -e /root/cf-out && echo there || echo gone')).toBe('gone\n');
  });

  it('POST /sandboxes/{id}/files/watch (startWatch)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/files/watch', { json: { path: '/root/cf', recursive: true } });
    state.watchSession = a.body.data?.sessionId;
    conforms(a, 200);
  });

  it('GET /sandboxes/{id}/files/watch/{sessionId}/stream (streamWatchEvents, WebSocket)', async () => {
    await box();
    const s = await socket('/sandboxes/{id}/files/watch/{sessionId}/stream', { sessionId: state.watchSession ?? 'none' });
    // The agent confirms the watch before the start call answers; a file made now is seen.
    await execText('echo watched > /root/cf/watched.txt');
    await s.until(/watched\.txt/);
    await s.close();
    const events = s.received.map((m) => JSON.parse(m) as unknown).filter((e) => JSON.stringify(e).includes('watched.txt'));
    for (const e of events) expect(c.checkSchema('FileEvent', e), JSON.stringify(e)).toEqual([]);
  });

  // ── Images ──────────────────────────────────────────────────────────────────────────────────────

  it('GET /images (listImages)', async () => {
    const a = await call('GET', '/images');
    const debian = (Array.isArray(a.body) ? a.body : (a.body.data ?? [])).find((i: { name: string }) => i.name === 'debian');
    state.imageId = debian?._id ?? debian?.id;
    conforms(a, 200);
    expect(debian, a.text).toBeDefined();
  });

  it('GET /images/{id} (getImage)', async () => {
    const a = await call('GET', '/images/{id}', { path: { id: state.imageId ?? 'none' } });
    conforms(a, 200);
    expect(a.body.name).toBe('debian');
  });

  it('GET /images/name/{name} (getImageByName)', async () => {
    const a = await call('GET', '/images/name/{name}', { path: { name: 'debian' } });
    conforms(a, 200);
    expect(a.body._id).toBe(state.imageId);
  });

  it('POST /images (createImage)', async () => {
    const a = await call('POST', '/images', { json: { name: 'conf-image', version: '1.0', path: 'debian' } });
    state.createdImageId = a.body._id ?? a.body.data?._id ?? a.body.data?.id;
    conforms(a, 201);
  });

  it('DELETE /images/{id} (deleteImage)', async () => {
    conforms(await call('DELETE', '/images/{id}', { path: { id: state.createdImageId ?? 'none' } }), 200);
  });

  // ── Snapshots ───────────────────────────────────────────────────────────────────────────────────

  it('POST /sandboxes/{id}/snapshot (createSnapshot)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/{id}/snapshot');
    conforms(a, 200);
  }, 120_000);

  it('GET /sandboxes/{id}/snapshots (listSnapshots)', async () => {
    await box();
    const a = await call('GET', '/sandboxes/{id}/snapshots');
    const list = (Array.isArray(a.body) ? a.body : (a.body.data ?? [])) as Array<{ full_path: string }>;
    state.snapshotPath = list[0]?.full_path;
    conforms(a, 200);
    expect(list.length, a.text).toBeGreaterThan(0);
  });

  it('POST /sandboxes/restore (restoreSandbox)', async () => {
    await box();
    const a = await call('POST', '/sandboxes/restore', { json: { new_id: 'conf-restored', snapshot_path: state.snapshotPath ?? 'none', orgId, cold: true } });
    const id = a.body.id ?? a.body.data?.id;
    if (id) await vr.trpc.sandbox.delete.mutate({ id });
    conforms(a, 201);
  }, 120_000);

  // ── Lifecycle ───────────────────────────────────────────────────────────────────────────────────

  it('POST /sandboxes/{id}/pause (pauseSandbox)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/pause'), 200);
    expect((await call('GET', '/sandboxes/{id}')).body.data.status).toBe('paused');
  }, 60_000);

  it('POST /sandboxes/{id}/resume (resumeSandbox)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/resume'), 200);
    expect(await execText('echo resumed')).toBe('resumed\n');
  }, 60_000);

  it('pauses and resumes with POST /sandboxes/{id}/sleep and /wake, as the client libraries call them', async () => {
    await box();
    const slept = await server.http(`/api/sandboxes/${boxId}/sleep`, { method: 'POST', apiKey });
    expect(slept.status, await slept.clone().text()).toBe(200);
    expect((await call('GET', '/sandboxes/{id}')).body.data.status).toBe('paused');
    const woke = await server.http(`/api/sandboxes/${boxId}/wake`, { method: 'POST', apiKey });
    expect(woke.status, await woke.clone().text()).toBe(200);
    expect(await execText('echo awake')).toBe('awake\n');
  }, 60_000);

  it('POST /sandboxes/{id}/stop (stopSandbox)', async () => {
    await box();
    conforms(await call('POST', '/sandboxes/{id}/stop'), 200);
    expect((await call('GET', '/sandboxes/{id}')).body.data.status).toBe('stopped');
  }, 60_000);

  it('DELETE /sandboxes/{id} (deleteSandbox)', async () => {
    await box();
    conforms(await call('DELETE', '/sandboxes/{id}'), 200);
    conforms(await call('GET', '/sandboxes/{id}'), 404);
  }, 60_000);

  it("answers every sandbox, image and key operation on a missing resource with the contract's 404 and ErrorResponse", async () => {
    const missing = '65ae1234567890abcdef1234';
    // A valid request for each operation, so that only the missing resource is wrong.
    const inputs: Record<string, Call> = {
      'POST /sandboxes/{}/exec': { json: { command: 'true' } },
      'POST /sandboxes/{}/exec-stream': { json: { command: 'true' } },
      'POST /sandboxes/{}/commands/run': { json: { command: 'true' } },
      'POST /sandboxes/{}/commands/kill': { json: { pid: 1 } },
      'POST /sandboxes/{}/commands/attach': { json: { pid: 1 } },
      'POST /sandboxes/{}/commands/wait': { json: { pid: 1 } },
      'POST /sandboxes/{}/pty/sessions': { json: { cols: 80, rows: 24 } },
      'POST /sandboxes/{}/pty/sessions/{}/execute': { json: { command: 'true' } },
      'POST /sandboxes/{}/pty/sessions/{}/resize': { json: { cols: 80, rows: 24 } },
      'POST /sandboxes/{}/files/upload': { query: { path: '/root/x' }, body: 'x', headers: { 'content-type': 'application/octet-stream' } },
      'POST /sandboxes/{}/files/create': { query: { path: '/root/x' }, json: { content: '' } },
      'POST /sandboxes/{}/files/watch': { json: { path: '/root' } },
      'POST /sandboxes/{}/files/copy': { query: { from: '/root/x', to: '/root/y' } },
      'POST /sandboxes/{}/files/move': { query: { from: '/root/x', to: '/root/y' } },
      'POST /sandboxes/{}/files/chmod': { query: { path: '/root/x', mode: '755' } },
      'POST /sandboxes/{}/files/extract': { query: { archive: '/root/x.tar.gz', dest: '/root/y' } },
      'POST /sandboxes/{}/files/compress': { query: { path: '/root/x', format: 'tar.gz' } },
      'GET /sandboxes/{}/files/search': { query: { path: '/root', pattern: 'x' } },
    };
    const wrong: string[] = [];
    for (const op of c.operations) {
      const params = Object.fromEntries([...op.path.matchAll(/\{([^}]+)\}/g)].map((m) => [m[1]!, m[1] === 'orgId' ? orgId : missing]));
      if (!Object.keys(params).some((p) => p !== 'orgId') || op.path === '/images/name/{name}') continue;
      const documented = c.statuses(op.method, op.path);
      let status: number;
      let body: unknown = null;
      if (documented.includes('101')) {
        const opened = await openSocket(`${server.url.replace(/^http/, 'ws')}/api${fill(op.path, params)}`, { 'x-api-key': apiKey });
        if (opened.status === 101) await (opened as { socket: OpenSocket }).socket.close();
        status = opened.status;
        body = 'body' in opened ? JSON.parse(opened.body || 'null') : null;
      } else {
        const input = inputs[op.key] ?? (op.path.includes('/files') ? { query: { path: '/root/x' } } : {});
        const a = await call(op.method, op.path, { ...input, path: params });
        status = a.status;
        body = a.body;
      }
      const problems = documented.includes('404')
        ? status === 404
          ? c.check(op.method, op.path, 404, body)
          : [`status ${status}, expected 404`]
        : c.checkSchema('ErrorResponse', body).concat(status >= 400 && status < 500 ? [] : [`status ${status}, expected a 4xx`]);
      if (problems.length) wrong.push(`${op.key}: ${problems.join('; ')} — ${JSON.stringify(body).slice(0, 200)}`);
    }
    expect(wrong, wrong.join('\n')).toEqual([]);
  });

  it('ran every operation of the original contract', () => {
    const missing = c.operations.filter((o) => !exercised.has(o.key)).map((o) => o.key);
    expect(missing, `contract operations this flow never ran:\n${missing.join('\n')}`).toEqual([]);
  });
});
