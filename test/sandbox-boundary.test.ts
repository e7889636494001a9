import { execFileSync } from 'node:child_process';
import { appendFileSync, copyFileSync, existsSync, mkdtempSync, readFileSync, readlinkSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle, VoidRunClient } from '../client/index.js';
import type { WatchMessage } from '../shared/index.js';
import { ensureAgentBundle } from '../server/agent-client/agent-bundle.js';
import { AGENT_RUNTIME_MOUNTS, ensureAgentRuntime } from '../server/hypervisor/container/agent-runtime.js';
import { agentRuntimeSources, BOOT_FILES_DIR, ensureStaticHelpers } from '../server/hypervisor/container/boot-files.js';
import { SANDBOX_INOTIFY } from '../server/hypervisor/container/kernel-limits.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/** x86_64 syscall numbers, for perl's syscall() (the image has perl-base, no compiler). */
const SYS = { pidfd_open: 434, pidfd_getfd: 438, inotify_init: 253 };
/** The agent's pid inside the sandbox: the oldest process running the agent bundle. */
// The agent is PID 1's (our init's) child; init's own command line ends in agent.cjs too.
const AGENT = "agent=$(pgrep -P 1 -o -f '/opt/voidrun/agent.cjs$')";

describe.skipIf(!support.ok)('the container sandbox boundary', () => {
  let server: TestServer;
  let vr: VoidRunClient;
  let box: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer();
    const reg = await server.client().trpc.auth.register.mutate({ name: 'Boundary User', email: uniqueEmail('boundary') });
    vr = server.client(reg.apiKey);
    box = await vr.sandboxes.create({ name: 'boundary' });
  }, 180_000);
  afterAll(async () => {
    await server?.close();
  });

  const sh = async (command: string) => (await box.exec(command)).stdout.trim();

  it('a sandbox command cannot set up io_uring (a kernel surface the profile refuses)', async () => {
    // io_uring_setup(8, params): 425 on x86_64; the params struct is 120 bytes.
    const out = await sh(`perl -e '$p = "\\0" x 120; $r = syscall(425, 8, $p); print "r=$r errno=", $!+0, "\\n"'`);
    expect(out).toBe('r=-1 errno=1');
  });

  it("a sandbox cannot see other sandboxes' disks: their I/O counters, filesystems or loop devices", async () => {
    const other = await vr.sandboxes.create({ name: 'boundary-neighbour' });
    await other.exec('head -c 1048576 /dev/zero > /root/busy && sync');
    const out = await sh('cat /proc/diskstats 2>&1 | wc -l; ls /proc/fs /sys/fs/ext4 /sys/block /sys/class/block 2>/dev/null | grep -c loop');
    expect(out.split('\n')).toEqual(['0', '0']);
    await other.delete();
  });

  it("a sandbox command cannot copy the agent's listening socket with pidfd_getfd", async () => {
    const out = await sh(`${AGENT}; perl -e '$p = syscall(${SYS.pidfd_open}, $ARGV[0] + 0, 0); $fd = syscall(${SYS.pidfd_getfd}, $p, 3, 0); print "pidfd=", ($p >= 0 ? "ok" : "fail"), " getfd=$fd errno=", $!+0, "\\n"' $agent`);
    expect(out).toBe('pidfd=ok getfd=-1 errno=1');
  });

  it("a sandbox command cannot write the agent's memory through /proc/<pid>/mem, nor read its descriptors or environment", async () => {
    const out = await sh(`${AGENT}; for f in mem fd/3 environ; do perl -e 'open(my $h, "+<", $ARGV[0]) || open($h, "<", $ARGV[0]) ? print "$ARGV[0] open\\n" : print "$ARGV[0] $!\\n"' /proc/$agent/$f; done; readlink /proc/$agent/fd/3 || echo link-refused`);
    expect(out.split('\n').map((l) => l.replace(/^\/proc\/\d+\//, ''))).toEqual(['mem Permission denied', 'fd/3 Permission denied', 'environ Permission denied', 'link-refused']);
    // The commands it starts are ordinary processes again: their own /proc entries are theirs.
    expect(await sh('sleep 5 & ls /proc/$!/fd | wc -l; kill $!')).not.toBe('0');
  });

  it("replacing /usr/bin/tini in the writable layer does not give PID 1 the agent's socket", async () => {
    const sb = await vr.sandboxes.create({ name: 'init-swap' });
    // A fake init that would record what it holds and then run the agent as usual.
    await sb.exec(`printf '#!/bin/sh\\nls -l /proc/self/fd > /root/pid1-fds\\nexec "$@"\\n' > /usr/bin/tini && chmod +x /usr/bin/tini`);
    const cannot = (await sb.exec('sh -c "echo x > /opt/voidrun/init" 2>&1; rm -f /opt/voidrun/init 2>&1; mv /opt/voidrun/init /root/ 2>&1; readlink /proc/1/fd/3 2>&1 || echo fd3-refused')).stdout;
    expect(cannot).toMatch(/Read-only file system/);
    expect(cannot).toMatch(/rm: cannot remove '\/opt\/voidrun\/init': Read-only file system/);
    expect(cannot).toMatch(/fd3-refused/);
    await sb.stop();
    await sb.start();
    expect((await sb.exec('test -e /root/pid1-fds && echo ran || echo not-run; tr "\\0" " " < /proc/1/cmdline')).stdout).toMatch(/^not-run\n\/opt\/voidrun\/init /);
    // From the host: PID 1 holds no socket at all (only its log, the agent's output pipe, a signalfd).
    const init = readFileSync(join(server.dirs.instancesDir, sb.id, 'init.pid'), 'utf8').trim();
    const fds = readdirSync(`/proc/${init}/fd`).map((fd) => readlinkSync(`/proc/${init}/fd/${fd}`));
    expect(fds.filter((target) => target.startsWith('socket:'))).toEqual([]);
    expect((await sb.exec('echo still serving')).stdout).toBe('still serving\n');
    await sb.delete();
  });

  it("a sandbox command cannot write to its host-side sandbox.log through PID 1's or the agent's descriptors", async () => {
    // Copying the descriptor (no permission check on the file) or reopening it through /proc.
    const copy = `perl -e '$p = syscall(${SYS.pidfd_open}, $ARGV[0] + 0, 0); $fd = syscall(${SYS.pidfd_getfd}, $p, $ARGV[1] + 0, 0); if ($fd >= 0 && open(my $h, ">&=", $fd)) { print $h "grow\\n"; print "wrote\\n" } else { print "refused\\n" }'`;
    const out = await sh(`${AGENT}; for pid in 1 $agent; do for fd in 1 2; do ${copy} $pid $fd; sh -c "echo grow >> /proc/$pid/fd/$fd" 2>/dev/null && echo wrote || echo refused; done; done`);
    expect(out.split('\n')).toEqual(Array(8).fill('refused'));
    expect(readFileSync(join(server.dirs.instancesDir, box.id, 'sandbox.log'), 'utf8')).not.toContain('grow');
  });

  it('a library, preload list or OpenSSL config written into the image does not load into the agent', async () => {
    const sb = await vr.sandboxes.create({ name: 'loader-swap' });
    const refused = await sb.exec(`sh -c 'echo /root/evil.so > /etc/ld.so.preload' 2>&1; printf garbage > /root/evil.so
      cp /root/evil.so "$(readlink -f /usr/lib/x86_64-linux-gnu/libstdc++.so.6)"
      printf 'nodejs_conf = c\\n[c]\\nproviders = p\\n[p]\\nevil = e\\n[e]\\nmodule = /root/evil.so\\nactivate = 1\\n' > /etc/ssl/openssl.cnf`);
    expect(refused.stdout).toMatch(/Read-only file system/);
    await sb.stop();
    await sb.start();
    expect((await sb.exec('echo still serving')).stdout).toBe('still serving\n');
    const init = readFileSync(join(server.dirs.instancesDir, sb.id, 'init.pid'), 'utf8').trim();
    const agent = readFileSync(`/proc/${init}/task/${init}/children`, 'utf8').trim().split(' ')[0];
    const maps = readFileSync(`/proc/${agent}/maps`, 'utf8');
    expect(maps).toContain('/opt/voidrun/lib/libstdc++.so.6');
    expect(maps).not.toMatch(/\/usr\/lib\/x86_64-linux-gnu\/|evil/);
    await sb.delete();
  });

  it('a Node module written where the agent would look for an optional dependency does not load into the agent', async () => {
    const sb = await vr.sandboxes.create({ name: 'module-plant' });
    // ws loads bufferutil and utf-8-validate if it can find them; they are not installed, so Node
    // would look on up the image's directories and HOME.
    const plant = 'require("fs").writeFileSync("/tmp/planted-" + process.pid, "ran"); module.exports = { mask() {}, unmask() {}, isValidUTF8: () => true };';
    await sb.exec(`for d in /node_modules /opt/node_modules /root/.node_modules /root/.node_libraries; do for m in bufferutil utf-8-validate; do mkdir -p $d/$m && printf '%s' '${plant}' > $d/$m/index.js; done; done`);
    await sb.stop();
    await sb.start();
    expect((await sb.exec('ls /tmp | grep -c planted || true')).stdout).toBe('0\n');
    expect((await sb.exec('env | grep -c ^WS_NO_ || true')).stdout).toBe('0\n'); // the agent's setting, not the commands'.
    await sb.delete();
  });

  it('PID 1 reaps orphans: a backgrounded command that outlives its shell leaves no zombie', async () => {
    const out = await sh(`(sh -c 'echo $$ > /tmp/orphan; exec sleep 0.2' &); while [ ! -s /tmp/orphan ]; do :; done; pid=$(cat /tmp/orphan);
      for i in $(seq 1 300); do [ -d /proc/$pid ] || break; sleep 0.02; done; [ -d /proc/$pid ] && awk '{print $3}' /proc/$pid/stat || echo reaped`);
    expect(out).toBe('reaped');
  });

  it("one sandbox holding all the inotify instances it can, under hundreds of uids, leaves another sandbox's file watch delivering events", async () => {
    // A cannot raise its own limit.
    expect(await sh('cat /proc/sys/user/max_inotify_instances; sh -c "echo 1000000 > /proc/sys/user/max_inotify_instances" 2>&1')).toMatch(new RegExp(`^${SANDBOX_INOTIFY.instances}\n.*Read-only file system`));
    // 60 processes, each taking every instance it can as 5 uids (0…299 in all), holding them.
    const hog = await box.commands.run(`perl -e 'for $b (0..59) { next if fork; $n = 0; for $u ($b * 5 .. $b * 5 + 4) { $> = $u; while (syscall(${SYS.inotify_init}) >= 0) { $n++ } $e = $! + 0; $> = 0 } open(my $o, ">", "/tmp/held.$b"); print $o "$n $e\\n"; close $o; sleep 600; exit } sleep 600'`);
    let held: string[] = [];
    for (let i = 0; i < 300 && held.length < 60; i++) held = (await sh('cat /tmp/held.* 2>/dev/null || true')).split('\n').filter(Boolean);
    // Each stopped by its sandbox's per-uid limit (EMFILE), none by the host's: 38,400 in all.
    expect(new Set(held)).toEqual(new Set([`${5 * SANDBOX_INOTIFY.instances} 24`]));

    const other = await vr.sandboxes.create({ name: 'watcher' });
    await other.files.mkdir('/root/w');
    const events: WatchMessage[] = [];
    const stop = other.files.watch('/root/w', (e) => events.push(e));
    for (let i = 0; i < 100 && events.length === 0; i++) await other.exec(`echo ${i} > /root/w/f${i}`);
    stop();
    expect(events.length).toBeGreaterThan(0);
    await hog.kill();
    await other.delete();
  });
});

describe.skipIf(!support.ok)('the container sandbox init', () => {
  // The init's bound, driven directly: in a sandbox only the agent reaches its output pipe (the
  // tests above show /proc/1/fd and the agent's fds are out of reach of sandbox commands).
  it("keeps a sandbox's host-side log within its bound however much the agent writes", async () => {
    const { init } = await ensureStaticHelpers();
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-init-'));
    try {
      const log = join(dir, 'sandbox.log');
      execFileSync('sh', ['-c', `"$0" 65536 -- /bin/sh -c 'for i in $(seq 1 200); do head -c 1000 /dev/zero | tr "\\0" x; echo; done; echo last line' >> "$1" 2>&1`, init, log]);
      const text = readFileSync(log, 'utf8');
      expect(statSync(log).size).toBeLessThanOrEqual(65536);
      expect(text).toMatch(/^voidrun-init: sandbox log reached 65536 bytes; earlier output dropped\n/);
      expect(text.endsWith('last line\n')).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("exits with the agent's status and forwards SIGTERM to it", async () => {
    const { init } = await ensureStaticHelpers();
    const status = (args: string[]) => {
      try {
        execFileSync(init, ['4096', '--', ...args], { stdio: 'ignore' });
        return 0;
      } catch (err) {
        return (err as { status: number }).status;
      }
    };
    expect(status(['/bin/sh', '-c', 'exit 7'])).toBe(7);
    expect(status(['/bin/sh', '-c', 'kill -TERM $PPID; sleep 5'])).toBe(128 + 15);
  });
});

describe.skipIf(!support.ok)('the agent runtime image', () => {
  const mounted = (dir: string) => readFileSync('/proc/self/mounts', 'utf8').includes(` ${dir} `);
  const attached = (image: string) => execFileSync('losetup', ['-j', image], { encoding: 'utf8' }).trim() !== '';

  it('an edited agent does not leave the previous runtime mounted: an unused runtime is unmounted with its loop device and image removed, one a running sandbox uses stays', async () => {
    const server = await startTestServer();
    const dir = mkdtempSync(join(tmpdir(), 'voidrun-runtime-'));
    try {
      const reg = await server.client().trpc.auth.register.mutate({ name: 'Runtime User', email: uniqueEmail('runtime') });
      const sb = await server.client(reg.apiKey).sandboxes.create({ name: 'on-current' });
      const sources = await agentRuntimeSources(await ensureAgentBundle());
      const current = await ensureAgentRuntime(sources, BOOT_FILES_DIR);
      // The agent as a developer's edit leaves it: another bundle, so another runtime.
      const edited = join(dir, 'agent.cjs');
      copyFileSync(sources.bundle, edited);
      appendFileSync(edited, `\n// edited ${Date.now()}\n`);
      const next = await ensureAgentRuntime({ ...sources, bundle: edited }, BOOT_FILES_DIR);
      expect(next.hash).not.toBe(current.hash);
      // The running sandbox still uses the current runtime: it stays.
      expect(mounted(current.dir)).toBe(true);
      expect((await sb.exec('echo still serving')).stdout).toBe('still serving\n');
      // Back on the current agent: the edited runtime, used by no sandbox, goes with its device and image.
      const nextImage = join(BOOT_FILES_DIR, `agent-runtime-${next.hash}.img`);
      expect(attached(nextImage)).toBe(true);
      await ensureAgentRuntime(sources, BOOT_FILES_DIR);
      expect(mounted(next.dir)).toBe(false);
      expect(existsSync(nextImage)).toBe(false);
      expect(execFileSync('losetup', ['-a'], { encoding: 'utf8' })).not.toContain(nextImage);
      expect(readdirSync(AGENT_RUNTIME_MOUNTS)).not.toContain(next.hash);
      await sb.delete();
    } finally {
      rmSync(dir, { recursive: true, force: true });
      await server.close();
    }
  }, 60_000);
});
