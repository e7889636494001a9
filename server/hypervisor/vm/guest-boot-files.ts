/*
 * The two boot scripts of a microVM guest. Both run under busybox (no shell is assumed in the
 * image itself).
 *
 * 1. The initramfs `/init`: loads the virtio modules (Debian's cloud kernel has them as modules;
 *    ext4 is built in), mounts the root disk (/dev/vda) and the read-only agent disk (/dev/vdb) on
 *    it, and switches root to the agent disk's `init`. With `voidrun.probe` on the kernel command
 *    line it only prints `BOOT_PROBE_MARKER` and powers off: how the qemu driver learns whether
 *    KVM can run an ordinary guest on this host.
 * 2. The agent disk's `/init` (PID 1 after switch_root): mounts the pseudo filesystems and starts
 *    the agent under tini, pointed at the config disk (/dev/vdc).
 */

export const BOOT_PROBE_MARKER = 'VOIDRUN-GUEST-BOOTED';

/** Where the agent disk is mounted in the guest (a directory the base disk has, empty). */
export const GUEST_AGENT_DIR = '/opt/voidrun';

export function initramfsInit(modules: string[]): string {
  return `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "voidrun initramfs: $*" > /dev/console; sleep 1; poweroff -f; }
for m in ${modules.join(' ')}; do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "voidrun initramfs: module $m did not load" > /dev/console
done
if grep -q voidrun.probe /proc/cmdline; then
  echo ${BOOT_PROBE_MARKER} > /dev/console
  poweroff -f
fi
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
  i=$((i + 1)); [ $i -gt 100 ] && fail "disks /dev/vda and /dev/vdb did not appear"
  sleep 0.1
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount the root disk"
mount -t ext4 -o ro,noload /dev/vdb /newroot${GUEST_AGENT_DIR} || fail "cannot mount the agent disk"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot ${GUEST_AGENT_DIR}/init
`;
}

export function agentDiskInit(): string {
  return `#!${GUEST_AGENT_DIR}/busybox sh
B=${GUEST_AGENT_DIR}/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mkdir -p /dev/pts /dev/shm /run /tmp
$B mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$B ln -sf pts/ptmx /dev/ptmx
$B mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$B mount -t tmpfs -o mode=755 tmpfs /run
$B chmod 1777 /tmp
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
export VOIDRUN_GUEST_CONFIG=/dev/vdc VOIDRUN_BUSYBOX=$B
cd /root
exec /usr/bin/tini -s -g -- ${GUEST_AGENT_DIR}/node --max-semi-space-size=2 --v8-pool-size=1 ${GUEST_AGENT_DIR}/agent.cjs
`;
}
