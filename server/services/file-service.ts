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
      return { stdout: `${st.mode} ${st.uid}:${st.gid} ${st.size} ${st.modTime} ${st.path}\n`, ...ok, ...st };
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
      return { stdout: `${du.humanReadable}\t${du.path}\n`, ...ok, ...du };
    });
  }

  headTail(p: Principal, id: string, path: string, lines: number, head: boolean): Promise<HeadTailResult> {
    return this.#agent(p, id, async (a) => {
      const r = await a.files.headTail.query({ path, lines, head });
      return { stdout: r.content, ...ok, ...r };
    });
  }

  search(p: Principal, id: string, path: string, pattern: string): Promise<SearchResult> {
    return this.#agent(p, id, async (a) => {
      const r = await a.files.search.query({ path, pattern });
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
