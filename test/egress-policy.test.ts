import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { connect, createServer, type Server } from 'node:net';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import { egressCapFor, parseNetworkRule, privateAllowError, type NetworkPolicy } from '../shared/index.js';
import { DnsProxy, localAnswer, nameAllowed, parseAnswer, parseQuery } from '../server/hypervisor/network/dns-proxy.js';
import { httpHostOf, sniOf } from '../server/hypervisor/network/name-proxy.js';
import { EgressFirewall, egressBaseScript, readEgressTable, sandboxScript } from '../server/hypervisor/network/egress-firewall.js';
import { newId } from '../server/store/ids.js';
import { tearDown } from '../server/hypervisor/network/host-network.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';
import { fetchCommand, freeTestAddress, ip, onPath, startTestInternet, type TestInternet } from './helpers/test-internet.js';

const policy = (p: Partial<NetworkPolicy>): NetworkPolicy => ({ mode: 'bridge', egress: 'allow', allow: [], deny: [], maxEgressBytes: null, egressCut: false, ...p });

/** A DNS query for `name` (type A unless given), as a stub resolver sends it. */
function query(name: string, type = 1, id = 0x1234): Buffer {
  const labels = name.split('.').map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l)]));
  const header = Buffer.from([id >> 8, id & 0xff, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
  return Buffer.concat([header, ...labels, Buffer.from([0, type >> 8, type & 0xff, 0, 1])]);
}

describe('network policy entries', () => {
  it.each([
    ['203.0.113.0/24', '203.0.113.0/24'],
    ['203.0.113.9', '203.0.113.9/32'],
    ['10.1.2.3/8', '10.0.0.0/8'],
    ['0.0.0.0/0', '0.0.0.0/0'],
    ['PyPI.org.', 'pypi.org'],
    ['*.pythonhosted.org', '*.pythonhosted.org'],
    ['allowed.test', 'allowed.test'],
  ])('%s is the rule %s', (entry, rule) => {
    expect(parseNetworkRule(entry)).toEqual({ rule });
  });

  it.each([
    ['', /empty/],
    ['1.2.3', /not an IPv4 CIDR/],
    ['1.2.3.4/33', /not an IPv4 CIDR/],
    ['300.1.1.1', /not an IPv4 CIDR/],
    ['2001:db8::/32', /IPv6 is not supported/],
    ['exa mple.com', /not a CIDR, a domain/],
    ['a..b', /not a CIDR, a domain/],
    ['*.', /not a CIDR, a domain/],
    ['foo.*.com', /not a CIDR, a domain/],
    [`${'a'.repeat(64)}.com`, /not a CIDR, a domain/],
  ])('%j is refused', (entry, message) => {
    const parsed = parseNetworkRule(entry);
    expect('error' in parsed && parsed.error).toMatch(message);
  });

  it('a name resolves when no deny entry names it and egress or an allow entry lets it', () => {
    const allowList = policy({ egress: 'deny', allow: ['allowed.test', '*.cdn.test'], deny: ['bad.cdn.test'] });
    expect(nameAllowed(allowList, 'allowed.test')).toBe(true);
    expect(nameAllowed(allowList, 'sub.allowed.test')).toBe(false);
    expect(nameAllowed(allowList, 'x.cdn.test')).toBe(true);
    expect(nameAllowed(allowList, 'a.b.cdn.test')).toBe(true);
    expect(nameAllowed(allowList, 'cdn.test')).toBe(false);
    expect(nameAllowed(allowList, 'xcdn.test')).toBe(false);
    expect(nameAllowed(allowList, 'bad.cdn.test')).toBe(false);
    expect(nameAllowed(allowList, 'blocked.test')).toBe(false);
    const open = policy({ deny: ['*.evil.test', 'evil.test'] });
    expect(nameAllowed(open, 'anything.test')).toBe(true);
    expect(nameAllowed(open, 'evil.test')).toBe(false);
    expect(nameAllowed(open, 'a.evil.test')).toBe(false);
  });

  it('an allow CIDR inside a private range must lie inside SANDBOX_PRIVATE_ALLOW (named in the refusal); one merely containing private ranges is fine', () => {
    expect(privateAllowError(['pypi.org', '0.0.0.0/0', '8.0.0.0/6', '203.0.113.0/24'], [])).toBeUndefined();
    expect(privateAllowError(['10.1.0.0/16'], [])).toMatch(/allow entry 10\.1\.0\.0\/16 is in a private range; this server's SANDBOX_PRIVATE_ALLOW lets sandboxes open none/);
    expect(privateAllowError(['10.1.2.0/24', '192.168.5.5/32'], ['10.1.0.0/16', '192.168.5.0/24'])).toBeUndefined();
    // Wider than the setting, or beside it: refused, naming the entry and what may be opened.
    expect(privateAllowError(['10.0.0.0/8'], ['10.1.0.0/16'])).toMatch(/allow entry 10\.0\.0\.0\/8 .*open only 10\.1\.0\.0\/16 of the private ranges/);
    expect(privateAllowError(['203.0.113.0/24', '100.64.0.0/10'], ['10.0.0.0/8'])).toMatch(/100\.64\.0\.0\/10/);
  });

  it('SANDBOX_EGRESS_BYTES_MAX set is a ceiling: no cap means the ceiling, more is refused naming it; unset, 0 or null is no cap', () => {
    expect(egressCapFor(0, null)).toEqual({ cap: null });
    expect(egressCapFor(null, null)).toEqual({ cap: null });
    expect(egressCapFor(10 ** 12, null)).toEqual({ cap: 10 ** 12 });
    expect(egressCapFor(0, 5000)).toEqual({ cap: 5000 });
    expect(egressCapFor(null, 5000)).toEqual({ cap: 5000 });
    expect(egressCapFor(4999, 5000)).toEqual({ cap: 4999 });
    expect(egressCapFor(5000, 5000)).toEqual({ cap: 5000 });
    expect(egressCapFor(5001, 5000)).toEqual({ error: expect.stringMatching(/maxEgressBytes 5001 is above this server's ceiling SANDBOX_EGRESS_BYTES_MAX=5000/) });
  });
});

describe('egress firewall rules (pure)', () => {
  const opts = { bridge: 'vmbr0', gateway: '192.168.100.1', networkCidr: '192.168.100.0/22' };

  it('refuses the host, the sandbox network, link-local and multicast before any sandbox chain, and sends all DNS to the resolver', () => {
    const script = egressBaseScript(opts);
    expect(script).toContain('add element ip voidrun_vmbr0 refused { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4, 240.0.0.0/4, 192.168.100.0/22 }');
    expect(script).toContain('add rule ip voidrun_vmbr0 prerouting iifname "vmbr0" meta l4proto { tcp, udp } th dport 53 dnat to 192.168.100.1:53');
    const input = script.split('\n').filter((l) => l.startsWith('add rule ip voidrun_vmbr0 input '));
    expect(input.at(-1)).toBe('add rule ip voidrun_vmbr0 input reject with icmp type admin-prohibited');
    const from = script.split('\n').filter((l) => l.startsWith('add rule ip voidrun_vmbr0 from_sandbox '));
    expect(from).toEqual([
      'add rule ip voidrun_vmbr0 from_sandbox ip daddr @refused reject with icmp type admin-prohibited',
      'add rule ip voidrun_vmbr0 from_sandbox ip saddr vmap @by_source',
      'add rule ip voidrun_vmbr0 from_sandbox drop',
    ]);
  });

  it("orders a sandbox's chain: deny, allow CIDRs, private ranges, resolved names, default; a cut refuses everything", () => {
    const id = 'a'.repeat(24);
    const chain = `s_${id}`;
    const script = sandboxScript('vmbr0', { id, ip: '192.168.100.7' }, policy({ egress: 'deny', allow: ['10.0.0.0/8', 'allowed.test'], deny: ['203.0.113.7/32', 'evil.test'] }), { privateAllow: ['10.0.0.0/8'] });
    expect(script).toContain(`add element ip voidrun_vmbr0 ${chain}_allow { 10.0.0.0/8 }`);
    expect(script).toContain(`add element ip voidrun_vmbr0 ${chain}_deny { 203.0.113.7/32 }`);
    expect(script.split('\n').filter((l) => l.startsWith(`add rule ip voidrun_vmbr0 ${chain} `)).map((l) => l.slice(`add rule ip voidrun_vmbr0 ${chain} `.length))).toEqual([
      `ip daddr @${chain}_deny reject with icmp type admin-prohibited`,
      `ip daddr @${chain}_allow accept`,
      'ip daddr @private reject with icmp type admin-prohibited',
      `ip daddr @${chain}_dns accept`,
      'reject with icmp type admin-prohibited',
    ]);
    expect(script).toContain(`add element ip voidrun_vmbr0 by_source { 192.168.100.7 : jump ${chain} }`);
    // Without the name proxy, or with it and domains allowed under egress deny: ports 80 and 443 redirected (except to allow CIDRs).
    expect(script).toContain(`add chain ip voidrun_vmbr0 n_${id}\ndelete chain ip voidrun_vmbr0 n_${id}`);
    const proxied = sandboxScript('vmbr0', { id, ip: '192.168.100.7' }, policy({ egress: 'deny', allow: ['10.0.0.0/8', 'allowed.test'] }), { proxyGateway: '192.168.100.1' });
    expect(proxied).toContain(`add rule ip voidrun_vmbr0 n_${id} ip daddr @${chain}_allow return`);
    expect(proxied).toContain(`add rule ip voidrun_vmbr0 n_${id} tcp dport { 80, 443 } dnat to 192.168.100.1 : tcp dport map @proxy_ports`);
    expect(proxied).toContain(`add element ip voidrun_vmbr0 sni_by_source { 192.168.100.7 : jump n_${id} }`);
    expect(sandboxScript('vmbr0', { id, ip: '192.168.100.7' }, policy({ egress: 'allow', allow: ['allowed.test'] }), { proxyGateway: '192.168.100.1' })).not.toContain('sni_by_source {');
    const cut = sandboxScript('vmbr0', { id, ip: '192.168.100.7' }, policy({ egressCut: true }));
    expect(cut.split('\n').filter((l) => l.startsWith(`add rule ip voidrun_vmbr0 ${chain} `))).toEqual([
      `add rule ip voidrun_vmbr0 ${chain} counter reject with icmp type admin-prohibited comment "egress cut: maxEgressBytes reached"`,
    ]);
  });

  it('refuses what is not an address, a CIDR or a sandbox id rather than writing it into a rule', () => {
    expect(() => sandboxScript('vmbr0', { id: 'a'.repeat(24), ip: '1.2.3.4; flush ruleset' }, policy({}))).toThrow(/not an IPv4 address/);
    expect(() => sandboxScript('vmbr0', { id: 'A b', ip: '1.2.3.4' }, policy({}))).toThrow(/sandbox id/);
    expect(() => egressBaseScript({ ...opts, bridge: 'br0"; flush' })).toThrow(/interface name/);
  });
});

describe('the DNS resolver parses defensively', () => {
  it('reads a query and answers NXDOMAIN with its question', () => {
    const q = query('Allowed.Test');
    const parsed = parseQuery(q)!;
    expect(parsed).toMatchObject({ id: 0x1234, name: 'allowed.test', type: 1 });
    const nx = localAnswer(q, parsed, 3);
    expect(nx.readUInt16BE(2) & 0x800f).toBe(0x8003);
    expect(nx.subarray(12)).toEqual(q.subarray(12));
  });

  it('refuses responses, other opcodes, several questions, compression in the question and names past 255 bytes', () => {
    const q = query('a.test');
    const withFlags = (flags: number) => Buffer.concat([q.subarray(0, 2), Buffer.from([flags >> 8, flags & 0xff]), q.subarray(4)]);
    expect(parseQuery(withFlags(0x8100))).toBeNull();
    expect(parseQuery(withFlags(0x2800))).toBeNull();
    const two = Buffer.from(q);
    two.writeUInt16BE(2, 4);
    expect(parseQuery(two)).toBeNull();
    const pointer = Buffer.concat([q.subarray(0, 12), Buffer.from([0xc0, 0x0c, 0, 1, 0, 1])]);
    expect(parseQuery(pointer)).toBeNull();
    expect(parseQuery(query(Array.from({ length: 5 }, () => 'a'.repeat(60)).join('.')))).toBeNull();
    expect(parseQuery(Buffer.alloc(11))).toBeNull();
  });

  it('malformed DNS packets never throw: random bytes, truncations and pointer loops are dropped', () => {
    const q = query('allowed.test');
    const parsed = parseQuery(q)!;
    for (let i = 0; i < 2000; i++) {
      const junk = randomBytes(randomInt(0, 600));
      expect(() => parseQuery(junk)).not.toThrow();
      // An answer that starts like one to this query, then anything.
      const answer = Buffer.concat([q.subarray(0, 2), Buffer.from([0x81, 0x80]), q.subarray(4, 6), junk.subarray(0, 2), q.subarray(8), junk]);
      expect(() => parseAnswer(answer, q, parsed)).not.toThrow();
      expect(() => parseAnswer(junk, q, parsed)).not.toThrow();
    }
    // A pointer to itself where a name should be, and a record running past the end.
    const loop = Buffer.concat([q.subarray(0, 2), Buffer.from([0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]), q.subarray(12), Buffer.from([0xc0, q.length, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4])]);
    expect(parseAnswer(loop, q, parsed)).toEqual([{ address: '1.2.3.4', ttl: 60 }]);
    const short = Buffer.concat([q.subarray(0, 2), Buffer.from([0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]), q.subarray(12), Buffer.from([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 200, 1])]);
    expect(parseAnswer(short, q, parsed)).toBeNull();
    // Another id, or another question: not an answer to this query.
    expect(parseAnswer(Buffer.concat([Buffer.from([0, 1]), loop.subarray(2)]), q, parsed)).toBeNull();
  });
});

describe('the name proxy reads names defensively', () => {
  it("finds the server_name of a real TLS ClientHello (Node's own), and the Host of an HTTP request", async () => {
    const hello = await new Promise<Buffer>((resolve) => {
      const catcher = createServer((socket) => socket.once('data', (d: Buffer) => (resolve(d), socket.destroy(), catcher.close())));
      catcher.listen(0, '127.0.0.1', () => {
        const client = tlsConnect({ host: '127.0.0.1', port: (catcher.address() as { port: number }).port, servername: 'allowed.test' });
        client.on('error', () => {});
      });
    });
    expect(sniOf(hello)).toBe('allowed.test');
    expect(sniOf(hello.subarray(0, 20))).toBeUndefined();
    expect(httpHostOf(Buffer.from('GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: Allowed.Test:8080\r\n\r\n'))).toBe('Allowed.Test');
    expect(httpHostOf(Buffer.from('GET / HTTP/1.1\r\nHost: a'))).toBeUndefined();
    expect(httpHostOf(Buffer.from('GET / HTTP/1.1\r\n\r\n'))).toBeNull();
    expect(httpHostOf(Buffer.from('\x16\x03\x01'))).toBeNull();
  });

  it('malformed ClientHellos and requests never throw', () => {
    for (let i = 0; i < 2000; i++) {
      const junk = randomBytes(randomInt(0, 800));
      const tlsLike = Buffer.concat([Buffer.from([0x16, 0x03, 0x01, junk.length >> 8, junk.length & 0xff, 0x01]), junk]);
      expect(() => sniOf(junk)).not.toThrow();
      expect(() => sniOf(tlsLike)).not.toThrow();
      expect(() => httpHostOf(junk)).not.toThrow();
      expect(() => httpHostOf(Buffer.concat([Buffer.from('GET / HTTP/1.1\r\nHost: '), junk, Buffer.from('\r\n\r\n')]))).not.toThrow();
    }
  });
});

describe('the DNS resolver on loopback', () => {
  it('listens on another port for UDP and TCP when its port is taken, and answers there', async () => {
    const squatter = createSocket('udp4');
    await new Promise<void>((r) => squatter.bind(0, '127.0.0.1', r));
    const taken = squatter.address().port;
    const proxy = new DnsProxy({ address: '127.0.0.1', port: taken, upstreams: [], policyAt: () => policy({ egress: 'deny' }), allowResolved: async () => {} });
    try {
      await proxy.start();
      expect(proxy.port).not.toBe(taken);
      const client = createSocket('udp4');
      const reply = await new Promise<Buffer>((resolve) => {
        client.once('message', resolve);
        client.send(query('blocked.test'), proxy.port!, '127.0.0.1');
      });
      client.close();
      expect(reply.readUInt16BE(2) & 0x000f).toBe(3);
      // The same port over TCP, framed.
      const tcpReply = await new Promise<Buffer>((resolve, reject) => {
        const q = query('blocked.test');
        const c = connect(proxy.port!, '127.0.0.1', () => c.write(Buffer.concat([Buffer.from([0, q.length]), q])));
        c.once('data', (d: Buffer) => (c.end(), resolve(d)));
        c.once('error', reject);
      });
      expect(tcpReply.readUInt16BE(2 + 2) & 0x000f).toBe(3);
    } finally {
      await proxy.stop();
      squatter.close();
    }
  });
});

const netSkip = !support.ok ? support.reason : !['ip', 'nft', 'nsenter', 'bridge'].every(onPath) ? 'ip, nft, nsenter or bridge missing' : null;
if (netSkip) console.warn(`egress policy tests with sandboxes skipped: ${netSkip}`);

describe.skipIf(netSkip !== null)('egress policy of container sandboxes on the bridge', () => {
  const tag = randomBytes(3).toString('hex');
  const bridge = `egb${tag}`;
  const subnet = `10.214.${randomInt(0, 256)}`;
  const gateway = `${subnet}.1`;
  // An address no interface or route of this machine covers (CI machines can sit on a TEST-NET).
  let blocked: string;
  let releaseBlocked = () => {};
  const metadataTable = String(randomInt(20_000, 30_000));
  const net = { bridge, gatewayCidr: `${gateway}/24`, networkCidr: `${subnet}.0/24` };
  let internet: TestInternet;
  let servers: ChildProcess;
  const dnsLog: string[] = [];
  let hostPort: Server;
  let server: TestServer;
  let vr: VoidRunClient;
  let apiKey: string;
  let box: SandboxHandle;
  let other: SandboxHandle;
  let closed = false;

  const serverEnv = () => ({
    SANDBOX_DRIVER: 'container',
    SANDBOX_NETWORK: 'bridge',
    BRIDGE_NAME: bridge,
    GATEWAY_IP: net.gatewayCidr,
    NETWORK_CIDR: net.networkCidr,
    DNS_NAMESERVERS: internet.address,
    HEALTH_ENABLED: 'false',
  });
  const put = (id: string, body: unknown) => server.http(`/api/sandboxes/${id}/network`, { method: 'PUT', apiKey, json: body });
  /** The sandbox as REST answers it. */
  const restGet = async (id: string) => ((await (await server.http(`/api/sandboxes/${id}`, { apiKey })).json()) as { data: { ip: string; network: NetworkPolicy } }).data;
  /** The body the test internet answered `target` with (a name or an address, port 8080), or null when the sandbox could not reach it. */
  const fetchFrom = async (sandbox: SandboxHandle, target: string, bytes = 0) => {
    const res = await sandbox.exec(fetchCommand(target, bytes));
    return res.exitCode === 0 ? (JSON.parse(res.stdout) as Record<string, unknown>) : null;
  };
  /** An HTTP/1.0 GET to `target`:80 with `host` as its Host: the body parsed when it is JSON, else the raw answer. */
  const httpGet = async (sandbox: SandboxHandle, target: string, host: string) => {
    const res = await sandbox.exec(`timeout 10 bash -c "exec 3<>/dev/tcp/${target}/80 && printf 'GET / HTTP/1.0\\r\\nHost: ${host}\\r\\n\\r\\n' >&3 && cat <&3"`);
    const body = res.stdout.split('\r\n\r\n')[1] ?? '';
    return body.startsWith('{') ? (JSON.parse(body) as Record<string, unknown>) : res.stdout;
  };
  /** A TLS ClientHello naming `sni` sent to `target`:443: what the other end answered ('' when the connection was closed). */
  const tlsHello = async (sandbox: SandboxHandle, target: string, sni: string) =>
    (
      await sandbox.exec(
        `timeout 10 perl -MIO::Socket::INET -e '$n="${sni}"; $x=pack("nnnCn",0,length($n)+5,length($n)+3,0,length($n)).$n; $b=pack("n",0x0303).("\\0"x32).pack("C",0).pack("nn",2,0x1301).pack("CC",1,0).pack("n",length($x)).$x; $h=pack("C",1).substr(pack("N",length($b)),1).$b; $s=IO::Socket::INET->new(PeerAddr=>"${target}",PeerPort=>443) or exit 3; print $s pack("Cnn",0x16,0x0301,length($h)).$h; $r=<$s>; print $r // ""'`,
      )
    ).stdout.trim();
  const resolves = async (sandbox: SandboxHandle, name: string) => (await sandbox.exec(`getent ahostsv4 ${name}`)).exitCode === 0;
  const connects = async (sandbox: SandboxHandle, address: string, port: number) =>
    (await sandbox.exec(`timeout 10 bash -c 'exec 3<>/dev/tcp/${address}/${port}' 2>/dev/null`)).exitCode === 0;

  beforeAll(async () => {
    internet = await startTestInternet({ name: `egi-${tag}`, hostIf: `egi${tag}`, testNet: '203.0.113' });
    ({ address: blocked, release: releaseBlocked } = await freeTestAddress());
    // A second server address (blocked.test) and the metadata address in the test internet; only
    // traffic from this test's bridge is routed to the latter, so nothing else on the host is.
    for (const address of [blocked, '169.254.169.254']) await ip('-n', internet.ns, 'addr', 'add', `${address}/32`, 'dev', 'lo');
    await ip('route', 'add', `${blocked}/32`, 'via', internet.address);
    await ip('route', 'add', '169.254.169.254/32', 'via', internet.address, 'table', metadataTable);
    await ip('rule', 'add', 'iif', bridge, 'lookup', metadataTable, 'priority', metadataTable);
    const names = { 'allowed.test': internet.address, 'api.allowed.test': internet.address, 'blocked.test': blocked };
    servers = spawn('ip', ['netns', 'exec', internet.ns, process.execPath, join(import.meta.dirname, 'fixtures', 'egress-internet.mjs'), JSON.stringify({ dns: internet.address, names, http: [blocked, '169.254.169.254'], web: [internet.address, blocked] })]);
    await new Promise<void>((resolve, reject) => {
      servers.stdout!.on('data', (chunk: Buffer) => {
        for (const line of chunk.toString().split('\n').filter(Boolean)) line === 'ready' ? resolve() : dnsLog.push(line);
      });
      servers.once('exit', (code) => reject(new Error(`test internet servers exited with ${code}`)));
    });
    hostPort = createServer((s) => s.end('host port\n'));
    await new Promise<void>((r) => hostPort.listen(0, '0.0.0.0', r));
    server = await startTestServer(serverEnv());
    apiKey = (await server.client().trpc.auth.register.mutate({ name: 'Egress User', email: uniqueEmail('egress') })).apiKey;
    vr = server.client(apiKey);
    [box, other] = await Promise.all([vr.sandboxes.create({ name: 'egress-box', network: { egress: 'allow' } }), vr.sandboxes.create({ name: 'other-box' })]);
  }, 240_000);

  afterAll(async () => {
    try {
      if (!closed) await server?.close();
    } finally {
      await tearDown(net).catch(() => {});
      await ip('rule', 'del', 'iif', bridge, 'lookup', metadataTable, 'priority', metadataTable).catch(() => {});
      await ip('route', 'del', '169.254.169.254/32', 'table', metadataTable).catch(() => {});
      if (blocked) await ip('route', 'del', `${blocked}/32`).catch(() => {});
      releaseBlocked();
      servers?.kill();
      hostPort?.close();
      await internet?.close();
    }
  }, 60_000);

  it('create echoes the resolved policy; bad entries are refused naming them', async () => {
    expect((await restGet(other.id)).network).toEqual({ mode: 'bridge', egress: 'allow', allow: [], deny: [], maxEgressBytes: null, egressCut: false });
    const bad = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'bad-net', network: { egress: 'deny', allow: ['pypi.org', 'no spaces.org'] } } });
    expect(bad.status).toBe(400);
    expect(JSON.stringify(await bad.json())).toMatch(/network\.allow\.1.*no spaces\.org/);
    const many = await put(box.id, { allow: Array.from({ length: 65 }, (_, i) => `h${i}.test`) });
    expect(many.status).toBe(400);
    expect(JSON.stringify(await many.json())).toMatch(/at most 64 entries/);
    const mode = await put(box.id, { mode: 'none' });
    expect(mode.status).toBe(400);
    expect(JSON.stringify(await mode.json())).toMatch(/stop it first/);
    // A misspelt field is refused, not ignored: a policy that silently lost a field would allow more than meant.
    const typo = await put(box.id, { egres: 'deny' });
    expect(typo.status).toBe(400);
    expect(JSON.stringify(await typo.json())).toMatch(/egres/);
    // The host's private networks open only where the operator's SANDBOX_PRIVATE_ALLOW (unset here) says, on create and on change.
    const lan = await server.http('/api/sandboxes', { method: 'POST', apiKey, json: { name: 'lan-net', network: { egress: 'deny', allow: ['172.16.0.0/12'] } } });
    expect(lan.status).toBe(400);
    expect(JSON.stringify(await lan.json())).toMatch(/allow entry 172\.16\.0\.0\/12 is in a private range.*SANDBOX_PRIVATE_ALLOW/);
    const lanLater = await put(box.id, { allow: ['0.0.0.0/0', '192.168.1.0/24'] });
    expect(lanLater.status).toBe(400);
    expect(JSON.stringify(await lanLater.json())).toMatch(/allow entry 192\.168\.1\.0\/24 .*SANDBOX_PRIVATE_ALLOW/);
    expect((await restGet(box.id)).network.allow).toEqual([]);
  });

  it('egress allow: the sandbox fetches from the test internet by name and by address', async () => {
    expect(await fetchFrom(box, 'allowed.test')).toMatchObject({ from: internet.hostAddress });
    expect(await fetchFrom(box, 'blocked.test')).toMatchObject({ at: blocked });
    expect(await fetchFrom(box, internet.address)).toMatchObject({ from: internet.hostAddress });
  }, 60_000);

  it('a policy change stops a connection already open: every packet is checked, not only the first', async () => {
    // The connection is open and half the body sent before the change; the other half after it.
    await box.files.write(
      '/root/held.sh',
      [
        `exec 3<>/dev/tcp/${internet.address}/8080 || exit 1`,
        `printf 'POST / HTTP/1.0\r\nContent-Length: 10\r\n\r\nhello' >&3`,
        'touch /tmp/opened',
        'until [ -e /tmp/go ]; do sleep 0.1; done',
        `printf 'world' >&3`,
        `if timeout 8 sed -n '$p' <&3 > /tmp/body; then echo done > /tmp/result; else echo failed > /tmp/result; fi`,
        '',
      ].join('\n'),
    );
    const waitFor = (file: string) => box.exec(`timeout 30 bash -c 'until [ -e ${file} ]; do sleep 0.1; done'`);
    await box.commands.run('bash /root/held.sh');
    expect((await waitFor('/tmp/opened')).exitCode).toBe(0);
    expect((await put(box.id, { egress: 'deny' })).status).toBe(200);
    await box.exec('touch /tmp/go');
    expect((await waitFor('/tmp/result')).exitCode).toBe(0);
    expect((await box.exec('cat /tmp/result /tmp/body')).stdout.trim()).toBe('failed');
  }, 60_000);

  it('egress deny, changed on the running sandbox: it reaches nothing, by name or by address, and its DNS goes nowhere', async () => {
    const res = await put(box.id, { egress: 'deny' });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { data: { network: NetworkPolicy } }).data.network).toMatchObject({ egress: 'deny', allow: [] });
    const asked = dnsLog.length;
    expect(await fetchFrom(box, internet.address)).toBeNull();
    expect(await resolves(box, 'allowed.test')).toBe(false);
    // A query sent straight to the test internet's resolver is answered by ours (NXDOMAIN), never by it.
    const direct = await box.exec(
      `timeout 10 perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(PeerAddr=>"${internet.address}",PeerPort=>53,Proto=>"udp") or die; $q=pack("nnnnnn",7,256,1,0,0,0).join("",map{chr(length).$_}split/\\./,"allowed.test").chr(0).pack("nn",1,1); $s->send($q); $s->recv($r,512); print unpack("n",substr($r,2,2))&15'`,
    );
    expect(direct.stdout).toBe('3');
    expect(dnsLog.slice(asked)).toEqual([]);
  }, 60_000);

  it('allow: ["allowed.test"] reaches allowed.test, not blocked.test nor a server by address', async () => {
    expect((await put(box.id, { egress: 'deny', allow: ['allowed.test'] })).status).toBe(200);
    const asked = dnsLog.length;
    // Before the name is looked up, its address is closed too.
    expect(await fetchFrom(box, internet.address)).toBeNull();
    expect(await fetchFrom(box, 'allowed.test')).toMatchObject({ from: internet.hostAddress });
    expect(await resolves(box, 'blocked.test')).toBe(false);
    expect(await fetchFrom(box, blocked)).toBeNull();
    expect(dnsLog.slice(asked).filter((l) => l.includes('blocked.test'))).toEqual([]);
    // `*.domain` names the subdomains, not the domain.
    expect((await put(box.id, { allow: ['*.allowed.test'] })).status).toBe(200);
    expect(await fetchFrom(box, 'api.allowed.test')).toMatchObject({ from: internet.hostAddress });
    expect(await resolves(box, 'allowed.test')).toBe(false);
    // Back to egress allow with a deny list: the denied name does not resolve and the denied CIDR is closed.
    expect((await put(box.id, { egress: 'allow', allow: [], deny: ['blocked.test', `${internet.address}/32`] })).status).toBe(200);
    expect(await resolves(box, 'blocked.test')).toBe(false);
    expect(await fetchFrom(box, blocked)).toMatchObject({ at: blocked });
    expect(await fetchFrom(box, internet.address)).toBeNull();
    expect((await put(box.id, { deny: [] })).status).toBe(200);
  }, 90_000);

  it('with domains allowed, ports 80 and 443 reach only the allowed names, whatever address or Host/SNI the sandbox uses', async () => {
    expect((await put(box.id, { egress: 'deny', allow: ['allowed.test'], deny: [] })).status).toBe(200);
    expect(await httpGet(box, 'allowed.test', 'allowed.test')).toMatchObject({ at: internet.address, host: 'allowed.test' });
    // allowed.test's address is open now; another name on it is not.
    expect(await httpGet(box, internet.address, 'blocked.test')).toMatch(/^HTTP\/1\.1 403 .*egress policy: blocked\.test is not allowed/s);
    // An allowed Host sent to any address reaches the allowed name's server, not that address.
    expect(await httpGet(box, blocked, 'allowed.test')).toMatchObject({ at: internet.address });
    expect(await tlsHello(box, 'allowed.test', 'allowed.test')).toBe(`tls ${internet.address} allowed.test`);
    expect(await tlsHello(box, internet.address, 'blocked.test')).toBe('');
    expect(await tlsHello(box, blocked, 'allowed.test')).toBe(`tls ${internet.address} allowed.test`);
    // Under egress allow nothing is redirected: the address the sandbox chose answers.
    expect((await put(box.id, { egress: 'allow', allow: [] })).status).toBe(200);
    expect(await tlsHello(box, blocked, 'allowed.test')).toBe(`tls ${blocked} allowed.test`);
  }, 90_000);

  it('whatever the policy, no sandbox reaches a host port, the API port, another sandbox or 169.254.169.254', async () => {
    // Even with every address allowed explicitly.
    expect((await put(box.id, { egress: 'allow', allow: ['0.0.0.0/0'] })).status).toBe(200);
    const port = (hostPort.address() as { port: number }).port;
    const apiPort = Number(new URL(server.url).port);
    expect(await connects(box, gateway, port)).toBe(false);
    expect(await connects(box, internet.hostAddress, port)).toBe(false);
    expect(await connects(box, gateway, apiPort)).toBe(false);
    expect(await fetchFrom(box, '169.254.169.254')).toBeNull();
    const otherIp = (await restGet(other.id)).ip;
    await other.commands.run(`perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8080,Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){print $c "HTTP/1.0 200 OK\\r\\n\\r\\nother\\n"; close $c}'`);
    expect((await other.exec(`timeout 10 bash -c 'until exec 3<>/dev/tcp/127.0.0.1/8080; do sleep 0.2; done' 2>/dev/null`)).exitCode).toBe(0);
    expect(await connects(box, otherIp, 8080)).toBe(false);
    // The host's port listens on those addresses: from the host itself it answers.
    const fromHost = await new Promise<boolean>((resolve) => {
      const c = connect(port, gateway, () => (c.end(), resolve(true)));
      c.on('error', () => resolve(false));
    });
    expect(fromHost).toBe(true);
    // And the internet still answers: only what is always refused was.
    expect(await fetchFrom(box, internet.address)).toMatchObject({ from: internet.hostAddress });
    expect((await put(box.id, { allow: [] })).status).toBe(200);
  }, 90_000);

  it('malformed DNS packets to the proxy do not crash the server', async () => {
    // From inside a sandbox (a known source): junk datagrams, a truncated header, a TCP frame
    // announcing more than it sends, then a well-formed query, which still gets its answer.
    const junk = await box.exec(
      `perl -MIO::Socket::INET -e '$u=IO::Socket::INET->new(PeerAddr=>"${gateway}",PeerPort=>53,Proto=>"udp") or die; for $n (0,1,11,12,13,100,512,1500) { $u->send(join("",map{chr(int(rand(256)))}1..$n)) } $u->send(pack("nnnnnn",1,256,1,0,0,0).chr(0xc0).chr(12)); $t=IO::Socket::INET->new(PeerAddr=>"${gateway}",PeerPort=>53,Proto=>"tcp") or die; print $t pack("n",60000)."abc"; close $t; $t=IO::Socket::INET->new(PeerAddr=>"${gateway}",PeerPort=>53,Proto=>"tcp") or die; print $t pack("n",3)."abc"; close $t; print "sent"'`,
    );
    expect(junk.stdout).toBe('sent');
    expect(await resolves(box, 'allowed.test')).toBe(true);
    expect((await server.http('/api/version')).status).toBe(200);
  }, 60_000);

  it("past maxEgressBytes the sandbox's egress is cut, its answer says so, and raising the cap lifts it", async () => {
    const res = await put(box.id, { maxEgressBytes: 100_000 });
    expect(((await res.json()) as { data: { network: NetworkPolicy } }).data.network).toMatchObject({ maxEgressBytes: 100_000, egressCut: false });
    expect(await fetchFrom(box, internet.address, 300_000)).toMatchObject({ received: 300_000 });
    await expect.poll(async () => (await restGet(box.id)).network.egressCut, { timeout: 30_000, interval: 200 }).toBe(true);
    expect(await fetchFrom(box, internet.address)).toBeNull();
    expect(server.logLines.some((l) => l.includes('egress cut'))).toBe(true);
    // The cut is in the sandbox's event stream too, with the cap and the bytes counted on the host.
    await expect
      .poll(
        async () => {
          const res = await server.http(`/api/sandboxes/${box.id}/events?limit=1000`, { apiKey });
          const { events } = ((await res.json()) as { data: { events: Array<{ type: string; data?: Record<string, unknown> }> } }).data;
          return events.find((e) => e.type === 'network.egress_cut')?.data;
        },
        { timeout: 10_000, interval: 200 },
      )
      .toMatchObject({ maxEgressBytes: 100_000, egressBytes: expect.any(Number) });
    // REST drops null fields (as the original does), so 0 is how a REST client removes the cap.
    const lifted = await put(box.id, { maxEgressBytes: 0 });
    expect(((await lifted.json()) as { data: { network: NetworkPolicy } }).data.network).toMatchObject({ maxEgressBytes: null, egressCut: false });
    expect(await fetchFrom(box, internet.address)).toMatchObject({ from: internet.hostAddress });
  }, 90_000);

  it("the mode changes while the sandbox is stopped and holds from its next start; the gateway's MAC stays put as sandboxes leave and join the bridge", async () => {
    const gatewayMac = readFileSync(`/sys/class/net/${bridge}/address`, 'utf8');
    await other.stop();
    expect(((await (await put(other.id, { mode: 'none' })).json()) as { data: { network: NetworkPolicy } }).data.network.mode).toBe('none');
    await other.start();
    expect(await restGet(other.id)).toMatchObject({ ip: '', network: { mode: 'none' } });
    expect(await fetchFrom(other, internet.address)).toBeNull();
    await other.stop();
    expect((await put(other.id, { mode: 'bridge' })).status).toBe(200);
    await other.start();
    expect((await restGet(other.id)).ip).toMatch(new RegExp(`^${subnet.replace(/\./g, '\\.')}\\.`));
    expect(await fetchFrom(other, internet.address)).toMatchObject({ from: internet.hostAddress });
    // Regression: a sandbox leaving and joining the bridge changed the gateway's MAC (a bridge takes its
    // ports' lowest unless set), cutting every other sandbox off until its ARP entry expired.
    // Whether a port's MAC undercuts the bridge's is chance; that its MAC is set (addr_assign_type 3) is not.
    expect(readFileSync(`/sys/class/net/${bridge}/addr_assign_type`, 'utf8').trim()).toBe('3');
    expect(readFileSync(`/sys/class/net/${bridge}/address`, 'utf8')).toBe(gatewayMac);
    expect(await fetchFrom(box, 'allowed.test')).toMatchObject({ from: internet.hostAddress });
  }, 120_000);

  it("a restarted server keeps a running sandbox's policy (its resolver and PUT work again) and removes rules no sandbox owns", async () => {
    expect((await put(box.id, { egress: 'deny', allow: ['allowed.test'], deny: [] })).status).toBe(200);
    await server.close({ keepState: true });
    // What a server killed mid-delete could leave: the rules of a sandbox that has no record.
    const orphan = newId();
    await new EgressFirewall({ bridge, gateway, networkCidr: net.networkCidr }).apply({ id: orphan, ip: `${subnet}.250`, hostIf: '' }, policy({}));
    expect((await readEgressTable(bridge)).chains).toContain(orphan);
    server = await startTestServer(serverEnv(), server.dirs);
    vr = server.client(apiKey);
    box = await vr.sandboxes.get(box.id);
    const table = await readEgressTable(bridge);
    expect(table.chains).not.toContain(orphan);
    expect([...table.sources.values()]).not.toContain(orphan);
    const startup = server.logLines.filter((l) => /reconcile|egress/.test(l)).join('\n');
    expect(await fetchFrom(box, 'allowed.test'), startup).toMatchObject({ from: internet.hostAddress });
    expect(await resolves(box, 'blocked.test')).toBe(false);
    expect(await fetchFrom(box, blocked)).toBeNull();
    expect((await put(box.id, { egress: 'allow', allow: [] })).status).toBe(200);
    expect(await fetchFrom(box, blocked)).toMatchObject({ at: blocked });
  }, 180_000);

  it('delete leaves no rule or set behind, and setup-net --down removes the table', async () => {
    const before = await readEgressTable(bridge);
    expect(before.chains).toContain(box.id);
    await box.delete();
    const after = await readEgressTable(bridge);
    expect(after.chains).not.toContain(box.id);
    expect(after.sets.filter((s) => s.includes(box.id))).toEqual([]);
    expect([...after.sources.values()]).not.toContain(box.id);
    closed = true;
    await server.close();
    expect(await tearDown(net)).toContain(`deleted the egress firewall (nftables table ip voidrun_${bridge})`);
    expect((await readEgressTable(bridge)).exists).toBe(false);
  }, 90_000);
});
