import { createTRPCClient, createWSClient, wsLink } from '@trpc/client';
import superjson from 'superjson';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import type { AppRouter } from '../server/routers/index.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/** Resolves with a WebSocket's close code and reason. */
function closed(ws: WebSocket): Promise<{ code: number; reason: string }> {
  return new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
}

describe.skipIf(!support.ok)('revoked and deactivated keys close what they opened (container sandbox)', () => {
  let server: TestServer;
  let admin: VoidRunClient;
  let orgId: string;
  let box: SandboxHandle;

  /** A second key of the org, to be revoked or deactivated by `admin`. */
  const secondKey = async (name: string) => (await admin.trpc.org.createApiKey.mutate({ orgId, keyName: name })) as { plainKey: string; keyId: string };

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Revoker', email: uniqueEmail('revoke') });
    orgId = reg.orgId;
    admin = server.client(reg.apiKey);
    box = await admin.sandboxes.create({ name: 'revoke-box' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  it("a revoked key's open terminal is closed", async () => {
    const key = await secondKey('terminal');
    const ws = new WebSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/pty?apiKey=${key.plainKey}`);
    await new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    });
    const ended = closed(ws);
    await admin.trpc.org.revokeApiKey.mutate({ orgId, keyId: key.keyId });
    expect(await ended).toEqual({ code: 1008, reason: 'the API key was revoked or deactivated' });
  });

  it("a deactivated key's SSE exec stream is cut", async () => {
    const key = await secondKey('sse');
    const res = await server.http(`/api/sandboxes/${box.id}/exec-stream`, { method: 'POST', apiKey: key.plainKey, json: { command: 'echo started; sleep 600' } });
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    let text = '';
    while (!text.includes('started')) text += new TextDecoder().decode((await reader.read()).value);
    await admin.trpc.org.setApiKeyActive.mutate({ orgId, keyId: key.keyId, isActive: false });
    // The stream ends (or the connection is cut) instead of waiting for the 600 s command.
    const rest = await (async () => {
      try {
        for (;;) if ((await reader.read()).done) return 'ended';
      } catch {
        return 'cut';
      }
    })();
    expect(['ended', 'cut']).toContain(rest);
  });

  it("a revoked key's tRPC WebSocket and its subscription are closed", async () => {
    const key = await secondKey('subscription');
    let onClose!: (cause?: { code?: number }) => void;
    const wsClosed = new Promise<{ code?: number } | undefined>((resolve) => (onClose = resolve));
    const wsClient = createWSClient({ url: `${server.url.replace('http', 'ws')}/trpc`, WebSocket: WebSocket as never, connectionParams: { apiKey: key.plainKey }, onClose });
    const trpc = createTRPCClient<AppRouter>({ links: [wsLink({ client: wsClient, transformer: superjson })] });
    const started = new Promise<void>((resolve) => {
      trpc.exec.stream.subscribe(
        { id: box.id, command: 'echo started; sleep 600' },
        { onData: (e) => void (JSON.stringify(e).includes('started') && resolve()), onError: () => {} },
      );
    });
    await started;
    await admin.trpc.org.revokeApiKey.mutate({ orgId, keyId: key.keyId });
    expect((await wsClosed)?.code).toBe(1008);
    await wsClient.close();
  });

  it("a revoked key's file-watch stream is closed", async () => {
    const key = await secondKey('watch');
    const watch = await server.http(`/api/sandboxes/${box.id}/files/watch`, { method: 'POST', apiKey: key.plainKey, json: { path: '/tmp', recursive: false } });
    expect(watch.status).toBe(200);
    const sessionId = ((await watch.json()) as { data: { sessionId?: string; id?: string } }).data;
    const id = sessionId.sessionId ?? sessionId.id;
    const ws = new WebSocket(`${server.url.replace('http', 'ws')}/api/sandboxes/${box.id}/files/watch/${id}/stream?apiKey=${key.plainKey}`);
    await new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    });
    const ended = closed(ws);
    await admin.trpc.org.revokeApiKey.mutate({ orgId, keyId: key.keyId });
    expect((await ended).code).toBe(1008);
  });
});
