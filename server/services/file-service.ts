import type { ClientRequest, IncomingMessage } from 'node:http';
import type { Readable, Writable } from 'node:stream';
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
  UploadTarResult,
} from '../../shared/index.js';
import { AgentUnavailableError, fromAgentCode, type AgentClient } from '../agent-client/agent-clients.js';
import { agentHeader, readAgentError, readAgentJson } from '../agent-client/agent-http.js';
import { decodeOrNull } from '../../shared/uri.js';
import { AgentUploadReply, AgentUploadTarReply } from '../../shared/schemas/agent-replies.js';
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
    return this.#put(p, id, `/files/content?path=${encodeURIComponent(path)}`, source, declaredSize, signal, (res, sandboxId) => readAgentJson(res, AgentUploadReply, sandboxId, 'an upload'));
  }

  /**
   * Streams a tar stream (`source`) to the agent, which writes its entries under the directory
   * `path` as they arrive (see agent/services/files/tar-upload.ts for what it refuses). The same
   * MAX_UPLOAD_BYTES bound as `upload`, over the whole stream.
   */
  async uploadTar(p: Principal, id: string, path: string, source: Readable, declaredSize?: number, signal?: AbortSignal): Promise<UploadTarResult> {
    return this.#put(p, id, `/files/tar?path=${encodeURIComponent(path)}`, source, declaredSize, signal, (res, sandboxId) => readAgentJson(res, AgentUploadTarReply, sandboxId, 'a tar upload'));
  }

  /** A PUT of `source` to the agent's route `agentPath`, at most MAX_UPLOAD_BYTES (declared or streamed). */
  async #put<T>(p: Principal, id: string, agentPath: string, source: Readable, declaredSize: number | undefined, signal: AbortSignal | undefined, read: (res: IncomingMessage, sandboxId: string) => Promise<T>): Promise<T> {
    const limit = this.deps.maxUploadBytes;
    if (declaredSize !== undefined && declaredSize > limit) throw tooLarge(limit);
    const record = await this.deps.sandboxes.running(p, id);
    const agentReq = this.deps.sandboxes.agents.request(id, {
      method: 'PUT',
      path: agentPath,
      headers: declaredSize !== undefined ? { 'content-length': declaredSize } : { 'transfer-encoding': 'chunked' },
      signal,
    });
    return this.#sendBody(record, agentReq, source, limit, (res) => read(res, record.id));
  }

  /**
   * Forwards `source` as the body of an agent request and reads the agent's answer with `read`.
   * More than `limit` bytes fail with 413 (the agent request is cut, so the agent writes nothing);
   * the source is never destroyed here: on a failure the caller drains what is left of it, so its
   * client reads the answer instead of a reset.
   */
  async #sendBody<T>(record: SandboxRecord, agentReq: ClientRequest, source: Readable, limit: number, read: (res: IncomingMessage) => Promise<T>): Promise<T> {
    const response = answerOf(agentReq);
    try {
      await forwardStream(source, agentReq, limit);
    } catch (err) {
      agentReq.destroy();
      if (err instanceof PayloadTooLargeError) throw err;
      // The agent may have answered early with its reason (e.g. the path is a directory).
      const early = await Promise.race([response.catch(() => null), new Promise<null>((r) => setTimeout(() => r(null), 2000))]);
      if (early && early.statusCode !== 200) throw await agentHttpError(early, record.id);
      throw await this.#failure(record, err);
    }
    const res = await response.catch(async (err: unknown) => {
      throw await this.#failure(record, err);
    });
    if (res.statusCode !== 200) throw await agentHttpError(res, record.id);
    return read(res).catch(async (err: unknown) => {
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
    agentReq.end();
    return answerOf(agentReq).catch(async (err: unknown) => {
      throw await this.#failure(record, err);
    });
  }
}


/** An agent request's response once its head arrived, or its error (observed: a late failure is not unhandled). */
function answerOf(req: ClientRequest): Promise<IncomingMessage> {
  const response = new Promise<IncomingMessage>((resolve, reject) => {
    req.once('response', resolve);
    req.once('error', reject);
  });
  response.catch(() => {});
  return response;
}

/** The most a forwarded stream buffers for its destination before it waits for it to drain. */
const FORWARD_BUFFER_BYTES = 4 * 1024 * 1024;

/**
 * Copies `source` into `dest` (then ends it), failing with 413 past `limit` bytes, with an
 * interrupted source, or with `dest`'s error or early close. The chunks read in one turn of the
 * event loop go out in one write (corked until `setImmediate`), not one socket write each, and
 * the source is paused only past FORWARD_BUFFER_BYTES buffered (not at every 16 KiB), so a slow
 * reader costs a pause and resume per few MiB, not per chunk. The source is never destroyed here:
 * on a failure it is paused (a request body is then drained by the caller).
 */
export function forwardStream(source: Readable, dest: Writable & { socket?: { writableLength: number } | null }, limit = Infinity): Promise<void> {
  return new Promise((resolve, reject) => {
    let received = 0;
    let corked = false;
    let settled = false;
    let ended = false;
    const uncork = () => {
      corked = false;
      dest.uncork();
    };
    const finish = (err?: Error) => {
      if (settled) return;
      settled = true;
      source.off('data', onData).off('end', onEnd).off('error', finish).off('close', onClose);
      dest.off('drain', onDrain).off('error', finish).off('close', onDestClose);
      if (corked) uncork();
      if (err) {
        source.pause();
        reject(err);
      } else resolve();
    };
    const onData = (chunk: Buffer) => {
      received += chunk.length;
      if (received > limit) return finish(tooLarge(limit));
      if (!corked) {
        corked = true;
        dest.cork();
        setImmediate(uncork);
      }
      dest.write(chunk);
      if ((dest.socket?.writableLength ?? dest.writableLength) > FORWARD_BUFFER_BYTES) source.pause();
    };
    const onDrain = () => source.resume();
    const onEnd = () => {
      ended = true;
      dest.end(() => finish());
    };
    // A source that went away midway (a client or an agent hung up): its destination is cut too.
    const onClose = () => {
      if (!ended) finish(new Error('the transfer was interrupted'));
    };
    const onDestClose = () => {
      if (!dest.writableFinished) finish(new Error('the receiving side went away'));
    };
    // A source that errors after the failure was answered is observed.
    source.on('error', ignore);
    source.on('data', onData).once('end', onEnd).once('error', finish).once('close', onClose);
    dest.on('drain', onDrain).once('error', finish).once('close', onDestClose);
  });
}

function ignore(): void {}

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
