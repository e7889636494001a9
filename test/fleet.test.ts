import { randomBytes } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { connect as netConnect } from 'node:net';
import { MongoClient, ObjectId } from 'mongodb';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createClient } from '../client/index.js';
import { FleetProcesses, json, launch, runc, stopNode, type FleetNode as Node } from './helpers/fleet-nodes.js';
import { ociLayout } from './helpers/oci-archive.js';
import { support } from './helpers/sandbox-support.js';
import { until } from './helpers/until.js';

const mongoUri = process.env.MONGO_URI;
const fleet = mongoUri ? new FleetProcesses(mongoUri, { HOST_HEARTBEAT_SEC: '1', HOST_DEAD_AFTER_SEC: '4', HOST_SLOTS: '3', ORG_MAX_STREAMS: '400', PREVIEW_DOMAIN: 'preview.test', PREVIEW_URL_SCHEME: 'http' }) : null;
const token = fleet?.token ?? '';
const adminKey = fleet?.adminKey ?? '';
const db = fleet?.db ?? '';
const startNode = (name: string, role: 'api' | 'host') => fleet!.start(name, role);

describe.skipIf(!mongoUri || !support.ok)(`a fleet of server processes on one MongoDB-wire store${mongoUri ? '' : ' (skipped: no MONGO_URI)'}${support.ok ? '' : ` (skipped: ${support.reason})`}`, () => {
  let api1: Node;
  let api2: Node;
  let h1: Node;
  let h2: Node;
  let apiKey: string;
  let orgId: string;
  let mongo: MongoClient;
  const hostOf = async (id: string) => (await mongo.db(db).collection('sandboxes').findOne({ _id: new ObjectId(id) }))?.hostId as string | undefined;

  beforeAll(async () => {
    mongo = await MongoClient.connect(mongoUri!);
    // The first node sets the store up (indexes, system user, images) before the rest start together.
    api1 = await startNode('api1', 'api');
    [api2, h1, h2] = await Promise.all([startNode('api2', 'api'), startNode('h1', 'host'), startNode('h2', 'host')]);
    const registered = await json(`${api1.url}/api/register`, { method: 'POST', body: JSON.stringify({ name: 'Fleet Owner', email: 'fleet@example.com' }) });
    apiKey = registered.body.data.apiKey;
    orgId = registered.body.data.orgId;
  }, 180_000);

  afterAll(async () => {
    // Sandboxes outlive a server that stops (it adopts them at its next start): these are deleted first.
    if (apiKey && api1) {
      const left = await json(`${api1.url}/api/sandboxes?limit=100`, { apiKey });
      await Promise.all(((left.body.data ?? []) as Array<{ id: string }>).map((b) => json(`${api1.url}/api/sandboxes/${b.id}`, { method: 'DELETE', apiKey })));
    }
    await Promise.all([api1, api2, h1, h2].filter(Boolean).map((n) => stopNode(n)));
    await mongo?.db(db).dropDatabase().catch(() => {});
    await mongo?.close();
    fleet?.cleanup();
  }, 60_000);

  it('every node answers /api/version with its role and node id; hosts register with their internal address', async () => {
    const versions = await Promise.all([api1, api2, h1, h2].map(async (n) => (await json(`${n.url}/api/version`)).body));
    expect(versions.map((v) => v.role)).toEqual(['api', 'api', 'host', 'host']);
    expect(new Set(versions.map((v) => v.nodeId)).size).toBe(4);
    const hosts = await mongo.db(db).collection('hosts').find({}).toArray();
    expect(hosts.map((h) => h.address).sort()).toEqual([`127.0.0.1:${h1.internalPort}`, `127.0.0.1:${h2.internalPort}`].sort());
    expect(hosts.map((h) => h.state)).toEqual(['ready', 'ready']);
    // /metrics on every node names its role and id; an API node's shows each host's state and slots.
    const apiMetrics = await (await fetch(`${api1.url}/metrics`)).text();
    expect(apiMetrics).toContain(`voidrun_node_info{role="api",node_id="${versions[0].nodeId}"} 1`);
    for (const h of hosts) {
      expect(apiMetrics).toContain(`voidrun_fleet_host_state{voidrun_host="${h._id}",state="ready"} 1`);
      expect(apiMetrics).toContain(`voidrun_fleet_host_slots{voidrun_host="${h._id}",kind="capacity"} 3`);
    }
    expect(await (await fetch(`${h1.url}/metrics`)).text()).toContain(`voidrun_node_info{role="host",node_id="${versions[2].nodeId}"} 1`);
  });

  it("a host's internal listener serves nothing without the cluster token", async () => {
    const bare = await json(`http://127.0.0.1:${h1.internalPort}/api/version`);
    expect(bare.status).toBe(401);
    expect(bare.body.error).toMatch(/only API nodes of its fleet \(with its CLUSTER_TOKEN\)/);
    const wrong = await json(`http://127.0.0.1:${h1.internalPort}/internal/v1/call`, { method: 'POST', headers: { 'x-voidrun-cluster-token': 'x'.repeat(token.length) }, body: '{}' });
    expect(wrong.status).toBe(401);
    // Its public port answers /api/version and /metrics only: a create there would bypass placement.
    const direct = await json(`${h1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'direct' }) });
    expect(direct.status).toBe(404);
    expect(direct.body.error).toMatch(/this is a fleet host \(VOIDRUN_ROLE=host\), which serves API nodes only; send API requests to an API node$/);
    expect((await fetch(`${h1.url}/metrics`)).status).toBe(200);
  });

  it('a sandbox created through one API node is used through the other: exec, files both ways, streams, errors as one server answers them', async () => {
    const created = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'across' }) });
    expect(created.status).toBe(201);
    const id = created.body.data.id as string;
    expect(await hostOf(id)).toMatch(/^node-/);
    const vr = createClient({ url: api2.url, apiKey });
    const box = await vr.sandboxes.get(id);
    expect((await box.exec('hostname')).stdout).toBe('across\n');
    // Bytes up through API node 2, down through API node 1.
    const bytes = randomBytes(3 * 1024 * 1024 + 17);
    const up = await fetch(`${api2.url}/api/sandboxes/${id}/files/upload?path=/root/blob.bin`, { method: 'POST', headers: { 'x-api-key': apiKey, 'content-type': 'application/octet-stream' }, body: bytes });
    expect(up.status).toBe(200);
    const down = Buffer.from(await (await fetch(`${api1.url}/api/sandboxes/${id}/files/download?path=/root/blob.bin`, { headers: { 'x-api-key': apiKey } })).arrayBuffer());
    expect(down.equals(bytes)).toBe(true);
    // A stream through the tRPC client (API node 2) arrives whole.
    let out = '';
    for await (const chunk of box.execStream('seq 1 50000')) if ('data' in chunk && typeof chunk.data === 'string') out += chunk.data;
    expect(out).toBe(`${Array.from({ length: 50000 }, (_, i) => i + 1).join('\n')}\n`);
    // Errors keep their shape: the host's validation and not-found, the same on REST and tRPC.
    const bad = await json(`${api1.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 5 }) });
    expect(bad).toMatchObject({ status: 400, body: { code: 'INVALID_INPUT', error: 'Invalid command: Invalid input: expected string, received number' } });
    await expect(box.exec('')).rejects.toThrow('Invalid command: must not be empty');
    const other = await json(`${api1.url}/api/register`, { method: 'POST', body: JSON.stringify({ name: 'Other Org', email: 'other@example.com' }) });
    const foreign = await json(`${api2.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey: other.body.data.apiKey, body: JSON.stringify({ command: 'true' }) });
    expect(foreign).toMatchObject({ status: 404, body: { code: 'SANDBOX_NOT_FOUND' } });
    // A terminal WebSocket through API node 1: the upgrade and its bytes are passed to the host.
    const ws = new WebSocket(`${api1.url.replace('http', 'ws')}/api/sandboxes/${id}/pty?apiKey=${apiKey}`);
    let screen = '';
    ws.on('message', (m) => (screen += m.toString()));
    await new Promise((resolve, reject) => (ws.once('open', resolve), ws.once('error', reject)));
    ws.send('echo "fleet $((6*7))"\n');
    await until(() => screen, (t) => t.includes('fleet 42'), 'the terminal to answer', 15_000);
    ws.close();
    await box.delete();
    expect((await json(`${api1.url}/api/sandboxes/${id}`, { apiKey })).status).toBe(404);
  }, 120_000);

  it("an image built or imported through an API node lives on the host that made its layers: its sandboxes go there, its log and delete reach it", async () => {
    const imageHost = async (id: string) => (await mongo.db(db).collection('images').findOne({ _id: new ObjectId(id) }))?.hostId as string | undefined;
    const hostIds = await Promise.all([h1, h2].map(async (n) => (await json(`${n.url}/api/version`)).body.nodeId as string));
    const made = await json(`${api1.url}/api/images`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'fleet-built', base: 'debian', run: ['echo built-in-the-fleet > /built'] }) });
    expect(made.status, JSON.stringify(made.body)).toBe(201);
    const imageId = (made.body.data?.id ?? made.body.id) as string;
    const home = await imageHost(imageId);
    expect(hostIds).toContain(home);
    // Followed through the other API node: live from the host that builds it, to its end.
    const live = await fetch(`${api2.url}/api/images/${imageId}/logs/stream`, { headers: { 'x-api-key': apiKey } });
    expect(live.status).toBe(200);
    const followed = await live.text();
    expect(followed).toContain('echo built-in-the-fleet');
    expect(followed).toMatch(/event: end\ndata: \{"status":"ready"\}/);
    await until(async () => (await json(`${api2.url}/api/images/${imageId}`, { apiKey })).body, (b) => (b.data ?? b).status !== 'building', 'the build to end', 180_000, 250);
    expect((await json(`${api2.url}/api/images/${imageId}`, { apiKey })).body).toMatchObject({ status: 'ready' });
    const log = await json(`${api2.url}/api/images/${imageId}/logs`, { apiKey });
    expect(log.status).toBe(200);
    expect(JSON.stringify(log.body)).toContain('echo built-in-the-fleet');
    // Its sandboxes are placed on its host only (the other host has no such layers).
    const ids: string[] = [];
    for (const name of ['from-built-1', 'from-built-2']) {
      const box = await json(`${api2.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name, templateId: 'fleet-built' }) });
      expect(box.status, JSON.stringify(box.body)).toBe(201);
      ids.push(box.body.data.id);
      expect(await hostOf(box.body.data.id)).toBe(home);
    }
    const ran = await json(`${api1.url}/api/sandboxes/${ids[0]}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'cat /built' }) });
    expect(JSON.stringify(ran.body)).toContain('built-in-the-fleet');
    // In use: the host's own answer (409), through either node; once unused, deleted there.
    expect((await json(`${api2.url}/api/images/${imageId}`, { method: 'DELETE', apiKey })).status).toBe(409);
    for (const id of ids) expect((await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey })).status).toBe(200);
    expect((await json(`${api2.url}/api/images/${imageId}`, { method: 'DELETE', apiKey })).status).toBe(200);
    expect((await json(`${api1.url}/api/images/${imageId}`, { apiKey })).status).toBe(404);

    // An OCI import through an API node is made on a host, and named its own.
    const archive = ociLayout({ layers: [[{ name: 'etc/' }, { name: 'etc/imported', body: 'yes' }]], env: ['PATH=/usr/bin:/bin'] });
    const imported = await fetch(`${api2.url}/api/images/import?name=fleet-imported`, { method: 'POST', headers: { 'x-api-key': apiKey, 'content-type': 'application/x-tar' }, body: archive });
    const importedBody = (await imported.json()) as { data: { id: string } };
    expect(imported.status, JSON.stringify(importedBody)).toBe(201);
    expect(hostIds).toContain(await imageHost(importedBody.data.id));
    expect((await json(`${api1.url}/api/images/${importedBody.data.id}`, { method: 'DELETE', apiKey })).status).toBe(200);
  }, 300_000);

  it("a snapshot is restored through any API node on the host that holds it, also after its sandbox was deleted with its snapshots kept", async () => {
    const src = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'snap-source' }) });
    expect(src.status).toBe(201);
    const sourceId = src.body.data.id as string;
    const home = await hostOf(sourceId);
    await json(`${api1.url}/api/sandboxes/${sourceId}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'echo kept-in-the-snapshot > /root/mark' }) });
    const snap = await json(`${api1.url}/api/sandboxes/${sourceId}/snapshot`, { method: 'POST', apiKey, body: '{}' });
    expect(snap.status, JSON.stringify(snap.body)).toBe(200);
    const snapshotPath = snap.body.data.full_path as string;
    const restoreAndRead = async (name: string) => {
      const restored = await json(`${api2.url}/api/sandboxes/restore`, { method: 'POST', apiKey, body: JSON.stringify({ snapshot_path: snapshotPath, new_id: name }) });
      expect(restored.status, JSON.stringify(restored.body)).toBe(201);
      const id = restored.body.data.id as string;
      expect(await hostOf(id)).toBe(home);
      const read = await json(`${api1.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'cat /root/mark' }) });
      expect(JSON.stringify(read.body)).toContain('kept-in-the-snapshot');
      expect((await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey })).status).toBe(200);
    };
    await restoreAndRead('restored-1');
    // The source goes, its snapshot stays on its host: found there.
    expect((await json(`${api2.url}/api/sandboxes/${sourceId}?keepSnapshots=true`, { method: 'DELETE', apiKey })).status).toBe(200);
    await restoreAndRead('restored-2');
    // A snapshot no host has is a 404, and leaves no slot held.
    const missing = await json(`${api1.url}/api/sandboxes/restore`, { method: 'POST', apiKey, body: JSON.stringify({ snapshot_path: `${sourceId}/snap-${'0'.repeat(24)}` }) });
    expect(missing).toMatchObject({ status: 404, body: { code: 'SNAPSHOT_NOT_FOUND' } });
    const slots = await mongo.db(db).collection('host_slots').find({}).toArray();
    expect(slots.filter((s) => s.sandboxId === '')).toEqual([]);
  }, 180_000);

  it('300 event streams open through one API node to one host do not hold up its other requests (no socket pool cap queues them)', async () => {
    const created = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'many-streams' }) });
    expect(created.status).toBe(201);
    const id = created.body.data.id as string;
    const { hostname, port } = new URL(api1.url);
    const open: Array<{ destroy(): void }> = [];
    try {
      // Each an SSE stream of the sandbox's events, forwarded to its host for as long as it is open.
      const statuses = await Promise.all(
        Array.from({ length: 300 }, () =>
          new Promise<number>((resolve, reject) => {
            const req = httpRequest({ hostname, port, path: `/api/sandboxes/${id}/events/stream`, headers: { 'x-api-key': apiKey, accept: 'text/event-stream' }, agent: false }, (res) => {
              open.push(res);
              resolve(res.statusCode ?? 0);
            });
            open.push(req);
            req.once('error', reject);
            req.end();
          }),
        ),
      );
      expect(statuses.filter((s) => s !== 200)).toEqual([]);
      // With all 300 open, a call on the same host is answered at once.
      const ran = await json(`${api1.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'echo through' }) });
      expect(ran.status).toBe(200);
      expect(JSON.stringify(ran.body)).toContain('through');
    } finally {
      for (const s of open) s.destroy();
      await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey });
    }
  }, 120_000);

  it("a key revoked through one API node closes its streams open through the other: an SSE exec stream and a terminal end within a heartbeat or so", async () => {
    const created = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'revoked-streams' }) });
    expect(created.status).toBe(201);
    const id = created.body.data.id as string;
    const owner = createClient({ url: api2.url, apiKey });
    const second = (await owner.trpc.org.createApiKey.mutate({ orgId, keyName: 'to-revoke' })) as { plainKey: string; keyId: string };
    // Both opened through API node 1 (forwarded to the sandbox's host) with the second key.
    const sse = await fetch(`${api1.url}/api/sandboxes/${id}/exec-stream`, { method: 'POST', headers: { 'x-api-key': second.plainKey, 'content-type': 'application/json' }, body: JSON.stringify({ command: 'echo started; sleep 600' }) });
    expect(sse.status).toBe(200);
    const reader = sse.body!.getReader();
    let text = '';
    while (!text.includes('started')) text += new TextDecoder().decode((await reader.read()).value);
    const ws = new WebSocket(`${api1.url.replace('http', 'ws')}/api/sandboxes/${id}/pty?apiKey=${second.plainKey}`);
    const wsClosed = new Promise<number>((resolve) => ws.once('close', (code) => resolve(code)));
    await new Promise((resolve, reject) => (ws.once('open', resolve), ws.once('error', reject)));
    const sseEnded = (async () => {
      try {
        for (;;) if ((await reader.read()).done) return 'ended';
      } catch {
        return 'cut';
      }
    })();
    // Revoked through API node 2: neither node 1 nor the host saw the revoke happen.
    await owner.trpc.org.revokeApiKey.mutate({ orgId, keyId: second.keyId });
    // HOST_HEARTBEAT_SEC is 1 here: each node re-reads its open streams' keys once a second (the
    // command would run 600 s).
    expect(await sseEnded).toMatch(/ended|cut/);
    expect(await wsClosed).toBeGreaterThan(0);
    // And the key opens nothing new anywhere.
    expect((await json(`${api1.url}/api/sandboxes/${id}`, { apiKey: second.plainKey })).status).toBe(401);
    expect((await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey })).status).toBe(200);
  }, 120_000);

  it('forwarding resists a tenant: no request smuggled in a chunked GET, no cluster token reaching a sandbox, no dot-segment path to another route, no slot taken twice by an idempotent replay', async () => {
    const first = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, headers: { 'idempotency-key': 'attack-replay' }, body: JSON.stringify({ name: 'attacked' }) });
    const id = first.body.data.id as string;
    try {
    // An idempotent replay (through either API node) returns the same sandbox and holds no second slot.
    for (const n of [api1, api2]) {
      const again = await json(`${n.url}/api/sandboxes`, { method: 'POST', apiKey, headers: { 'idempotency-key': 'attack-replay' }, body: JSON.stringify({ name: 'attacked' }) });
      expect(again.body.data.id).toBe(id);
    }
    expect(await mongo.db(db).collection('host_slots').countDocuments({ sandboxId: id })).toBe(1);
    expect(await mongo.db(db).collection('host_slots').countDocuments({})).toBe(1);
    // Smuggling: a GET with a chunked body whose body is the start of another request.
    const smuggled = `POST /api/sandboxes/${id}/exec HTTP/1.1\r\nHost: h\r\nX-Swallow: `;
    const raw = `GET /api/sandboxes/${id} HTTP/1.1\r\nHost: x\r\nX-API-Key: ${apiKey}\r\nTransfer-Encoding: chunked\r\n\r\n${smuggled.length.toString(16)}\r\n${smuggled}\r\n0\r\n\r\n`;
    const { port } = new URL(api1.url);
    const answer = await new Promise<string>((resolve, reject) => {
      const sock = netConnect(Number(port), '127.0.0.1', () => sock.write(raw));
      let text = '';
      sock.on('data', (d: Buffer) => {
        text += d.toString();
        // The answer is whole once its declared body has arrived.
        const head = text.indexOf('\r\n\r\n');
        const length = Number(/content-length: (\d+)/i.exec(text)?.[1] ?? NaN);
        if (head >= 0 && text.length - head - 4 >= length) (sock.destroy(), resolve(text));
      });
      sock.on('error', reject);
      setTimeout(() => (sock.destroy(), resolve(text)), 5000);
    });
    expect(answer).toMatch(/^HTTP\/1\.1 200/);
    // Requests after it, on the API node's kept-alive sockets to the host, are answered as sent.
    for (let i = 0; i < 5; i++) expect((await json(`${api1.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: `echo victim-${i}` }) })).body.data.stdout).toBe(`victim-${i}\n`);
    // Events are written behind the calls (batched): read until the last one is in.
    const started = async () =>
      ((await json(`${api1.url}/api/sandboxes/${id}/events?limit=100`, { apiKey })).body.data.events as Array<{ type: string; data: { command?: string } }>).filter((e) => e.type === 'process.started').map((e) => e.data.command);
    const commands = await until(started, (c) => c.length >= 5, 'the five process.started events');
    expect(commands).toEqual(['echo victim-0', 'echo victim-1', 'echo victim-2', 'echo victim-3', 'echo victim-4']);
    // Dot segments: routed by one path, resolved to another (here: a create on the host, placed nowhere).
    // (Sent as written: fetch would resolve the dots itself.)
    const rawPost = (url: string, path: string, headers: Record<string, string> = {}) =>
      new Promise<{ status: number; body: any }>((resolve, reject) => {
        const { hostname, port: p } = new URL(url);
        const r = httpRequest({ host: hostname, port: Number(p), path, method: 'POST', headers: { 'content-type': 'application/json', 'x-api-key': apiKey, ...headers } }, (res) => {
          let text = '';
          res.on('data', (d: Buffer) => (text += d.toString()));
          res.on('end', () => resolve({ status: res.statusCode!, body: JSON.parse(text) }));
        });
        r.on('error', reject);
        r.end(JSON.stringify({ name: 'sneaky' }));
      });
    for (const path of [`/api/sandboxes/${id}/..`, `/api/sandboxes/${id}/%2e%2e`, `/api/sandboxes/${id}/../restore`]) {
      const r = await rawPost(api1.url, path);
      expect(r.status, path).toBe(400);
      expect(r.body.error).toMatch(/has a "\." or "\.\." segment or an encoded slash/);
    }
    const direct = await rawPost(`http://127.0.0.1:${h1.internalPort}`, `/api/sandboxes/${id}/..`, { 'x-voidrun-cluster-token': token });
    expect(direct.status).toBe(400);
    expect(await mongo.db(db).collection('sandboxes').countDocuments({ name: 'sneaky' })).toBe(0);
    // The cluster token never reaches a sandbox's server through its port.
    await json(`${api1.url}/api/sandboxes/${id}/commands/run`, { method: 'POST', apiKey, body: JSON.stringify({ command: `/opt/voidrun/node -e "require('http').createServer((q, r) => r.end(JSON.stringify(q.headers))).listen(8080)"` }) });
    const seen = await until(() => fetch(`${api2.url}/api/sandboxes/${id}/ports/8080/`, { headers: { 'x-api-key': apiKey } }).then(async (r) => ({ status: r.status, text: await r.text() })), (r) => r.status === 200, 'the sandbox server to answer', 15_000, 200);
    expect(Object.keys(JSON.parse(seen.text))).not.toContain('x-voidrun-cluster-token');
    expect(seen.text).not.toContain(token);
    // Its preview host through an API node (the Host header names the sandbox): served by its host, the token not passed on.
    const preview = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const { port: p } = new URL(api1.url);
      const r = httpRequest({ host: '127.0.0.1', port: Number(p), path: '/hello', headers: { host: `8080-${id}.preview.test`, 'x-api-key': apiKey } }, (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode!, text }));
      });
      r.on('error', reject);
      r.end();
    });
    expect(preview.status).toBe(200);
    expect(JSON.parse(preview.text)).toMatchObject({ host: `8080-${id}.preview.test` });
    expect(preview.text).not.toContain(token);
    } finally {
      await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey });
    }
  }, 120_000);

  it("the caller an API node authenticated is who the host serves (the key read once); a client's own x-voidrun-principal header is dropped everywhere, never believed", async () => {
    const created = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'vouched' }) });
    const id = created.body.data.id as string;
    try {
      const other = await json(`${api1.url}/api/register`, { method: 'POST', body: JSON.stringify({ name: 'Forger', email: 'forger@example.com' }) });
      const otherKey = other.body.data.apiKey as string;
      const forged = JSON.stringify({ orgId, keyId: 'a'.repeat(24), userId: 'b'.repeat(24) });
      const exec = (base: string, headers: Record<string, string>) =>
        json(`${base}/api/sandboxes/${id}/exec`, { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: JSON.stringify({ command: 'echo served' }) });
      // Through either API node, the header sent by a client changes nothing: another org's key
      // still finds no such sandbox; no key, or a bad one, is still a 401; REST, raw routes and
      // tRPC alike.
      for (const n of [api1, api2]) {
        expect((await exec(n.url, { 'x-api-key': otherKey, 'x-voidrun-principal': forged })).status).toBe(404);
        expect((await exec(n.url, { 'x-voidrun-principal': forged })).status).toBe(401);
        expect((await exec(n.url, { 'x-api-key': 'vr_not-a-key', 'x-voidrun-principal': forged })).status).toBe(401);
        const stream = await fetch(`${n.url}/api/sandboxes/${id}/exec-stream`, { method: 'POST', headers: { 'x-api-key': otherKey, 'x-voidrun-principal': forged, 'content-type': 'application/json' }, body: JSON.stringify({ command: 'echo served' }) });
        expect(stream.status).toBe(404);
        const viaTrpc = createClient({ url: n.url, apiKey: otherKey, headers: { 'x-voidrun-principal': forged } });
        await expect(viaTrpc.trpc.exec.run.mutate({ id, command: 'echo served' })).rejects.toThrow(/not found/i);
        expect((await exec(n.url, { 'x-api-key': apiKey, 'x-voidrun-principal': JSON.stringify({ orgId: other.body.data.orgId, keyId: 'a'.repeat(24), userId: 'b'.repeat(24) }) })).body.data.stdout).toBe('served\n');
      }
      // The host believes the header on its internal listener only, where the cluster secret is
      // required: that is the API nodes' word (here the test speaks as one).
      const internal = `http://127.0.0.1:${(await hostOf(id)) === (await json(`${h1.url}/api/version`)).body.nodeId ? h1.internalPort : h2.internalPort}`;
      expect((await exec(internal, { 'x-voidrun-cluster-token': token, 'x-voidrun-principal': forged })).body.data.stdout).toBe('served\n');
      expect((await exec(internal, { 'x-voidrun-principal': forged })).status).toBe(401);
      // A malformed vouch is no vouch: the key (none here) decides.
      for (const bad of ['{', JSON.stringify({ orgId }), JSON.stringify({ orgId, keyId: 'a', userId: 'b', extra: 1 }), 'x'.repeat(600)]) {
        expect((await exec(internal, { 'x-voidrun-cluster-token': token, 'x-voidrun-principal': bad })).status).toBe(401);
      }
      // The header never reaches a sandbox's own server (ports are keyless: no principal is vouched for).
      await json(`${api1.url}/api/sandboxes/${id}/commands/run`, { method: 'POST', apiKey, body: JSON.stringify({ command: `/opt/voidrun/node -e "require('http').createServer((q, r) => r.end(JSON.stringify(q.headers))).listen(8080)"` }) });
      const seen = await until(
        () => fetch(`${api2.url}/api/sandboxes/${id}/ports/8080/`, { headers: { 'x-api-key': apiKey, 'x-voidrun-principal': forged } }).then(async (r) => ({ status: r.status, text: await r.text() })),
        (r) => r.status === 200,
        'the sandbox server to answer',
        15_000,
        200,
      );
      expect(Object.keys(JSON.parse(seen.text))).not.toContain('x-voidrun-principal');

      // A vouch is taken only while fresh: a key revoked while its request's body was held back
      // does not run the command (the API node read the key when the head came; the host reads it
      // again once the body is in, past VOUCH_FRESH_MS).
      const owner = createClient({ url: api1.url, apiKey });
      const doomed = (await owner.trpc.org.createApiKey.mutate({ orgId, keyName: 'held-body' })) as { plainKey: string; keyId: string };
      const body = JSON.stringify({ command: 'touch /root/held-body-ran' });
      const { port: apiPort } = new URL(api2.url);
      const sock = netConnect(Number(apiPort), '127.0.0.1');
      await new Promise((resolve) => sock.once('connect', resolve));
      let answer = '';
      sock.on('data', (d: Buffer) => (answer += d.toString()));
      sock.write(`POST /api/sandboxes/${id}/exec HTTP/1.1\r\nHost: x\r\nX-API-Key: ${doomed.plainKey}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`);
      await owner.trpc.org.revokeApiKey.mutate({ orgId, keyId: doomed.keyId });
      await new Promise((r) => setTimeout(r, 1200)); // past the host's VOUCH_FRESH_MS (1 s): a bound, not an event
      sock.write(body);
      await until(() => answer, (a) => /\r\n\r\n[\s\S]*\}/.test(a), 'the held request to be answered');
      sock.destroy();
      expect(answer).toMatch(/^HTTP\/1\.1 401/);
      expect((await json(`${api1.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'test -e /root/held-body-ran && echo ran || echo not-run' }) })).body.data.stdout).toBe('not-run\n');
    } finally {
      await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey });
    }
  }, 120_000);

  it('concurrent creates through both API nodes fill the hosts to their slots and no further; the next is 429 "fleet full"', async () => {
    const creates = await Promise.all(
      Array.from({ length: 6 }, (_, i) => json(`${(i % 2 ? api2 : api1).url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: `full-${i}` }) })),
    );
    expect(creates.map((c) => c.status)).toEqual([201, 201, 201, 201, 201, 201]);
    const ids = creates.map((c) => c.body.data.id as string);
    const perHost = new Map<string, number>();
    for (const id of ids) perHost.set((await hostOf(id))!, (perHost.get((await hostOf(id))!) ?? 0) + 1);
    expect([...perHost.values()].sort()).toEqual([3, 3]);
    const over = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'one-too-many' }) });
    expect(over.status).toBe(429);
    expect(over.body.error).toMatch(/^Sandbox fleet full: all 6 sandbox slots of the 2 ready host\(s\) are held/);
    // Deleted sandboxes' slots are freed by their hosts (at their next heartbeat): creates succeed again.
    await Promise.all(ids.map((id) => json(`${api2.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey })));
    await until(() => mongo.db(db).collection('host_slots').countDocuments({}), (n) => n === 0, 'the slots to be freed', 15_000, 100);
    const again = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'after-free' }) });
    expect(again.status).toBe(201);
    await json(`${api1.url}/api/sandboxes/${again.body.data.id}`, { method: 'DELETE', apiKey });
  }, 180_000);

  it("an org's quotas hold across hosts: 6 concurrent creates of 2 vCPUs each, placed over both hosts, pass ORG_MAX_VCPUS (8) never", async () => {
    const org = await json(`${api1.url}/api/register`, { method: 'POST', body: JSON.stringify({ name: 'Quota Racer', email: 'quota-racer@example.com' }) });
    const key = org.body.data.apiKey as string;
    const creates = await Promise.all(
      Array.from({ length: 6 }, (_, i) => json(`${(i % 2 ? api2 : api1).url}/api/sandboxes`, { method: 'POST', apiKey: key, body: JSON.stringify({ name: `quota-${i}`, cpu: 2 }) })),
    );
    const made = creates.filter((c) => c.status === 201);
    try {
      const refused = creates.filter((c) => c.status === 429);
      expect(made.length + refused.length).toBe(6);
      expect(made.length).toBeLessThanOrEqual(4);
      for (const r of refused) expect(r.body.error).toMatch(/Org quota exceeded: vcpus 2 requested, \d+ of 8 in use \(ORG_MAX_VCPUS\)|Sandbox fleet full/);
      const listed = await json(`${api2.url}/api/sandboxes?limit=100`, { apiKey: key });
      expect((listed.body.data as Array<{ cpu: number }>).reduce((n, b) => n + b.cpu, 0)).toBeLessThanOrEqual(8);
    } finally {
      await Promise.all(made.map((c) => json(`${api1.url}/api/sandboxes/${c.body.data.id}`, { method: 'DELETE', apiKey: key })));
    }
    await until(() => mongo.db(db).collection('host_slots').countDocuments({}), (n) => n === 0, 'the slots to be freed', 15_000, 100);
  }, 180_000);

  it('the admin key lists the hosts with their load and drains one: creates then go to the other; undrained, it takes them again', async () => {
    expect((await json(`${api1.url}/api/admin/hosts`, { apiKey })).status).toBe(401);
    const listed = await json(`${api2.url}/api/admin/hosts`, { apiKey: adminKey });
    expect(listed.status).toBe(200);
    const ids = (listed.body.data as Array<{ id: string; state: string; capacity: { slots: number } }>).map((h) => h.id);
    expect(ids.length).toBe(2);
    expect(listed.body.data.map((h: { state: string; capacity: { slots: number } }) => [h.state, h.capacity.slots])).toEqual([['ready', 3], ['ready', 3]]);
    const [kept, drained] = ids as [string, string];
    const drain = await json(`${api1.url}/api/admin/hosts/${drained}/drain`, { method: 'POST', apiKey: adminKey });
    expect(drain).toMatchObject({ status: 200, body: { data: { id: drained, state: 'draining' } } });
    const made = await Promise.all([0, 1, 2].map((i) => json(`${api2.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: `drain-${i}` }) })));
    expect(made.map((m) => m.status)).toEqual([201, 201, 201]);
    for (const m of made) expect(await hostOf(m.body.data.id)).toBe(kept);
    const after = await json(`${api1.url}/api/admin/hosts`, { apiKey: adminKey });
    expect(after.body.data.find((h: { id: string }) => h.id === kept)).toMatchObject({ slotsHeld: 3, sandboxes: 3 });
    // The draining host's heartbeats keep it draining; undrained, it takes the next create (the other is full).
    expect((await json(`${api1.url}/api/admin/hosts/${drained}/undrain`, { method: 'POST', apiKey: adminKey })).body.data.state).toBe('ready');
    const next = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'undrained' }) });
    expect(next.status).toBe(201);
    expect(await hostOf(next.body.data.id)).toBe(drained);
    expect((await json(`${api1.url}/api/admin/hosts/node-nosuchhost/drain`, { method: 'POST', apiKey: adminKey })).status).toBe(404);
    for (const id of [...made.map((m) => m.body.data.id), next.body.data.id]) await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey });
  }, 120_000);

  it('draining a host moves its stopped sandboxes to another host with their files (they start there); its running ones stay', async () => {
    const made: string[] = [];
    for (const name of ['to-move', 'stays-1', 'stays-2']) {
      const box = await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name }) });
      expect(box.status).toBe(201);
      made.push(box.body.data.id);
    }
    const [moving] = made as [string];
    const home = (await hostOf(moving))!;
    const runningThere = [];
    for (const id of made.slice(1)) if ((await hostOf(id)) === home) runningThere.push(id);
    await json(`${api1.url}/api/sandboxes/${moving}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'echo came-along > /root/moved-mark' }) });
    expect((await json(`${api1.url}/api/sandboxes/${moving}/stop`, { method: 'POST', apiKey })).status).toBe(200);
    expect((await json(`${api2.url}/api/admin/hosts/${home}/drain`, { method: 'POST', apiKey: adminKey })).status).toBe(200);
    try {
      // HOST_HEARTBEAT_SEC is 1: the drained host moves it at a heartbeat.
      const now = await until(() => hostOf(moving), (h) => h !== home, 'the stopped sandbox to move', 60_000, 100);
      expect(now).toMatch(/^node-/);
      for (const id of runningThere) expect(await hostOf(id)).toBe(home);
      // Its slot follows it (given there right after the record names that host; freed here).
      await until(async () => (await mongo.db(db).collection('host_slots').find({ sandboxId: moving }).toArray()).map((x) => x.hostId), (h) => h.length === 1 && h[0] === now, 'its slot on its new host', 10_000, 100);
      // Through API node 1, which knew its old host: at most one 503 "moved; retry" (it drops its
      // cached host), and the retry is served by the new host.
      const start = () => json(`${api1.url}/api/sandboxes/${moving}/start`, { method: 'POST', apiKey });
      let started = await start();
      if (started.status === 503) {
        expect(started.body.error).toMatch(/was moved to fleet host .*; retry/);
        started = await start();
      }
      expect(started.status, JSON.stringify(started.body)).toBe(200);
      const read = await json(`${api2.url}/api/sandboxes/${moving}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'cat /root/moved-mark' }) });
      expect(JSON.stringify(read.body)).toContain('came-along');
      expect((await json(`${api2.url}/api/sandboxes/${moving}`, { apiKey })).body.data.status).toBe('running');
    } finally {
      await json(`${api2.url}/api/admin/hosts/${home}/undrain`, { method: 'POST', apiKey: adminKey });
      for (const id of made) await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey });
    }
  }, 120_000);

  it('a host killed with -9 loses its sandboxes (host-lost) within the dead-after interval, creates go elsewhere, and on its return it registers anew without resurrecting them', async () => {
    // One after the other: the second goes to the host with more free slots, so one lands on each.
    const ids: string[] = [];
    for (const i of [0, 1]) ids.push((await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: `lost-${i}` }) })).body.data.id);
    const victimId = (await hostOf(ids[0]!))!;
    const victim = (await json(`${h1.url}/api/version`)).body.nodeId === victimId ? h1 : h2;
    const onVictim: string[] = [];
    for (const id of ids) if ((await hostOf(id)) === victimId) onVictim.push(id);
    expect(onVictim.length).toBeGreaterThan(0);
    const epochBefore = (await mongo.db(db).collection('hosts').findOne({ _id: { $eq: victimId } as never }))!.epoch as number;
    await stopNode(victim, 'SIGKILL');
    const lostAt = Date.now();
    const record = await until(() => json(`${api2.url}/api/sandboxes/${onVictim[0]}`, { apiKey }), (r) => r.body.data?.status === 'error', 'the sandbox to be marked lost', 20_000, 200);
    expect(Date.now() - lostAt).toBeLessThan(4000 + 2 * 1000 + 3000); // HOST_DEAD_AFTER_SEC + a sweep interval or two + slack
    expect(record.body.data.endedReason).toBe('host-lost');
    const exec = await json(`${api1.url}/api/sandboxes/${onVictim[0]}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'true' }) });
    expect(exec.status).toBe(503);
    expect(exec.body).toMatchObject({ code: 'HOST_UNAVAILABLE' });
    expect(exec.body.error).toMatch(/which stopped answering \(host-lost\)/);
    // New sandboxes go to the host still serving.
    const fresh = await json(`${api2.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'elsewhere' }) });
    expect(fresh.status).toBe(201);
    expect(await hostOf(fresh.body.data.id)).not.toBe(victimId);
    // It comes back under the same node id (DATA_DIR) with a new epoch; its lost sandboxes stay lost and stopped.
    const returned = await launch(victim);
    if (victim === h1) h1 = returned;
    else h2 = returned;
    const back = await until(() => mongo.db(db).collection('hosts').findOne({ _id: { $eq: victimId } as never }), (h) => h?.state === 'ready' && (h.epoch as number) > epochBefore, 'the host to register again', 20_000, 100);
    expect(back!.epoch).toBeGreaterThan(epochBefore);
    for (const id of onVictim) {
      const r = await json(`${api1.url}/api/sandboxes/${id}`, { apiKey });
      expect(r.body.data).toMatchObject({ status: 'error', endedReason: 'host-lost' });
    }
    const running = await runc(victim.env.RUNC_ROOT!, 'list', '-q');
    const states = running.trim() ? running.trim().split('\n') : [];
    for (const id of onVictim) expect(states.filter((s) => s.includes(id))).toEqual([]);
    // A lost sandbox is deleted like any other.
    for (const id of [...ids, fresh.body.data.id]) expect((await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey })).status).toBe(200);
  }, 180_000);

  it('a host cut off past the dead-after interval (frozen, its process alive) finds itself fenced when it is back: it stops its lost sandboxes and registers with a new epoch', async () => {
    const id = (await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'fenced' }) })).body.data.id as string;
    const hostId = (await hostOf(id))!;
    const node = (await json(`${h1.url}/api/version`)).body.nodeId === hostId ? h1 : h2;
    const before = (await mongo.db(db).collection('hosts').findOne({ _id: hostId as never }))!.epoch as number;
    // SIGSTOP: no heartbeat, no answer, every timer and socket kept, as a partition would leave them.
    node.child.kill('SIGSTOP');
    try {
      await until(() => json(`${api1.url}/api/sandboxes/${id}`, { apiKey }), (r) => r.body.data?.endedReason === 'host-lost', 'the sandbox to be marked lost', 20_000, 200);
    } finally {
      node.child.kill('SIGCONT');
    }
    const back = await until(() => mongo.db(db).collection('hosts').findOne({ _id: hostId as never }), (h) => h?.state === 'ready' && (h.epoch as number) > before, 'the host to register again', 20_000, 100);
    expect(back!.epoch).toBeGreaterThan(before);
    expect(node.log.join('\n')).toMatch(/this host was declared lost \(or registered elsewhere\); reconciling before it registers again/);
    // Its runtime was stopped, and stays so: the record says lost, and nothing brings it back.
    const state = await runc(node.env.RUNC_ROOT!, 'state', `vr-${id}`);
    expect(state.includes('"status": "running"')).toBe(false);
    const exec = await json(`${api2.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: 'true' }) });
    expect(exec.status).toBe(409);
    expect((await json(`${api2.url}/api/sandboxes/${id}`, { apiKey })).body.data).toMatchObject({ status: 'error', endedReason: 'host-lost' });
    expect((await json(`${api2.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey })).status).toBe(200);
  }, 120_000);

  it('an API node killed mid-stream loses nothing: the client resumes the event stream on another API node from its last event id', async () => {
    const id = (await json(`${api1.url}/api/sandboxes`, { method: 'POST', apiKey, body: JSON.stringify({ name: 'resume' }) })).body.data.id as string;
    for (let i = 0; i < 3; i++) await json(`${api1.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: `echo ${i}` }) });
    /** SSE events from `url` until `stop` holds: ids and types, in order. */
    const read = async (url: string, headers: Record<string, string>, stop: (seen: Array<{ id: string; type: string }>) => boolean) => {
      const ac = new AbortController();
      const res = await fetch(url, { headers: { 'x-api-key': apiKey, ...headers }, signal: ac.signal });
      expect(res.status).toBe(200);
      const seen: Array<{ id: string; type: string }> = [];
      const decoder = new TextDecoder();
      let text = '';
      const reader = res.body!.getReader();
      while (!stop(seen)) {
        const { value, done } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
        let end: number;
        while ((end = text.indexOf('\n\n')) >= 0) {
          const block = text.slice(0, end);
          text = text.slice(end + 2);
          const idLine = /^id: (.+)$/m.exec(block)?.[1];
          const type = /^event: (.+)$/m.exec(block)?.[1];
          if (idLine && type) seen.push({ id: idLine, type });
        }
      }
      // Closed from this side at once (its socket must not outlive it: the node behind it may be killed next).
      ac.abort();
      reader.releaseLock();
      return seen;
    };
    const first = await read(`${api2.url}/api/sandboxes/${id}/events/stream`, {}, (seen) => seen.filter((e) => e.type === 'process.exited').length >= 3);
    // The API node dies under the stream: nothing of the stream was its own. Events go on meanwhile.
    await stopNode(api2, 'SIGKILL');
    for (let i = 3; i < 5; i++) await json(`${api1.url}/api/sandboxes/${id}/exec`, { method: 'POST', apiKey, body: JSON.stringify({ command: `echo ${i}` }) });
    const rest = await read(`${api1.url}/api/sandboxes/${id}/events/stream`, { 'last-event-id': first.at(-1)!.id }, (seen) => seen.filter((e) => e.type === 'process.exited').length >= 2);
    expect(rest.map((e) => e.type)).toEqual(['process.started', 'process.exited', 'process.started', 'process.exited']);
    const all = await read(`${api1.url}/api/sandboxes/${id}/events/stream`, {}, (seen) => seen.length >= first.length + rest.length);
    // Resumed exactly after the last event seen: no event twice, none skipped.
    expect([...first, ...rest].map((e) => e.id)).toEqual(all.slice(0, first.length + rest.length).map((e) => e.id));
    api2 = await launch(api2);
    expect((await json(`${api2.url}/api/version`)).body.role).toBe('api');
    await json(`${api1.url}/api/sandboxes/${id}`, { method: 'DELETE', apiKey });
  }, 120_000);
});
