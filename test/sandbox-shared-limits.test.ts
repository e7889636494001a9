import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SandboxHandle } from '../client/index.js';
import { canRaiseRlimits, HOST_EPOLL_WATCHES_MAX, HOST_INOTIFY_MAX, SANDBOX_RLIMITS, SANDBOX_USERNS_LIMITS, sysctlFile } from '../server/hypervisor/container/kernel-limits.js';
import { support } from './helpers/sandbox-support.js';
import { startTestServer, uniqueEmail, type TestServer } from './helpers/server.js';

/** x86_64 syscall numbers, for perl's syscall() (the image has perl-base, no compiler). */
const SYS = { mq_open: 240, timer_create: 222, fanotify_init: 300, epoll_create1: 291, epoll_ctl: 233 };
const FAN_REPORT_FID = 0x200;
const F_SETPIPE_SZ = 1031;
const rlimit = (type: string) => SANDBOX_RLIMITS.find((r) => r.type === type)!.hard;
/** Separate message queue and signal budgets need runc started with raised hard rlimits. */
const rlimitsRaisable = support.ok && canRaiseRlimits();
if (support.ok && !rlimitsRaisable) console.warn('[sandbox tests] SKIPPED message queue and pending signal tests: this host gives root no CAP_SYS_RESOURCE');

// Every sandbox maps its root onto the same host uid, and host root (runc) creates every sandbox's
// user namespace: these tests check that one sandbox using a kernel budget counted per host uid or
// charged to the namespace's creator leaves another sandbox's budget alone.
describe.skipIf(!support.ok)('kernel limits container sandboxes would share', () => {
  let server: TestServer;
  let a: SandboxHandle;
  let b: SandboxHandle;

  beforeAll(async () => {
    server = await startTestServer();
    const org = async (name: string) => server.client((await server.client().trpc.auth.register.mutate({ name, email: uniqueEmail(name.toLowerCase()) })).apiKey);
    [a, b] = await Promise.all([(await org('Hog')).sandboxes.create({ name: 'hog' }), (await org('Victim')).sandboxes.create({ name: 'victim' })]);
  }, 180_000);
  afterAll(async () => {
    await Promise.all([a?.delete(), b?.delete()]);
    await server?.close();
  });

  const sh = async (box: SandboxHandle, command: string) => (await box.exec(command)).stdout.trim();
  /**
   * Starts `perl` in A (children write one result line each to /tmp/<tag>.<n> and then hold what
   * they took) and returns the `count` result lines once all are written, and a stop function.
   */
  const hold = async (tag: string, count: number, perl: string) => {
    const hog = await a.commands.run(`perl -e '${perl}'`);
    const lines = await sh(a, `while [ "$(ls /tmp/${tag}.* 2>/dev/null | wc -l)" -lt ${count} ]; do sleep 0.05; done; cat /tmp/${tag}.*`);
    return { lines: lines.split('\n'), stop: () => hog.kill() };
  };

  it.skipIf(!rlimitsRaisable)('one sandbox holding the message queues it can, as several uids, leaves another sandbox\'s mq_open working', async () => {
    // Three uids, each creating default queues (~80 KiB each) until its RLIMIT_MSGQUEUE refuses
    // (EMFILE): more in all than the 800 KiB that was once every sandbox's shared budget.
    const { lines, stop } = await hold('mq', 3, `for $u (0..2) { next if fork; $< = $> = $u + 1; $n = 0; $n++ while syscall(${SYS.mq_open}, "hog$u.$n", 0102, 0600, 0) >= 0; $e = $! + 0; open(my $o, ">", "/tmp/mq.$u"); print $o "$n $e\\n"; close $o; sleep 600; exit } sleep 600`);
    // A default queue is 10 messages of 8 KiB plus its index: 9 fit in 800 KiB.
    expect(rlimit('RLIMIT_MSGQUEUE')).toBe(819_200);
    expect(lines).toEqual(Array(3).fill('9 24'));
    try {
      expect(await sh(b, `perl -e '$q = syscall(${SYS.mq_open}, "victim", 0102, 0600, 0); print $q >= 0 ? "ok" : "errno=" . ($! + 0)'`)).toBe('ok');
    } finally {
      await stop();
      await sh(a, 'rm -f /dev/mqueue/hog*');
    }
  });

  it.skipIf(!rlimitsRaisable)("one sandbox queueing all the signals it can, as several uids, leaves another sandbox's timer_create working", async () => {
    // Two children (uids 1 and 2) block signal 34; A queues it to each until their SigQ is full:
    // 2 × RLIMIT_SIGPENDING in all, more than the host default once shared by every sandbox.
    const { lines, stop } = await hold('sigq', 2, `use POSIX; for $u (1, 2) { $p = fork; if (!$p) { $< = $> = $u; sigprocmask(SIG_BLOCK, POSIX::SigSet->new(34)); open(my $o, ">", "/tmp/ready.$u"); close $o; sleep 600; exit } select(undef, undef, undef, 0.01) until -e "/tmp/ready.$u"; kill 34, $p for 1..${rlimit('RLIMIT_SIGPENDING') + 1000}; open(my $f, "<", "/proc/$p/status"); ($q) = grep { /^SigQ/ } <$f>; open(my $o, ">", "/tmp/sigq.$u"); print $o $q; close $o } sleep 600`);
    expect(lines).toEqual(Array(2).fill(`SigQ:\t${rlimit('RLIMIT_SIGPENDING')}/${rlimit('RLIMIT_SIGPENDING')}`));
    try {
      expect(await sh(b, `perl -e '$t = "\\0" x 8; $r = syscall(${SYS.timer_create}, 1, 0, $t); print $r == 0 ? "ok" : "errno=" . ($! + 0)'`)).toBe('ok');
    } finally {
      await stop();
    }
  });

  it("one sandbox holding all the fanotify groups it can, as several uids, leaves another sandbox's (and host root's) fanotify_init working", async () => {
    expect(Number(readFileSync(sysctlFile('fs.fanotify.max_user_groups'), 'utf8'))).toBe(HOST_INOTIFY_MAX);
    // A cannot raise its own limit.
    expect(await sh(a, 'cat /proc/sys/user/max_fanotify_groups; sh -c "echo 1000000 > /proc/sys/user/max_fanotify_groups" 2>&1')).toMatch(new RegExp(`^${SANDBOX_USERNS_LIMITS.max_fanotify_groups}\n.*Read-only file system`));
    const { lines, stop } = await hold('fan', 3, `for $u (0..2) { next if fork; $> = $u; $n = 0; $n++ while syscall(${SYS.fanotify_init}, ${FAN_REPORT_FID}, 0) >= 0; $e = $! + 0; $> = 0; open(my $o, ">", "/tmp/fan.$u"); print $o "$n $e\\n"; close $o; sleep 600; exit } sleep 600`);
    // Each stopped by its sandbox's per-uid limit (EMFILE): 3 × 128, more than the host's default.
    expect(lines).toEqual(Array(3).fill(`${SANDBOX_USERNS_LIMITS.max_fanotify_groups} 24`));
    const probe = `perl -e '$f = syscall(${SYS.fanotify_init}, ${FAN_REPORT_FID}, 0); print $f >= 0 ? "ok" : "errno=" . ($! + 0)'`;
    try {
      expect(await sh(b, probe)).toBe('ok');
      expect(execFileSync('sh', ['-c', probe], { encoding: 'utf8' })).toBe('ok');
    } finally {
      await stop();
    }
  });

  it("one sandbox holding 1 MiB pipes past the host's per-uid pipe budget leaves another sandbox's F_SETPIPE_SZ working", async () => {
    expect(readFileSync(sysctlFile('fs.pipe-user-pages-soft'), 'utf8').trim()).toBe('0');
    // 100 pipes of 1 MiB: more than the 64 MiB (fs.pipe-user-pages-soft's default) every sandbox shared.
    const { lines, stop } = await hold('pipes', 1, `$n = 0; for (1..100) { pipe(my $r, my $w) or last; push @p, $r, $w; $n++ if fcntl($w, ${F_SETPIPE_SZ}, 1048576) } open(my $o, ">", "/tmp/pipes.0"); print $o "$n\\n"; close $o; sleep 600`);
    expect(lines).toEqual(['100']);
    try {
      expect(await sh(b, `perl -e 'pipe($r, $w); print fcntl($w, ${F_SETPIPE_SZ}, 1048576) ? "ok" : "errno=" . ($! + 0)'`)).toBe('ok');
    } finally {
      await stop();
    }
  });

  it("the host's epoll watch limit is not one sandbox can exhaust: it is the kernel's maximum, and a sandbox's watches are charged to its memory cgroup", async () => {
    expect(readFileSync(sysctlFile('fs.epoll.max_user_watches'), 'utf8').trim()).toBe(HOST_EPOLL_WATCHES_MAX);
    const init = readFileSync(join(server.dirs.instancesDir, a.id, 'init.pid'), 'utf8').trim();
    // Its memory cgroup's usage: cgroup v2's unified file, or v1's memory controller.
    const cgroups = readFileSync(`/proc/${init}/cgroup`, 'utf8');
    const v1 = /^\d+:memory:(.+)$/m.exec(cgroups)?.[1];
    const usageFile = v1 ? `/sys/fs/cgroup/memory${v1}/memory.usage_in_bytes` : `/sys/fs/cgroup${/^0::(.+)$/m.exec(cgroups)![1]}/memory.current`;
    const usage = () => Number(readFileSync(usageFile, 'utf8'));
    const before = usage();
    // 250 pipes' 500 descriptors, each added to 400 epoll instances: 200,000 watches.
    const { lines, stop } = await hold('epoll', 1, `for (1..250) { pipe(my $r, my $w); push @fds, fileno($r), fileno($w); push @keep, $r, $w } $ev = pack("LQ", 1, 0); $n = 0; for (1..400) { $ep = syscall(${SYS.epoll_create1}, 0); for $fd (@fds) { $n++ if syscall(${SYS.epoll_ctl}, $ep, 1, $fd, $ev) == 0 } } open(my $o, ">", "/tmp/epoll.0"); print $o "$n\\n"; close $o; sleep 600`);
    expect(lines).toEqual(['200000']);
    try {
      // An epoll watch is an epitem and an eppoll_entry, together well over 128 bytes.
      expect(usage() - before).toBeGreaterThan(200_000 * 128);
      expect(await sh(b, 'echo still serving')).toBe('still serving');
    } finally {
      await stop();
    }
  });
});
