import { TRPCError } from '@trpc/server';

/** An error the agent reports to the server with a tRPC code the agent-client maps to a domain error. */
export class AgentError extends TRPCError {
  constructor(code: AgentErrorCode, message: string) {
    super({ code, message });
  }
}

export type AgentErrorCode = 'BAD_REQUEST' | 'NOT_FOUND' | 'FORBIDDEN' | 'CONFLICT' | 'PRECONDITION_FAILED' | 'PAYLOAD_TOO_LARGE';

/** The HTTP status the agent's raw routes answer for each code. */
export const agentErrorStatus: Record<AgentErrorCode, number> = {
  BAD_REQUEST: 400,
  NOT_FOUND: 404,
  FORBIDDEN: 403,
  CONFLICT: 409,
  PRECONDITION_FAILED: 412,
  PAYLOAD_TOO_LARGE: 413,
};

/** A filesystem error as an AgentError that names the path and what was wrong. */
export function fsError(err: unknown, path: string): Error {
  const code = (err as NodeJS.ErrnoException).code;
  switch (code) {
    case 'ENOENT':
      return new AgentError('NOT_FOUND', `No such file or directory: ${path}`);
    case 'ENOTDIR':
      return new AgentError('BAD_REQUEST', `Not a directory: ${path}`);
    case 'EISDIR':
      return new AgentError('BAD_REQUEST', `Is a directory: ${path}`);
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return new AgentError('FORBIDDEN', `Permission denied: ${path}`);
    case 'EEXIST':
    case 'ENOTEMPTY':
      return new AgentError('CONFLICT', `Already exists: ${path}`);
    case 'ENOSPC':
    case 'EDQUOT':
      return new AgentError('PAYLOAD_TOO_LARGE', `No space left in the sandbox for ${path}`);
    case 'ENAMETOOLONG':
      return new AgentError('BAD_REQUEST', `Name too long: ${path}`);
    case 'ELOOP':
      return new AgentError('BAD_REQUEST', `Too many levels of symbolic links: ${path}`);
    case 'EINVAL':
      return new AgentError('BAD_REQUEST', `Invalid operation on ${path} (e.g. moving a directory into itself)`);
    case 'EBUSY':
      return new AgentError('CONFLICT', `Busy (in use or a mount point): ${path}`);
    case 'EXDEV':
      return new AgentError('BAD_REQUEST', `Cannot move across filesystems: ${path}`);
    default:
      // fs.cp reports its refusals (copying a directory into itself, onto a file, …) as ERR_FS_CP_*.
      if (code?.startsWith('ERR_FS_CP_')) return new AgentError('BAD_REQUEST', `Cannot copy ${path}: ${(err as Error).message.replace(/^[^:]*: /, '')}`);
      return err instanceof Error ? err : new Error(String(err));
  }
}
