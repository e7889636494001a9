import { describe, expect, it } from 'vitest';
import { HostUnavailableError, TooManyRequestsError } from '../server/errors.js';
import pino from 'pino';
import { hostIpLeases, hostSandboxes, LostHostSweeper } from '../server/services/fleet/host-membership.js';
import { WarmPool } from '../server/services/warm-pool.js';
import { HostRegistry, sweepLostHosts } from '../server/services/fleet/host-registry.js';
import { Placement } from '../server/services/fleet/placement.js';
import { newId } from '../server/store/ids.js';
import { SANDBOX_NETWORK_NONE, type HostRecord, type SandboxRecord, type Store } from '../server/store/types.js';
import { onSharedStores, withSharedStore, type SharedStore } from './helpers/shared-store.js';

/**
 * Fleet placement on the real stores (README "Fleet"). Two store connections stand for two API
 * nodes sharing one database; on MongoDB-wire stores (FerretDB in CI, which loses concurrent
 * updates) the slot and epoch claims must still have exactly one winner each.
 */
function fleetSuite(name: string, open: SharedStore) {
  describe(`fleet placement: ${name}`, () => {
    let a: Store;
    let b: Store;
    withSharedStore(open, (s) => ({ a, b } = s));

    const host = (id: string, over: Partial<HostRecord> = {}): HostRecord => ({
      id,
      address: `10.0.0.${id.length}:33945`,
      capacity: { cpu: 8, memoryMb: 16384, diskMb: 100000, slots: 10 },
      labels: { driver: 'container' },
      images: [],
      state: 'ready',
      epoch: 1,
      heartbeatAt: new Date(),
      registeredAt: new Date(),
      ...over,
    });
    const placements = (store: Store) => new Placement({ hosts: store.hosts, slots: store.hostSlots, deadAfterMs: 15_000 });

    it('30 concurrent creates from two API nodes against 3 hosts of 10 slots place exactly 30, none over capacity; the 31st is 429 "fleet full"', async () => {
      const prefix = `h${newId().slice(-6)}`;
      const ids = [0, 1, 2].map((i) => `${prefix}-${i}`);
      for (const id of ids) await a.hosts.put(host(id));
      // Only these three hosts: others from other tests of this suite are drained first.
      for (const h of await a.hosts.list()) if (!ids.includes(h.id)) await a.hosts.setState(h.id, 'draining');
      const [pa, pb] = [placements(a), placements(b)];
      const results = await Promise.allSettled(Array.from({ length: 30 }, (_, i) => (i % 2 ? pa : pb).place({ cpu: 1, memMb: 512 })));
      const placed = results.filter((r) => r.status === 'fulfilled');
      expect(results.filter((r) => r.status === 'rejected').map((r) => String((r as PromiseRejectedResult).reason))).toEqual([]);
      expect(placed).toHaveLength(30);
      for (const id of ids) {
        const slots = await b.hostSlots.listByHost(id);
        expect(slots.length).toBeLessThanOrEqual(10);
        expect(new Set(slots.map((s) => s.slot)).size).toBe(slots.length);
        expect(slots.every((s) => s.slot >= 0 && s.slot < 10)).toBe(true);
      }
      expect((await Promise.all(ids.map((id) => b.hostSlots.listByHost(id)))).flat()).toHaveLength(30);
      const full = await pa.place({ cpu: 1, memMb: 512 }).catch((e: unknown) => e);
      expect(full).toBeInstanceOf(TooManyRequestsError);
      expect((full as Error).message).toMatch(/fleet full/);
      expect((full as Error).message).toContain('30 sandbox slots of the 3 ready host(s)');
      // A deleted sandbox's slot is free again, on its host.
      const first = (placed[0] as PromiseFulfilledResult<Awaited<ReturnType<Placement['place']>>>).value;
      await first.release();
      const again = await pb.place({ cpu: 1, memMb: 512 });
      expect(again.host.id).toBe(first.host.id);
      expect(again.slot).toBe(first.slot);
      for (const id of ids) await a.hosts.setState(id, 'gone');
    });

    it("places an image's sandboxes on its host only: 429 naming that host when its slots are held, 503 while it takes none; a build goes to a ready host", async () => {
      const prefix = `i${newId().slice(-6)}`;
      const [home, other] = [`${prefix}-home`, `${prefix}-other`];
      await a.hosts.put(host(home, { capacity: { cpu: 8, memoryMb: 16384, diskMb: 100000, slots: 2 } }));
      await a.hosts.put(host(other));
      for (const h of await a.hosts.list()) if (h.id !== home && h.id !== other) await a.hosts.setState(h.id, 'draining');
      const pa = placements(a);
      const placed = await Promise.all([pa.place({ cpu: 1, memMb: 512, hostId: home }), placements(b).place({ cpu: 1, memMb: 512, hostId: home })]);
      expect(placed.map((p) => p.host.id)).toEqual([home, home]);
      const full = await pa.place({ cpu: 1, memMb: 512, hostId: home }).catch((e: unknown) => e);
      expect(full).toBeInstanceOf(TooManyRequestsError);
      expect((full as Error).message).toContain(`Fleet host ${home}, which holds the image's layers, has all its 2 sandbox slots held`);
      // Without the image's host, the other one still takes sandboxes.
      expect((await pa.place({ cpu: 1, memMb: 512 })).host.id).toBe(other);
      await a.hosts.setState(home, 'draining');
      const away = await pa.place({ cpu: 1, memMb: 512, hostId: home }).catch((e: unknown) => e);
      expect(away).toBeInstanceOf(HostUnavailableError);
      expect((away as Error).message).toContain(`Fleet host ${home}, which holds the image's layers, takes no sandboxes now`);
      expect((await pa.builder()).id).toBe(other);
      await a.hosts.setState(other, 'draining');
      await expect(pa.builder()).rejects.toThrow(/No fleet host is ready to build images now/);
      for (const id of [home, other]) await a.hosts.setState(id, 'gone');
    });

    it('never places on a draining, unresponsive or gone host, one with a stale heartbeat, or one too small; prefers hosts with the image', async () => {
      const prefix = `p${newId().slice(-6)}`;
      for (const h of await a.hosts.list()) await a.hosts.setState(h.id, 'gone');
      await a.hosts.put(host(`${prefix}-draining`, { state: 'draining' }));
      await a.hosts.put(host(`${prefix}-lost`, { state: 'unresponsive' }));
      await a.hosts.put(host(`${prefix}-stale`, { heartbeatAt: new Date(Date.now() - 60_000) }));
      await a.hosts.put(host(`${prefix}-small`, { capacity: { cpu: 1, memoryMb: 256, diskMb: 1000, slots: 10 } }));
      const none = await placements(b).place({ cpu: 1, memMb: 512 }).catch((e: unknown) => e);
      expect(none).toBeInstanceOf(TooManyRequestsError);
      expect((none as Error).message).toMatch(/fleet full: no host is ready/);
      await a.hosts.put(host(`${prefix}-plain`));
      await a.hosts.put(host(`${prefix}-imaged`, { images: ['img-1'] }));
      for (let i = 0; i < 5; i++) {
        const p = await placements(b).place({ cpu: 1, memMb: 512, imageId: 'img-1' });
        expect(p.host.id).toBe(`${prefix}-imaged`);
        await p.release();
      }
      for (const h of await a.hosts.list()) await a.hosts.setState(h.id, 'gone');
    });

    it('a slot reserved by a create that never finished is freed by its host after the TTL, an assigned one never', async () => {
      const id = `r${newId().slice(-6)}`;
      await a.hosts.put(host(id, { capacity: { cpu: 8, memoryMb: 16384, diskMb: 1000, slots: 2 } }));
      let now = new Date();
      const p = new Placement({ hosts: a.hosts, slots: a.hostSlots, deadAfterMs: 3_600_000, pendingTtlMs: 1000, now: () => now });
      const one = await p.place({ cpu: 1, memMb: 1 });
      const two = await p.place({ cpu: 1, memMb: 1 });
      expect([one.host.id, two.host.id]).toEqual([id, id]);
      await two.assign(newId());
      expect(await p.reapExpired(id)).toBe(0);
      now = new Date(now.getTime() + 5000);
      expect(await p.reapExpired(id)).toBe(1);
      expect((await a.hostSlots.listByHost(id)).map((s) => s.slot)).toEqual([two.slot]);
      await a.hosts.setState(id, 'gone');
    });

    it("hosts lease addresses on their own bridges: one address on two hosts, each host lists and frees only its own (a host's restart no longer frees the others')", async () => {
      const [hostA, hostB] = [`ha${newId().slice(-6)}`, `hb${newId().slice(-6)}`];
      const leasesA = hostIpLeases(a.ipLeases, hostA);
      const leasesB = hostIpLeases(b.ipLeases, hostB);
      const [sbxA, sbxB, sbxA2] = [newId(), newId(), newId()];
      expect(await leasesA.claim('192.168.100.2', sbxA)).toBe(true);
      expect(await leasesB.claim('192.168.100.2', sbxB)).toBe(true);
      // On one host the address is still taken once.
      expect(await leasesA.claim('192.168.100.2', sbxA2)).toBe(false);
      expect(await leasesA.findBySandbox(sbxA)).toMatchObject({ ip: '192.168.100.2', sandboxId: sbxA });
      expect(await leasesA.findBySandbox(sbxB)).toBeNull();
      expect((await leasesA.list()).map((l) => [l.ip, l.sandboxId])).toEqual([['192.168.100.2', sbxA]]);
      // Host A's startup reconcile frees what no sandbox of its own holds: host B's lease is not among it.
      for (const lease of await leasesA.list()) await leasesA.releaseBySandbox(lease.sandboxId);
      expect(await leasesB.findBySandbox(sbxB)).toMatchObject({ ip: '192.168.100.2' });
      expect(await leasesA.claim('192.168.100.2', sbxA2)).toBe(true);
      expect(await leasesB.claim('192.168.100.2', newId())).toBe(false);
      // A sandbox moved from one host to the other holds a lease on each for a moment: each host finds and frees only its own.
      const moved = newId();
      expect(await leasesA.claim('192.168.100.9', moved)).toBe(true);
      expect(await leasesB.claim('192.168.100.7', moved)).toBe(true);
      expect(await leasesB.findBySandbox(moved)).toMatchObject({ ip: '192.168.100.7' });
      expect(await leasesA.releaseBySandbox(moved)).toBe(1);
      expect(await leasesB.findBySandbox(moved)).toMatchObject({ ip: '192.168.100.7' });
      expect(await leasesA.findBySandbox(moved)).toBeNull();
      expect(await leasesB.releaseBySandbox(moved)).toBe(1);
    });

    it("the lost-host sweep of two API nodes at once reports each lost sandbox once, and one that found the host registered again touches nothing (not its new sandboxes, not their slots)", async () => {
      const id = `s${newId().slice(-6)}`;
      const identity = { id, address: '10.0.0.8:33945', capacity: { cpu: 2, memoryMb: 2048, diskMb: 1000, slots: 4 }, labels: {}, images: [] };
      const registry = new HostRegistry(a.hosts, a.hostEpochs);
      const record = await registry.register(identity);
      const orgId = newId();
      const sandbox = (name: string) => a.sandboxes.create({ name, orgId, createdBy: newId(), imageId: newId(), ip: '', cpu: 1, mem: 1024, diskMb: 1, status: 'running', envVars: {}, network: SANDBOX_NETWORK_NONE, labels: {}, hostId: id });
      const old = await sandbox(`old-${id}`);
      // Images building there (and one building on another host, one ready there): only the first
      // fail, saying why (regression: they stayed "building" for good, and their sandboxes 409).
      const image = (name: string, hostId: string, status: 'building' | 'ready') => a.images.create({ name, tag: 'latest', description: '', base: 'debian', orgId, isSystem: false, createdBy: newId(), status, source: 'recipe', hostId });
      const building = await image(`b-${id}`, id, 'building');
      const ready = await image(`r-${id}`, id, 'ready');
      const elsewhere = await image(`e-${id}`, `other-${id}`, 'building');
      await a.hosts.put({ ...record, heartbeatAt: new Date(Date.now() - 20_000) });
      const reported: SandboxRecord[] = [];
      const log = pino({ level: 'silent' });
      const sweeper = (store: Store, sandboxes = store.sandboxes) =>
        new LostHostSweeper({ hosts: store.hosts, epochs: store.hostEpochs, slots: store.hostSlots, sandboxes, images: store.images, deadAfterMs: 15_000, intervalMs: 60_000, log, onLost: (r) => reported.push(r) });
      await Promise.all([sweeper(a).sweep(), sweeper(b).sweep()]);
      expect((await a.sandboxes.findByIdInAnyOrg(old.id))).toMatchObject({ status: 'error', lifecycle: { endedReason: 'host-lost' } });
      expect(reported.filter((r) => r.id === old.id)).toHaveLength(1);
      expect(await a.images.findById(building.id)).toMatchObject({ status: 'failed', progress: null, error: expect.stringMatching(new RegExp(`build host ${id} stopped answering \\(host-lost\\).*delete the image and create it again`)) });
      expect(await a.images.findById(ready.id)).toMatchObject({ status: 'ready', error: null });
      expect(await a.images.findById(elsewhere.id)).toMatchObject({ status: 'building' });
      for (const i of [building, ready, elsewhere]) await a.images.delete(i.id);

      // Lost again; this time the host registers anew (and is given a sandbox and a slot) while a sweep is under way.
      await registry.register(identity);
      const current = (await a.hosts.findById(id))!;
      await a.hosts.put({ ...current, heartbeatAt: new Date(Date.now() - 20_000) });
      let fresh: SandboxRecord | null = null;
      const racing = { ...a.sandboxes, listAll: async () => {
        const all = await a.sandboxes.listAll();
        await registry.register(identity);
        fresh = await sandbox(`new-${id}`);
        await a.hostSlots.reserve({ hostId: id, slot: 0, sandboxId: fresh.id, expiresAt: new Date(Date.now() + 60_000), createdAt: new Date(), reservation: newId() });
        return [...all, fresh];
      } };
      await sweeper(b, racing).sweep();
      expect(await a.sandboxes.findByIdInAnyOrg(fresh!.id)).toMatchObject({ status: 'running' });
      expect((await a.hostSlots.listByHost(id)).map((s) => s.sandboxId)).toEqual([fresh!.id]);
      await a.hosts.setState(id, 'gone');
    });

    it("a host's warm pool starting up keeps another host's member claims (a hand-over in flight there is not cut), and releases claims whose sandbox is gone", async () => {
      const [hostA, hostB] = [`wa${newId().slice(-6)}`, `wb${newId().slice(-6)}`];
      const member = await b.sandboxes.create({ name: `pool-${hostB}`, orgId: '', createdBy: '', imageId: newId(), ip: '', cpu: 1, mem: 1024, diskMb: 1, status: 'running', envVars: {}, network: SANDBOX_NETWORK_NONE, labels: {}, pool: 'p', hostId: hostB });
      const gone = newId();
      expect(await b.poolClaims.claim(member.id)).toBe(true);
      expect(await b.poolClaims.claim(gone)).toBe(true);
      const log = pino({ level: 'silent' });
      // No WARM_POOL entries on host A: start() only reconciles claims and members (no sandbox service needed).
      const pool = new WarmPool({ entries: [], service: undefined as never, sandboxes: hostSandboxes(a.sandboxes, hostA, a.hostSlots), claims: a.poolClaims, images: undefined as never, diskMb: 1, networkMode: 'none', log });
      await pool.start();
      await pool.close();
      const claims = await a.poolClaims.list();
      expect(claims).toContain(member.id);
      expect(claims).not.toContain(gone);
      await b.poolClaims.release(member.id);
      await b.sandboxes.delete('', member.id);
    });

    it("one holder per slot among 20 racing reservations; a late release or assign of a freed reservation never touches the slot's new holder", async () => {
      const hostId = `r${newId().slice(-6)}`;
      const at = new Date();
      const reservations = Array.from({ length: 20 }, () => newId());
      const won = await Promise.all(reservations.map((reservation, i) => (i % 2 ? a : b).hostSlots.reserve({ hostId, slot: 0, reservation, sandboxId: '', expiresAt: at, createdAt: at })));
      expect(won.filter(Boolean)).toHaveLength(1);
      const first = { hostId, slot: 0, reservation: reservations[won.indexOf(true)]! };
      expect(await a.hostSlots.release(first)).toBe(true);
      const second = { hostId, slot: 0, reservation: newId() };
      expect(await b.hostSlots.reserve({ ...second, sandboxId: '', expiresAt: at, createdAt: at })).toBe(true);
      // The first holder's late calls (a sweep and a delete that both saw it) change nothing now.
      expect(await a.hostSlots.release(first)).toBe(false);
      await a.hostSlots.assign(first, 'stale-sandbox');
      await b.hostSlots.assign(second, 'current');
      expect((await a.hostSlots.listByHost(hostId)).map((x) => [x.slot, x.reservation, x.sandboxId])).toEqual([[0, second.reservation, 'current']]);
      expect(await b.hostSlots.release(second)).toBe(true);
      expect(await a.hostSlots.listByHost(hostId)).toEqual([]);
    });

    it('a drain racing heartbeats and a re-registration is never undone (FerretDB writes whole documents back)', async () => {
      const prefix = `d${newId().slice(-6)}`;
      const ids = Array.from({ length: 20 }, (_, i) => `${prefix}-${i}`);
      await Promise.all(ids.map((id) => a.hosts.put(host(id))));
      await Promise.all(ids.map((id) => Promise.all([b.hosts.drain(id), a.hosts.heartbeat(id, new Date()), a.hosts.heartbeat(id, new Date()), a.hosts.put(host(id, { epoch: 2 }))])));
      expect((await b.hosts.list()).filter((h) => ids.includes(h.id)).map((h) => h.state)).toEqual(ids.map(() => 'draining'));
      await Promise.all(ids.map((id) => Promise.all([a.hosts.undrain(id), b.hosts.heartbeat(id, new Date())])));
      expect((await a.hosts.list()).filter((h) => ids.includes(h.id)).map((h) => h.state)).toEqual(ids.map(() => 'ready'));
      for (const id of ids) await a.hosts.setState(id, 'gone');
    });

    it('of 20 concurrent registrations under one host id each epoch has one winner; a host declared lost is fenced until it registers again', async () => {
      const id = `e${newId().slice(-6)}`;
      const identity = { id, address: '10.0.0.9:33945', capacity: { cpu: 2, memoryMb: 2048, diskMb: 1000, slots: 4 }, labels: {}, images: [] };
      const registries = Array.from({ length: 20 }, (_, i) => new HostRegistry(i % 2 ? a.hosts : b.hosts, i % 2 ? a.hostEpochs : b.hostEpochs));
      await Promise.all(registries.map((r) => r.register(identity)));
      const epochs = registries.map((r) => r.epoch).sort((x, y) => x - y);
      expect(new Set(epochs).size).toBe(20);
      expect(await a.hostEpochs.latest(id)).toBe(epochs[19]);

      const registry = new HostRegistry(a.hosts, a.hostEpochs);
      const record = await registry.register(identity);
      expect(record.epoch).toBe(epochs[19]! + 1);
      expect(await registry.heartbeat(id)).toBe('ok');
      // An older registration of the same id (a restart that lost the race) is fenced.
      expect(await registries[0]!.heartbeat(id)).toBe('fenced');
      // Missed heartbeats: an API node's sweep declares it unresponsive; its next heartbeat is fenced.
      await a.hosts.put({ ...record, heartbeatAt: new Date(Date.now() - 20_000) });
      const lost = await sweepLostHosts(b.hosts, b.hostEpochs, 15_000);
      expect(lost.map((h) => h.id)).toContain(id);
      expect((await a.hosts.findById(id))?.state).toBe('unresponsive');
      expect(await registry.heartbeat(id)).toBe('fenced');
      // It comes back with a new epoch and serves again.
      const back = await registry.register(identity);
      expect(back.epoch).toBe(record.epoch + 1);
      expect(back.state).toBe('ready');
      expect(await registry.heartbeat(id)).toBe('ok');
      // A draining host stays draining through a re-registration, and undrained it is ready again.
      await a.hosts.drain(id);
      expect((await registry.register(identity)).state).toBe('draining');
      expect((await b.hosts.findById(id))?.state).toBe('draining');
      await b.hosts.undrain(id);
      expect((await registry.register(identity)).state).toBe('ready');
      await a.hosts.setState(id, 'gone');
    });
  });
}

onSharedStores('fleet placement', fleetSuite);
