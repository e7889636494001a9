import type { IncomingMessage, ServerResponse } from 'node:http';
import { ProcessSpec } from '../../../shared/schemas/agent.js';
import { AgentError, agentErrorStatus } from '../../errors.js';
import type { SequencedEvent } from './output-log.js';
import type { ManagedProcess, ProcessManager } from './process-manager.js';
import type { ShellSessions } from '../shell/shell-sessions.js';
import { z } from 'zod';

const ShellExecSpec = z.object({ sessionId: z.string().min(1), command: z.string(), timeoutMs: z.number().int().min(1) });

/** The largest process spec accepted (the kernel refuses more than about 2 MiB of arguments and environment anyway). */
const MAX_SPEC_BYTES = 4 * 1024 * 1024;

/**
 * The agent's streamed process output, over plain HTTP so the socket's flow control reaches the
 * process: one JSON object per line (`{"type":"started","pid":n}` first when it started the
 * process, then `{"seq":n,"type":"stdout"|"stderr","data":…}`, `{"seq":n,"type":"gap",…}`, and
 * `{"seq":n,"type":"exit",…}` last). While the response is backed up the process's pipes are not
 * read, so it blocks on write.
 *
 * - `POST /process/stream` (body: a ProcessSpec): starts the process and streams it from its
 *   first byte, in one call, so nothing it writes can be missed.
 * - `GET /process/output?pid=N&after=S`: a listed process's output after event S, then live.
 * - `POST /shell/exec-stream` (body: `{sessionId, command, timeoutMs}`): one command in a shell
 *   session, `{"type":"stdout"|"stderr","data":…}` lines then `{"type":"exit","exitCode":n}` (or
 *   `{"type":"error","error":…,"code":…}` when it fails after the head was sent); the shell's
 *   pipes are held the same way.
 *
 * Resolves with false when the request is for neither route.
 */
export async function handleProcessStream(req: IncomingMessage, res: ServerResponse, processes: ProcessManager, shells: ShellSessions): Promise<boolean> {
  const url = new URL(req.url ?? '/', 'http://agent');
  try {
    if (url.pathname === '/process/stream' && req.method === 'POST') {
      const parsed = ProcessSpec.safeParse(await readJson(req));
      if (!parsed.success) throw new AgentError('BAD_REQUEST', `Invalid process spec: ${parsed.error.issues[0]?.message ?? 'malformed'}`);
      const proc = processes.start(parsed.data);
      streamOutput(res, proc, 0, `${JSON.stringify({ type: 'started', pid: proc.pid })}\n`);
      return true;
    }
    if (url.pathname === '/shell/exec-stream' && req.method === 'POST') {
      const parsed = ShellExecSpec.safeParse(await readJson(req));
      if (!parsed.success) throw new AgentError('BAD_REQUEST', `Invalid shell command: ${parsed.error.issues[0]?.message ?? 'malformed'}`);
      streamShellExec(res, shells, parsed.data);
      return true;
    }
    if (url.pathname === '/process/output' && req.method === 'GET') {
      const pid = Number(url.searchParams.get('pid'));
      const after = Number(url.searchParams.get('after') ?? '0');
      if (!Number.isSafeInteger(pid) || pid < 1 || !Number.isSafeInteger(after) || after < 0) throw new AgentError('BAD_REQUEST', 'pid and after must be non-negative integers');
      streamOutput(res, processes.get(pid), after, '');
      return true;
    }
  } catch (err) {
    sendError(res, err);
    return true;
  }
  return false;
}

/** Writes `proc`'s events after `after` (then live, until its exit) to `res`, holding the process while `res` is backed up. */
function streamOutput(res: ServerResponse, proc: ManagedProcess, after: number, head: string): void {
  res.writeHead(200, { 'content-type': 'application/x-ndjson' });
  // The head goes out now, not with the first event: the server waits a bounded time for an
  // answer, and a process that is silent for longer (`sleep`) is not an agent that stopped answering.
  if (head) res.write(head);
  else res.flushHeaders();
  const holder = {};
  let last = after;
  let done = false;
  const finish = () => {
    if (done) return;
    done = true;
    unsubscribe();
    proc.release(holder);
  };
  const send = (e: SequencedEvent) => {
    if (done || (e.seq <= last && e.event.type !== 'gap')) return;
    last = Math.max(last, e.seq);
    const line = `${JSON.stringify({ seq: e.seq, ...e.event })}\n`;
    if (e.event.type === 'exit') {
      finish();
      res.end(line);
    } else if (!res.write(line)) proc.hold(holder);
  };
  res.on('drain', () => proc.release(holder));
  res.once('close', finish);
  // Backlog and subscription in one synchronous step: no event falls between them.
  const backlog = proc.output.since(after);
  const unsubscribe = proc.output.subscribe(send);
  for (const e of backlog) send(e);
}

/** Runs one command in a shell session, writing its output to `res` and holding the shell while `res` is backed up. */
function streamShellExec(res: ServerResponse, shells: ShellSessions, spec: z.infer<typeof ShellExecSpec>): void {
  const session = shells.get(spec.sessionId);
  res.writeHead(200, { 'content-type': 'application/x-ndjson' });
  res.flushHeaders(); // as in streamOutput: a silent command, or one queued behind another, is still answered

  const holder = {};
  let left = false;
  res.on('drain', () => session.release(holder));
  res.once('close', () => {
    left = true;
    session.release(holder);
  });
  const line = (v: unknown) => `${JSON.stringify(v)}\n`;
  session
    .exec(spec.command, spec.timeoutMs, (c) => {
      if (!left && !res.write(line({ type: c.stream, data: c.data }))) session.hold(holder);
    })
    .then(
      (exitCode) => res.end(line({ type: 'exit', exitCode })),
      (err: unknown) => res.end(line({ type: 'error', error: (err as Error).message, code: err instanceof AgentError ? err.code : 'INTERNAL' })),
    )
    .finally(() => session.release(holder));
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > MAX_SPEC_BYTES) throw new AgentError('PAYLOAD_TOO_LARGE', `The process spec is larger than ${MAX_SPEC_BYTES} bytes`);
    chunks.push(c as Buffer);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new AgentError('BAD_REQUEST', 'The process spec is not JSON');
  }
}

function sendError(res: ServerResponse, err: unknown): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const known = err instanceof AgentError;
  const body = JSON.stringify({ error: (err as Error).message, code: known ? err.code : 'INTERNAL' });
  res.writeHead(known ? (agentErrorStatus[err.code as keyof typeof agentErrorStatus] ?? 400) : 500, { 'content-type': 'application/json' }).end(body);
}
