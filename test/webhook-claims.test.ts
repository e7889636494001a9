import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { WebhookService } from '../server/services/webhooks.js';
import { newId } from '../server/store/ids.js';
import type { Store, WebhookRecord } from '../server/store/types.js';
import { onSharedStores, withSharedStore, type SharedStore } from './helpers/shared-store.js';
import { until } from './helpers/until.js';

/** A loopback receiver answering with the next of `statuses` (then 200), recording every request's headers. */
async function receiver(statuses: number[] = []): Promise<{ url: string; received: IncomingHttpHeaders[]; server: Server }> {
  const received: IncomingHttpHeaders[] = [];
  const server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      received.push(req.headers);
      res.writeHead(statuses.shift() ?? 200);
      res.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`, received, server };
}

/**
 * Several servers on one store (fleet API nodes and hosts) holding the same webhook deliveries:
 * the real WebhookService twice, on two connections to one real store, against a real receiver.
 * Each attempt is made by exactly one of them; a delivery a dead server left is taken up by another.
 */
function claimSuite(name: string, open: SharedStore) {
  describe(`webhook deliveries shared by two servers: ${name}`, () => {
    let a: Store;
    let b: Store;
    withSharedStore(open, (s) => ({ a, b } = s));

    const log = pino({ level: 'silent' });
    const service = (store: Store, over: { sweepMs?: number; staleClaimMs?: number; resumeAtStart?: boolean; sweepPageSize?: number; maxPendingPerOrg?: number } = {}) =>
      new WebhookService({
        webhooks: store.webhooks,
        deliveries: store.webhookDeliveries,
        orgs: store.orgs,
        log,
        maxAttempts: 3,
        retryBaseMs: 50,
        timeoutMs: 2000,
        maxInFlightPerOrg: 4,
        maxPendingPerOrg: 100,
        maxPerOrg: 10,
        allowPrivate: ['127.0.0.1/32'],
        sweepMs: 60_000,
        sweepGraceMs: 0,
        ...over,
      });
    const hookFor = (url: string): Promise<WebhookRecord> => a.webhooks.create({ orgId: newId(), url, events: [], secret: 'a-test-secret-of-some-length', createdBy: newId() });
    const deliveryFor = (hook: WebhookRecord, dueAgoMs = 0) =>
      a.webhookDeliveries.create({ webhookId: hook.id, orgId: hook.orgId, eventId: `${newId()}:1`, eventType: 'sandbox.created', body: '{}', attempts: 0, nextAttemptAt: new Date(Date.now() - dueAgoMs) });
    const attemptsOf = (r: { received: IncomingHttpHeaders[] }, id: string) => r.received.filter((h) => h['x-voidrun-delivery'] === id).map((h) => h['x-voidrun-attempt']);

    it('two servers starting on one store make each pending attempt once (no duplicate deliveries at startup), retries included', async () => {
      const rx = await receiver([500, 500]);
      const hook = await hookFor(rx.url);
      const [d1, d2] = [await deliveryFor(hook), await deliveryFor(hook)];
      const [sa, sb] = [service(a), service(b)];
      try {
        await Promise.all([sa.start(), sb.start()]);
        await until(async () => [await a.webhookDeliveries.findById(d1.id), await a.webhookDeliveries.findById(d2.id)], (ds) => ds.every((d) => d === null), 'both deliveries done');
        // Two of the four attempts were refused (500) and retried: each attempt number arrives once.
        expect([...attemptsOf(rx, d1.id), ...attemptsOf(rx, d2.id)].sort()).toEqual(['1', '1', '2', '2']);
        expect((await a.webhookDeliveries.listAttempts(hook.orgId, hook.id, 10)).map((x) => x.attempt).sort()).toEqual([1, 1, 2, 2]);
      } finally {
        await Promise.all([sa.close(), sb.close()]);
        rx.server.close();
      }
    });

    it("a sweep takes up a delivery no running server holds (a dead server's), once, without a restart", async () => {
      const rx = await receiver();
      const hook = await hookFor(rx.url);
      const [sa, sb] = [service(a), service(b)];
      try {
        await Promise.all([sa.start(), sb.start()]);
        // Written after both started, by a server that died before its first attempt.
        const orphan = await deliveryFor(hook, 10_000);
        const taken = await Promise.all([sa.sweep(), sb.sweep(), sa.sweep()]);
        expect(taken.reduce((x, y) => x + y, 0)).toBeGreaterThanOrEqual(1);
        await until(() => a.webhookDeliveries.findById(orphan.id), (d) => d === null, 'the orphan delivered');
        expect(attemptsOf(rx, orphan.id)).toEqual(['1']);
      } finally {
        await Promise.all([sa.close(), sb.close()]);
        rx.server.close();
      }
    });

    it('fleet nodes starting take up only overdue deliveries (not those another node waits to retry), and a sweep pages past deliveries it must skip', async () => {
      const rx = await receiver();
      const [hook, busy] = [await hookFor(rx.url), await hookFor(rx.url)];
      const overdue = await deliveryFor(hook, 10_000);
      // Another node's retry, due in a minute: not this node's to schedule or count.
      const waiting = await a.webhookDeliveries.create({ webhookId: hook.id, orgId: hook.orgId, eventId: `${newId()}:1`, eventType: 'sandbox.created', body: '{}', attempts: 1, nextAttemptAt: new Date(Date.now() + 60_000) });
      const sa = service(a, { resumeAtStart: false });
      try {
        await sa.start();
        await until(() => a.webhookDeliveries.findById(overdue.id), (d) => d === null, 'the overdue delivery');
        expect(attemptsOf(rx, overdue.id)).toEqual(['1']);
        expect(await a.webhookDeliveries.findById(waiting.id)).toMatchObject({ attempts: 1 });
      } finally {
        await sa.close();
      }
      // Three overdue deliveries of an org at its bound here stand before another org's: pages of two.
      const ahead = [await deliveryFor(busy, 30_000), await deliveryFor(busy, 29_000), await deliveryFor(busy, 28_000)];
      const behind = await deliveryFor(hook, 20_000);
      const sb = service(b, { resumeAtStart: false, sweepPageSize: 2, maxPendingPerOrg: 0 });
      try {
        await sb.start();
        // maxPendingPerOrg 0: nothing is taken, but every page is read to the end.
        expect(await sb.sweep()).toBe(0);
      } finally {
        await sb.close();
      }
      const sc = service(b, { resumeAtStart: false, sweepPageSize: 2 });
      try {
        await sc.start();
        await until(() => b.webhookDeliveries.findById(behind.id), (d) => d === null, 'the delivery behind the others');
        for (const d of ahead) await until(() => b.webhookDeliveries.findById(d.id), (x) => x === null, 'the ones ahead');
      } finally {
        await sc.close();
        await a.webhookDeliveries.finish(waiting.id);
        rx.server.close();
      }
    });

    it("an attempt claimed by a server that died mid-attempt is taken over once the claim is stale, and not before", async () => {
      const rx = await receiver();
      const hook = await hookFor(rx.url);
      const stuck = await deliveryFor(hook, 10_000);
      expect(await b.webhookDeliveries.claimAttempt({ deliveryId: stuck.id, webhookId: hook.id, attempt: 1, gen: 0 })).toBe(true);
      const fresh = service(a, { staleClaimMs: 60_000 });
      await fresh.start();
      await fresh.sweep();
      await fresh.close(); // waits for the attempt it started (which found the claim fresh)
      // The claim is fresh: its holder may still be at it.
      expect(await a.webhookDeliveries.findById(stuck.id)).not.toBeNull();
      expect(attemptsOf(rx, stuck.id)).toEqual([]);
      const [sa, sb] = [service(a, { staleClaimMs: 200 }), service(b, { staleClaimMs: 200 })];
      try {
        await new Promise((r) => setTimeout(r, 250)); // the claim's age passes the stale mark (a wall-clock age by design)
        await Promise.all([sa.start(), sb.start()]);
        await Promise.all([sa.sweep(), sb.sweep()]);
        await until(() => a.webhookDeliveries.findById(stuck.id), (d) => d === null, 'the stale attempt made');
        expect(attemptsOf(rx, stuck.id)).toEqual(['1']);
        // Its claims went with it.
        expect(await a.webhookDeliveries.attemptClaimedAt(stuck.id, 1, 0)).toBeNull();
      } finally {
        await Promise.all([sa.close(), sb.close()]);
        rx.server.close();
      }
    });
  });
}

onSharedStores('webhook deliveries shared by two servers', claimSuite);
