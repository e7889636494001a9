import { describe, expect, it } from 'vitest';
import { blockedSyscalls } from './seccomp-profile.js';
import { buildOciSpec, defaultCapabilities, type OciSpecOptions } from './oci-spec.js';

const base: OciSpecOptions = {
  spec: { id: 'abc', name: 'box-1', rootfs: '/images/debian/rootfs', image: 'debian', cpu: 2, memMb: 1024, diskMb: 5120, envVars: { FOO: 'bar' } },
  paths: { rootfs: '/inst/abc/rootfs', runtime: { dir: '/run/voidrun/agent-runtime/0123', hash: '0123', loader: true } },
  idMap: { hostId: 200000, size: 65536 },
  pidsLimit: 1024,
  cgroupsPath: '/voidrun/vr-abc',
};

function withSpec(patch: Partial<OciSpecOptions['spec']>): OciSpecOptions {
  return { ...base, spec: { ...base.spec, ...patch } };
}

describe('buildOciSpec', () => {
  it.each([
    ['1 cpu, 1 GiB', withSpec({ cpu: 1, memMb: 1024 }), { quota: 100_000, mem: 1024 * 1024 * 1024 }],
    ['2 cpus, 2 GiB', withSpec({ cpu: 2, memMb: 2048 }), { quota: 200_000, mem: 2 * 1024 * 1024 * 1024 }],
    ['8 cpus, 16 GiB', withSpec({ cpu: 8, memMb: 16384 }), { quota: 800_000, mem: 16 * 1024 * 1024 * 1024 }],
  ])('turns %s into cgroup limits with no swap beyond memory', (_name, opts, want) => {
    const r = buildOciSpec(opts).linux.resources;
    expect(r.cpu).toEqual({ quota: want.quota, period: 100_000 });
    expect(r.memory).toEqual({ limit: want.mem, swap: want.mem });
    expect(r.pids).toEqual({ limit: 1024 });
  });

  it.each([
    ['root maps onto the unprivileged range', { hostId: 200000, size: 65536 }],
    ['another range', { hostId: 300000, size: 65536 }],
  ])('maps uids and gids: %s', (_name, idMap) => {
    const l = buildOciSpec({ ...base, idMap }).linux;
    expect(l.uidMappings).toEqual([{ containerID: 0, hostID: idMap.hostId, size: idMap.size }]);
    expect(l.gidMappings).toEqual(l.uidMappings);
  });

  it('gives the sandbox its own pid, ipc, uts, mount, network, user and cgroup namespaces', () => {
    expect(buildOciSpec(base).linux.namespaces.map((n) => n.type).sort()).toEqual(['cgroup', 'ipc', 'mount', 'network', 'pid', 'user', 'uts']);
    expect(buildOciSpec(base).linux.namespaces.every((n) => !('path' in n))).toBe(true);
  });

  it('on the bridge joins the host-made network namespace by path and binds its sysfs and resolv.conf read-only', () => {
    const network = { netnsPath: '/run/netns/vr-vmbr0-abc', sysfsPath: '/run/voidrun-net/vmbr0/abc/sys', resolvConfPath: '/run/voidrun-net/vmbr0/abc/resolv.conf' };
    const spec = buildOciSpec({ ...base, network });
    expect(spec.linux.namespaces).toContainEqual({ type: 'network', path: network.netnsPath });
    expect(spec.linux.namespaces.filter((n) => n.type === 'network')).toHaveLength(1);
    expect(spec.linux.namespaces).toContainEqual({ type: 'user' });
    const mount = (destination: string) => spec.mounts.filter((m) => m.destination === destination);
    expect(mount('/sys')).toEqual([{ destination: '/sys', type: 'bind', source: network.sysfsPath, options: ['rbind', 'ro', 'nosuid', 'noexec', 'nodev'] }]);
    expect(mount('/etc/resolv.conf')).toEqual([{ destination: '/etc/resolv.conf', type: 'bind', source: network.resolvConfPath, options: ['rbind', 'ro', 'nosuid', 'nodev'] }]);
    // Without it: a sysfs of the sandbox's own, and the image's resolv.conf.
    expect(buildOciSpec(base).mounts.filter((m) => m.destination === '/sys')).toEqual([{ destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] }]);
    expect(buildOciSpec(base).mounts.some((m) => m.destination === '/etc/resolv.conf')).toBe(false);
  });

  it.each([
    ['web.prod-1', 'web.prod-1'],
    ['a'.repeat(63), 'a'.repeat(63)],
    [`${'a'.repeat(62)}-b${'c'.repeat(20)}`, 'a'.repeat(62)],
    [`${'x'.repeat(70)}.example.com`, 'x'.repeat(63)],
  ])('sets the hostname from the sandbox name %s (at most 63 characters)', (name, hostname) => {
    expect(buildOciSpec(withSpec({ name })).hostname).toBe(hostname);
  });

  it('refuses clone() with namespace flags and clone3', () => {
    const rules = buildOciSpec(base).linux.seccomp.syscalls;
    const cloneRules = rules.filter((r) => r.names.includes('clone'));
    expect(cloneRules.map((r) => (r as { args: Array<{ value: number }> }).args[0]!.value).reduce((a, b) => a | b, 0)).toBe(0x7e020000);
    expect(rules.find((r) => r.names.includes('clone3'))).toMatchObject({ action: 'SCMP_ACT_ERRNO', errnoRet: 38 });
  });

  it('binds only the agent runtime image from the host, read-only: no host directory of the server, its node_modules or its dist/', () => {
    const binds = buildOciSpec(base).mounts.filter((m) => m.type === 'bind');
    expect(binds.map((m) => [m.source, m.destination])).toEqual([
      ['/run/voidrun/agent-runtime/0123/agent', '/opt/voidrun'],
      ['/run/voidrun/agent-runtime/0123/empty', '/etc/ld.so.preload'],
    ]);
    for (const m of binds) expect(m.options).toEqual(expect.arrayContaining(['ro', 'nosuid', 'nodev']));
  });

  it('runs node directly when it is statically linked (no loader in the runtime)', () => {
    const p = buildOciSpec({ ...base, paths: { ...base.paths, runtime: { ...base.paths.runtime, loader: false } } }).process;
    expect(p.args.slice(3, 5)).toEqual(['/opt/voidrun/node', '--openssl-config=/opt/voidrun/openssl.cnf']);
  });

  it("runs the agent under the host-mounted init (not a file of the image); the sandbox's envVars reach it encoded, never as its own environment", () => {
    const envVars = { FOO: 'bar', NODE_OPTIONS: '--require /evil.js', VOIDRUN_AGENT_FD: '7' };
    const p = buildOciSpec(withSpec({ envVars })).process;
    expect(p.args.slice(0, 3)).toEqual(['/opt/voidrun/init', String(1024 * 1024), '--']);
    // Through the host's loader and libraries, with an empty OpenSSL config: nothing of the image runs in the agent.
    expect(p.args.slice(3)).toEqual([
      '/opt/voidrun/lib/ld.so',
      '--inhibit-cache',
      '--library-path',
      '/opt/voidrun/lib',
      '/opt/voidrun/node',
      '--openssl-config=/opt/voidrun/openssl.cnf',
      '--max-semi-space-size=2',
      '--v8-pool-size=1',
      '/opt/voidrun/agent.cjs',
    ]);
    expect(p.env).toContain('VOIDRUN_AGENT_FD=3');
    expect(p.env).not.toContain('VOIDRUN_AGENT_FD=7');
    expect(p.env.filter((e) => e.startsWith('NODE_OPTIONS') || e.startsWith('FOO'))).toEqual([]);
    // The agent never looks for ws's optional modules (the image's directories are the tenant's).
    expect(p.env).toEqual(expect.arrayContaining(['WS_NO_BUFFER_UTIL=1', 'WS_NO_UTF_8_VALIDATE=1']));
    const encoded = p.env.find((e) => e.startsWith('VOIDRUN_SANDBOX_ENV='))!.split('=')[1]!;
    expect(JSON.parse(Buffer.from(encoded, 'base64').toString())).toEqual(envVars);
    expect(p.user).toEqual({ uid: 0, gid: 0 });
  });

  it("grants only a container runtime's default capabilities and blocks dangerous syscalls", () => {
    const s = buildOciSpec(base);
    expect(s.process.capabilities.bounding).toEqual(defaultCapabilities);
    expect(s.process.capabilities.bounding).not.toContain('CAP_SYS_ADMIN');
    expect(s.process.capabilities.bounding).not.toContain('CAP_NET_ADMIN');
    const blocked = s.linux.seccomp.syscalls[0]!;
    expect(blocked.action).toBe('SCMP_ACT_ERRNO');
    for (const call of ['mount', 'kexec_load', 'bpf', 'setns', 'unshare', 'init_module']) expect(blocked.names).toContain(call);
    expect(blocked.names).toEqual([...blockedSyscalls]);
    expect(s.linux.maskedPaths).toContain('/proc/kcore');
    // Loop devices' backing files name every sandbox's disk image on the host.
    expect(s.linux.maskedPaths).toContain('/sys/devices/virtual/block');
    expect(s.linux.readonlyPaths).toContain('/proc/sys');
  });

  // Without CAP_SYS_PTRACE, as under Docker's default profile: no reading, writing or copying
  // another process's memory or descriptors, even one with the same uid.
  it.each(['ptrace', 'process_vm_readv', 'process_vm_writev', 'pidfd_getfd', 'process_madvise', 'kcmp'])('refuses %s with EPERM', (call) => {
    const rule = buildOciSpec(base).linux.seccomp.syscalls.find((r) => r.names.includes(call));
    expect(rule).toMatchObject({ action: 'SCMP_ACT_ERRNO', errnoRet: 1 });
    expect(rule).not.toHaveProperty('args');
  });

  it("gives the sandbox's processes their own message queue, pending signal and memlock limits, equal soft and hard", () => {
    const rlimits = buildOciSpec(base).process.rlimits;
    expect(rlimits.map((r) => r.type).sort()).toEqual(['RLIMIT_MEMLOCK', 'RLIMIT_MSGQUEUE', 'RLIMIT_SIGPENDING']);
    expect(rlimits.find((r) => r.type === 'RLIMIT_MSGQUEUE')).toEqual({ type: 'RLIMIT_MSGQUEUE', soft: 819_200, hard: 819_200 });
    expect(rlimits.every((r) => r.soft === r.hard && r.hard > 0)).toBe(true);
  });

  it('roots the container at the overlay mount, writable', () => {
    expect(buildOciSpec(base).root).toEqual({ path: '/inst/abc/rootfs', readonly: false });
    expect(buildOciSpec(base).linux.cgroupsPath).toBe('/voidrun/vr-abc');
  });
});
