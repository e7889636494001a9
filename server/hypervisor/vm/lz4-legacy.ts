/**
 * Decompresses an LZ4 "legacy" frame — the format of an x86 Linux kernel compressed with
 * CONFIG_KERNEL_LZ4, like Debian's cloud kernel. cloud-hypervisor boots only an uncompressed ELF
 * `vmlinux`, so the image builder extracts it from the bzImage the way the kernel's own
 * `scripts/extract-vmlinux` does, without needing the lz4 tool on the host.
 */
const LEGACY_MAGIC = 0x184c2102;
const BLOCK_SIZE = 8 * 1024 * 1024;
// LZ4_compressBound(8 MiB): a larger "block size" is the kernel's trailing length word, not a block.
const MAX_COMPRESSED_BLOCK = BLOCK_SIZE + Math.floor(BLOCK_SIZE / 255) + 16;

function decompressBlock(src: Buffer, out: Buffer, outPos: number): number {
  let i = 0;
  let o = outPos;
  while (i < src.length) {
    const token = src[i++]!;
    let literals = token >> 4;
    if (literals === 15) {
      let b: number;
      do {
        b = src[i++]!;
        literals += b;
      } while (b === 255);
    }
    src.copy(out, o, i, i + literals);
    i += literals;
    o += literals;
    if (i >= src.length) break; // the last sequence has literals only
    const offset = src[i]! | (src[i + 1]! << 8);
    i += 2;
    if (offset === 0 || offset > o) throw new Error('corrupt LZ4 block (bad match offset)');
    let matchLength = (token & 15) + 4;
    if ((token & 15) === 15) {
      let b: number;
      do {
        b = src[i++]!;
        matchLength += b;
      } while (b === 255);
    }
    // Byte by byte: a match may overlap the bytes it is producing.
    for (let k = 0; k < matchLength; k++, o++) out[o] = out[o - offset]!;
  }
  return o;
}

/** Finds the first LZ4 legacy frame in `data` and returns what it decompresses to. */
export function extractLz4Legacy(data: Buffer): Buffer {
  let start = -1;
  for (let i = 0; i + 4 <= data.length; i++) {
    if (data.readUInt32LE(i) === LEGACY_MAGIC) {
      start = i;
      break;
    }
  }
  if (start < 0) throw new Error('no LZ4 legacy frame found (is the kernel compressed with LZ4?)');
  const blocks: Buffer[] = [];
  let pos = start + 4;
  while (pos + 4 <= data.length) {
    const size = data.readUInt32LE(pos);
    if (size === LEGACY_MAGIC) {
      pos += 4;
      continue;
    }
    if (size === 0 || size > MAX_COMPRESSED_BLOCK || pos + 4 + size > data.length) break;
    const out = Buffer.allocUnsafe(BLOCK_SIZE);
    const end = decompressBlock(data.subarray(pos + 4, pos + 4 + size), out, 0);
    blocks.push(out.subarray(0, end));
    pos += 4 + size;
  }
  return Buffer.concat(blocks);
}
