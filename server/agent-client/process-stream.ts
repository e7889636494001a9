import type { IncomingMessage } from 'node:http';
import { AGENT_MESSAGE_MAX_CHARS, AGENT_STREAM_MAX_LINE_BYTES, AgentProcessStreamLine } from '../../shared/schemas/agent-replies.js';
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
export async function* agentProcessStream(agents: AgentClients, sandboxId: string, call: ProcessStreamCall, signal?: AbortSignal): AsyncGenerator<AgentProcessStreamLine> {
  const body = 'start' in call ? JSON.stringify(call.start) : undefined;
  const req = agents.request(sandboxId, {
    method: body === undefined ? 'GET' : 'POST',
    path: 'start' in call ? '/process/stream' : `/process/output?pid=${call.pid}&after=${call.after}`,
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
      throw fromAgentCode(code, message, undefined, 'PROCESS_NOT_FOUND') ?? new AgentUnavailableError(`The sandbox agent failed: ${message}`);
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
        yield parseLine(line, sandboxId);
        start = nl + 1;
      }
      if (start < chunk.length) {
        partial.push(start === 0 ? chunk : chunk.subarray(start));
        partialBytes += chunk.length - start;
      }
      if (partialBytes > AGENT_STREAM_MAX_LINE_BYTES) {
        throw new AgentProtocolError(`the sandbox ${sandboxId} agent sent a reply of ${partialBytes} bytes where at most ${AGENT_STREAM_MAX_LINE_BYTES} are accepted (one line of a process's output stream)`);
      }
    }
    throw new AgentProtocolError(`the sandbox ${sandboxId} agent ended a process's output stream before the process's exit`);
  } finally {
    res?.destroy();
    req.destroy();
  }
}

function parseLine(line: string, sandboxId: string): AgentProcessStreamLine {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch {
    throw new AgentProtocolError(`the sandbox ${sandboxId} agent sent a process output line that is not JSON: ${JSON.stringify(line.slice(0, 80)).slice(0, AGENT_MESSAGE_MAX_CHARS)}`);
  }
  const parsed = AgentProcessStreamLine.safeParse(json);
  if (!parsed.success) throw new AgentProtocolError(`the sandbox ${sandboxId} agent sent a malformed process output event`);
  return parsed.data;
}
