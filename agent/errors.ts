import { TRPCError } from '@trpc/server';

/** An error the agent reports to the server with a tRPC code the agent-client maps to a domain error. */
export class AgentError extends TRPCError {
  constructor(code: 'BAD_REQUEST' | 'NOT_FOUND' | 'FORBIDDEN' | 'CONFLICT' | 'PRECONDITION_FAILED', message: string) {
    super({ code, message });
  }
}
