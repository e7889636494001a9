import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Server } from 'node:net';
import { MongoClient, ObjectId } from 'mongodb';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FleetProcesses, json, runc, stopNode, type FleetNode } from './helpers/fleet-nodes.js';
import { support } from './helpers/sandbox-support.js';
import { claimTestBlock, ip, onPath } from './helpers/test-internet.js';
import { until } from './helpers/until.js';

const mongoUri = process.env.MONGO_URI;
const canNetns = process.getuid?.() === 0 && onPath('ip') && onPath('nsenter');
const skip = !mongoUri ? 'no MONGO_URI' : !support.ok ? support.reason : !canNetns ? 'needs root, ip and nsenter' : null;

/** One node's network: a namespace and a veth pair on a /30 of TEST-NET space this machine does not use. */
interface Link {
  ns: string;
  /** The test's (root namespace) end of the link. */
  hostIf: string;
  hostAddress: string;
  /** The node's address, in its namespace. */
  address: string;
  release(): void;
}

const tag = randomBytes(3).toString('hex');

async function makeLink(name: string): Promise<Link> {
  const block = await claimTestBlock('198.51.100', 4);
  const prefix = '198.51.100';
  const link: Link = { ns: `vrf-${tag}-${name}`, hostIf: `vrf${tag}${name}`.slice(0, 15), hostAddress: `${prefix}.${block.first + 1}`, address: `${prefix}.${block.first + 2}`, release: block.release };
  await ip('netns', 'add', link.ns);
  await ip('link', 'add', link.hostIf, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', link.ns);
  await ip('addr', 'add', `${link.hostAddress}/30`, 'dev', link.hostIf);
  await ip('link', 'set', link.hostIf, 'up');
  await ip('-n', link.ns, 'addr', 'add', `${link.address}/30`, 'dev', 'eth0');
  for (const dev of ['eth0', 'lo']) await ip('-n', link.ns, 'link', 'set', dev, 'up');
  await ip('-n', link.ns, 'route', 'add', 'default', 'via', link.hostAddress);
  return link;
}

describe.skipIf(skip !== null)(`a fleet whose nodes each have their own network namespace and address${skip ? ` (skipped: ${skip})` : ''}`, () => {
  const fleet = mongoUri ? new FleetProcesses('', { HOST_HEARTBEAT_SEC: '1', HOST_DEAD_AFTER_SEC: '4', HOST_SLOTS: '4' }) : null;
  const links: Record<string, Link> = {};
  const nodes: Record<string, FleetNode> = {};
  let relay: Server;
  let mongo: MongoClient;
  let apiKey: string;
  const hostOf = async (id: string) => (await mongo.db(fleet!.db).collection('sandboxes').findOne({ _id: new ObjectId(id) }))?.hostId as string | undefined;

  beforeAll(async () => {
    mongo = await MongoClient.connect(mongoUri!);
    for (const name of ['api', 'h1', 'h2']) links[name] = await makeLink(name);
    // Node to node goes through this namespace's routes (API node → host). Left on afterwards: the
    // server's own bridge networking turns it on too, and tests running beside this one rely on it.
    if (readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8').trim() !== '1') writeFileSync('/proc/sys/net/ipv4/ip_forward', '1');
    // The store, reached from every namespace at the API link's address here (it listens on loopback).
    const store = new URL(mongoUri!);
    relay = createServer((s) => {
      const upstream = connect(Number(store.port), store.hostname);
      s.pipe(upstream).pipe(s);
      s.on('error', () => upstream.destroy());
      upstream.on('error', () => s.destroy());
    });
    await new Promise<void>((r) => relay.listen(27017, links.api!.hostAddress, r));
    const uri = `mongodb://${links.api!.hostAddress}:27017/`;
    nodes.api = await fleet!.start('api', 'api', { MONGO_URI: uri }, links.api);
    const [h1, h2] = await Promise.all(['h1', 'h2'].map((n) => fleet!.start(n, 'host', { MONGO_URI: uri }, links[n])));
    Object.assign(nodes, { h1, h2 });
    apiKey = (await json(`${nodes.api.url}/api/register`, { method: 'POST', body: JSON.stringify({ name: 'Netns Owner', email: 'netns@example.com' }) })).body.data.apiKey;
  }, 180_000);

  afterAll(async () => {
    if (apiKey && nodes.api) {
      const left = await json(`${nodes.api.url}/api/sandboxes?limit=100`, { apiKey }).catch(() => ({ body: { data: [] } }));
      await Promise.all(((left.body.data ?? []) as Array<{ id: string }>).map((b) => json(`${nodes.api!.url}/api/sandboxes/${b.id}`, { method: 'DELETE', apiKey }).catch(() => {})));
    }
    await Promise.all(Object.values(nodes).map((n) => stopNode(n)));
    relay?.close();
    for (const link of Object.values(links)) {
      await ip('netns', 'del', link.ns).catch(() => {});
      await ip('link', 'del', link.hostIf).catch(() => {});
      link.release();
    }
    await mongo?.db(fleet!.db).dropDatabase().catch(() => {});
    await mongo?.close();
    fleet?.cleanup();
  }, 60_000);

  it('hosts register at their own addresses, and the API node reaches their sandboxes there', async () => {
    const hosts = await mongo.db(fleet!.db).collection('hosts').find({}).toArray();
    expect(hosts.map((h) => h.address).sort()).toEqual([`${links.h1!.address}:33945`, `${links.h2!.address}:33945`].sort());
    const made = await json(`${nodes.api!.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'in-netns' }) });
    expect(made.status).toBe(201);
    const exec = await json(`${nodes.api!.url}/api/sandboxes/${made.body.data.id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'echo from-$(hostname)' }) });
    expect(exec.body.data.stdout).toBe('from-in-netns\n');
    await json(`${nodes.api!.url}/api/sandboxes/${made.body.data.id}`, { method: 'DELETE', apiKey });
  }, 60_000);

  it("a host whose link goes down is lost within the dead-after interval; with the link back it is fenced, stops its lost sandbox and registers anew", async () => {
    const id = (await json(`${nodes.api!.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'cut-off' }) })).body.data.id as string;
    const hostId = (await hostOf(id))!;
    const name = (await json(`${nodes.h1!.url}/api/version`)).body.nodeId === hostId ? 'h1' : 'h2';
    const node = nodes[name]!;
    const before = (await mongo.db(fleet!.db).collection('hosts').findOne({ _id: hostId as never }))!.epoch as number;
    await ip('link', 'set', links[name]!.hostIf, 'down');
    try {
      const lost = await until(() => json(`${nodes.api!.url}/api/sandboxes/${id}`, { apiKey }), (r) => r.body.data?.endedReason === 'host-lost', 'the sandbox to be marked lost', 30_000, 250);
      expect(lost.body.data.status).toBe('error');
      const exec = await json(`${nodes.api!.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'true' }) });
      expect(exec).toMatchObject({ status: 503, body: { code: 'HOST_UNAVAILABLE' } });
      // Creates go to the host still connected.
      const other = await json(`${nodes.api!.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'still-here' }) });
      expect(other.status).toBe(201);
      expect(await hostOf(other.body.data.id)).not.toBe(hostId);
    } finally {
      await ip('link', 'set', links[name]!.hostIf, 'up');
    }
    const back = await until(() => mongo.db(fleet!.db).collection('hosts').findOne({ _id: hostId as never }), (h) => h?.state === 'ready' && (h.epoch as number) > before, 'the host to register again', 40_000, 200);
    expect(back!.epoch).toBeGreaterThan(before);
    await until(() => node.log.join('\n'), (l) => l.includes('this host was declared lost'), 'the host to log its fencing', 10_000);
    const state = await runc(node.env.RUNC_ROOT!, 'state', `vr-${id}`);
    expect(state.includes('"status": "running"')).toBe(false);
    expect((await json(`${nodes.api!.url}/api/sandboxes/${id}`, { apiKey })).body.data).toMatchObject({ status: 'error', endedReason: 'host-lost' });
  }, 180_000);
});
