/**
 * The seccomp profile every container sandbox runs under: everything is allowed except the
 * syscalls container runtimes block by default (Docker's default profile refuses these to processes
 * without extra capabilities): kernel modules and keyrings, clocks, reboot, swap, BPF and perf,
 * cross-process memory access, namespace escapes and obsolete syscalls. Refused calls fail with EPERM.
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
  'pivot_root',
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

export function buildSeccompProfile() {
  return {
    defaultAction: 'SCMP_ACT_ALLOW',
    architectures: ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32'],
    syscalls: [{ names: [...blockedSyscalls], action: 'SCMP_ACT_ERRNO', errnoRet: EPERM }],
  };
}
