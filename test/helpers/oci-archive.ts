import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';

/**
 * A small tar writer and OCI image layout / `docker save` builders for the import tests: every
 * archive is made here, byte by byte, so a test can also make the hostile ones (a declared size
 * with no body, a GNU sparse entry, owners past 65535) that real tools refuse to write.
 */
export interface TarItem {
  name: string;
  /** `global`: a global PAX header (metadata, not an entry), with `pax` as its records. */
  type?: 'file' | 'dir' | 'symlink' | 'hardlink' | 'char' | 'block' | 'fifo' | 'sparse' | 'global';
  body?: Buffer | string;
  linkName?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
  /** The size the header declares, when it is not the body's (a hostile header). */
  declaredSize?: number;
  /** Extra PAX records. */
  pax?: Record<string, string>;
}

const typeFlags: Record<NonNullable<TarItem['type']>, string> = { file: '0', hardlink: '1', symlink: '2', char: '3', block: '4', dir: '5', fifo: '6', sparse: 'S', global: 'g' };

function octal(value: number, width: number): string {
  return value.toString(8).padStart(width - 1, '0') + '\0';
}

function header(name: string, type: string, size: number, item: TarItem, linkName: string): Buffer {
  const h = Buffer.alloc(512);
  h.write(name, 0, 100, 'utf8');
  h.write(octal(item.mode ?? (type === '5' ? 0o755 : 0o644), 8), 100, 'ascii');
  h.write(octal(Math.min(item.uid ?? 0, 0o7777777), 8), 108, 'ascii');
  h.write(octal(Math.min(item.gid ?? 0, 0o7777777), 8), 116, 'ascii');
  if (size > 0o77777777777) {
    // GNU base-256: the size past 8 GiB.
    h[124] = 0x80;
    let v = BigInt(size);
    for (let i = 135; i > 124; i--, v >>= 8n) h[i] = Number(v & 0xffn);
  } else {
    h.write(octal(size, 12), 124, 'ascii');
  }
  h.write(octal(item.mtime ?? 1_700_000_000, 12), 136, 'ascii');
  h.write(type, 156, 'ascii');
  h.write(linkName, 157, 100, 'utf8');
  h.write('ustar\0', 257, 'ascii');
  h.write('00', 263, 'ascii');
  if (type === 'S') h.write(octal(10 * 1024 ** 3, 12), 483, 'ascii'); // the sparse file's real size
  h.fill(' ', 148, 156);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'ascii');
  return h;
}

function padded(body: Buffer): Buffer[] {
  const rest = body.length % 512;
  return rest ? [body, Buffer.alloc(512 - rest)] : [body];
}

/** PAX records (`<len> key=value\n`, the length counting itself). */
function paxData(pax: Record<string, string>): Buffer {
  const records = Object.entries(pax).map(([k, v]) => {
    const text = ` ${k}=${v}\n`;
    let len = Buffer.byteLength(text) + 1;
    while (String(len).length + Buffer.byteLength(text) !== len) len++;
    return `${len}${text}`;
  });
  return Buffer.from(records.join(''));
}

/** One item's blocks: its PAX header when it needs one, its header, its padded body. */
export function tarBlocks(item: TarItem): Buffer[] {
  const type = typeFlags[item.type ?? (item.name.endsWith('/') ? 'dir' : 'file')];
  if (item.type === 'global') {
    const data = paxData(item.pax ?? {});
    return [header(item.name.slice(0, 100), type, data.length, item, ''), ...(data.length ? padded(data) : [])];
  }
  const out: Buffer[] = [];
  const body = Buffer.from(item.body ?? '');
  const linkName = item.linkName ?? '';
  const pax: Record<string, string> = { ...item.pax };
  if (Buffer.byteLength(item.name) > 100) pax.path = item.name;
  if (Buffer.byteLength(linkName) > 100) pax.linkpath = linkName;
  if ((item.uid ?? 0) > 0o7777777) pax.uid = String(item.uid);
  if ((item.gid ?? 0) > 0o7777777) pax.gid = String(item.gid);
  if (Object.keys(pax).length) {
    const data = paxData(pax);
    out.push(header('PaxHeader', 'x', data.length, { name: 'PaxHeader' }, ''), ...padded(data));
  }
  out.push(header(item.name.slice(0, 100), type, item.declaredSize ?? body.length, item, linkName.slice(0, 100)));
  if (body.length) out.push(...padded(body));
  return out;
}

/** A tar archive of `items` (PAX headers for long names and owners past the octal fields). */
export function tar(items: TarItem[]): Buffer {
  return Buffer.concat([...items.flatMap(tarBlocks), Buffer.alloc(1024)]);
}

export const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

export interface ImageSpec {
  /** Each layer's entries, bottom first. */
  layers: TarItem[][];
  /** Which layers are gzip-compressed (default: every other one, the first compressed). */
  gzip?: boolean[];
  env?: string[];
  workdir?: string;
  /** A layer media type in place of the usual (e.g. a zstd one). */
  layerMediaType?: string;
}

function layerBlobs(spec: ImageSpec): Array<{ blob: Buffer; diffId: string; gzip: boolean }> {
  return spec.layers.map((items, i) => {
    const plain = tar(items);
    const gzip = spec.gzip?.[i] ?? i % 2 === 0;
    return { blob: gzip ? gzipSync(plain) : plain, diffId: `sha256:${sha256(plain)}`, gzip };
  });
}

function configJson(spec: ImageSpec, diffIds: string[]): Buffer {
  return Buffer.from(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      config: { Env: spec.env ?? ['PATH=/usr/local/bin:/usr/bin:/bin'], WorkingDir: spec.workdir ?? '', Cmd: ['/bin/sh'] },
      rootfs: { type: 'layers', diff_ids: diffIds },
    }),
  );
}

/** The files of an OCI image layout of one image (name → content), for tests to alter before `tar`. */
export function ociLayoutFiles(spec: ImageSpec): Map<string, Buffer> {
  const files = new Map<string, Buffer>();
  const blob = (content: Buffer) => {
    const digest = `sha256:${sha256(content)}`;
    files.set(`blobs/sha256/${digest.slice(7)}`, content);
    return { digest, size: content.length };
  };
  const layers = layerBlobs(spec);
  const config = blob(configJson(spec, layers.map((l) => l.diffId)));
  const manifest = blob(
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
        layers: layers.map((l) => ({ mediaType: spec.layerMediaType ?? `application/vnd.oci.image.layer.v1.tar${l.gzip ? '+gzip' : ''}`, ...blob(l.blob) })),
      }),
    ),
  );
  files.set('oci-layout', Buffer.from(JSON.stringify({ imageLayoutVersion: '1.0.0' })));
  files.set(
    'index.json',
    Buffer.from(JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...manifest, platform: { os: 'linux', architecture: 'amd64' }, annotations: { 'org.opencontainers.image.ref.name': 'latest' } }] })),
  );
  return files;
}

/** Files as a tar (directories of blobs/ included, as `tar -C layout .` writes them), then `extra` items (links). */
export function tarOfFiles(files: Map<string, Buffer>, extra: TarItem[] = []): Buffer {
  const dirs = new Set<string>();
  for (const name of files.keys()) for (let i = name.indexOf('/'); i !== -1; i = name.indexOf('/', i + 1)) dirs.add(`${name.slice(0, i)}/`);
  return tar([...[...dirs].sort().map((name) => ({ name })), ...[...files].map(([name, body]) => ({ name, body })), ...extra]);
}

interface LayoutManifest {
  layers: Array<{ mediaType?: string; digest: string; size: number }>;
}

/** Rewrites the one manifest of an OCI layout's files with `change` (its blob and the index's descriptor follow). */
export function changeManifest(files: Map<string, Buffer>, change: (manifest: LayoutManifest) => void): void {
  const index = JSON.parse(files.get('index.json')!.toString()) as { manifests: Array<{ digest: string; size: number }> };
  const oldName = `blobs/sha256/${index.manifests[0]!.digest.slice(7)}`;
  const manifest = JSON.parse(files.get(oldName)!.toString()) as LayoutManifest;
  change(manifest);
  const blob = Buffer.from(JSON.stringify(manifest));
  files.delete(oldName);
  files.set(`blobs/sha256/${sha256(blob)}`, blob);
  index.manifests[0] = { ...index.manifests[0]!, digest: `sha256:${sha256(blob)}`, size: blob.length };
  files.set('index.json', Buffer.from(JSON.stringify(index)));
}

/** An OCI image layout tar of one image. */
export function ociLayout(spec: ImageSpec): Buffer {
  return tarOfFiles(ociLayoutFiles(spec));
}

/** A `docker save` tar of one image (the classic layout: <id>/layer.tar, <config>.json, manifest.json). */
export function dockerSave(spec: ImageSpec): Buffer {
  const files = new Map<string, Buffer>();
  const layers = layerBlobs(spec);
  const config = configJson(spec, layers.map((l) => l.diffId));
  const configName = `${sha256(config)}.json`;
  files.set(configName, config);
  const names = layers.map((l) => {
    const name = `${sha256(l.blob)}/layer.tar`;
    files.set(name, l.blob);
    return name;
  });
  files.set('manifest.json', Buffer.from(JSON.stringify([{ Config: configName, RepoTags: ['imported:latest'], Layers: names }])));
  return tarOfFiles(files);
}
