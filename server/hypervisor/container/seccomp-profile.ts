/**
 * The seccomp profile every container sandbox runs under: everything is allowed except the
 * syscalls container runtimes block by default (Docker's default profile refuses these to processes
 * without extra capabilities): kernel modules and keyrings, clocks, reboot, swap, BPF and perf,
 * cross-process memory and descriptor access (ptrace, process_vm_*, pidfd_getfd, process_madvise),
 * namespace escapes and obsolete syscalls. Refused calls fail with EPERM.
 */
export const blockedSyscalls = [
  'acct',
  'add_key',
  'bpf',
  'clock_adjtime',
  'clock_settime',
  'create_module',
  'delete_module',
  'finit_module',
  'get_kernel_syms',
  'get_mempolicy',
  'init_module',
  // io_uring: a large, often-exploited kernel surface (Docker's default profile refuses it too).
  'io_uring_enter',
  'io_uring_register',
  'io_uring_setup',
  'ioperm',
  'iopl',
  'kcmp',
  'kexec_file_load',
  'kexec_load',
  'keyctl',
  'lookup_dcookie',
  'mbind',
  'mount',
  'mount_setattr',
  'move_mount',
  'move_pages',
  'name_to_handle_at',
  'nfsservctl',
  'open_by_handle_at',
  'open_tree',
  'fsopen',
  'fsconfig',
  'fsmount',
  'fspick',
  'perf_event_open',
  'pidfd_getfd',
  'pivot_root',
  'process_madvise',
  'process_vm_readv',
  'process_vm_writev',
  'ptrace',
  'query_module',
  'quotactl',
  'reboot',
  'request_key',
  'set_mempolicy',
  'setns',
  'settimeofday',
  'stime',
  'swapoff',
  'swapon',
  'syslog',
  'umount',
  'umount2',
  'unshare',
  'uselib',
  'userfaultfd',
  'ustat',
  'vm86',
  'vm86old',
] as const;

const EPERM = 1;
const ENOSYS = 38;

/** clone() flags that create namespaces (CLONE_NEWNS … CLONE_NEWNET, CLONE_NEWCGROUP). */
export const namespaceCloneFlags = {
  CLONE_NEWNS: 0x00020000,
  CLONE_NEWCGROUP: 0x02000000,
  CLONE_NEWUTS: 0x04000000,
  CLONE_NEWIPC: 0x08000000,
  CLONE_NEWUSER: 0x10000000,
  CLONE_NEWPID: 0x20000000,
  CLONE_NEWNET: 0x40000000,
} as const;

export function buildSeccompProfile() {
  return {
    defaultAction: 'SCMP_ACT_ALLOW',
    architectures: ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32'],
    syscalls: [
      { names: [...blockedSyscalls], action: 'SCMP_ACT_ERRNO', errnoRet: EPERM },
      // New namespaces inside a sandbox open kernel attack surface (a user namespace grants a
      // full capability set over its own netns, nf_tables, …): clone() with any namespace flag
      // fails, as under Docker's profile. One rule per flag: seccomp compares masked equality.
      ...Object.values(namespaceCloneFlags).map((flag) => ({
        names: ['clone'],
        action: 'SCMP_ACT_ERRNO',
        errnoRet: EPERM,
        args: [{ index: 0, value: flag, valueTwo: flag, op: 'SCMP_CMP_MASKED_EQ' }],
      })),
      // clone3 passes its flags in memory seccomp cannot inspect: ENOSYS makes libc fall back to clone().
      { names: ['clone3'], action: 'SCMP_ACT_ERRNO', errnoRet: ENOSYS },
    ],
  };
}
