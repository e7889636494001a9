import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { existsSync } from 'node:fs';
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

/**
 * A test "internet": a network namespace `<name>` joined to the host by a veth pair (host end
 * `<hostIf>`) with a random /30 of a TEST-NET range (`198.51.100` or `203.0.113`, never routed on
 * the real internet) and no route back to the sandboxes' network, so a sandbox reaching it proves
 * the masquerade. Its HTTP server on port 8080 answers with JSON `{from, received}`: the address
 * it sees the client come from and how many body bytes it received.
 */
export async function startTestInternet(opts: { name: string; hostIf: string; testNet: '198.51.100' | '203.0.113' }): Promise<TestInternet> {
  const { name: ns, hostIf } = opts;
  const base = randomInt(0, 64) * 4;
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
