import { z } from 'zod';
import { AgentText, ArgText, Id, PathText, ProcessEnv } from './common.js';
import { IdempotencyKey } from './idempotency.js';


/** A one-shot command's timeout when none is given (or 0, which clients built on the original's Go structs always send). */
export const DEFAULT_EXEC_TIMEOUT_SEC = 30;

export const ExecInput = z
  .object({
    id: Id,
    command: ArgText.min(1, 'must not be empty').meta({ example: 'ls -la /root' }),
    args: z.array(ArgText).optional().meta({ description: 'When given, `command` is run as a program with these arguments, without a shell.' }),
    timeout: z
      .number()
      .int()
      .min(0, 'must be 0 to 300 seconds')
      .max(300, 'must be 0 to 300 seconds')
      .default(DEFAULT_EXEC_TIMEOUT_SEC)
      .meta({ description: `Seconds (ignored if background=true); 0 = the default, ${DEFAULT_EXEC_TIMEOUT_SEC}. The whole process tree is killed when it passes.` }),
    env: ProcessEnv.optional(),
    cwd: PathText.optional().meta({ example: '/root' }),
    background: z.boolean().default(false).meta({ description: 'Start in the background and answer with its pid at once.' }),
  })
  .meta({ id: 'ExecRequest' });
export type ExecInput = z.infer<typeof ExecInput>;

export const ExecResult = z
  .object({
    stdout: z.string(),
    stderr: z.string(),
    exitCode: z.number().int().meta({ description: '124 when the timeout killed it; 128+n when signal n ended it.' }),
    truncated: z.boolean().meta({ description: 'True when stdout or stderr passed the output cap and the rest was dropped.' }),
    timedOut: z.boolean(),
  })
  .meta({ id: 'ExecResult' });
export type ExecResult = z.infer<typeof ExecResult>;

export const CommandStarted = z
  .object({ success: z.literal(true), pid: z.number().int(), command: z.string() })
  .meta({ id: 'CommandRunResponse' });
export type CommandStarted = z.infer<typeof CommandStarted>;

export const ExecOutput = z.union([ExecResult, CommandStarted]);
export type ExecOutput = z.infer<typeof ExecOutput>;

/** One chunk of a streamed command: the same events as the SSE stream. */
export const ExecChunk = z.discriminatedUnion('type', [
  z.object({ type: z.literal('started'), pid: z.number().int() }),
  z.object({ type: z.literal('stdout'), data: z.string() }),
  z.object({ type: z.literal('stderr'), data: z.string() }),
  z.object({ type: z.literal('exit'), exitCode: z.number().int(), timedOut: z.boolean() }),
  z.object({ type: z.literal('gap'), droppedBytes: z.number().int() }),
]);
export type ExecChunk = z.infer<typeof ExecChunk>;

export const RunCommandInput = z.object({
  id: Id,
  command: ArgText.min(1, 'must not be empty').meta({ example: 'sleep 3600' }),
  args: z.array(ArgText).optional(),
  env: ProcessEnv.optional(),
  cwd: PathText.optional(),
  timeout: z.number().int().min(0, 'must be 0 to 900 seconds').max(900, 'must be 0 to 900 seconds').default(0).meta({ description: 'Seconds; 0 = no timeout' }),
  idempotencyKey: IdempotencyKey.optional(),
});
export type RunCommandInput = z.infer<typeof RunCommandInput>;

export const ProcessInfo = z
  .object({
    pid: z.number().int(),
    command: z.string(),
    startTime: z.string().meta({ format: 'date-time' }),
    running: z.boolean(),
    exitCode: z.number().int().nullable(),
  })
  .meta({ id: 'ProcessInfo' });
export type ProcessInfo = z.infer<typeof ProcessInfo>;

export const CommandList = z.object({ success: z.literal(true), processes: z.array(ProcessInfo) }).meta({ id: 'CommandListResponse' });
export const PidInput = z.object({ id: Id, pid: z.number().int().positive() });
export const CommandKillResult = z.object({ success: z.literal(true), message: z.string() }).meta({ id: 'CommandKillResponse' });
export const WaitInput = PidInput.extend({
  timeout: z.number().int().min(0).max(3600).default(0).meta({ description: 'Seconds to wait at most; 0 = until it exits' }),
});
export const CommandWaitResult = z
  .object({ success: z.boolean(), exitCode: z.number().int().nullable(), error: z.string().nullable() })
  .meta({ id: 'CommandWaitResponse' });
export const WriteStdinInput = PidInput.extend({ data: z.string(), eof: z.boolean().default(false) });

export const SessionExecInput = z
  .object({
    id: Id,
    action: z.enum(['create', 'exec', 'input', 'resize', 'close'], { error: 'must be create, exec, input, resize or close' }),
    sessionId: z.string().optional(),
    shell: PathText.optional().meta({ description: 'For create: the shell program (default /bin/bash, also when empty)' }),
    command: AgentText.optional().meta({ description: 'For exec' }),
    input: z.string().optional().meta({ description: 'For input: raw text written to the shell' }),
    cols: z.number().int().min(0).max(500).optional().meta({ description: 'Accepted and ignored (no terminal); 0 as the original\'s clients send it' }),
    rows: z.number().int().min(0).max(200).optional().meta({ description: 'Accepted and ignored (no terminal); 0 as the original\'s clients send it' }),
    timeout: z.number().int().min(1).max(300).default(30).meta({ description: 'For exec: seconds' }),
  })
  .meta({ id: 'SessionExecRequest' });
export type SessionExecInput = z.infer<typeof SessionExecInput>;

export const SessionExecResult = z
  .object({ success: z.boolean(), sessionId: z.string(), output: z.string(), error: z.string(), exitCode: z.number().int() })
  .meta({ id: 'SessionExecResponse' });
export type SessionExecResult = z.infer<typeof SessionExecResult>;

export const SessionExecStreamInput = z.object({
  id: Id,
  sessionId: z.string().min(1),
  command: AgentText.min(1),
  timeout: z.number().int().min(1).max(300).default(30),
});
