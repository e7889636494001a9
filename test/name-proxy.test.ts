import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NetworkPolicy } from '../shared/index.js';
import { DnsProxy, MAX_TCP_CONNECTIONS_PER_SOURCE, QUERY_BURST, QUERY_RATE } from '../server/hypervisor/network/dns-proxy.js';
import { addressUsable, allowedParts, EgressFirewall, hostAddresses, sandboxChain, sandboxScript } from '../server/hypervisor/network/egress-firewall.js';
import { checkRequestHead, HttpRequests } from '../server/hypervisor/network/http-requests.js';
import { MAX_CONNECTIONS_PER_SOURCE, NameProxy } from '../server/hypervisor/network/name-proxy.js';
import { setUp, tearDown } from '../server/hypervisor/network/host-network.js';
import { forgetConnections } from '../server/hypervisor/network/ip-pool.js';
import { readFileSync } from 'node:fs';
import { SandboxEgress } from '../server/hypervisor/network/sandbox-egress.js';
import { tapGuardTable } from '../server/hypervisor/network/tap-guard.js';
import { newId } from '../server/store/ids.js';
import { ip, onPath, startTestInternet, type TestInternet } from './helpers/test-internet.js';

/*
 * The name proxy (the SNI/Host check of ports 80 and 443) connects from the host itself, so the
 * input hook that keeps sandboxes off the host does not see its connections: it must refuse the
 * host's own addresses itself, and only connections the firewall redirected may reach it.
 * "Sandboxes" here are network namespaces this file creates on its own bridge, with the real
 * firewall, resolver and proxy of one bridge (SandboxEgress) and no sandbox runtime.
 */

const run = promisify(execFile);
const policy = (p: Partial<NetworkPolicy>): NetworkPolicy => ({ mode: 'bridge', egress: 'allow', allow: [], deny: [], maxEgressBytes: null, egressCut: false, ...p });

describe('the name proxy never connects a sandbox to the host (pure)', () => {
  it("no address of the host's own interfaces is usable on a sandbox's behalf, whatever its allow CIDRs", () => {
    const own = [...hostAddresses()];
    expect(own.length).toBeGreaterThan(0);
    expect(own.filter((address) => addressUsable(address, policy({ allow: ['0.0.0.0/0'] }), '10.211.0.0/24'))).toEqual([]);
  });

  it('an allow CIDR that merely contains a private range does not open it: only one lying inside a private range does', () => {
    expect(allowedParts('0.0.0.0/0')).toEqual(['0.0.0.0-9.255.255.255', '11.0.0.0-100.63.255.255', '100.128.0.0-172.15.255.255', '172.32.0.0-192.167.255.255', '192.169.0.0-255.255.255.255']);
    expect(allowedParts('172.0.0.0/8')).toEqual(['172.0.0.0-172.15.255.255', '172.32.0.0-172.255.255.255']);
    for (const cidr of ['10.0.0.0/8', '10.1.0.0/16', '192.168.1.5/32']) expect(allowedParts(cidr, ['10.0.0.0/8', '192.168.0.0/16'])).toEqual([cidr]);
    for (const cidr of ['203.0.113.0/24', '8.0.0.0/7']) expect(allowedParts(cidr)).toEqual([cidr]);
    const everything = policy({ egress: 'deny', allow: ['0.0.0.0/0'] });
    expect(sandboxScript('vmbr0', { id: 'a'.repeat(24), ip: '192.168.100.7' }, everything)).toContain('172.32.0.0-192.167.255.255');
    expect(['10.1.2.3', '172.16.0.1', '192.168.0.1', '100.64.0.1'].filter((ip) => addressUsable(ip, everything, '10.211.0.0/24'))).toEqual([]);
    expect(addressUsable('203.0.113.9', everything, '10.211.0.0/24')).toBe(true);
    const lan = policy({ egress: 'deny', allow: ['10.1.0.0/16'] });
    expect([addressUsable('10.1.2.3', lan, '10.211.0.0/24', ['10.0.0.0/8']), addressUsable('10.2.0.1', lan, '10.211.0.0/24', ['10.0.0.0/8'])]).toEqual([true, false]);
  });

  it('a private allow CIDR opens only what SANDBOX_PRIVATE_ALLOW holds of it (a policy stored before the setting narrowed opens nothing beyond it)', () => {
    // Nothing without the setting; the overlap with it otherwise, whichever of the two is wider.
    expect(allowedParts('10.0.0.0/8')).toEqual([]);
    expect(allowedParts('10.0.0.0/8', ['10.1.0.0/16', '10.9.9.0/24', '192.168.0.0/16'])).toEqual(['10.1.0.0/16', '10.9.9.0/24']);
    expect(allowedParts('10.1.2.0/24', ['10.1.0.0/16'])).toEqual(['10.1.2.0/24']);
    expect(allowedParts('172.16.0.0/12', ['10.0.0.0/8'])).toEqual([]);
    // A CIDR merely containing private ranges opens the public part only, whatever the setting.
    expect(allowedParts('172.0.0.0/8', ['172.16.0.0/12'])).toEqual(['172.0.0.0-172.15.255.255', '172.32.0.0-172.255.255.255']);
    const lan = policy({ egress: 'deny', allow: ['10.0.0.0/8', '192.168.5.0/24'] });
    const id = 'b'.repeat(24);
    const elementsOf = (privateAllow?: string[]) => sandboxScript('vmbr0', { id, ip: '192.168.100.7' }, lan, privateAllow ? { privateAllow } : {}).split('\n').filter((l) => l.startsWith(`add element ip voidrun_vmbr0 ${sandboxChain(id)}_allow `));
    expect(elementsOf()).toEqual([]);
    expect(elementsOf(['10.1.0.0/16'])).toEqual([`add element ip voidrun_vmbr0 ${sandboxChain(id)}_allow { 10.1.0.0/16 }`]);
    expect(elementsOf(['10.0.0.0/8', '192.168.0.0/16'])).toEqual([`add element ip voidrun_vmbr0 ${sandboxChain(id)}_allow { 10.0.0.0/8, 192.168.5.0/24 }`]);
    expect(['10.1.2.3', '10.2.0.1', '192.168.5.9'].filter((ip) => addressUsable(ip, lan, '10.211.0.0/24'))).toEqual([]);
    expect(['10.1.2.3', '10.2.0.1', '192.168.5.9'].filter((ip) => addressUsable(ip, lan, '10.211.0.0/24', ['10.1.0.0/16']))).toEqual(['10.1.2.3']);
  });
});

describe('every request of a plain-HTTP connection through the name proxy names its host (pure)', () => {
  it.each([
    ['GET / HTTP/1.1\r\nHost: allowed.test', { body: 'none', upgrade: false }],
    ['GET http://Allowed.Test:80/x HTTP/1.1\r\nHost: allowed.test', { body: 'none', upgrade: false }],
    ['POST /up HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 5', { body: 5, upgrade: false }],
    ['POST /up HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: gzip, chunked', { body: 'chunked', upgrade: false }],
    ['GET /ws HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\nConnection: Upgrade', { body: 'none', upgrade: true }],
    ['GET http://blocked.test/ HTTP/1.1\r\nHost: allowed.test', { error: 'the request target http://blocked.test/ does not name allowed.test' }],
    ['GET http://allowed.test@blocked.test/ HTTP/1.1\r\nHost: allowed.test', { error: 'the request target http://allowed.test@blocked.test/ does not name allowed.test' }],
    ['GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: blocked.test', { error: 'the request names more than one Host' }],
    ['GET / HTTP/1.1\r\nHost: blocked.test', { error: "blocked.test is not this connection's host (allowed.test)" }],
    ['GET / HTTP/1.1\r\nX: 1', { error: 'the request names no host' }],
    ['GET / HTTP/1.1\r\nHost: allowed.test\r\n Host: blocked.test', { error: 'the request has a malformed header field' }],
    ['CONNECT blocked.test:443 HTTP/1.1\r\nHost: allowed.test', { error: 'CONNECT is not allowed' }],
    ['POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked', { error: 'the request has both Transfer-Encoding and Content-Length' }],
    ['POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 5\r\nContent-Length: 6', { error: 'the request has an invalid Content-Length' }],
  ])('%j', (head, verdict) => {
    expect(checkRequestHead(head, 'allowed.test')).toEqual(verdict);
  });

  it('a kept-alive connection passes requests for its host, bodies whole, and stops at the first naming another', () => {
    const requests = new HttpRequests('allowed.test');
    const first = 'POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 36\r\n\r\nGET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n';
    const chunked = 'POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n4;x=1\r\nabcd\r\n0\r\nTrailer: 1\r\n\r\n\r\n';
    // A body that looks like a request is a body; fed a byte at a time as well as whole.
    expect(requests.feed(Buffer.from(first))).toEqual({ pass: Buffer.from(first) });
    let passed = '';
    for (const byte of Buffer.from(chunked)) passed += requests.feed(Buffer.from([byte])).pass.toString('latin1');
    expect(passed).toBe(chunked);
    const switched = requests.feed(Buffer.from('GET /a HTTP/1.1\r\nHost: allowed.test\r\n\r\nGET /b HTTP/1.1\r\nHost: blocked.test\r\n\r\n'));
    expect(switched.pass.toString()).toBe('GET /a HTTP/1.1\r\nHost: allowed.test\r\n\r\n');
    expect(switched.error).toBe("blocked.test is not this connection's host (allowed.test)");
    expect(requests.feed(Buffer.from('x')).pass.length).toBe(0);
  });

  it("an upgrade holds the client's next bytes until the server answers: a 101 makes them opaque, anything else keeps checking", () => {
    const upgrade = 'GET /ws HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\n\r\n';
    const later = 'GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n';
    const switched = new HttpRequests('allowed.test');
    expect(switched.feed(Buffer.from(upgrade + later)).pass.toString()).toBe(upgrade);
    expect(switched.awaitingUpgrade).toBe(true);
    expect(switched.upstreamAnswered(101)).toEqual({ pass: Buffer.from(later) });
    expect(switched.feed(Buffer.from('frames')).pass.toString()).toBe('frames');
    const refused = new HttpRequests('allowed.test');
    refused.feed(Buffer.from(upgrade + later));
    expect(refused.upstreamAnswered(400).error).toBe("blocked.test is not this connection's host (allowed.test)");
    // Only the first request may ask.
    expect(new HttpRequests('allowed.test').feed(Buffer.from(`GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n${upgrade}`)).error).toBe('only the first request of a connection may upgrade it');
  });
});

/** A connection from `from` to 127.0.0.1:`port`, once connected. */
const dial = (port: number, from = '127.0.0.1') =>
  new Promise<Socket>((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port, localAddress: from }, () => resolve(socket));
    socket.once('error', reject);
  });
/** Writes `data` on a new connection from `from` and resolves to everything answered before the other end closed. */
const exchange = async (port: number, data: Buffer | string, from = '127.0.0.1') => {
  const socket = await dial(port, from);
  return new Promise<string>((resolve) => {
    let answer = '';
    socket.on('data', (d: Buffer) => (answer += d.toString('latin1')));
    socket.on('error', () => {});
    socket.on('close', () => resolve(answer));
    socket.write(data);
  });
};

describe("one sandbox cannot hold the proxies' connections (real sockets on loopback; the source address is the sandbox)", () => {
  it('the name proxy counts connections that have not named a host yet against their source', async () => {
    const proxy = new NameProxy({
      address: '127.0.0.1',
      policyAt: () => policy({ egress: 'deny', allow: ['allowed.test'] }),
      resolve: async () => [],
      connectable: () => false,
      // Long enough that the silent connections below are held for the whole test.
      timeouts: { firstByteMs: 120_000, nameMs: 120_000 },
    });
    await proxy.start();
    const held: Socket[] = [];
    try {
      const port = proxy.ports!.http;
      const request = 'GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n';
      for (let i = 0; i < MAX_CONNECTIONS_PER_SOURCE; i++) held.push(await dial(port));
      // One more from the same source is closed unanswered; another source is still served.
      expect(await exchange(port, request)).toBe('');
      expect(await exchange(port, request, '127.0.0.2')).toMatch(/^HTTP\/1\.1 403 .*blocked\.test is not allowed/s);
      // A held connection closed gives its place back.
      held.pop()!.destroy();
      await expect.poll(() => exchange(port, request), { timeout: 10_000 }).toMatch(/^HTTP\/1\.1 403 /);
    } finally {
      for (const s of held) s.destroy();
      await proxy.stop();
    }
  }, 60_000);

  it("a policy change while the proxy looks a name up closes that connection: it never reaches the name's server", async () => {
    // The name's "server": port 80 of a loopback address of this test's own.
    const address = `127.${randomInt(1, 255)}.${randomInt(1, 255)}.${randomInt(2, 255)}`;
    const reached: string[] = [];
    const upstream = createServer((s) => (reached.push('connected'), s.destroy()));
    await new Promise<void>((r) => upstream.listen(80, address, r));
    let current = policy({ egress: 'deny', allow: ['allowed.test'] });
    let looking!: () => void;
    const lookingUp = new Promise<void>((r) => (looking = r));
    let answer!: (addresses: string[]) => void;
    const proxy = new NameProxy({
      address: '127.0.0.1',
      policyAt: () => current,
      resolve: () => (looking(), new Promise<string[]>((r) => (answer = r))),
      connectable: () => true,
    });
    await proxy.start();
    try {
      const closed = exchange(proxy.ports!.http, 'GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n');
      await lookingUp;
      current = policy({ egress: 'deny' });
      proxy.reevaluate('127.0.0.1');
      answer([address]);
      expect(await closed).toBe('');
      expect(reached).toEqual([]);
    } finally {
      await proxy.stop();
      upstream.close();
    }
  }, 60_000);

  it("one sandbox's query flood is refused past its rate, unforwarded, while other sandboxes' queries are answered", async () => {
    let clock = 1_000_000;
    const asked: string[] = [];
    const dns = new DnsProxy({ address: '127.0.0.1', upstreams: [], now: () => clock, policyAt: (ip) => (asked.push(ip), policy({ egress: 'deny' })), allowResolved: async () => {} });
    const labels = Buffer.from([7, ...Buffer.from('blocked'), 4, ...Buffer.from('test'), 0]);
    const q = Buffer.concat([Buffer.from([0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]), labels, Buffer.from([0, 1, 0, 1])]);
    const rcodes = async (source: string, n: number) => {
      const seen: number[] = [];
      for (let i = 0; i < n; i++) seen.push((await dns.answer(q, source, 'udp'))!.readUInt16BE(2) & 15);
      return seen;
    };
    const tally = (codes: number[]) => codes.reduce<Record<number, number>>((t, c) => ({ ...t, [c]: (t[c] ?? 0) + 1 }), {});
    expect(tally(await rcodes('10.0.0.2', QUERY_BURST + 20))).toEqual({ 3: QUERY_BURST, 5: 20 });
    // The refused ones were not looked at further (no policy lookup, nothing forwarded).
    expect(asked.length).toBe(QUERY_BURST);
    expect(tally(await rcodes('10.0.0.3', 5))).toEqual({ 3: 5 });
    clock += 100;
    expect(tally(await rcodes('10.0.0.2', QUERY_RATE / 10 + 1))).toEqual({ 3: QUERY_RATE / 10, 5: 1 });
  });

  it('a WebSocket upgrade on port 80 passes through once the server answers 101; without a 101 the next request is still checked', async () => {
    const address = `127.${randomInt(1, 255)}.${randomInt(1, 255)}.${randomInt(2, 255)}`;
    // The name's server: 101 and then an echo for /ws, 200 for anything else (kept alive).
    const upstream = createServer((s) => {
      s.once('data', (head: Buffer) => {
        if (head.toString().startsWith('GET /ws ')) {
          s.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n');
          s.on('data', (d: Buffer) => s.write(d));
        } else s.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
      });
      s.on('error', () => {});
    });
    await new Promise<void>((r) => upstream.listen(80, address, r));
    const proxy = new NameProxy({ address: '127.0.0.1', policyAt: () => policy({ egress: 'deny', allow: ['allowed.test'] }), resolve: async () => [address], connectable: () => true });
    await proxy.start();
    /** Sends `first`, waits for an answer, sends `then`; resolves to everything received until the connection closes or `until` is seen. */
    const converse = async (first: string, then: string, until: string) => {
      const socket = await dial(proxy.ports!.http);
      return new Promise<string>((resolve) => {
        let got = '';
        socket.on('error', () => {});
        socket.on('data', (d: Buffer) => {
          const wasEmpty = got === '';
          got += d.toString('latin1');
          if (wasEmpty) socket.write(then);
          if (got.includes(until)) (socket.destroy(), resolve(got));
        });
        socket.on('close', () => resolve(got));
        socket.write(first);
      });
    };
    try {
      const ws = await converse('GET /ws HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n', 'GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n', 'blocked.test');
      expect(ws).toMatch(/^HTTP\/1\.1 101 [^]*GET \/ HTTP\/1\.1\r\nHost: blocked\.test/);
      const refused = await converse('GET /x HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\n\r\n', 'GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n', 'never');
      expect(refused).toBe('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
    } finally {
      await proxy.stop();
      upstream.close();
    }
  }, 60_000);

  it("the DNS resolver's TCP side serves other sandboxes while one holds as many connections as it may", async () => {
    const dns = new DnsProxy({ address: '127.0.0.1', port: 0, upstreams: [], policyAt: () => policy({ egress: 'deny' }), allowResolved: async () => {} });
    await dns.start();
    const held: Socket[] = [];
    try {
      const port = dns.port!;
      const labels = Buffer.from([7, ...Buffer.from('blocked'), 4, ...Buffer.from('test'), 0]);
      const q = Buffer.concat([Buffer.from([0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]), labels, Buffer.from([0, 1, 0, 1])]);
      const framed = Buffer.concat([Buffer.from([0, q.length]), q]);
      for (let i = 0; i < MAX_TCP_CONNECTIONS_PER_SOURCE; i++) held.push(await dial(port));
      expect(await exchange(port, framed)).toBe('');
      const other = await new Promise<Buffer>((resolve, reject) => {
        const c = connect({ host: '127.0.0.1', port, localAddress: '127.0.0.2' }, () => c.write(framed));
        c.once('data', (d: Buffer) => (c.destroy(), resolve(d)));
        c.once('error', reject);
      });
      // NXDOMAIN, framed.
      expect(other.readUInt16BE(2 + 2) & 0x000f).toBe(3);
    } finally {
      for (const s of held) s.destroy();
      await dns.stop();
    }
  }, 60_000);
});

const nsSkip = process.getuid?.() !== 0 ? 'not root' : !['ip', 'nft'].every(onPath) ? 'ip or nft missing' : null;

describe.skipIf(nsSkip !== null)("DNS answers and the firewall's transactions (nftables in a namespace this test creates)", () => {
  const ns = `npf-${randomBytes(3).toString('hex')}`;
  const a = { id: newId(), ip: '10.211.250.2', hostIf: '' };
  const b = { id: newId(), ip: '10.211.250.3', hostIf: '' };
  let firewall: EgressFirewall;
  const setOf = async (id: string) => (await run('ip', ['netns', 'exec', ns, 'nft', 'list', 'set', 'ip', tapGuardTable('npfbr0'), `${sandboxChain(id)}_dns`])).stdout;

  beforeAll(async () => {
    await ip('netns', 'add', ns);
    firewall = new EgressFirewall({ bridge: 'npfbr0', gateway: '10.211.250.1', networkCidr: '10.211.250.0/24', netns: ns });
    await firewall.setUp();
    for (const box of [a, b]) await firewall.apply(box, policy({ egress: 'deny', allow: ['allowed.test'] }));
  });
  afterAll(async () => {
    await ip('netns', 'del', ns).catch(() => {});
  });

  it("an answer arriving after the query's sandbox left its address (or changed its policy) opens nothing for the address's new owner", async () => {
    const asked = policy({ egress: 'deny', allow: ['allowed.test'] });
    const gone = { id: newId(), ip: '10.211.250.4', hostIf: '' };
    await firewall.apply(gone, asked);
    await firewall.remove(gone.id);
    // The address goes to another sandbox while the answer to the first one's query is upstream.
    const next = { id: newId(), ip: gone.ip, hostIf: '' };
    await firewall.apply(next, policy({ egress: 'deny', allow: ['allowed.test'] }));
    const before = firewall.dnsTransactions;
    await firewall.allowResolved(gone.ip, [{ address: '203.0.113.77', ttl: 60 }], asked);
    expect(firewall.dnsTransactions).toBe(before);
    expect(await setOf(next.id)).not.toContain('203.0.113.77');
    await firewall.remove(next.id);
  });

  it("a flood of answers costs one nft transaction for all sandboxes, not one per answer queued before every policy change", async () => {
    const before = firewall.dnsTransactions;
    const answers = [
      ...Array.from({ length: 64 }, () => firewall.allowResolved(a.ip, [{ address: '203.0.113.9', ttl: 60 }])),
      ...Array.from({ length: 8 }, (_, i) => firewall.allowResolved(b.ip, [{ address: `203.0.113.${20 + i}`, ttl: 60 }])),
    ];
    // A policy change queued during the flood waits for one transaction at most.
    const change = firewall.apply(b, policy({ egress: 'deny', allow: ['allowed.test', 'other.test'] }));
    answers.push(firewall.allowResolved(a.ip, [{ address: '203.0.113.9', ttl: 60 }]));
    await Promise.all([...answers, change]);
    expect(firewall.dnsTransactions - before).toBe(1);
    expect(await setOf(a.id)).toContain('203.0.113.9');
    // The change came after the answers: it emptied b's set.
    expect(await setOf(b.id)).not.toMatch(/203\.0\.113\.2\d/);
    // The same answer again: already open for more than half its TTL, nothing written.
    await firewall.allowResolved(a.ip, [{ address: '203.0.113.9', ttl: 60 }]);
    expect(firewall.dnsTransactions - before).toBe(1);
  });
});

const netSkip = nsSkip;
if (netSkip) console.warn(`name proxy tests in namespaces skipped: ${netSkip}`);

describe.skipIf(netSkip !== null)('the name proxy on a bridge, with namespaces as sandboxes', () => {
  const tag = randomBytes(3).toString('hex');
  const bridge = `npb${tag}`;
  const subnet = `10.211.${randomInt(0, 256)}`;
  const gateway = `${subnet}.1`;
  const net = { bridge, gatewayCidr: `${gateway}/24`, networkCidr: `${subnet}.0/24` };
  /** Sandbox namespaces: `proxied` allows domains under egress deny (its ports 80 and 443 go to the proxy), `open` has egress allow. */
  const boxes = {
    proxied: { id: newId(), ns: `npp${tag}`, hostIf: `nph${tag}`, ip: `${subnet}.2`, policy: policy({ egress: 'deny', allow: ['allowed.test', 'host.test'] }) },
    open: { id: newId(), ns: `npo${tag}`, hostIf: `npj${tag}`, ip: `${subnet}.3`, policy: policy({}) },
  };
  let internet: TestInternet;
  /** A "LAN" server's private address, routed from the host to the test internet. */
  const lan = `172.31.${randomInt(0, 256)}.2`;
  /** Another "LAN" server, outside SANDBOX_PRIVATE_ALLOW (172.31.0.0/16). */
  const lanOutside = `172.30.${randomInt(0, 256)}.2`;
  let servers: ChildProcess;
  let hostService: Server;
  const hostHits: string[] = [];
  /** The test internet's DNS server's log: `query <name> <type>` per query it got. */
  const dnsLog: string[] = [];
  let egress: SandboxEgress | undefined;

  /** Runs bash `script` in the namespace of `box`; its stdout, or null when it failed. */
  const inBox = async (box: { ns: string }, script: string): Promise<string | null> => {
    try {
      return (await run('ip', ['netns', 'exec', box.ns, 'timeout', '10', 'bash', '-c', script])).stdout;
    } catch {
      return null;
    }
  };
  /** An HTTP/1.0 GET to `address`:`port` with `host` as its Host, from `box`: the raw answer, or null when it could not connect. */
  const httpGet = (box: { ns: string }, address: string, host: string, port = 80) =>
    inBox(box, `exec 3<>/dev/tcp/${address}/${port} && printf 'GET / HTTP/1.0\\r\\nHost: ${host}\\r\\n\\r\\n' >&3 && cat <&3`);

  beforeAll(async () => {
    internet = await startTestInternet({ name: `npi-${tag}`, hostIf: `npi${tag}`, testNet: '198.51.100' });
    // host.test names the host's own end of the test internet's link, where a "host service" listens.
    const names = { 'allowed.test': internet.address, 'host.test': internet.hostAddress };
    for (const address of [lan, lanOutside]) {
      await ip('-n', internet.ns, 'addr', 'add', `${address}/32`, 'dev', 'lo');
      await ip('route', 'add', `${address}/32`, 'via', internet.address);
    }
    servers = spawn('ip', ['netns', 'exec', internet.ns, process.execPath, join(import.meta.dirname, 'fixtures', 'egress-internet.mjs'), JSON.stringify({ dns: internet.address, names, http: [lan, lanOutside], web: [internet.address] })]);
    await new Promise<void>((resolve, reject) => {
      servers.stdout!.on('data', (chunk: Buffer) => {
        for (const line of chunk.toString().split('\n').filter(Boolean)) line === 'ready' ? resolve() : dnsLog.push(line);
      });
      servers.once('exit', (code) => reject(new Error(`test internet servers exited with ${code}`)));
    });
    hostService = createServer((s) => (hostHits.push(s.remoteAddress ?? ''), s.end('HTTP/1.0 200 OK\r\n\r\nhost service\n')));
    await new Promise<void>((r) => hostService.listen(80, internet.hostAddress, r));
    await setUp(net);
    // SANDBOX_PRIVATE_ALLOW: the "LAN"'s part of 172.16.0.0/12 only.
    egress = new SandboxEgress({ ...net, nameservers: [internet.address], privateAllow: ['172.31.0.0/16'], log: pino({ level: 'silent' }) });
    await egress.start();
    for (const box of Object.values(boxes)) {
      await ip('netns', 'add', box.ns);
      await ip('link', 'add', box.hostIf, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', box.ns);
      await ip('link', 'set', box.hostIf, 'master', bridge, 'up');
      await ip('-n', box.ns, 'addr', 'add', `${box.ip}/24`, 'dev', 'eth0');
      for (const dev of ['eth0', 'lo']) await ip('-n', box.ns, 'link', 'set', dev, 'up');
      await ip('-n', box.ns, 'route', 'add', 'default', 'via', gateway);
      await egress.firewall.apply({ id: box.id, ip: box.ip, hostIf: box.hostIf }, box.policy);
    }
  }, 120_000);

  afterAll(async () => {
    await egress?.stop();
    for (const box of Object.values(boxes)) {
      await ip('netns', 'del', box.ns).catch(() => {});
      await ip('link', 'del', box.hostIf).catch(() => {});
    }
    await tearDown(net).catch(() => {});
    await ip('route', 'del', `${lan}/32`).catch(() => {});
    await ip('route', 'del', `${lanOutside}/32`).catch(() => {});
    servers?.kill();
    hostService?.close();
    await internet?.close();
  }, 60_000);

  it("a name resolving to one of the host's addresses is not connected: the redirected request never reaches the host's service", async () => {
    // The proxy works for a name whose address is another host's.
    expect(await httpGet(boxes.proxied, internet.address, 'allowed.test')).toMatch(new RegExp(`"at":"${internet.address.replace(/\./g, '\\.')}"`));
    const answer = await httpGet(boxes.proxied, internet.address, 'host.test');
    expect(answer).toMatch(/^HTTP\/1\.1 502 .*host\.test does not resolve/s);
    expect(answer).not.toContain('host service');
    // A direct connection to that address is refused to the sandbox too.
    expect(await httpGet(boxes.proxied, internet.hostAddress, 'host.test')).not.toContain('host service');
    expect(hostHits).toEqual([]);
  }, 60_000);

  it('a kept-alive connection on port 80 cannot switch to a host its policy refuses after the first request', async () => {
    // Node's agent reuses the socket for the second request (reusedSocket), which names blocked.test.
    const script = `
      const http = require('node:http');
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      const get = (host) => new Promise((resolve) => {
        const req = http.request({ host: ${JSON.stringify(internet.address)}, port: 80, agent, headers: { host } }, (res) => {
          let body = '';
          res.on('data', (d) => (body += d));
          res.on('end', () => resolve({ body, reused: req.reusedSocket }));
        });
        req.on('error', (err) => resolve({ error: err.code, reused: req.reusedSocket }));
        req.end();
      });
      (async () => console.log(JSON.stringify([await get('allowed.test'), await get('blocked.test')])))();
    `;
    const { stdout } = await run('ip', ['netns', 'exec', boxes.proxied.ns, 'timeout', '20', process.execPath, '-e', script]);
    const [first, second] = JSON.parse(stdout) as Array<{ body?: string; error?: string; reused: boolean }>;
    expect(JSON.parse(first!.body!)).toMatchObject({ at: internet.address, host: 'allowed.test' });
    expect(second).toMatchObject({ reused: true, error: 'ECONNRESET' });
    // On one connection too: an absolute target or a second Host naming another host is refused before anything is sent.
    expect(await inBox(boxes.proxied, `exec 3<>/dev/tcp/${internet.address}/80 && printf 'GET http://blocked.test/ HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n' >&3 && cat <&3`)).toMatch(
      /^HTTP\/1\.1 403 .*does not name allowed\.test/s,
    );
    expect(await inBox(boxes.proxied, `exec 3<>/dev/tcp/${internet.address}/80 && printf 'GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\nHost: blocked.test\\r\\n\\r\\n' >&3 && cat <&3`)).toMatch(
      /^HTTP\/1\.1 403 .*more than one Host/s,
    );
  }, 60_000);

  it("allow: ['0.0.0.0/0'] reaches the internet but not the host's private networks; an allow CIDR inside a private range opens that part within SANDBOX_PRIVATE_ALLOW", async () => {
    const box = boxes.open;
    const get8080 = (address: string) => inBox(box, `exec 3<>/dev/tcp/${address}/8080 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3`);
    try {
      await egress!.firewall.apply(box, policy({ egress: 'deny', allow: ['0.0.0.0/0'] }));
      expect(await get8080(internet.address)).toContain('"from"');
      expect(await get8080(lan)).toBeNull();
      // Opened where SANDBOX_PRIVATE_ALLOW (172.31.0.0/16) holds it: the allow CIDR is wider, the firewall opens the overlap.
      await egress!.firewall.apply(box, policy({ egress: 'deny', allow: ['172.16.0.0/12'] }));
      expect(await get8080(lan)).toContain(`"at":"${lan}"`);
      // Not beyond it: the rest of 172.16.0.0/12 stays refused (as for a policy stored before the setting narrowed).
      expect(await get8080(lanOutside)).toBeNull();
    } finally {
      await egress!.firewall.apply(box, box.policy);
    }
  }, 60_000);

  it.skipIf(!onPath('conntrack'))("a released address's tracked connections are forgotten: its next owner is delivered no replies to them", async () => {
    const box = boxes.open;
    const tracked = () => readFileSync('/proc/net/nf_conntrack', 'utf8').split('\n').filter((l) => l.includes(`src=${box.ip} `) && l.includes(`dst=${internet.address} `));
    // A connection the sandbox holds open (until killed).
    const holder = spawn('ip', ['netns', 'exec', box.ns, process.execPath, '-e', `require('node:net').connect(8080, ${JSON.stringify(internet.address)}, () => console.log('connected'))`]);
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout!.once('data', () => resolve());
        holder.once('exit', (code) => reject(new Error(`the holder exited with ${code}`)));
      });
      expect(tracked().length).toBeGreaterThan(0);
      await forgetConnections(box.ip);
      expect(tracked()).toEqual([]);
    } finally {
      holder.kill();
    }
  }, 60_000);

  it('a sandbox whose egress is cut sends no query upstream: its DNS is refused (names carry data too)', async () => {
    /** The rcode of an A query for `name` sent from `box` to the test internet's resolver (the firewall redirects it to ours). */
    const rcode = async (box: { ns: string }, name: string) => {
      const script = `
        const s = require('node:dgram').createSocket('udp4');
        const labels = Buffer.concat(${JSON.stringify(name)}.split('.').map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l)])));
        s.on('message', (m) => (console.log(m.readUInt16BE(2) & 15), s.close()));
        s.send(Buffer.concat([Buffer.from([0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]), labels, Buffer.from([0, 0, 1, 0, 1])]), 53, ${JSON.stringify(internet.address)});
      `;
      return Number((await run('ip', ['netns', 'exec', box.ns, 'timeout', '10', process.execPath, '-e', script])).stdout.trim());
    };
    const cut = boxes.open;
    await egress!.firewall.apply({ id: cut.id, ip: cut.ip, hostIf: cut.hostIf }, policy({ maxEgressBytes: 1000, egressCut: true }));
    try {
      expect(await rcode(cut, 'exfil-secret.allowed.test')).toBe(5);
      // Another sandbox's query is forwarded: once the test internet logged it, it had the cut one's before, if any.
      expect(await rcode(boxes.proxied, 'allowed.test')).toBe(0);
      await expect.poll(() => dnsLog.includes('query allowed.test 1'), { timeout: 10_000 }).toBe(true);
      expect(dnsLog.filter((l) => l.includes('exfil-secret'))).toEqual([]);
    } finally {
      await egress!.firewall.apply({ id: cut.id, ip: cut.ip, hostIf: cut.hostIf }, cut.policy);
    }
  }, 60_000);

  it("a sandbox dialling the name proxy's ports itself is refused: only connections the firewall redirected reach them", async () => {
    const { stdout } = await run('nft', ['-j', 'list', 'map', 'ip', tapGuardTable(bridge), 'proxy_ports']);
    const elem = (JSON.parse(stdout) as { nftables: Array<{ map?: { elem?: Array<[number, number]> } }> }).nftables.find((e) => e.map)!.map!.elem!;
    const ports = elem.map(([, to]) => to);
    expect(ports).toHaveLength(2);
    for (const box of [boxes.open, boxes.proxied]) {
      for (const port of ports) expect(await inBox(box, `exec 3<>/dev/tcp/${gateway}/${port} && echo connected`)).toBeNull();
    }
    // The redirected path still works.
    expect(await httpGet(boxes.proxied, internet.address, 'allowed.test')).toContain('"host":"allowed.test"');
    expect(hostHits).toEqual([]);
  }, 60_000);
});
