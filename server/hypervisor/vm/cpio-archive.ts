/**
 * A `newc` cpio archive, the format the Linux kernel unpacks an initramfs from. Only what an
 * initramfs needs: directories, regular files and symlinks, all owned by root.
 */
export interface CpioEntry {
  /** Path inside the archive, without a leading slash. */
  path: string;
  type: 'dir' | 'file' | 'symlink';
  /** Permission bits (e.g. 0o755). */
  mode: number;
  /** File contents, or the symlink's target. */
  data?: Buffer | string;
}

const TYPE_BITS = { dir: 0o040000, file: 0o100000, symlink: 0o120000 } as const;

function pad4(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}

function header(fields: { ino: number; mode: number; nlink: number; size: number; nameSize: number }): string {
  const hex = (n: number) => n.toString(16).padStart(8, '0');
  // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check
  return `070701${[fields.ino, fields.mode, 0, 0, fields.nlink, 0, fields.size, 0, 0, 0, 0, fields.nameSize, 0].map(hex).join('')}`;
}

export function cpioArchive(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  const push = (ino: number, mode: number, nlink: number, name: string, data: Buffer) => {
    const nameBytes = Buffer.from(`${name}\0`);
    const head = Buffer.from(header({ ino, mode, nlink, size: data.length, nameSize: nameBytes.length }));
    parts.push(head, nameBytes, pad4(head.length + nameBytes.length), data, pad4(data.length));
  };
  entries.forEach((entry, i) => {
    const data = entry.type === 'dir' ? Buffer.alloc(0) : Buffer.isBuffer(entry.data) ? entry.data : Buffer.from(entry.data ?? '');
    push(i + 1, TYPE_BITS[entry.type] | entry.mode, entry.type === 'dir' ? 2 : 1, entry.path, data);
  });
  push(0, 0, 1, 'TRAILER!!!', Buffer.alloc(0));
  return Buffer.concat(parts);
}
