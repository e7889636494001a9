import { request as httpRequest, type IncomingMessage } from 'node:http';
import type { Duplex, Readable } from 'node:stream';
import type { z } from 'zod';
import { AGENT_MESSAGE_MAX_CHARS, AgentHttpErrorReply } from '../../shared/schemas/agent-replies.js';
import { AgentProtocolError } from './agent-connection.js';

/**
 * The agent's raw HTTP routes (readiness, file bytes, a VM's poweroff and identity), spoken only
 * from here. Like its tRPC replies, every body the server reads from an agent is size-bounded and
 * schema-parsed; a file's bytes are streamed, never held.
 */

/** The most the server reads of an agent's JSON answer on a raw route. */
export const AGENT_HTTP_MAX_JSON_BYTES = 64 * 1024;

/**
 * One HTTP request to the agent over a stream from `connect()`: resolves with the status code
 * (the body is discarded unread). The stream is used for this request only.
 */
export function agentHttpStatus(agent: Duplex, method: string, path: string, opts: { body?: unknown; timeoutMs: number }): Promise<number> {
  const body = opts.body === undefined ? undefined : JSON.stringify(opts.body);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        method,
        path,
        createConnection: () => agent as never,
        timeout: opts.timeoutMs,
        headers: body === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      },
    );
    req.once('timeout', () => req.destroy(new Error(`${method} ${path}: no answer within ${opts.timeoutMs} ms`)));
    req.once('error', reject);
    req.end(body);
  });
}

/** Reads a whole body of at most `maxBytes`; more fails with `AgentProtocolError`. */
export async function readBounded(stream: Readable, maxBytes: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of stream) {
    size += (c as Buffer).length;
    if (size > maxBytes) {
      stream.destroy();
      throw new AgentProtocolError(`${what} was larger than ${maxBytes} bytes`);
    }
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks);
}

/** An agent's JSON answer, bounded and parsed against `schema`; anything else is an `AgentProtocolError`. */
export async function readAgentJson<T extends z.ZodType>(res: IncomingMessage, schema: T, sandboxId: string, what: string): Promise<z.infer<T>> {
  const label = `the sandbox ${sandboxId} agent's answer to ${what}`;
  const body = await readBounded(res, AGENT_HTTP_MAX_JSON_BYTES, label);
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch {
    throw new AgentProtocolError(`${label} is not JSON`);
  }
  const parsed = schema.safeParse(json);
  if (!parsed.success) throw new AgentProtocolError(`${label} is malformed`);
  return parsed.data;
}

/** An agent's error answer on a raw route: its `{error, code}` (bounded, cut), or what can be said without it. */
export async function readAgentError(res: IncomingMessage, sandboxId: string): Promise<{ code: string; message: string }> {
  const body = await readBounded(res, AGENT_HTTP_MAX_JSON_BYTES, 'an error answer').catch(() => null);
  let parsed: z.infer<typeof AgentHttpErrorReply> = {};
  try {
    const r = AgentHttpErrorReply.safeParse(JSON.parse(body?.toString('utf8') ?? ''));
    if (r.success) parsed = r.data;
  } catch {}
  const message = parsed.error ? parsed.error.slice(0, AGENT_MESSAGE_MAX_CHARS) : `the sandbox ${sandboxId} agent answered HTTP ${res.statusCode}`;
  return { code: parsed.code ?? '', message };
}

/** A response header from an agent as text, or '' (repeated headers are not accepted). */
export function agentHeader(res: IncomingMessage, name: string): string {
  const v = res.headers[name];
  return typeof v === 'string' ? v : '';
}

