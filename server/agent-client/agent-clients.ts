import { createTRPCClient, TRPCClientError, type TRPCClient } from '@trpc/client';
import type { AgentRouter } from '../../agent/router.js';
import { DomainError, ErrorCode, InvalidInputError, NotFoundError } from '../errors.js';
import type { SandboxDriver } from '../hypervisor/types.js';
import { AgentConnection, AgentConnectionError } from './agent-connection.js';

export type AgentClient = TRPCClient<AgentRouter>;

/** Raised when a sandbox's agent cannot be reached; 502 to callers. */
export class AgentUnavailableError extends DomainError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(ErrorCode.AGENT_UNAVAILABLE, message, options);
  }
}

/**
 * One agent connection per sandbox, opened on first use and kept. The server's only way to talk
 * to what runs inside a sandbox.
 */
export class AgentClients {
  readonly #clients = new Map<string, { conn: AgentConnection; client: AgentClient }>();

  constructor(private readonly driver: SandboxDriver) {}

  get(sandboxId: string): AgentClient {
    let entry = this.#clients.get(sandboxId);
    if (!entry) {
      const conn = new AgentConnection(() => this.driver.connect(sandboxId));
      entry = { conn, client: createTRPCClient<AgentRouter>({ links: [conn.link()] }) };
      this.#clients.set(sandboxId, entry);
    }
    return entry.client;
  }

  /** Forgets a sandbox's connection (it was stopped, restarted or deleted). */
  async drop(sandboxId: string): Promise<void> {
    const entry = this.#clients.get(sandboxId);
    this.#clients.delete(sandboxId);
    await entry?.conn.close();
  }

  async closeAll(): Promise<void> {
    await Promise.all([...this.#clients.keys()].map((id) => this.drop(id)));
  }
}

/**
 * Maps an agent call's failure to a domain error: unreachable agent → AgentUnavailableError (502);
 * the agent's own NOT_FOUND / BAD_REQUEST → NotFoundError / InvalidInputError with its message.
 */
export function fromAgentError(err: unknown): unknown {
  if (!(err instanceof TRPCClientError)) return err;
  if (err.cause instanceof AgentConnectionError) {
    return new AgentUnavailableError(`The sandbox agent is not responding: ${err.cause.message}. Check the sandbox status; restart it with POST /api/sandboxes/{id}/start if it stopped.`, { cause: err });
  }
  const code = (err.data as { code?: string } | undefined)?.code;
  if (code === 'NOT_FOUND') return new NotFoundError(err.message, { cause: err });
  if (code === 'BAD_REQUEST') return new InvalidInputError(err.message, { cause: err });
  return new AgentUnavailableError(`The sandbox agent failed: ${err.message}`, { cause: err });
}
