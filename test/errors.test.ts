import { createServer, type Server } from 'node:http';
import { connect } from 'node:net';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { parse } from 'yaml';
import {
  ConflictError,
  errorFromResponse,
  FileNotFoundError,
  InternalServerError,
  NotFoundError,
  SandboxNotFoundError,
  SandboxNotRunningError,
  UnauthorizedError,
} from '../client/index.js';
import { SandboxFiles } from '../client/files.js';
import { DomainError } from '../server/errors.js';
import { writeSse, type SseEvent } from '../server/http/sse.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const openapi = parse(readFileSync(join(root, 'openapi.yml'), 'utf8')) as { components: { schemas: Record<string, object> } };
const validErrorBody = new Ajv({ strict: false }).compile(openapi.components.schemas.ErrorResponse!);

/** Expects `body` to be an ErrorResponse of openapi.yml with `code`. */
function expectErrorBody(body: unknown, code: string): void {
  expect(validErrorBody(body), JSON.stringify(validErrorBody.errors)).toBe(true);
  expect(body).toMatchObject({ code, error: expect.any(String) });
}

/** The status and parsed body of a refused WebSocket upgrade. */
function refusedUpgrade(url: string, headers: Record<string, string> = {}): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers });
    ws.on('open', () => reject(new Error('the upgrade was accepted')));
    ws.on('error', () => {});
    ws.on('unexpected-response', (_req, res) => {
      let text = '';
      res.on('data', (d: Buffer) => (text += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode!, body: JSON.parse(text) }));
    });
  });
}

/** Sends `request` on a raw connection; resolves with what the server answered before closing. */
function rawExchange(url: string, request: string): Promise<string> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const socket = connect(Number(port), hostname);
    let text = '';
    socket.on('data', (d) => (text += d.toString('latin1')));
    socket.on('error', () => {});
    socket.on('close', () => resolve(text));
    socket.write(request);
  });
}

function bodyOf(response: string): unknown {
  return JSON.parse(response.slice(response.indexOf('\r\n\r\n') + 4));
}

describe('errors, one rendering for every face', () => {
  let server: TestServer;
  let apiKey: string;
  const missing = '65ae1234567890abcdef1234';

  beforeAll(async () => {
    server = await startTestServer();
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Errors', email: uniqueEmail('errors') })).apiKey;
  });
  afterAll(async () => {
    await server?.close();
  });

  it('a missing sandbox is SANDBOX_NOT_FOUND on REST, tRPC, raw routes, SSE and WebSocket upgrades', async () => {
    const rest = await server.http(`/api/sandboxes/${missing}`, { apiKey });
    expect(rest.status).toBe(404);
    expectErrorBody(await rest.json(), 'SANDBOX_NOT_FOUND');

    const trpc = await server
      .client(apiKey)
      .trpc.sandbox.get.query({ id: missing })
      .catch((e: unknown) => e);
    expect(trpc).toBeInstanceOf(SandboxNotFoundError);
    expect(trpc).toBeInstanceOf(NotFoundError);
    expect(trpc).toMatchObject({ code: 'SANDBOX_NOT_FOUND', data: { errorCode: 'SANDBOX_NOT_FOUND', httpStatus: 404 } });

    const download = await server.http(`/api/sandboxes/${missing}/files/download?path=/etc/hostname`, { apiKey });
    expect(download.status).toBe(404);
    expectErrorBody(await download.json(), 'SANDBOX_NOT_FOUND');

    const sse = await server.http(`/api/sandboxes/${missing}/exec-stream`, { method: 'POST', apiKey, json: { command: 'true' } });
    expect(sse.status).toBe(404);
    expect(sse.headers.get('content-type')).toContain('application/json');
    expectErrorBody(await sse.json(), 'SANDBOX_NOT_FOUND');

    const pty = await refusedUpgrade(`${server.url.replace('http', 'ws')}/api/sandboxes/${missing}/pty`, { 'x-api-key': apiKey });
    expect(pty.status).toBe(404);
    expectErrorBody(pty.body, 'SANDBOX_NOT_FOUND');
    // Upgrades are counted under the route table's label, like every request.
    expect(await (await server.http('/metrics')).text()).toMatch(/voidrun_http_requests_total\{method="GET",route="\/api\/sandboxes\/\{id\}\/pty",status="404"\} 1/);
  });

  it('a missing file, session or route has its own code', async () => {
    const watch = await refusedUpgrade(`${server.url.replace('http', 'ws')}/api/sandboxes/${missing}/files/watch/nosuchsession/stream`, { 'x-api-key': apiKey });
    expect(watch.status).toBe(404);
    expectErrorBody(watch.body, 'SESSION_NOT_FOUND');

    const route = await server.http('/api/no/such/route', { apiKey });
    expect(route.status).toBe(404);
    expectErrorBody(await route.json(), 'ROUTE_NOT_FOUND');
    const wsRoute = await refusedUpgrade(`${server.url.replace('http', 'ws')}/api/no/such/socket`);
    expect(wsRoute.status).toBe(404);
    expectErrorBody(wsRoute.body, 'ROUTE_NOT_FOUND');

    const key = await server.http(`/api/orgs/me`, { apiKey });
    const orgId = ((await key.json()) as { data?: { id: string }; id?: string }).data?.id ?? '';
    const revoke = await server.http(`/api/orgs/${orgId}/apikeys/${missing}`, { method: 'DELETE', apiKey });
    expect(revoke.status).toBe(404);
    expectErrorBody(await revoke.json(), 'API_KEY_NOT_FOUND');
    const image = await server.http(`/api/images/${missing}`, { apiKey });
    expect(image.status).toBe(404);
    expectErrorBody(await image.json(), 'IMAGE_NOT_FOUND');
  });

  it('a missing key is UNAUTHORIZED and bad input INVALID_INPUT on every kind of route', async () => {
    const rest = await server.http('/api/sandboxes');
    expect(rest.status).toBe(401);
    expectErrorBody(await rest.json(), 'UNAUTHORIZED');
    const raw = await server.http(`/api/sandboxes/${missing}/files/download?path=/x`);
    expect(raw.status).toBe(401);
    expectErrorBody(await raw.json(), 'UNAUTHORIZED');
    const ws = await refusedUpgrade(`${server.url.replace('http', 'ws')}/api/sandboxes/${missing}/pty`);
    expect(ws.status).toBe(401);
    expectErrorBody(ws.body, 'UNAUTHORIZED');

    const register = await server.http('/api/register', { method: 'POST', json: { name: 'Errors User', email: 'not an email' } });
    expect(register.status).toBe(400);
    const body = (await register.json()) as { error: string };
    expectErrorBody(body, 'INVALID_INPUT');
    expect(body.error).toContain('email');
    const stream = await server.http(`/api/sandboxes/${missing}/exec-stream`, { method: 'POST', apiKey, json: { command: '' } });
    expect(stream.status).toBe(400);
    expectErrorBody(await stream.json(), 'INVALID_INPUT');
    // Path parameters are checked against the route table's schemas, on raw and WebSocket routes alike.
    const longId = 'x'.repeat(65);
    const rawParam = await server.http(`/api/sandboxes/${longId}/files/download?path=/x`, { apiKey });
    expect(rawParam.status).toBe(400);
    expectErrorBody(await rawParam.json(), 'INVALID_INPUT');
    const wsParam = await refusedUpgrade(`${server.url.replace('http', 'ws')}/api/sandboxes/${longId}/pty`, { 'x-api-key': apiKey });
    expect(wsParam.status).toBe(400);
    expectErrorBody(wsParam.body, 'INVALID_INPUT');
    expect((wsParam.body as { error: string }).error).toMatch(/^Invalid id: /);
    // A WebSocket route asked without an upgrade says so (after the key check, as every route).
    expect((await server.http(`/api/sandboxes/${missing}/pty`)).status).toBe(401);
    const plain = await server.http(`/api/sandboxes/${missing}/pty`, { apiKey });
    expect(plain.status).toBe(400);
    const plainBody = (await plain.json()) as { error: string };
    expectErrorBody(plainBody, 'INVALID_INPUT');
    expect(plainBody.error).toContain('WebSocket');
  });

  it("what Node's parser refuses is answered with an error body, never Node's text: headers too large (431), a malformed request (400)", async () => {
    const big = await rawExchange(server.url, `GET /api/version HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`);
    expect(big).toMatch(/^HTTP\/1.1 431 /);
    expectErrorBody(bodyOf(big), 'HEADERS_TOO_LARGE');
    const malformed = await rawExchange(server.url, 'GET /api/version HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n');
    expect(malformed).toMatch(/^HTTP\/1.1 400 /);
    expectErrorBody(bodyOf(malformed), 'INVALID_INPUT');
    expect((bodyOf(malformed) as { error: string }).error).toBe('Malformed HTTP request');
  });

  it('the shipped client tells a missing sandbox from a missing file: files.exists() throws SandboxNotFoundError', async () => {
    const client = server.client(apiKey);
    const files = new SandboxFiles(client.trpc, { baseUrl: server.url, headers: { 'x-api-key': apiKey } }, missing);
    await expect(files.exists('/etc/hostname')).rejects.toBeInstanceOf(SandboxNotFoundError);
    await expect(files.read('/etc/hostname')).rejects.toBeInstanceOf(SandboxNotFoundError);
  });
});

describe('the client maps error codes, not statuses', () => {
  const response = (status: number, body: unknown) => new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });

  it('chooses the class by the body code', async () => {
    expect(await errorFromResponse(response(404, { error: 'gone', code: 'FILE_NOT_FOUND' }))).toBeInstanceOf(FileNotFoundError);
    expect(await errorFromResponse(response(404, { error: 'gone', code: 'SANDBOX_NOT_FOUND' }))).toBeInstanceOf(SandboxNotFoundError);
    const notRunning = await errorFromResponse(response(409, { error: 'stopped', code: 'SANDBOX_NOT_RUNNING' }));
    expect(notRunning).toBeInstanceOf(SandboxNotRunningError);
    expect(notRunning).toBeInstanceOf(ConflictError);
    expect(await errorFromResponse(response(401, { error: 'no key', code: 'UNAUTHORIZED' }))).toBeInstanceOf(UnauthorizedError);
  });

  it('a body without a code it knows (a proxy, a newer server) is not guessed from the status', async () => {
    const proxy = await errorFromResponse(new Response('<html>Not Found</html>', { status: 404 }));
    expect(proxy).toBeInstanceOf(InternalServerError);
    expect(proxy).not.toBeInstanceOf(NotFoundError);
    expect(proxy.status).toBe(404);
    expect(await errorFromResponse(response(404, { error: 'x', code: 'SOMETHING_NEW' }))).toBeInstanceOf(InternalServerError);
  });
});

describe('a stream that fails after its headers', () => {
  let http: Server;
  let url: string;
  beforeAll(async () => {
    http = createServer((req, res) => {
      const failure = req.url === '/bug' ? new Error('EACCES: permission denied, open /var/lib/host/secret') : new DomainError('SANDBOX_NOT_RUNNING', 'Sandbox box is stopped; start it first');
      const events = (async function* (): AsyncGenerator<SseEvent> {
        yield { event: 'stdout', data: 'hello' };
        throw failure;
      })();
      void writeSse(res, null, events, new AbortController().signal);
    });
    await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
    const address = http.address() as { port: number };
    url = `http://127.0.0.1:${address.port}`;
  });
  afterAll(() => new Promise<void>((r) => http.close(() => r())));

  it('ends with an error event whose data is the error body with its code; an unexpected failure says only "Internal server error"', async () => {
    const text = await (await fetch(url)).text();
    expect(text).toContain('event: stdout\ndata: hello\n\n');
    const data = /event: error\ndata: (.*)\n/.exec(text)?.[1];
    expect(JSON.parse(data!)).toEqual({ error: 'Sandbox box is stopped; start it first', code: 'SANDBOX_NOT_RUNNING' });
    const bug = await (await fetch(`${url}/bug`)).text();
    expect(JSON.parse(/event: error\ndata: (.*)\n/.exec(bug)![1]!)).toEqual({ error: 'Internal server error', code: 'INTERNAL' });
    expect(bug).not.toContain('/var/lib/host');
  });
});
