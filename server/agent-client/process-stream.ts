import type { IncomingMessage } from 'node:http';
import type { z } from 'zod';
import type { NotFoundCode } from '../../shared/errors.js';
import { AGENT_MESSAGE_MAX_CHARS, AGENT_STREAM_MAX_LINE_BYTES, AgentProcessStreamLine, AgentShellStreamLine } from '../../shared/schemas/agent-replies.js';
import { AgentProtocolError } from './agent-connection.js';
import { AgentUnavailableError, fromAgentCode, type AgentClients } from './agent-clients.js';
import { readAgentError } from './agent-http.js';

/** Which of the agent's process-output streams to open (see agent/services/process/output-stream.ts). */
export type ProcessStreamCall = { start: Record<string, unknown> } | { pid: number; after: number };

/**
 * A process's output from the sandbox's agent, as the agent's raw HTTP stream gives it: every line
 * bounded and schema-parsed. The stream is pulled, never pushed: while the caller does not ask for
 * the next event, the socket is not read, the agent's writes back up, and the agent stops reading
 * the process's pipes, so the process itself waits. Failures are thrown as they come (the caller
 * maps them with `AgentClients.failure`); a caller that returns early closes the stream.
 */
export function agentProcessStream(agents: AgentClients, sandboxId: string, call: ProcessStreamCall, signal?: AbortSignal): AsyncGenerator<AgentProcessStreamLine> {
  const path = 'start' in call ? '/process/stream' : `/process/output?pid=${call.pid}&after=${call.after}`;
  return agentLineStream(agents, sandboxId, path, 'start' in call ? call.start : undefined, AgentProcessStreamLine, 'PROCESS_NOT_FOUND', signal);
}

/** One command in a shell session, as the agent's raw stream gives it (pulled, like `agentProcessStream`). */
export function agentShellExecStream(agents: AgentClients, sandboxId: string, spec: { sessionId: string; command: string; timeoutMs: number }, signal?: AbortSignal): AsyncGenerator<AgentShellStreamLine> {
  return agentLineStream(agents, sandboxId, '/shell/exec-stream', spec, AgentShellStreamLine, 'SESSION_NOT_FOUND', signal);
}

/** An agent's NDJSON stream on `path` (POST with `body`, else GET), each line bounded and parsed against `schema`. */
async function* agentLineStream<T extends z.ZodType>(
  agents: AgentClients,
  sandboxId: string,
  path: string,
  json: unknown,
  schema: T,
  notFound: NotFoundCode,
  signal?: AbortSignal,
): AsyncGenerator<z.infer<T>> {
  const body = json === undefined ? undefined : JSON.stringify(json);
  const req = agents.request(sandboxId, {
    method: body === undefined ? 'GET' : 'POST',
    path,
    headers: body === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    signal,
  });
  const answered = new Promise<IncomingMessage>((resolve, reject) => {
    req.once('response', resolve);
    req.once('error', reject);
  });
  req.end(body);
  let res: IncomingMessage | undefined;
  try {
    res = await answered;
    if (res.statusCode !== 200) {
      const { code, message } = await readAgentError(res, sandboxId);
      throw fromAgentCode(code, message, undefined, notFound) ?? new AgentUnavailableError(`The sandbox agent failed: ${message}`);
    }
    // Lines are found in the bytes (a JSON line holds no raw newline) and decoded one at a time.
    let partial: Buffer[] = [];
    let partialBytes = 0;
    for await (const chunk of res as AsyncIterable<Buffer>) {
      let start = 0;
      for (let nl = chunk.indexOf(10); nl !== -1; nl = chunk.indexOf(10, start)) {
        let line: string;
        if (partialBytes) {
          partial.push(chunk.subarray(start, nl));
          line = Buffer.concat(partial, partialBytes + nl - start).toString('utf8');
          partial = [];
          partialBytes = 0;
        } else {
          line = chunk.toString('utf8', start, nl);
        }
        yield parseLine(line, schema, sandboxId);
        start = nl + 1;
      }
      if (start < chunk.length) {
        partial.push(start === 0 ? chunk : chunk.subarray(start));
        partialBytes += chunk.length - start;
      }
      if (partialBytes > AGENT_STREAM_MAX_LINE_BYTES) {
        throw new AgentProtocolError(`the sandbox ${sandboxId} agent sent a reply of ${partialBytes} bytes where at most ${AGENT_STREAM_MAX_LINE_BYTES} are accepted (one line of an output stream)`);
      }
    }
    throw new AgentProtocolError(`the sandbox ${sandboxId} agent ended an output stream before its exit event`);
  } finally {
    res?.destroy();
    req.destroy();
  }
}

function parseLine<T extends z.ZodType>(line: string, schema: T, sandboxId: string): z.infer<T> {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch {
    throw new AgentProtocolError(`the sandbox ${sandboxId} agent sent an output stream line that is not JSON: ${JSON.stringify(line.slice(0, 80)).slice(0, AGENT_MESSAGE_MAX_CHARS)}`);
  }
  const parsed = schema.safeParse(json);
  if (!parsed.success) throw new AgentProtocolError(`the sandbox ${sandboxId} agent sent a malformed output stream event`);
  return parsed.data;
}
