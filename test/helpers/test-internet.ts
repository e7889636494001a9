import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, unlinkSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** `ip` with these arguments; resolves to its stdout. */
export const ip = async (...args: string[]): Promise<string> => (await run('ip', args)).stdout;

/** Whether `name` is installed in one of the system's binary directories. */
export const onPath = (name: string): boolean => ['/usr/sbin', '/sbin', '/usr/bin', '/bin'].some((dir) => existsSync(`${dir}/${name}`));

export interface TestInternet {
  /** The namespace's name. */
  ns: string;
  /** Where its HTTP server listens (port 8080). */
  address: string;
  /** The host's end of the link: what a masqueraded sandbox appears to come from. */
  hostAddress: string;
  close(): Promise<void>;
}

export type TestNet = '192.0.2' | '198.51.100' | '203.0.113';

const toInt = (address: string) => address.split('.').reduce((n, part) => n * 256 + Number(part), 0);

/**
 * The IPv4 ranges this machine already uses: its own interfaces' networks and every route but the
 * default. A CI machine may sit on a TEST-NET itself (one runs on 192.0.2.0/24), so a test address
 * picked at random from one can be the host's own or its gateway's.
 */
async function usedRanges(): Promise<Array<[number, number]>> {
  const ranges: Array<[number, number]> = [];
  const add = (address: string, prefix: number) => {
    const size = 2 ** (32 - prefix);
    const start = Math.floor(toInt(address) / size) * size;
    ranges.push([start, start + size - 1]);
  };
  for (const link of JSON.parse(await ip('-j', '-4', 'addr')) as Array<{ addr_info?: Array<{ local: string; prefixlen: number }> }>)
    for (const a of link.addr_info ?? []) add(a.local, a.prefixlen);
  for (const r of JSON.parse(await ip('-j', '-4', 'route')) as Array<{ dst: string }>) {
    if (r.dst === 'default') continue;
    const [address, prefix] = r.dst.split('/');
    add(address!, prefix === undefined ? 32 : Number(prefix));
  }
  return ranges;
}

const claimDir = '/tmp/voidrun-test-nets';

/**
 * Claims `size` consecutive addresses (aligned) of `testNet` that nothing on this machine uses and
 * no other test process has claimed (test files run in parallel and each builds its own links):
 * a claim is a file created exclusively under /tmp/voidrun-test-nets, holding the claimer's pid so a
 * killed run's claims are taken back.
 */
export async function claimTestBlock(testNet: TestNet, size: 1 | 4): Promise<{ first: number; release(): void }> {
  mkdirSync(claimDir, { recursive: true });
  const used = await usedRanges();
  const netStart = toInt(`${testNet}.0`);
  const free: number[] = [];
  for (let first = size === 1 ? 1 : 0; first + size <= (size === 1 ? 255 : 256); first += size) {
    const [a, b] = [netStart + first, netStart + first + size - 1];
    if (!used.some(([s, e]) => a <= e && b >= s)) free.push(first);
  }
  while (free.length) {
    const first = free.splice(randomInt(0, free.length), 1)[0]!;
    const file = `${claimDir}/${testNet}.${Math.floor(first / 4) * 4}`;
    try {
      writeFileSync(file, String(process.pid), { flag: 'wx' });
    } catch {
      const holder = Number(readFileSync(file, 'utf8').trim() || 0);
      let alive = holder === process.pid;
      try {
        if (!alive && holder) {
          process.kill(holder, 0);
          alive = true;
        }
      } catch {}
      if (alive) continue;
      try {
        unlinkSync(file);
        writeFileSync(file, String(process.pid), { flag: 'wx' });
      } catch {
        continue;
      }
    }
    const release = () => {
      try {
        unlinkSync(file);
      } catch {}
    };
    return { first, release };
  }
  throw new Error(`no free address block of ${size} left in ${testNet}.0/24 on this machine`);
}

/** An address of some TEST-NET that this machine does not use and no other test has claimed, with its release. */
export async function freeTestAddress(): Promise<{ address: string; release(): void }> {
  const nets: TestNet[] = ['192.0.2', '198.51.100', '203.0.113'];
  const start = randomInt(0, nets.length);
  for (const testNet of [...nets.slice(start), ...nets.slice(0, start)]) {
    try {
      const block = await claimTestBlock(testNet, 1);
      return { address: `${testNet}.${block.first}`, release: block.release };
    } catch {}
  }
  throw new Error('no free TEST-NET address left on this machine');
}

/**
 * A test "internet": a network namespace `<name>` joined to the host by a veth pair (host end
 * `<hostIf>`) with a random /30 of a TEST-NET range (`198.51.100` or `203.0.113`, never routed on
 * the real internet) and no route back to the sandboxes' network, so a sandbox reaching it proves
 * the masquerade. Its HTTP server on port 8080 answers with JSON `{from, received}`: the address
 * it sees the client come from and how many body bytes it received.
 */
export async function startTestInternet(opts: { name: string; hostIf: string; testNet: TestNet }): Promise<TestInternet> {
  const { name: ns, hostIf } = opts;
  const block = await claimTestBlock(opts.testNet, 4);
  const base = block.first;
  const hostAddress = `${opts.testNet}.${base + 1}`;
  const address = `${opts.testNet}.${base + 2}`;
  await ip('netns', 'add', ns);
  await ip('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
  await ip('addr', 'add', `${hostAddress}/30`, 'dev', hostIf);
  await ip('link', 'set', hostIf, 'up');
  await ip('-n', ns, 'addr', 'add', `${address}/30`, 'dev', 'eth0');
  for (const dev of ['eth0', 'lo']) await ip('-n', ns, 'link', 'set', dev, 'up');
  const server: ChildProcess = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', `
    require('node:http').createServer((req, res) => {
      let received = 0;
      req.on('data', (d) => (received += d.length));
      req.on('end', () => res.end(JSON.stringify({ from: req.socket.remoteAddress, received })));
    }).listen(8080, ${JSON.stringify(address)}, () => console.log('listening'));
  `]);
  await new Promise<void>((resolve, reject) => {
    server.stdout!.once('data', () => resolve());
    server.once('exit', (code) => reject(new Error(`test internet server exited with ${code}`)));
  });
  return {
    ns,
    address,
    hostAddress,
    async close() {
      const exited = server.exitCode === null ? new Promise((r) => server.once('exit', r)) : null;
      server.kill();
      await exited;
      await ip('netns', 'del', ns).catch(() => {});
      await ip('link', 'del', hostIf).catch(() => {});
      block.release();
    },
  };
}

/**
 * A shell command for a sandbox that POSTs `bytes` bytes to `address`:`port` with bash's /dev/tcp
 * (giving up after 10 s) and prints the answer's last line (the body).
 */
export function fetchCommand(address: string, bytes = 0, port = 8080): string {
  const body = bytes ? `head -c ${bytes} /dev/zero >&3; ` : '';
  return `timeout 10 bash -c "exec 3<>/dev/tcp/${address}/${port} && printf 'POST / HTTP/1.0\\r\\nContent-Length: ${bytes}\\r\\n\\r\\n' >&3 && ${body}sed -n '\\$p' <&3"`;
}
