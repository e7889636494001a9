import { randomBytes } from 'node:crypto';
import { closeSync, constants, createWriteStream, lstatSync, mkdirSync, openSync, renameSync, rmSync, statfsSync, writeSync, type Stats, type StatsFs } from 'node:fs';
import { lstat, mkdir, open, realpath, rename, rm, stat, statfs } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { basename, dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { AgentError, agentErrorStatus, fsError } from '../../errors.js';
import { resolveInSandbox } from './paths.js';
import { extractTarUpload } from './tar-upload.js';

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function sendError(res: ServerResponse, err: unknown): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  if (err instanceof AgentError) sendJson(res, agentErrorStatus[err.code as keyof typeof agentErrorStatus] ?? 400, { error: err.message, code: err.code });
  else sendJson(res, 500, { error: (err as Error).message, code: 'INTERNAL' });
}

/**
 * HEAD: where a downloadable file is — its path with every symlink resolved inside the sandbox,
 * its device and inode — for a server that can read the sandbox's filesystem from the host (the
 * container driver's mount). The server opens it there and reads it only if device and inode
 * match, so nothing swapped in between can make it read anything but this file.
 */
async function locate(res: ServerResponse, input: string): Promise<void> {
  const path = resolveInSandbox(input);
  const fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK).catch((err) => {
    throw fsError(err, path);
  });
  try {
    const st = await fh.stat({ bigint: true });
    if (st.isDirectory()) throw new AgentError('BAD_REQUEST', `Is a directory: ${path} (compress it first, then download the archive)`);
    if (!st.isFile()) throw new AgentError('BAD_REQUEST', `Not a regular file: ${path} (a device, socket or pipe cannot be downloaded)`);
    const real = await realpath(path).catch(() => path);
    res.writeHead(200, {
      'content-length': String(st.size),
      'x-file-path': encodeURIComponent(path),
      'x-file-realpath': encodeURIComponent(real),
      'x-file-dev': String(st.dev),
      'x-file-ino': String(st.ino),
    });
    res.end();
  } finally {
    await fh.close();
  }
}

/** GET: streams a file's bytes, with its size as Content-Length. */
async function download(res: ServerResponse, input: string): Promise<void> {
  const path = resolveInSandbox(input);
  // Opened first, then checked on the open descriptor (no swap between check and read);
  // O_NONBLOCK so opening a pipe can't block one of libuv's few worker threads.
  const fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK).catch((err) => {
    throw fsError(err, path);
  });
  try {
    const st = await fh.stat();
    if (st.isDirectory()) throw new AgentError('BAD_REQUEST', `Is a directory: ${path} (compress it first, then download the archive)`);
    if (!st.isFile()) throw new AgentError('BAD_REQUEST', `Not a regular file: ${path} (a device, socket or pipe cannot be downloaded)`);
    // Files such as /proc's report size 0 yet have content: send those without a length.
    res.writeHead(200, { 'content-type': 'application/octet-stream', ...(st.size > 0 ? { 'content-length': st.size } : {}), 'x-file-path': encodeURIComponent(path) });
    await pipeline(fh.createReadStream({ highWaterMark: 1024 * 1024, autoClose: false }), res);
  } finally {
    await fh.close();
  }
}

/**
 * PUT: writes the body to a temporary file beside the target and renames it into place only when
 * the whole body arrived, so the target is either the old file or the complete new one — never a
 * partial write. A broken connection or a full disk removes the temporary file.
 */
async function upload(req: IncomingMessage, res: ServerResponse, input: string): Promise<void> {
  const path = resolveInSandbox(input);
  const declared = Number(req.headers['content-length'] ?? NaN);
  if (declared <= SMALL_UPLOAD_BYTES) {
    const body = await readSmallBody(req, declared);
    writeSmallFile(path, body);
    sendJson(res, 200, { path, size: body.length });
    return;
  }
  const existing = await lstat(path).catch(() => null);
  if (existing?.isDirectory()) throw new AgentError('BAD_REQUEST', `Is a directory: ${path} (give the path of the file to write)`);
  await mkdir(dirname(path), { recursive: true }).catch((err) => {
    throw fsError(err, dirname(path));
  });
  const temp = join(dirname(path), `.${basename(path)}.upload-${randomBytes(6).toString('hex')}`);
  try {
    await writeBody(req, temp, existing ? existing.mode & 0o7777 : 0o644);
    if (req.readableAborted || !req.complete) throw new AgentError('BAD_REQUEST', 'The upload was interrupted before it finished');
    await rename(temp, path);
  } catch (err) {
    await rm(temp, { force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') throw await noSpace(path);
    throw code ? fsError(err, path) : err;
  }
  const st = await stat(path);
  sendJson(res, 200, { path, size: st.size });
}

/** Bodies up to this size are read whole and written with a few blocking calls (each a few microseconds). */
const SMALL_UPLOAD_BYTES = 256 * 1024;

/** A body of a declared `length` (≤ SMALL_UPLOAD_BYTES), whole; a body broken off midway is a 400. */
function readSmallBody(req: IncomingMessage, length: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.once('end', () => {
      const body = Buffer.concat(chunks);
      if (body.length === length) resolve(body);
      else reject(new AgentError('BAD_REQUEST', 'The upload was interrupted before it finished'));
    });
    req.once('close', () => {
      if (!req.complete) reject(new AgentError('BAD_REQUEST', 'The upload was interrupted before it finished'));
    });
  });
}

/**
 * `upload` for a body already in memory, as the same steps: a temporary file beside the target
 * (the target's mode, or 0644), renamed into place; the parent directories made only when missing.
 */
function writeSmallFile(path: string, body: Buffer): void {
  const existing = lstatOrNull(path);
  if (existing?.isDirectory()) throw new AgentError('BAD_REQUEST', `Is a directory: ${path} (give the path of the file to write)`);
  const temp = join(dirname(path), `.${basename(path)}.upload-${randomBytes(6).toString('hex')}`);
  const mode = existing ? existing.mode & 0o7777 : 0o644;
  let fd: number;
  try {
    fd = openTemp(temp, mode);
  } catch (err) {
    throw fsError(err, path);
  }
  try {
    try {
      writeFullySync(fd, body);
    } finally {
      closeSync(fd);
    }
    renameSync(temp, path);
  } catch (err) {
    rmSync(temp, { force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') throw noSpaceSync(path);
    throw fsError(err, path);
  }
}

function lstatOrNull(path: string): Stats | null {
  try {
    return lstatSync(path);
  } catch {
    return null;
  }
}

/** Creates `temp` exclusively, making its parent directories first if they are missing. */
function openTemp(temp: string, mode: number): number {
  try {
    return openSync(temp, 'wx', mode);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    mkdirSync(dirname(temp), { recursive: true });
    return openSync(temp, 'wx', mode);
  }
}

function writeFullySync(fd: number, body: Buffer): void {
  for (let off = 0; off < body.length; ) off += writeSync(fd, body, off, body.length - off);
}

/**
 * Writes the request body to a new `file`. When writing fails (a full disk) the rest of the body is
 * read and dropped before the promise rejects, so a client still sending gets the answer instead of
 * a reset connection.
 */
function writeBody(req: IncomingMessage, file: string, mode: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const out = createWriteStream(file, { flags: 'wx', mode, highWaterMark: 1024 * 1024 });
    let failed = false;
    out.once('error', (err) => {
      failed = true;
      req.unpipe(out);
      if (req.complete || req.destroyed) return reject(err);
      req.once('end', () => reject(err));
      req.once('close', () => reject(err));
      req.resume();
    });
    out.once('finish', () => resolve());
    req.once('close', () => {
      if (!req.complete && !failed) out.destroy(new AgentError('BAD_REQUEST', 'The upload was interrupted before it finished'));
    });
    req.pipe(out);
  });
}

/** An upload that found the disk full: 413, naming the disk's size (diskMb from the driver, else the filesystem's). */
async function noSpace(path: string): Promise<AgentError> {
  return noSpaceError(path, await statfs(dirname(path)).catch(() => null));
}

function noSpaceSync(path: string): AgentError {
  let fs: StatsFs | null = null;
  try {
    fs = statfsSync(dirname(path));
  } catch {}
  return noSpaceError(path, fs);
}

function noSpaceError(path: string, fs: StatsFs | null): AgentError {
  const size = process.env.VOIDRUN_DISK_MB ? `diskMb ${process.env.VOIDRUN_DISK_MB}` : fs ? `${Math.round((fs.blocks * fs.bsize) / 1048576)} MB` : 'its size';
  const free = fs ? `, ${Math.floor((fs.bavail * fs.bsize) / 1048576)} MB free` : '';
  return new AgentError('PAYLOAD_TOO_LARGE', `No space left on the sandbox's disk (${size}${free}): the upload to ${path} does not fit and was not written`);
}

/** PUT /files/tar: extracts the body (a tar stream) under the directory `input`; a refused entry answers 400 naming it. */
async function uploadTar(req: IncomingMessage, res: ServerResponse, input: string): Promise<void> {
  sendJson(res, 200, await extractTarUpload(req, input));
}

/** The agent's raw byte routes: `/files/content?path=` (GET downloads, HEAD locates, PUT uploads) and `/files/tar?path=` (PUT extracts a tar). */
export async function handleFileTransfer(req: IncomingMessage, res: ServerResponse): Promise<boolean> {
  const url = new URL(req.url ?? '/', 'http://agent');
  if (url.pathname !== '/files/content' && url.pathname !== '/files/tar') return false;
  const path = url.searchParams.get('path');
  try {
    if (!path) throw new AgentError('BAD_REQUEST', 'path is required');
    if (url.pathname === '/files/tar') {
      if (req.method !== 'PUT') throw new AgentError('BAD_REQUEST', 'Use PUT');
      await uploadTar(req, res, path);
      return true;
    }
    if (req.method === 'GET') await download(res, path);
    else if (req.method === 'HEAD') await locate(res, path);
    else if (req.method === 'PUT') await upload(req, res, path);
    else sendJson(res, 405, { error: 'Use GET or PUT', code: 'BAD_REQUEST' });
  } catch (err) {
    sendError(res, err);
  }
  return true;
}
