import { createHash } from 'node:crypto';
import { constants, createReadStream } from 'node:fs';
import { chmod, chown, lchown, link, lstat, lutimes, mkdir, mkdtemp, open, readdir, readFile, rm, symlink, utimes } from 'node:fs/promises';
import { arch } from 'node:os';
import { join, posix } from 'node:path';
import { Readable, pipeline } from 'node:stream';
import { createGunzip } from 'node:zlib';
import type { Logger } from 'pino';
import { z } from 'zod';
import { ImagePath } from '../../../shared/schemas/images.js';
import { EnvVars } from '../../../shared/schemas/sandbox.js';
import { isTarFileType, TarReader, type TarEntry } from '../../../shared/tar-reader.js';
import { DomainError, InvalidInputError, PayloadTooLargeError } from '../../errors.js';
import { newId } from '../../store/ids.js';
import { processAlive } from '../host-process.js';
import { measureTree, type LayerStore } from './layer-store.js';

export interface OciImportOptions {
  layers: LayerStore;
  /** Host uid/gid of the sandbox's root: every entry's owner is shifted by it. */
  uidBase: number;
  /** The upload's bytes as sent, the archive's bytes unpacked, and the image's files' declared bytes: each at most this. */
  maxBytes: number;
  /** Entries of the archive, and of all its layers together: each at most this. */
  maxFiles: number;
  /** Where uploads are spooled (a private dir per import is made inside), on the layer store's filesystem; a dir of its own (not the layer store's). */
  spoolDir: string;
  log: Logger;
  /** The layer's description (default: "OCI image import"). */
  description?: string;
  /**
   * The disk the image may take (the org's quota left): refused with `refuse(bytes)` as soon as its
   * files declare more, and, measured, before the layer is committed, so a refused import leaves no layer.
   */
  quota?: { bytes: number; refuse(bytes: number): Error };
}

export interface ImportedImage {
  layerId: string;
  bytes: number;
  config: { env: Record<string, string>; workdir: string | null };
}

/** The longest entry name or link target accepted (bytes). */
const MAX_NAME_BYTES = 4096;
/** The largest JSON document (index, manifest, config) read from an archive. */
const MAX_JSON_BYTES = 4 * 1024 * 1024;
/** Owners inside the sandbox's user namespace: 0 to 65535 (the sandbox uid range's size). */
const ID_RANGE = 65536;
/**
 * The image config's Env in all ("K=V" plus a NUL each): Linux gives a new process's argv and
 * environment together about 2 MiB, so an image env near that would make every exec in its
 * sandboxes fail (E2BIG); this leaves the rest to the sandbox's own env and commands.
 */
const MAX_ENV_BYTES = 256 * 1024;
/**
 * Tar bytes read per entry allowed on top of the files' declared bytes (headers, PAX records, long
 * names, padding): with IMAGE_IMPORT_MAX_FILES this bounds every byte a tar stream of the import may
 * cost to unpack and walk, whatever gzip made of it.
 */
const TAR_BYTES_PER_ENTRY = 8 * 512;
/** Names and link targets with these are refused: a NUL cannot be a path, control characters are not in any real image. */
const CONTROL_CHARS = /[\x00-\x1f\x7f]/;

const LAYER_MEDIA_TYPES = new Set([
  'application/vnd.oci.image.layer.v1.tar',
  'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.oci.image.layer.nondistributable.v1.tar',
  'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip',
  'application/vnd.docker.image.rootfs.diff.tar',
  'application/vnd.docker.image.rootfs.diff.tar.gzip',
  'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
]);
const INDEX_MEDIA_TYPES = new Set(['application/vnd.oci.image.index.v1+json', 'application/vnd.docker.distribution.manifest.list.v2+json']);
const MANIFEST_MEDIA_TYPES = new Set(['application/vnd.oci.image.manifest.v1+json', 'application/vnd.docker.distribution.manifest.v2+json']);

const Digest = z.string().regex(/^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$/, 'must be sha256:<64 hex> or sha512:<128 hex>');
const Descriptor = z.object({ mediaType: z.string().max(200).optional(), digest: Digest, size: z.number().int().min(0) });
const Platform = z.object({ os: z.string().max(100).optional(), architecture: z.string().max(100).optional() }).optional();
const OciIndex = z.object({ manifests: z.array(Descriptor.extend({ platform: Platform })).max(1000) });
const OciManifest = z.object({ mediaType: z.string().max(200).optional(), config: Descriptor, layers: z.array(Descriptor).max(1000) });
const DockerManifest = z.array(z.object({ Config: z.string().max(MAX_NAME_BYTES), Layers: z.array(z.string().max(MAX_NAME_BYTES)).max(1000) })).max(1000);
const ImageConfig = z.object({
  config: z
    .object({ Env: z.array(z.string().max(128 * 1024)).max(1000).nullish(), WorkingDir: z.string().max(MAX_NAME_BYTES).nullish() })
    .nullish(),
});

/** One file of the upload, as spooled (regular files only; links are aliases). */
interface SpooledFile {
  path: string;
  size: number;
}

/**
 * Imports an OCI image layout tar or a `docker save` tar (either optionally gzip), streamed from
 * `body`, as ONE new layer: the image's layers applied in order, flattened (whiteouts delete,
 * opaque dirs drop what lower layers put there), owners shifted by `uidBase`. The upload is spooled
 * first (blob digests checked as they arrive), since the manifest may come after the layers.
 *
 * Everything in the archive is hostile: refused with an InvalidInputError naming the entry are `..`
 * components, an entry whose path goes through a symbolic link, hard links to anything but an
 * earlier regular file, devices and other special files, GNU sparse entries, owners outside
 * 0–65535, NUL or control characters in names and link targets, bodies on directories, links and
 * whiteouts, declared sizes past `maxBytes` and more than `maxFiles` entries (counted before any byte
 * of the entry is written); every tar stream (gzip unpacked) is bounded in all it may cost to read
 * (tarBound), so a small gzip upload cannot expand into hours of reading. Symbolic links are kept as they are (an absolute target resolves inside
 * the sandbox); nothing is ever written through one: every parent of an entry is checked with lstat
 * inside the staged tree, which this import alone writes, and files are created O_EXCL|O_NOFOLLOW.
 * On any failure the spool and the staged layer are removed.
 */
export async function importOciArchive(body: Readable, opts: OciImportOptions): Promise<ImportedImage> {
  await mkdir(opts.spoolDir, { recursive: true, mode: 0o700 });
  await removeStaleSpools(opts.spoolDir, opts.log);
  const spool = await mkdtemp(join(opts.spoolDir, `import-${process.pid}-`));
  try {
    const files = await spoolArchive(body, spool, opts);
    const image = await findImage(files);
    const staged = await opts.layers.stage();
    try {
      const bytes = await applyLayers(image.layers, staged.path, opts);
      if (opts.quota && Number.isFinite(opts.quota.bytes)) {
        // Measured as commit will (allocated blocks), but before it: a refused image leaves no layer.
        const measured = (await measureTree(staged.path)).bytes;
        if (measured > opts.quota.bytes) throw opts.quota.refuse(measured);
      }
      const info = await staged.commit(newId(), opts.description ?? 'OCI image import');
      opts.log.info({ layer: info.id, layers: image.layers.length, bytes: info.bytes, files: info.files, declaredBytes: bytes }, 'OCI image imported');
      return { layerId: info.id, bytes: info.bytes, config: image.config };
    } catch (err) {
      await staged.discard();
      throw err;
    }
  } finally {
    await rm(spool, { recursive: true, force: true });
  }
}

/** Removes the spools of server processes that are gone (killed mid-import); another live server's stay. */
async function removeStaleSpools(spoolDir: string, log: Logger): Promise<void> {
  for (const name of await readdir(spoolDir).catch(() => [] as string[])) {
    const pid = Number(/^import-(\d+)-/.exec(name)?.[1]);
    if (!pid || pid === process.pid || processAlive(pid)) continue;
    log.warn({ spool: name }, 'removing an import spool a stopped server left');
    await rm(join(spoolDir, name), { recursive: true, force: true });
  }
}

/** The upload's bytes, at most `max` (413 past it); a connection closed mid-upload is a 400. */
async function* uploadBytes(body: Readable, max: number): AsyncGenerator<Buffer> {
  let received = 0;
  // Not destroyed when the reader stops early: the HTTP layer then reads and drops the rest, so
  // the client gets the 400 rather than a reset.
  const chunks = body.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>;
  try {
    for await (const chunk of chunks) {
      received += chunk.length;
      if (received > max) throw new PayloadTooLargeError(`The image archive is larger than IMAGE_IMPORT_MAX_BYTES (${max} bytes)`);
      yield chunk;
    }
  } catch (err) {
    if (err instanceof DomainError) throw err;
    throw new InvalidInputError('The upload ended before the image archive was complete (the connection closed mid-upload)', { cause: err });
  }
}

/** What a stream's first bytes say it is compressed with ('none' for anything else, such as a tar). */
function compressionOf(head: Buffer): 'gzip' | 'zstd' | 'xz' | 'bzip2' | 'none' {
  if (head[0] === 0x1f && head[1] === 0x8b) return 'gzip';
  if (head.subarray(0, 4).equals(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]))) return 'zstd';
  if (head.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) return 'xz';
  if (head.subarray(0, 3).toString('latin1') === 'BZh') return 'bzip2';
  return 'none';
}

/** `source` unpacked when it is gzip (by its magic bytes); other compressions are a 400 naming them and `what`. */
async function* unpacked(source: AsyncIterable<Buffer>, what: string): AsyncGenerator<Buffer> {
  const it = source[Symbol.asyncIterator]();
  let head = Buffer.alloc(0);
  let done = false;
  while (head.length < 6 && !done) {
    const next = await it.next();
    if (next.done) done = true;
    else head = Buffer.concat([head, next.value]);
  }
  const all = (async function* () {
    if (head.length) yield head;
    for (let next = done ? null : await it.next(); next && !next.done; next = await it.next()) yield next.value;
  })();
  const kind = compressionOf(head);
  if (kind === 'none') return yield* all;
  if (kind !== 'gzip') throw new InvalidInputError(`${what} is ${kind}-compressed, which is not supported: send it as a plain tar or gzip`);
  const gunzip = pipeline(Readable.from(all), createGunzip(), () => {});
  try {
    for await (const chunk of gunzip) yield chunk as Buffer;
  } catch (err) {
    if (err instanceof DomainError) throw err;
    throw new InvalidInputError(`${what} is not valid gzip (${(err as Error).message})`, { cause: err });
  } finally {
    gunzip.destroy();
  }
}

/** An archive path without `./` or a leading `/`, `..` refused; '' for the archive's root. */
function entryPath(name: string, what: string): string {
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw new InvalidInputError(`${what}: entry ${JSON.stringify(name.slice(0, 200))} has a name over ${MAX_NAME_BYTES} bytes`);
  if (CONTROL_CHARS.test(name)) throw new InvalidInputError(`${what}: entry ${JSON.stringify(name.slice(0, 200))} has a NUL or control character in its name; refusing the image`);
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw new InvalidInputError(`${what}: entry ${JSON.stringify(name)} has a ".." component; refusing the image`);
  return parts.join('/');
}

/** Refuses a NUL or control character in an entry's name or link target (a NUL would reach the filesystem calls as a bad argument). */
function refuseControlChars(e: TarEntry, what: string): void {
  const field = CONTROL_CHARS.test(e.name) ? 'name' : CONTROL_CHARS.test(e.linkName) ? 'link target' : null;
  if (field) throw new InvalidInputError(`${what}: entry ${JSON.stringify(e.name.slice(0, 200))} has a NUL or control character in its ${field}; refusing the image`);
}

/** Refuses a body on an entry that has none (a directory, a link, a whiteout): its bytes would be read for nothing. */
function refuseBody(e: TarEntry, what: string, kind: string): void {
  if (e.size > 0) throw new InvalidInputError(`${what}: entry ${JSON.stringify(e.name.slice(0, 200))} is ${kind} but declares a ${e.size}-byte body; refusing the image`);
}

/** The most tar bytes an import's streams may take in all: the files' bytes plus TAR_BYTES_PER_ENTRY per entry. */
function tarBound(opts: OciImportOptions): { maxBytes: number; limit: string } {
  return { maxBytes: opts.maxBytes + TAR_BYTES_PER_ENTRY * opts.maxFiles, limit: `IMAGE_IMPORT_MAX_BYTES plus ${TAR_BYTES_PER_ENTRY} per IMAGE_IMPORT_MAX_FILES entry` };
}

/** Refuses sparse entries (type S, or PAX GNU.sparse.*): their real size is not what the header says. */
function refuseSparse(e: TarEntry, what: string): void {
  if (e.type === 'S' || [...e.pax.keys()].some((k) => k.startsWith('GNU.sparse.'))) {
    throw new InvalidInputError(`${what}: entry ${JSON.stringify(e.name)} is a GNU sparse file, which is not accepted; refusing the image`);
  }
}

/**
 * Spools the upload's regular files (blob digests checked), keyed by their archive path; symbolic
 * and hard links of the outer archive are aliases in the map (as docker save uses them for shared
 * layers), never links on disk.
 */
async function spoolArchive(body: Readable, spool: string, opts: OciImportOptions): Promise<Map<string, SpooledFile>> {
  const what = 'The image archive';
  const upload = uploadBytes(body, opts.maxBytes);
  const stream = unpacked(upload, what);
  try {
    const files = await spoolEntries(new TarReader(stream, (m) => new InvalidInputError(`${what}: ${m}`), tarBound(opts)), spool, opts);
    // What follows the end-of-archive blocks (zero padding) is read, so the request ends whole.
    let trailing = 0;
    for await (const chunk of stream) {
      trailing += chunk.length;
      if (trailing > 1024 * 1024) throw new InvalidInputError(`${what} goes on for more than 1 MiB past the end of its tar archive`);
    }
    return files;
  } catch (err) {
    // The rest of the body is read and dropped, so the client reads the refusal rather than a reset.
    void stream.return(undefined).catch(() => {});
    void (async () => {
      for await (const _ of upload);
    })().catch(() => {});
    throw err;
  }
}

async function spoolEntries(reader: TarReader, spool: string, opts: OciImportOptions): Promise<Map<string, SpooledFile>> {
  const what = 'The image archive';
  const files = new Map<string, SpooledFile>();
  const links = new Map<string, string>();
  let entries = 0;
  let bytes = 0;
  for (let e = await reader.next(); e; e = await reader.next()) {
    if (++entries > opts.maxFiles) throw new InvalidInputError(`${what} has more than IMAGE_IMPORT_MAX_FILES (${opts.maxFiles}) entries`);
    refuseSparse(e, what);
    refuseControlChars(e, what);
    const name = entryPath(e.name, what);
    if (e.type === '5') {
      refuseBody(e, what, 'a directory');
      continue;
    }
    if (e.type === '2' || e.type === '1') {
      refuseBody(e, what, 'a link');
      // A name in the archive (docker save links a shared layer as ../<id>/layer.tar), resolved
      // lexically; it only ever looks up another entry of the map.
      const base = e.type === '2' ? posix.dirname(name) : '.';
      const target = posix.normalize(posix.join(base, e.linkName));
      if (e.linkName.startsWith('/') || target === '..' || target.startsWith('../')) {
        throw new InvalidInputError(`${what}: entry ${JSON.stringify(e.name)} links to ${JSON.stringify(e.linkName)}, outside the archive`);
      }
      links.set(name, entryPath(target, what));
      continue;
    }
    if (!isTarFileType(e.type)) throw new InvalidInputError(`${what}: entry ${JSON.stringify(e.name)} is not a file, directory or link (type ${JSON.stringify(e.type)})`);
    bytes += e.size;
    if (bytes > opts.maxBytes) throw new InvalidInputError(`${what}: entry ${JSON.stringify(e.name)} declares ${e.size} bytes, past IMAGE_IMPORT_MAX_BYTES (${opts.maxBytes} bytes) for the whole archive`);
    const blob = /^blobs\/(sha256|sha512)\/([0-9a-f]+)$/.exec(name);
    const hash = blob ? createHash(blob[1]!) : null;
    const path = join(spool, String(entries));
    const file = await open(path, 'wx', 0o600);
    try {
      for (let chunk = await reader.read(); chunk; chunk = await reader.read()) {
        hash?.update(chunk);
        await file.write(chunk);
      }
    } catch (err) {
      throw spaceError(err);
    } finally {
      await file.close();
    }
    if (hash && hash.digest('hex') !== blob![2]) throw new InvalidInputError(`${what}: blob ${name} does not match its digest (a corrupted or altered archive)`);
    files.set(name, { path, size: e.size });
    links.delete(name);
  }
  for (const [name, target] of links) {
    let resolved: string | undefined = target;
    for (let hops = 0; resolved !== undefined && !files.has(resolved) && hops < 16; hops++) resolved = links.get(resolved);
    const file = resolved === undefined ? undefined : files.get(resolved);
    if (!file || files.has(name)) continue;
    // A link named as a blob is that blob only if what it points to has its digest.
    const blob = /^blobs\/(sha256|sha512)\/([0-9a-f]+)$/.exec(name);
    if (blob && resolved !== name && (await fileDigest(file.path, blob[1]!)) !== blob[2]) {
      throw new InvalidInputError(`${what}: blob ${name} is a link to ${resolved}, which does not match its digest (a corrupted or altered archive)`);
    }
    files.set(name, file);
  }
  return files;
}

async function fileDigest(path: string, algorithm: string): Promise<string> {
  const hash = createHash(algorithm);
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

function spaceError(err: unknown): unknown {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOSPC' || code === 'EDQUOT') return new PayloadTooLargeError('No space left on the server for this image; free space or import a smaller image', { cause: err });
  return err;
}

interface FoundImage {
  layers: Array<{ what: string; file: SpooledFile }>;
  config: ImportedImage['config'];
}

async function readJson<T extends z.ZodType>(files: Map<string, SpooledFile>, name: string, schema: T): Promise<z.infer<T>> {
  const file = files.get(name);
  if (!file) throw new InvalidInputError(`The image archive has no ${name}`);
  if (file.size > MAX_JSON_BYTES) throw new InvalidInputError(`The image archive's ${name} is larger than ${MAX_JSON_BYTES} bytes`);
  let json: unknown;
  try {
    json = JSON.parse(await readFile(file.path, 'utf8'));
  } catch {
    throw new InvalidInputError(`The image archive's ${name} is not valid JSON`);
  }
  const parsed = schema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new InvalidInputError(`The image archive's ${name} is not what it should be: ${issue.path.join('.') || '(top level)'} ${issue.message}`);
  }
  return parsed.data;
}

function blobName(digest: string): string {
  return `blobs/${digest.replace(':', '/')}`;
}

function blob(files: Map<string, SpooledFile>, d: z.infer<typeof Descriptor>, what: string): SpooledFile {
  const file = files.get(blobName(d.digest));
  if (!file) throw new InvalidInputError(`The image archive has no blob ${d.digest} (${what})`);
  if (file.size !== d.size) throw new InvalidInputError(`The image archive's blob ${d.digest} (${what}) has ${file.size} bytes where its descriptor says ${d.size}`);
  return file;
}

/** The host's architecture as OCI platforms name it. */
function ociArch(): string {
  return ({ x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' } as Record<string, string>)[arch()] ?? arch();
}

/** The image of an OCI layout (index.json) or a docker save tar (manifest.json): its layers, bottom first, and its config. */
async function findImage(files: Map<string, SpooledFile>): Promise<FoundImage> {
  let manifest: z.infer<typeof OciManifest>;
  let layerFiles: Array<{ what: string; file: SpooledFile; mediaType?: string }>;
  let configName: string;
  if (files.has('index.json')) {
    let index = await readJson(files, 'index.json', OciIndex);
    let chosen: z.infer<typeof OciIndex>['manifests'][number] | undefined;
    for (let depth = 0; ; depth++) {
      // Attestations carry platform unknown/unknown; an image saved under two tags is listed twice.
      const candidates = index.manifests.filter((m, i, all) => m.platform?.os !== 'unknown' && all.findIndex((o) => o.digest === m.digest) === i);
      chosen =
        candidates.length === 1
          ? candidates[0]
          : candidates.find((m) => (m.platform?.os ?? 'linux') === 'linux' && m.platform?.architecture === ociArch());
      if (!chosen) throw new InvalidInputError(`The image archive's index lists ${candidates.length} images and none for linux/${ociArch()}; export one image (docker save <image>, or an OCI layout of one platform)`);
      if (!INDEX_MEDIA_TYPES.has(chosen.mediaType ?? '')) break;
      if (depth >= 3) throw new InvalidInputError('The image archive\'s indexes nest more than 3 deep');
      index = await readJson(files, blobName(chosen.digest), OciIndex);
    }
    if (chosen.mediaType && !MANIFEST_MEDIA_TYPES.has(chosen.mediaType)) throw new InvalidInputError(`The image archive's index names a manifest of media type ${JSON.stringify(chosen.mediaType)}, which is not an image manifest`);
    blob(files, chosen, 'the image manifest');
    manifest = await readJson(files, blobName(chosen.digest), OciManifest);
    blob(files, manifest.config, 'the image config');
    configName = blobName(manifest.config.digest);
    layerFiles = manifest.layers.map((d, i) => ({ what: `Layer ${i + 1} (${d.digest.slice(0, 19)})`, file: blob(files, d, `layer ${i + 1}`), mediaType: d.mediaType }));
  } else if (files.has('manifest.json')) {
    const entries = await readJson(files, 'manifest.json', DockerManifest);
    if (entries.length !== 1) throw new InvalidInputError(`The image archive's manifest.json lists ${entries.length} images; save exactly one (docker save <image>)`);
    const [entry] = entries;
    const lookup = (name: string, what: string) => {
      const file = files.get(entryPath(name, 'manifest.json'));
      if (!file) throw new InvalidInputError(`The image archive has no ${name} (${what}, named in manifest.json)`);
      return file;
    };
    lookup(entry!.Config, 'the image config');
    configName = entryPath(entry!.Config, 'manifest.json');
    layerFiles = entry!.Layers.map((name, i) => ({ what: `Layer ${i + 1} (${name.slice(0, 80)})`, file: lookup(name, `layer ${i + 1}`) }));
  } else {
    throw new InvalidInputError('The upload is not an image archive: it has neither index.json (an OCI image layout) nor manifest.json (docker save)');
  }
  for (const layer of layerFiles) {
    if (layer.mediaType !== undefined && !LAYER_MEDIA_TYPES.has(layer.mediaType)) {
      throw new InvalidInputError(`${layer.what} has media type ${JSON.stringify(layer.mediaType)}, which is not supported: layers must be tar or tar+gzip (not zstd)`);
    }
  }
  const config = (await readJson(files, configName, ImageConfig)).config;
  const env: Record<string, string> = {};
  const envBytes = (config?.Env ?? []).reduce((n, pair) => n + Buffer.byteLength(pair) + 1, 0);
  if (envBytes > MAX_ENV_BYTES) {
    throw new InvalidInputError(`The image config's Env holds ${envBytes} bytes in ${config!.Env!.length} variables; at most ${MAX_ENV_BYTES} are accepted (a larger environment leaves no room to start processes in the sandbox): trim Env and export the image again`);
  }
  for (const pair of config?.Env ?? []) {
    const eq = pair.indexOf('=');
    if (eq > 0) env[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  const envOk = EnvVars.safeParse(env);
  if (!envOk.success) throw new InvalidInputError(`The image config's Env is not usable: ${envOk.error.issues[0]!.path.join('.')} ${envOk.error.issues[0]!.message}`);
  const workdir = config?.WorkingDir || null;
  if (workdir !== null && !ImagePath.safeParse(workdir).success) throw new InvalidInputError(`The image config's WorkingDir ${JSON.stringify(workdir.slice(0, 200))} is not an absolute path without ".."`);
  return { layers: layerFiles, config: { env, workdir } };
}

/** An entry's mtime as the host's filesystem can keep it: from 1970 to the year 9999. */
function fileTime(e: TarEntry): number {
  return Math.min(Math.max(e.mtime, 0), 253_402_300_799);
}

/** Bounds shared by all of an import's layers. */
interface Budget {
  entries: number;
  bytes: number;
  /** Tar bytes the layers' readers took (each layer's reader gets what is left of tarBound). */
  tarBytes: number;
}

/**
 * Applies each layer in order into `root` (a staged layer dir this import alone writes); returns
 * the bytes the files declared.
 */
async function applyLayers(layers: FoundImage['layers'], root: string, opts: OciImportOptions): Promise<number> {
  await chown(root, opts.uidBase, opts.uidBase);
  await chmod(root, 0o755);
  const budget: Budget = { entries: 0, bytes: 0, tarBytes: 0 };
  const bound = tarBound(opts);
  const dirTimes = new Map<string, number>();
  for (const layer of layers) {
    const source = createReadStream(layer.file.path);
    const reader = new TarReader(unpacked(source, layer.what), (m) => new InvalidInputError(`${layer.what}: ${m}`), { ...bound, maxBytes: bound.maxBytes - budget.tarBytes });
    try {
      await new LayerApplier(root, layer.what, opts, budget, dirTimes).apply(reader);
    } catch (err) {
      throw spaceError(err);
    } finally {
      source.destroy();
    }
    budget.tarBytes += reader.bytesRead;
  }
  await setDirTimes(root, '', dirTimes);
  return budget.bytes;
}

/** Sets the mtimes directory entries asked for, walking the tree (lstat, never following a link). */
async function setDirTimes(root: string, rel: string, times: Map<string, number>): Promise<void> {
  if (times.size === 0) return;
  for (const d of await readdir(join(root, rel), { withFileTypes: true })) {
    if (d.isDirectory()) await setDirTimes(root, rel ? `${rel}/${d.name}` : d.name, times);
  }
  const mtime = times.get(rel);
  if (mtime !== undefined) await utimes(join(root, rel), mtime, mtime);
}

/** One layer's application into the staged tree. */
class LayerApplier {
  /** Paths (relative) this layer wrote, and their parents: an opaque dir keeps them. */
  readonly #touched = new Set<string>();
  /** Relative paths known to be real directories (cleared whenever something is removed). */
  readonly #dirs = new Set<string>(['']);

  constructor(
    private readonly root: string,
    private readonly what: string,
    private readonly opts: OciImportOptions,
    private readonly budget: Budget,
    private readonly dirTimes: Map<string, number>,
  ) {}

  #refuse(e: TarEntry, why: string): InvalidInputError {
    return new InvalidInputError(`${this.what}: entry ${JSON.stringify(e.name.slice(0, 300))} ${why}; refusing the image`);
  }

  async apply(reader: TarReader): Promise<void> {
    for (let e = await reader.next(); e; e = await reader.next()) {
      try {
        await this.#entry(reader, e);
      } catch (err) {
        throw this.#fsRefusal(e, err);
      }
    }
  }

  /**
   * A filesystem error an entry caused (a name component over 255 bytes, too many hard links to
   * one file, …) as the entry's 400; anything else as it is (ENOSPC becomes a 413 above).
   */
  #fsRefusal(e: TarEntry, err: unknown): unknown {
    const code = (err as NodeJS.ErrnoException).code;
    const why: Record<string, string> = {
      ENAMETOOLONG: 'has a name component over 255 bytes',
      EMLINK: 'is one hard link too many to its file',
      ELOOP: 'goes through a symbolic link',
      ENOTDIR: 'is under something that is not a directory',
      EEXIST: 'collides with another entry',
      EINVAL: 'cannot be written (invalid name)',
      ENOENT: 'refers to something that is not there',
      // Node's own argument check (a NUL in a path): refused before the filesystem sees it.
      ERR_INVALID_ARG_VALUE: 'has a name or link target the filesystem cannot take',
    };
    return code && why[code] && !(err instanceof DomainError) ? this.#refuse(e, why[code]) : err;
  }

  async #entry(reader: TarReader, e: TarEntry): Promise<void> {
    if (++this.budget.entries > this.opts.maxFiles) throw this.#refuse(e, `is past IMAGE_IMPORT_MAX_FILES (${this.opts.maxFiles} entries in all layers)`);
    refuseSparse(e, this.what);
    refuseControlChars(e, this.what);
    if (e.uid >= ID_RANGE || e.gid >= ID_RANGE) throw this.#refuse(e, `is owned by ${e.uid}:${e.gid}; owners must be below ${ID_RANGE}`);
    if (Buffer.byteLength(e.linkName) > MAX_NAME_BYTES) throw this.#refuse(e, `has a link target over ${MAX_NAME_BYTES} bytes`);
    const rel = entryPath(e.name, this.what);
    const parts = rel.split('/');
    const leaf = parts[parts.length - 1]!;
    if (e.type === '5' || e.type === '1' || e.type === '2') refuseBody(e, this.what, e.type === '5' ? 'a directory' : 'a link');
    // Counted before anything is skipped or written: aufs metadata bodies are read for nothing, but read.
    if (isTarFileType(e.type)) {
      this.budget.bytes += e.size;
      if (this.budget.bytes > this.opts.maxBytes) throw this.#refuse(e, `declares ${e.size} bytes, past IMAGE_IMPORT_MAX_BYTES (${this.opts.maxBytes} bytes for all the image's files)`);
      if (this.opts.quota && this.budget.bytes > this.opts.quota.bytes) throw this.opts.quota.refuse(this.budget.bytes);
    }
    // aufs metadata (.wh..wh.plnk/, .wh..wh.aufs) in layers docker made on aufs: not part of the tree.
    if (parts.some((p) => p.startsWith('.wh..wh.') && p !== '.wh..wh..opq')) return;
    if (leaf.startsWith('.wh.')) {
      await this.#whiteout(e, parts, leaf);
      return;
    }
    if (rel === '') {
      if (e.type !== '5') throw this.#refuse(e, 'names the root but is not a directory');
      await this.#owned(this.root, e, false);
      this.dirTimes.set('', fileTime(e));
      return;
    }
    await this.#parents(e, parts, true);
    this.#touch(parts);
    const path = join(this.root, rel);
    const existing = await lstat(path).catch(() => null);
    if (e.type === '5') {
      if (existing && !existing.isDirectory()) await this.#remove(rel);
      if (!existing?.isDirectory()) await mkdir(path, { mode: 0o700 });
      await this.#owned(path, e, false);
      this.#dirs.add(rel);
      this.dirTimes.set(rel, fileTime(e));
      return;
    }
    if (e.type === '1') {
      // Resolved before anything is removed: a link to itself or to a path about to go is refused.
      const target = await this.#linkTarget(e);
      if (target === rel || target.startsWith(`${rel}/`)) throw this.#refuse(e, 'is a hard link to itself or to something under it');
      if (existing) await this.#remove(rel);
      await link(join(this.root, target), path);
      return;
    }
    if (existing) await this.#remove(rel);
    if (isTarFileType(e.type)) {
      await this.#writeFile(reader, path, e);
    } else if (e.type === '2') {
      if (!e.linkName) throw this.#refuse(e, 'is a symbolic link without a target');
      await symlink(e.linkName, path);
      await lchown(path, this.opts.uidBase + e.uid, this.opts.uidBase + e.gid);
      await lutimes(path, fileTime(e), fileTime(e));
    } else if (e.type === '3' || e.type === '4') {
      throw this.#refuse(e, 'is a device node, which images may not hold');
    } else {
      throw this.#refuse(e, `is not a file, directory or link (tar type ${JSON.stringify(e.type)})`);
    }
  }

  #touch(parts: string[]): void {
    for (let i = 1; i <= parts.length; i++) this.#touched.add(parts.slice(0, i).join('/'));
  }

  /**
   * Checks (and with `create`, makes) each parent of an entry: a real directory of the staged tree,
   * never a symbolic link, which is where an entry could otherwise be written outside it. False
   * when one is missing and not to be made.
   */
  async #parents(e: TarEntry, parts: string[], create: boolean): Promise<boolean> {
    for (let i = 1; i < parts.length; i++) {
      const rel = parts.slice(0, i).join('/');
      if (this.#dirs.has(rel)) continue;
      const path = join(this.root, rel);
      const st = await lstat(path).catch(() => null);
      if (!st) {
        if (!create) return false;
        await mkdir(path, { mode: 0o755 });
        await chown(path, this.opts.uidBase, this.opts.uidBase);
      } else if (st.isSymbolicLink()) {
        throw this.#refuse(e, `goes through the symbolic link ${JSON.stringify(rel)}`);
      } else if (!st.isDirectory()) {
        throw this.#refuse(e, `is under ${JSON.stringify(rel)}, which is not a directory`);
      }
      this.#dirs.add(rel);
    }
    return true;
  }

  async #linkTarget(e: TarEntry): Promise<string> {
    const target = entryPath(e.linkName, this.what);
    if (target === '') throw this.#refuse(e, 'is a hard link to the root');
    const st = (await this.#parents(e, target.split('/'), false)) ? await lstat(join(this.root, target)).catch(() => null) : null;
    if (!st?.isFile()) throw this.#refuse(e, `is a hard link to ${JSON.stringify(e.linkName)}, which is not an earlier regular file of the image`);
    return target;
  }

  /** Sets an entry's owner (shifted) and mode on a dir or file it made. */
  async #owned(path: string, e: TarEntry, file: boolean): Promise<void> {
    await chown(path, this.opts.uidBase + e.uid, this.opts.uidBase + e.gid);
    // After chown, which clears setuid/setgid bits.
    await chmod(path, e.mode || (file ? 0o644 : 0o755));
  }

  async #writeFile(reader: TarReader, path: string, e: TarEntry): Promise<void> {
    const file = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    try {
      for (let chunk = await reader.read(); chunk; chunk = await reader.read()) await file.write(chunk);
      await file.chown(this.opts.uidBase + e.uid, this.opts.uidBase + e.gid);
      await file.chmod(e.mode);
      await file.utimes(fileTime(e), fileTime(e));
    } finally {
      await file.close();
    }
  }

  /** Removes `rel` (whatever it is; a symbolic link itself, never what it points to). */
  async #remove(rel: string): Promise<void> {
    await rm(join(this.root, rel), { recursive: true, force: true });
    this.#dirs.clear();
    this.#dirs.add('');
  }

  /** `.wh.<name>` deletes what lower layers put at `<name>`; `.wh..wh..opq` empties its dir of it. */
  async #whiteout(e: TarEntry, parts: string[], leaf: string): Promise<void> {
    if (e.type === '5') throw this.#refuse(e, 'is a whiteout but a directory');
    refuseBody(e, this.what, 'a whiteout');
    const dirParts = parts.slice(0, -1);
    const dir = dirParts.join('/');
    // The dir must be a real one of the tree (a missing one means nothing to delete).
    if (!(await this.#parents(e, parts, false))) return;
    if (leaf === '.wh..wh..opq') {
      await this.#pruneUntouched(dir);
      return;
    }
    const name = leaf.slice('.wh.'.length);
    if (!name || name === '.' || name === '..' || name.startsWith('.wh.')) throw this.#refuse(e, 'is not a valid whiteout');
    const victim = dir ? `${dir}/${name}` : name;
    const st = await lstat(join(this.root, victim)).catch(() => null);
    if (!st) return;
    // Whiteouts hide lower layers only, wherever they come in the layer: what this layer wrote at
    // or under the victim stays; what lower layers put there goes (entries of this layer that come
    // after the whiteout are written after it, so they stay too).
    if (!this.#touched.has(victim)) await this.#remove(victim);
    else if (st.isDirectory()) await this.#pruneUntouched(victim);
  }

  /** Removes what lower layers put under `dir`, keeping what this layer wrote there. */
  async #pruneUntouched(dir: string): Promise<void> {
    for (const d of await readdir(join(this.root, dir), { withFileTypes: true })) {
      const rel = dir ? `${dir}/${d.name}` : d.name;
      if (!this.#touched.has(rel)) await this.#remove(rel);
      else if (d.isDirectory()) await this.#pruneUntouched(rel);
    }
  }
}

