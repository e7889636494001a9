import { createHmac } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { BlockList } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RegisterResult, Webhook, WebhookAttempt } from '../shared/index.js';
import { webhookAddressAllowed, webhookWants } from '../server/services/webhooks.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { until } from './helpers/until.js';

interface Received {
  headers: IncomingHttpHeaders;
  body: string;
}

/** A webhook receiver on loopback: answers each request with the next status of `statuses` (then 200), records what came. */
async function receiver(statuses: number[] = []): Promise<{ url: string; received: Received[]; server: Server; statuses: number[] }> {
  const received: Received[] = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      received.push({ headers: req.headers, body });
      res.writeHead(statuses.shift() ?? 200, { 'content-type': 'text/plain' });
      res.end('thanks');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`, received, server, statuses };
}

const SECRET = 'a-test-secret-of-some-length';

/** What a receiver does: recompute X-VoidRun-Signature over "<timestamp>.<body>" with the secret. */
function verify(r: Received, secret = SECRET): boolean {
  const expected = `sha256=${createHmac('sha256', secret).update(`${r.headers['x-voidrun-timestamp']}.${r.body}`).digest('hex')}`;
  return r.headers['x-voidrun-signature'] === expected;
}

describe('webhook addresses and filters (pure)', () => {
  it('refuses loopback, private, link-local and metadata addresses (also IPv4-mapped) unless the operator opens them', () => {
    const none = new BlockList();
    for (const a of ['127.0.0.1', '10.1.2.3', '172.16.0.1', '192.168.1.1', '169.254.169.254', '100.64.0.1', '0.0.0.0', '::1', '::', 'fe80::1', 'fd00:ec2::254', '::ffff:127.0.0.1', '::ffff:7f00:1', '::ffff:10.0.0.1', '224.0.0.1', 'not-an-ip']) {
      expect(webhookAddressAllowed(a, none), a).toBe(false);
    }
    for (const a of ['93.184.216.34', '1.1.1.1', '2606:4700:4700::1111', '::ffff:8.8.8.8', '::ffff:808:808']) expect(webhookAddressAllowed(a, none), a).toBe(true);
    const loopback = new BlockList();
    loopback.addSubnet('127.0.0.0', 8, 'ipv4');
    expect(webhookAddressAllowed('127.0.0.1', loopback)).toBe(true);
    expect(webhookAddressAllowed('::ffff:127.0.0.1', loopback)).toBe(true);
    expect(webhookAddressAllowed('10.0.0.1', loopback)).toBe(false);
  });

  it('refuses the IPv4-compatible (::/96) and IPv4-translated (::ffff:0:0:0/96) forms and IPv4-mapped ones in any spelling', () => {
    const none = new BlockList();
    for (const a of ['::7f00:1', '::127.0.0.1', '::808:808', '::ffff:0:7f00:1', '::ffff:0:808:808', '::ffff:0:8.8.8.8', '0:0:0:0:0:ffff:7f00:1', '0:0:0:0:0:ffff:127.0.0.1', '0::ffff:a00:1']) {
      expect(webhookAddressAllowed(a, none), a).toBe(false);
    }
    expect(webhookAddressAllowed('0:0:0:0:0:ffff:808:808', none)).toBe(true);
  });

  it("refuses this host's own addresses (any interface's, also spelled otherwise) unless the operator opens them", () => {
    const none = new BlockList();
    const own = new Set(['93.184.216.34', '2606:4700:4700::1111']);
    expect(webhookAddressAllowed('93.184.216.34', none, own)).toBe(false);
    expect(webhookAddressAllowed('::ffff:93.184.216.34', none, own)).toBe(false);
    expect(webhookAddressAllowed('2606:4700:4700:0:0:0:0:1111', none, own)).toBe(false);
    expect(webhookAddressAllowed('1.1.1.1', none, own)).toBe(true);
    const opened = new BlockList();
    opened.addAddress('93.184.216.34', 'ipv4');
    expect(webhookAddressAllowed('93.184.216.34', opened, own)).toBe(true);
  });

  it('matches event types exactly or by prefix pattern; no filter is every event', () => {
    expect(webhookWants([], 'process.exited')).toBe(true);
    expect(webhookWants(['*'], 'process.exited')).toBe(true);
    expect(webhookWants(['sandbox.*'], 'sandbox.created')).toBe(true);
    expect(webhookWants(['sandbox.*'], 'process.exited')).toBe(false);
    expect(webhookWants(['process.exited', 'port.*'], 'port.opened')).toBe(true);
    expect(webhookWants(['process.exited'], 'process.started')).toBe(false);
  });
});

describe.skipIf(!support.ok)('webhooks', () => {
  let server: TestServer;
  let owner: RegisterResult;
  const hooksPath = () => `/api/orgs/${owner.orgId}/webhooks`;
  const create = (json: unknown, apiKey = owner.apiKey, headers: Record<string, string> = {}) => server.http(hooksPath(), { method: 'POST', apiKey, json, headers });
  const attempts = async (webhookId: string): Promise<WebhookAttempt[]> =>
    ((await (await server.http(`${hooksPath()}/${webhookId}/deliveries`, { apiKey: owner.apiKey })).json()) as { data: WebhookAttempt[] }).data;

  beforeAll(async () => {
    // The receivers listen on loopback: the operator opens it (by default webhooks never reach it).
    server = await startTestServer({ WEBHOOK_ALLOW_PRIVATE: '127.0.0.1/32,::1', WEBHOOK_RETRY_BASE_MS: '50', WEBHOOK_TIMEOUT_MS: '2000', WEBHOOK_MAX_IN_FLIGHT_PER_ORG: '2' });
    owner = await server.client().trpc.auth.register.mutate({ name: 'Hooks', email: uniqueEmail('hooks') });
  }, 60_000);
  afterAll(async () => {
    await server?.close();
  });

  it('delivers signed events the filter wants, and only those; lists webhooks without their secrets', async () => {
    const rx = await receiver();
    const created = await create({ url: rx.url, events: ['sandbox.*'], secret: SECRET });
    expect(created.status).toBe(201);
    const hook = ((await created.json()) as { data: Webhook }).data;
    expect(hook).toMatchObject({ orgId: owner.orgId, url: rx.url, events: ['sandbox.*'] });
    expect(JSON.stringify(hook)).not.toContain(SECRET);
    const listed = ((await (await server.http(hooksPath(), { apiKey: owner.apiKey })).json()) as { data: Webhook[] }).data;
    expect(listed.map((h) => h.id)).toContain(hook.id);
    expect(JSON.stringify(listed)).not.toContain(SECRET);

    const vr = server.client(owner.apiKey);
    const box = await vr.sandboxes.create({ name: 'hook-box' });
    await vr.trpc.exec.run.mutate({ id: box.id, command: 'true' });
    await vr.trpc.sandbox.stop.mutate({ id: box.id });
    await until(() => rx.received.length, (n) => n >= 3, 'three deliveries');
    // The exec's process events were not delivered: wait for the stop (after them) and look at all.
    await until(() => rx.received.map((r) => r.headers['x-voidrun-event']), (t) => t.includes('sandbox.stopped'), 'sandbox.stopped');
    const types = rx.received.map((r) => r.headers['x-voidrun-event']).sort();
    expect(types).toEqual(['sandbox.created', 'sandbox.started', 'sandbox.stopped']);
    for (const r of rx.received) {
      expect(verify(r)).toBe(true);
      expect(verify(r, 'another-secret-entirely')).toBe(false);
      expect(r.headers['content-type']).toBe('application/json');
      expect(r.headers['x-voidrun-delivery']).toMatch(/^[0-9a-f]{24}$/);
      const event = JSON.parse(r.body) as { id: number; sandboxId: string; orgId: string; type: string };
      expect(event).toMatchObject({ sandboxId: box.id, orgId: owner.orgId, type: r.headers['x-voidrun-event'] });
      expect(Math.abs(Number(r.headers['x-voidrun-timestamp']) - Date.now() / 1000)).toBeLessThan(300);
    }
    const log = await until(() => attempts(hook.id), (a) => a.length >= 3, 'the delivery log');
    expect(log.every((a) => a.ok && a.statusCode === 200 && a.attempt === 1 && a.eventId.startsWith(`${box.id}:`))).toBe(true);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
    expect((await server.http(`${hooksPath()}/${hook.id}`, { method: 'DELETE', apiKey: owner.apiKey })).status).toBe(200);
    rx.server.close();
  });

  it('delivers to a URL by name, connecting to the address it checked (the name is resolved and checked at each attempt)', async () => {
    const rx = await receiver();
    const url = rx.url.replace('127.0.0.1', 'localhost');
    const created = await create({ url, events: ['sandbox.created'], secret: SECRET });
    expect(created.status).toBe(201);
    const hook = ((await created.json()) as { data: Webhook }).data;
    const box = await server.client(owner.apiKey).sandboxes.create({ name: 'hook-by-name' });
    await until(() => rx.received.length, (n) => n >= 1, 'the delivery by name');
    expect(rx.received[0]!.headers.host).toBe(new URL(url).host);
    expect(verify(rx.received[0]!)).toBe(true);
    await server.client(owner.apiKey).trpc.sandbox.delete.mutate({ id: box.id });
    await server.http(`${hooksPath()}/${hook.id}`, { method: 'DELETE', apiKey: owner.apiKey });
    rx.server.close();
  });

  it('retries a failing receiver with backoff: the log shows the 500 and then the 200, under one delivery id', async () => {
    const rx = await receiver([500]);
    const hook = ((await (await create({ url: rx.url, events: ['sandbox.created'], secret: SECRET })).json()) as { data: Webhook }).data;
    const vr = server.client(owner.apiKey);
    const box = await vr.sandboxes.create({ name: 'hook-retry' });
    await until(() => rx.received.length, (n) => n >= 2, 'the retry');
    expect(rx.received.map((r) => r.headers['x-voidrun-attempt'])).toEqual(['1', '2']);
    expect(rx.received[0]!.headers['x-voidrun-delivery']).toBe(rx.received[1]!.headers['x-voidrun-delivery']);
    expect(rx.received[0]!.body).toBe(rx.received[1]!.body);
    const log = await until(() => attempts(hook.id), (a) => a.length >= 2, 'both attempts in the log');
    expect(log.map((a) => [a.attempt, a.statusCode, a.ok, a.eventType])).toEqual([
      [2, 200, true, 'sandbox.created'],
      [1, 500, false, 'sandbox.created'],
    ]);
    expect(log[0]!.deliveryId).toBe(rx.received[0]!.headers['x-voidrun-delivery']);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
    await server.http(`${hooksPath()}/${hook.id}`, { method: 'DELETE', apiKey: owner.apiKey });
    rx.server.close();
  });

  it('gives up after WEBHOOK_MAX_ATTEMPTS and logs why each attempt failed (nothing listening)', async () => {
    const rx = await receiver();
    const url = rx.url;
    await new Promise((r) => rx.server.close(r)); // nothing listens there now
    const hook = ((await (await create({ url, events: ['sandbox.created'], secret: SECRET })).json()) as { data: Webhook }).data;
    const box = await server.client(owner.apiKey).sandboxes.create({ name: 'hook-refused' });
    const log = await until(() => attempts(hook.id), (a) => a.length >= 6, 'six attempts');
    expect(log.map((a) => a.attempt)).toEqual([6, 5, 4, 3, 2, 1]);
    expect(log.every((a) => !a.ok && a.statusCode === null && /ECONNREFUSED/.test(a.error ?? ''))).toBe(true);
    await new Promise((r) => setTimeout(r, 300));
    expect(await attempts(hook.id)).toHaveLength(6); // no seventh
    await server.client(owner.apiKey).trpc.sandbox.delete.mutate({ id: box.id });
    await server.http(`${hooksPath()}/${hook.id}`, { method: 'DELETE', apiKey: owner.apiKey });
  });

  it('runs at most WEBHOOK_MAX_IN_FLIGHT_PER_ORG attempts of one org at once; the rest wait, none is lost', async () => {
    const held: Array<() => void> = [];
    let open = 0;
    let most = 0;
    const bodies: string[] = [];
    const slow = createServer((req, res) => {
      open++;
      most = Math.max(most, open);
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        bodies.push(body);
        held.push(() => {
          open--;
          res.end('ok');
        });
      });
    });
    await new Promise<void>((r) => slow.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${(slow.address() as AddressInfo).port}/slow`;
    const hook = ((await (await create({ url, events: ['sandbox.paused', 'sandbox.resumed'], secret: SECRET })).json()) as { data: Webhook }).data;
    const vr = server.client(owner.apiKey);
    const box = await vr.sandboxes.create({ name: 'hook-slots' });
    for (let i = 0; i < 2; i++) {
      await vr.trpc.sandbox.pause.mutate({ id: box.id });
      await vr.trpc.sandbox.resume.mutate({ id: box.id });
    }
    // Four events: two attempts run, held by the receiver; the other two wait for a slot.
    await until(() => held.length, (n) => n >= 2, 'two held attempts');
    while (bodies.length < 4 || held.length > 0) {
      held.shift()?.();
      await until(() => held.length > 0 || bodies.length >= 4, Boolean, 'the next attempt');
    }
    expect(most).toBe(2);
    expect(bodies.map((b) => (JSON.parse(b) as { type: string }).type).sort()).toEqual(['sandbox.paused', 'sandbox.paused', 'sandbox.resumed', 'sandbox.resumed']);
    await vr.trpc.sandbox.delete.mutate({ id: box.id });
    await server.http(`${hooksPath()}/${hook.id}`, { method: 'DELETE', apiKey: owner.apiKey });
    slow.close();
  });

  it('concurrent creates never pass ORG_MAX_WEBHOOKS (10): the rest are 429 naming it', async () => {
    const org = await server.client().trpc.auth.register.mutate({ name: 'Hook Racer', email: uniqueEmail('hooks-race') });
    const rx = await receiver();
    const answers = await Promise.all(Array.from({ length: 16 }, () => server.http(`/api/orgs/${org.orgId}/webhooks`, { method: 'POST', apiKey: org.apiKey, json: { url: rx.url, secret: SECRET } })));
    const statuses = answers.map((r) => r.status);
    expect(statuses.filter((s) => s === 201 || s === 200)).toHaveLength(10);
    expect(statuses.filter((s) => s === 429)).toHaveLength(6);
    expect(JSON.stringify(await answers[statuses.indexOf(429)]!.json())).toMatch(/ORG_MAX_WEBHOOKS=10/);
    const listed = (await (await server.http(`/api/orgs/${org.orgId}/webhooks`, { apiKey: org.apiKey })).json()) as { data: unknown[] };
    expect(listed.data).toHaveLength(10);
  });

  it('refuses bad URLs, schemes, filters and secrets with a 400 naming the field', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ url: 'ftp://example.com/x', secret: SECRET }, /scheme must be http or https/],
      [{ url: 'file:///etc/passwd', secret: SECRET }, /scheme must be http or https/],
      [{ url: 'javascript:alert(1)', secret: SECRET }, /scheme must be http or https/],
      [{ url: 'not a url', secret: SECRET }, /not an absolute URL/],
      [{ url: 'http://user:pass@example.com/', secret: SECRET }, /credentials/],
      [{ url: `http://example.com/${'a'.repeat(3000)}`, secret: SECRET }, /url/],
      [{ url: 'http://no-such-host.invalid/', secret: SECRET }, /does not resolve|resolve/],
      [{ url: 'https://93.184.216.34/', secret: 'short' }, /secret/],
      [{ url: 'https://93.184.216.34/' }, /secret/],
      [{ url: 'https://93.184.216.34/', secret: SECRET, events: ['nope.*'] }, /matches no event type/],
      [{ url: 'https://93.184.216.34/', secret: SECRET, events: ['sandbox.bogus'] }, /matches no event type/],
      [{ url: 'https://93.184.216.34/', secret: SECRET, events: ['SANDBOX; DROP'] }, /events/],
      [{ url: 'https://93.184.216.34/', secret: SECRET, events: 'sandbox.*' }, /events/],
    ];
    for (const [json, message] of cases) {
      const res = await create(json);
      const body = (await res.json()) as { error?: string; message?: string };
      expect(res.status, JSON.stringify(json).slice(0, 100)).toBe(400);
      expect(JSON.stringify(body), JSON.stringify(json).slice(0, 100)).toMatch(message);
    }
  });

  it("is the owner's: members may list and read the log but not create or delete (403); another org gets 403, an unknown webhook 404", async () => {
    const rx = await receiver();
    const hook = ((await (await create({ url: rx.url, secret: SECRET })).json()) as { data: Webhook }).data;
    const member = await server.client().trpc.auth.register.mutate({ name: 'Member', email: uniqueEmail('hooks-member') });
    await server.app.store.orgs.addMember(owner.orgId, member.userId);
    const asMember = { 'x-org-id': owner.orgId };
    const seen = await server.http(hooksPath(), { apiKey: member.apiKey, headers: asMember });
    expect(seen.status).toBe(200);
    // A member sees the URL without its path (it may carry the receiver's token); the owner sees it whole.
    const memberView = ((await seen.json()) as { data: Webhook[] }).data.find((h) => h.id === hook.id)!;
    expect(memberView.url).toBe(`${new URL(rx.url).origin}/…`);
    const ownerView = ((await (await server.http(hooksPath(), { apiKey: owner.apiKey })).json()) as { data: Webhook[] }).data.find((h) => h.id === hook.id)!;
    expect(ownerView.url).toBe(rx.url);
    expect((await server.http(`${hooksPath()}/${hook.id}/deliveries`, { apiKey: member.apiKey, headers: asMember })).status).toBe(200);
    const denied = await create({ url: rx.url, secret: SECRET }, member.apiKey, asMember);
    expect(denied.status).toBe(403);
    expect(JSON.stringify(await denied.json())).toMatch(/owner/);
    expect((await server.http(`${hooksPath()}/${hook.id}`, { method: 'DELETE', apiKey: member.apiKey, headers: asMember })).status).toBe(403);
    // Another org (the member's own key, acting in its own org): 403 on every route of this org.
    expect((await server.http(hooksPath(), { apiKey: member.apiKey })).status).toBe(403);
    expect((await create({ url: rx.url, secret: SECRET }, member.apiKey)).status).toBe(403);
    expect((await server.http(`${hooksPath()}/${hook.id}/deliveries`, { apiKey: member.apiKey })).status).toBe(403);
    const unknown = '0123456789abcdef01234567';
    expect((await server.http(`${hooksPath()}/${unknown}/deliveries`, { apiKey: owner.apiKey })).status).toBe(404);
    expect((await server.http(`${hooksPath()}/${unknown}`, { method: 'DELETE', apiKey: owner.apiKey })).status).toBe(404);
    expect((await server.http(`${hooksPath()}/${hook.id}`, { method: 'DELETE', apiKey: owner.apiKey })).status).toBe(200);
    expect((await server.http(`${hooksPath()}/${hook.id}/deliveries`, { apiKey: owner.apiKey })).status).toBe(404);
    rx.server.close();
  });
});

describe('webhooks without WEBHOOK_ALLOW_PRIVATE', () => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer();
  }, 60_000);
  afterAll(async () => {
    await server?.close();
  });

  it('refuses URLs of this host, private networks, link-local and cloud metadata (SSRF), also by name', async () => {
    const reg = await server.client().trpc.auth.register.mutate({ name: 'SSRF', email: uniqueEmail('ssrf') });
    const rx = await receiver();
    for (const url of [rx.url, 'http://localhost:80/', 'http://127.1/', 'http://10.0.0.1/', 'http://192.168.1.1/', 'http://169.254.169.254/latest/meta-data/', 'http://[::1]/', 'http://[::ffff:127.0.0.1]/', 'http://0.0.0.0/', 'http://2130706433/']) {
      const res = await server.http(`/api/orgs/${reg.orgId}/webhooks`, { method: 'POST', apiKey: reg.apiKey, json: { url, secret: SECRET } });
      expect(res.status, url).toBe(400);
      expect(((await res.json()) as { error: string }).error, url).toMatch(/loopback, private or link-local|WEBHOOK_ALLOW_PRIVATE/);
    }
    expect(rx.received).toEqual([]);
    rx.server.close();
  });
});

describe.skipIf(!support.ok)('webhook deliveries under one org\'s flood', () => {
  it("one org's flood of deliveries to a stuck receiver is bounded by WEBHOOK_MAX_PENDING_PER_ORG (the rest dropped, logged once) and does not delay another org's deliveries", async () => {
    const held: Array<() => void> = [];
    const stuckBodies: string[] = [];
    const stuck = createServer((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        stuckBodies.push(body);
        held.push(() => res.end('ok'));
      });
    });
    await new Promise<void>((r) => stuck.listen(0, '127.0.0.1', r));
    const rx = await receiver();
    const server = await startTestServer({ WEBHOOK_ALLOW_PRIVATE: '127.0.0.1/32', WEBHOOK_MAX_IN_FLIGHT_PER_ORG: '1', WEBHOOK_MAX_PENDING_PER_ORG: '3', WEBHOOK_TIMEOUT_MS: '20000', HEALTH_ENABLED: 'false' });
    try {
      const a = await server.client().trpc.auth.register.mutate({ name: 'Flooder', email: uniqueEmail('hooks-flood') });
      const b = await server.client().trpc.auth.register.mutate({ name: 'Neighbour', email: uniqueEmail('hooks-neighbour') });
      const hookOf = async (reg: RegisterResult, url: string) => {
        const res = await server.http(`/api/orgs/${reg.orgId}/webhooks`, { method: 'POST', apiKey: reg.apiKey, json: { url, secret: SECRET } });
        expect(res.status).toBe(201);
      };
      await hookOf(a, `http://127.0.0.1:${(stuck.address() as AddressInfo).port}/stuck`);
      await hookOf(b, rx.url);
      // Org A: created, started and 2 events per command: 12 events, its receiver answers none.
      const va = server.client(a.apiKey);
      const boxA = await va.sandboxes.create({ name: 'flood' });
      for (let i = 0; i < 5; i++) await va.trpc.exec.run.mutate({ id: boxA.id, command: 'true' });
      await until(() => held.length, (n) => n >= 1, "A's first (held) attempt");
      await until(() => server.logLines.filter((l) => l.includes('webhook delivery dropped')).length, (n) => n >= 1, 'the drop logged');
      // Org B's delivery arrives while A's stay stuck.
      const vb = server.client(b.apiKey);
      const boxB = await vb.sandboxes.create({ name: 'neighbour' });
      await until(() => rx.received.map((r) => r.headers['x-voidrun-event']), (t) => t.includes('sandbox.started'), "B's deliveries");
      expect(rx.received.map((r) => r.headers['x-voidrun-event'])).toEqual(['sandbox.created', 'sandbox.started']);
      expect(stuckBodies).toHaveLength(1);
      // A gets exactly its 3 pending deliveries, in order, once its receiver answers; the 9 others were never stored.
      while (stuckBodies.length < 3 || held.length > 0) {
        held.shift()?.();
        await until(() => held.length > 0 || stuckBodies.length >= 3, Boolean, "A's next attempt");
      }
      expect(stuckBodies.map((x) => (JSON.parse(x) as { type: string }).type)).toEqual(['sandbox.created', 'sandbox.started', 'process.started']);
      expect(server.logLines.filter((l) => l.includes('webhook delivery dropped'))).toHaveLength(1);
      await va.trpc.sandbox.delete.mutate({ id: boxA.id });
      await vb.trpc.sandbox.delete.mutate({ id: boxB.id });
    } finally {
      for (const release of held) release();
      await server.close();
      stuck.close();
      rx.server.close();
    }
  }, 120_000);
});

describe.skipIf(!support.ok)('webhook deliveries across a server restart', () => {
  it('resumes a delivery that was waiting for its retry when the server stopped', async () => {
    const rx = await receiver([503]);
    // A long first retry delay: the server stops before it comes.
    const env = { WEBHOOK_ALLOW_PRIVATE: '127.0.0.1/32', WEBHOOK_RETRY_BASE_MS: '1500', HEALTH_ENABLED: 'false' };
    const first = await startTestServer(env);
    const reg = await first.client().trpc.auth.register.mutate({ name: 'Resume', email: uniqueEmail('hooks-resume') });
    const created = await first.http(`/api/orgs/${reg.orgId}/webhooks`, { method: 'POST', apiKey: reg.apiKey, json: { url: rx.url, events: ['sandbox.created'], secret: SECRET } });
    const hook = ((await created.json()) as { data: Webhook }).data;
    const box = await first.client(reg.apiKey).sandboxes.create({ name: 'hook-resume' });
    await until(() => rx.received.length, (n) => n >= 1, 'the first attempt');
    await first.close({ keepState: true });
    const second = await startTestServer(env, first.dirs);
    try {
      await until(() => rx.received.length, (n) => n >= 2, 'the retry after the restart');
      expect(rx.received.map((r) => [r.headers['x-voidrun-attempt'], r.headers['x-voidrun-delivery']])).toEqual([
        ['1', rx.received[0]!.headers['x-voidrun-delivery']],
        ['2', rx.received[0]!.headers['x-voidrun-delivery']],
      ]);
      expect(verify(rx.received[1]!)).toBe(true);
      const log = await until(
        async () => ((await (await second.http(`/api/orgs/${reg.orgId}/webhooks/${hook.id}/deliveries`, { apiKey: reg.apiKey })).json()) as { data: WebhookAttempt[] }).data,
        (a) => a.length >= 2,
        'both attempts in the log',
      );
      expect(log.map((a) => [a.attempt, a.statusCode])).toEqual([
        [2, 200],
        [1, 503],
      ]);
      await second.client(reg.apiKey).trpc.sandbox.delete.mutate({ id: box.id });
    } finally {
      await second.close();
      rx.server.close();
    }
  }, 120_000);
});
