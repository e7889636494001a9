import type { IncomingMessage } from 'node:http';
import { PassThrough, Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type {
  ArchiveFormat,
  ArchiveResult,
  DiskUsageResult,
  ExtractResult,
  FileList,
  FileOpResult,
  FileStats,
  FileType,
  HeadTailResult,
  SearchResult,
  StatResult,
  UploadResult,
} from '../../shared/index.js';
import { AgentUnavailableError, fromAgentCode, type AgentClient } from '../agent-client/agent-clients.js';
import { agentHeader, readAgentError, readAgentJson } from '../agent-client/agent-http.js';
import { decodeOrNull } from '../../shared/uri.js';
import { AgentUploadReply } from '../../shared/schemas/agent-replies.js';
import { PayloadTooLargeError } from '../errors.js';
import type { SandboxRecord } from '../store/types.js';
import type { Principal } from './auth-service.js';
import type { SandboxService } from './sandbox-service.js';

const ok = { stderr: '', exitCode: 0 };

/** A download in progress: the agent's response stream and what to put in the headers. */
export interface Download {
  path: string;
  size: number | null;
  stream: Readable;
}

/**
 * File operations in a sandbox. The agent does the filesystem work inside the sandbox (paths are
 * resolved there; relative ones against /root); bytes stream through without being held in memory.
 */
export class FileService {
  constructor(private readonly deps: { sandboxes: SandboxService; maxUploadBytes: number }) {}

  get maxUploadBytes(): number {
    return this.deps.maxUploadBytes;
  }

  async #agent<T>(principal: Principal, id: string, fn: (agent: AgentClient) => Promise<T>): Promise<T> {
    const record = await this.deps.sandboxes.running(principal, id);
    return this.deps.sandboxes.agents.call(record, fn);
  }

  #failure(record: SandboxRecord, err: unknown): Promise<unknown> {
    return this.deps.sandboxes.agents.failure(record, err);
  }

  list(p: Principal, id: string, path: string): Promise<FileList> {
    return this.#agent(p, id, async (a) => ({ success: true as const, files: await a.files.list.query({ path }) }));
  }

  stat(p: Principal, id: string, path: string): Promise<StatResult> {
    return this.#agent(p, id, async (a) => {
      const st = await a.files.stat.query({ path });
      return { stdout: statLine(st), ...ok, ...st };
    });
  }

  remove(p: Principal, id: string, path: string): Promise<FileOpResult> {
    return this.#agent(p, id, async (a) => ({ stdout: '', ...ok, path: await a.files.remove.mutate({ path }) }));
  }

  mkdir(p: Principal, id: string, path: string): Promise<FileOpResult> {
    return this.#agent(p, id, async (a) => ({ stdout: '', ...ok, path: await a.files.mkdir.mutate({ path }) }));
  }

  create(p: Principal, id: string, path: string, content = ''): Promise<FileOpResult> {
    return this.#agent(p, id, async (a) => ({ stdout: '', ...ok, path: await a.files.create.mutate({ path, content }) }));
  }

  copy(p: Principal, id: string, from: string, to: string): Promise<FileOpResult> {
    return this.#agent(p, id, async (a) => ({ stdout: '', ...ok, path: await a.files.copy.mutate({ from, to }) }));
  }

  move(p: Principal, id: string, from: string, to: string): Promise<FileOpResult> {
    return this.#agent(p, id, async (a) => ({ stdout: '', ...ok, path: await a.files.move.mutate({ from, to }) }));
  }

  chmod(p: Principal, id: string, path: string, mode: string): Promise<FileOpResult> {
    return this.#agent(p, id, async (a) => ({ stdout: '', ...ok, path: await a.files.chmod.mutate({ path, mode }) }));
  }

  du(p: Principal, id: string, path: string): Promise<DiskUsageResult> {
    return this.#agent(p, id, async (a) => {
      const du = await a.files.du.query({ path });
      return { stdout: `${duSize(du.size)}\t${du.path}\n`, ...ok, ...du };
    });
  }

  headTail(p: Principal, id: string, path: string, lines: number, head: boolean): Promise<HeadTailResult> {
    return this.#agent(p, id, async (a) => {
      const r = await a.files.headTail.query({ path, lines, head });
      return { stdout: r.content, ...ok, ...r };
    });
  }

  /**
   * Names under `path` matching `pattern`: a glob when it has `*`, `?` or `[`, otherwise a
   * substring (as the original's `find -name '*pattern*'`).
   */
  search(p: Principal, id: string, path: string, pattern: string): Promise<SearchResult> {
    const glob = /[*?[]/.test(pattern) ? pattern : `*${pattern}*`;
    return this.#agent(p, id, async (a) => {
      const r = await a.files.search.query({ path, pattern: glob });
      return { stdout: r.matches.map((m) => `${m}\n`).join(''), ...ok, ...r };
    });
  }

  compress(p: Principal, id: string, path: string, format: ArchiveFormat): Promise<ArchiveResult> {
    return this.#agent(p, id, async (a) => {
      const r = await a.files.compress.mutate({ path, format });
      return { stdout: `${r.archive}\n`, ...ok, ...r };
    });
  }

  extract(p: Principal, id: string, archive: string, dest: string): Promise<ExtractResult> {
    return this.#agent(p, id, async (a) => {
      const r = await a.files.extract.mutate({ archive, dest });
      return { stdout: '', ...ok, ...r };
    });
  }

  /**
   * Streams `source` into a file in the sandbox. More than `MAX_UPLOAD_BYTES` aborts the transfer
   * (413); the agent then removes its temporary file, so the target is never half-written.
   */
  async upload(p: Principal, id: string, path: string, source: Readable, declaredSize?: number, signal?: AbortSignal): Promise<UploadResult> {
    const limit = this.deps.maxUploadBytes;
    if (declaredSize !== undefined && declaredSize > limit) throw tooLarge(limit);
    const record = await this.deps.sandboxes.running(p, id);
    const agentReq = this.deps.sandboxes.agents.request(id, {
      method: 'PUT',
      path: `/files/content?path=${encodeURIComponent(path)}`,
      headers: declaredSize !== undefined ? { 'content-length': declaredSize } : { 'transfer-encoding': 'chunked' },
      signal,
    });
    const response = new Promise<IncomingMessage>((resolve, reject) => {
      agentReq.once('response', resolve);
      agentReq.once('error', reject);
    });
    response.catch(() => {}); // observed below on the paths that need it; a late failure must not go unhandled
    let received = 0;
    let overLimit = false;
    const counter = new Transform({
      transform(chunk: Buffer, _enc, done) {
        received += chunk.length;
        if (received > limit) {
          overLimit = true;
          done(tooLarge(limit));
        } else done(null, chunk);
      },
    });
    // The request body is not handed to pipeline() itself: on a failure pipeline destroys its
    // streams, and destroying the request would reset the connection before the client reads
    // our 413. The caller drains what is left of the body instead.
    const body = new PassThrough();
    let ended = false;
    source.once('end', () => (ended = true));
    // pipe() does not pass on a client that went away: do, so the agent drops its temporary file.
    source.once('error', (err) => body.destroy(err));
    source.once('close', () => {
      if (!ended) body.destroy(new Error('the upload was interrupted'));
    });
    source.pipe(body);
    body.once('close', () => source.unpipe(body));
    try {
      await pipeline(body, counter, agentReq);
    } catch (err) {
      agentReq.destroy();
      if (overLimit) throw tooLarge(limit);
      // The agent may have answered early with its reason (e.g. the path is a directory).
      const early = await Promise.race([response.catch(() => null), new Promise<null>((r) => setTimeout(() => r(null), 2000))]);
      if (early && early.statusCode !== 200) throw await agentHttpError(early, record.id);
      throw await this.#failure(record, err);
    }
    const res = await response.catch(async (err: unknown) => {
      throw await this.#failure(record, err);
    });
    if (res.statusCode !== 200) throw await agentHttpError(res, record.id);
    return readAgentJson(res, AgentUploadReply, record.id, 'an upload').catch(async (err: unknown) => {
      throw await this.#failure(record, err);
    });
  }

  /**
   * Opens a file in the sandbox for reading; the caller pipes `stream` to its client. The agent
   * streams the bytes: the server never opens a path in the sandbox's filesystem on the host on
   * an agent's word (an agent the tenant replaced could name any host file).
   */
  async download(p: Principal, id: string, path: string, signal?: AbortSignal): Promise<Download> {
    const record = await this.deps.sandboxes.running(p, id);
    const res = await this.#askAgent(record, 'GET', path, signal);
    if (res.statusCode !== 200) throw await agentHttpError(res, record.id);
    // What the agent says about the file only labels the response; it is checked, never trusted.
    const length = agentHeader(res, 'content-length');
    const size = /^\d{1,15}$/.test(length) ? Number(length) : null;
    const resolved = decodeOrNull(agentHeader(res, 'x-file-path'));
    const label = resolved && resolved.length <= 4096 && resolved.startsWith('/') && !/[\x00-\x1f\x7f]/.test(resolved) ? resolved : path;
    return { path: label, size, stream: res };
  }

  /** A bodiless request to the agent's `/files/content` route; its response once headers arrive. */
  #askAgent(record: SandboxRecord, method: 'GET', path: string, signal?: AbortSignal): Promise<IncomingMessage> {
    const agentReq = this.deps.sandboxes.agents.request(record.id, { method, path: `/files/content?path=${encodeURIComponent(path)}`, signal });
    return new Promise<IncomingMessage>((resolve, reject) => {
      agentReq.once('response', resolve);
      agentReq.once('error', reject);
      agentReq.end();
    }).catch(async (err: unknown) => {
      throw await this.#failure(record, err);
    });
  }
}


function tooLarge(limit: number): PayloadTooLargeError {
  return new PayloadTooLargeError(`Upload is larger than the limit of ${limit} bytes (MAX_UPLOAD_BYTES)`);
}

async function agentHttpError(res: IncomingMessage, sandboxId: string): Promise<Error> {
  const { code, message } = await readAgentError(res, sandboxId);
  return fromAgentCode(code, message, undefined, 'FILE_NOT_FOUND') ?? new AgentUnavailableError(`The sandbox agent failed: ${message}`);
}

/** The type bits of `st_mode` for each type `stat -c %F` names. */
const typeBits: Record<FileType, number> = {
  'regular file': 0o100000,
  'regular empty file': 0o100000,
  directory: 0o040000,
  'symbolic link': 0o120000,
  fifo: 0o010000,
  socket: 0o140000,
  'character special file': 0o020000,
  'block special file': 0o060000,
};

/**
 * A stat result as the original VoidRun's agent printed it with
 * `stat -c '{"path":"%n","size":%s,"mode":"%f","mtime":%Y,"type":"%F"}'`: the raw mode in hex,
 * the modification time in whole seconds (here always valid JSON, whatever the path holds).
 */
export function statLine(st: FileStats): string {
  const mode = (typeBits[st.type] | parseInt(st.mode, 8)).toString(16);
  return `${JSON.stringify({ path: st.path, size: st.size, mode, mtime: Math.floor(Date.parse(st.modTime) / 1000), type: st.type })}\n`;
}

/** A size as `du -h` prints it: 1024-based, rounded up, one decimal below 10 (`0`, `512`, `4.0K`, `60M`, `1.5G`). */
export function duSize(bytes: number): string {
  if (bytes < 1024) return String(bytes);
  const units = ['K', 'M', 'G', 'T', 'P', 'E'];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  if (value < 10) {
    const tenths = Math.ceil(value * 10);
    return tenths >= 100 ? `10${units[unit]}` : `${(tenths / 10).toFixed(1)}${units[unit]}`;
  }
  const whole = Math.ceil(value);
  return whole >= 1024 && unit < units.length - 1 ? `1.0${units[unit + 1]}` : `${whole}${units[unit]}`;
}
