import { randomUUID } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import type { Duplex } from 'node:stream';
import { AGENT_REQUEST_HEADER } from '../../shared/guest-protocol.js';
import { PORT_CLOSED_CODE, PORT_TUNNEL_PROTOCOL, portTunnelPath } from '../../shared/port-tunnel.js';
import { UpstreamUnavailableError } from '../errors.js';
import { AgentConnectionError, AgentProtocolError } from './agent-connection.js';
import { readAgentError } from './agent-http.js';
import { fromAgentCode } from './agent-clients.js';

/** How long the agent has to open a connection to the port and answer the tunnel request. */
export const PORT_TUNNEL_TIMEOUT_MS = 15_000;

/**
 * Opens a port tunnel (shared/port-tunnel.ts) over `stream`, a fresh connection to the sandbox's
 * agent that the tunnel then owns: resolves with it once the agent answered 101 echoing this
 * request's nonce, carrying the bytes of a TCP connection to `port` inside the sandbox. Nothing
 * listening there is an UpstreamUnavailableError; any other answer an AgentProtocolError or the
 * agent's (bounded) error. `stream` is destroyed on every failure.
 */
export function openPortTunnel(stream: Duplex, sandboxId: string, port: number): Promise<Duplex> {
  const nonce = randomUUID();
  return new Promise((resolve, reject) => {
    const fail = (err: Error) => {
      clearTimeout(timer);
      stream.destroy();
      reject(err);
    };
    const req = httpRequest({
      method: 'GET',
      path: portTunnelPath(port),
      createConnection: () => stream as never,
      headers: { host: 'agent', connection: 'Upgrade', upgrade: PORT_TUNNEL_PROTOCOL, [AGENT_REQUEST_HEADER]: nonce },
    });
    const timer = setTimeout(() => req.destroy(new AgentConnectionError(`the sandbox agent did not open port ${port} within ${PORT_TUNNEL_TIMEOUT_MS} ms`)), PORT_TUNNEL_TIMEOUT_MS);
    req.once('upgrade', (res, socket, head) => {
      clearTimeout(timer);
      if (res.headers[AGENT_REQUEST_HEADER] !== nonce) return fail(new AgentProtocolError(`the sandbox ${sandboxId} agent's tunnel answer was not the answer to the request sent`));
      if (head.length) socket.unshift(head);
      resolve(socket);
    });
    req.once('response', (res) => {
      clearTimeout(timer);
      void readAgentError(res, sandboxId).then(({ code, message }) => {
        if (code === PORT_CLOSED_CODE) return fail(notListening(sandboxId, port));
        fail(fromAgentCode(code, message) ?? new AgentProtocolError(`the sandbox ${sandboxId} agent answered a port tunnel with HTTP ${res.statusCode}`));
      });
    });
    req.once('error', fail);
    req.end();
  });
}

/** The 502 for a port nothing listens on. */
export function notListening(sandboxId: string, port: number): UpstreamUnavailableError {
  return new UpstreamUnavailableError(`Nothing listens on port ${port} in sandbox ${sandboxId}: start a server on it (listening on 127.0.0.1 or 0.0.0.0) and retry`);
}
