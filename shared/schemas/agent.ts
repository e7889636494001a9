import { z } from 'zod';

/**
 * The protocol between the server's agent-client and the agent inside each sandbox. Only the
 * server speaks it; it is not part of the public API.
 */

export const EnvMap = z.record(z.string(), z.string());

export const ProcessSpec = z.object({
  /** A shell command line (run by /bin/sh -c) unless `args` is given, then the program to run. */
  command: z.string().min(1),
  args: z.array(z.string()).optional(),
  env: EnvMap.optional(),
  cwd: z.string().optional(),
  /** Milliseconds; 0 = no limit. The whole process group is killed when it passes. */
  timeoutMs: z.number().int().min(0),
  /** Keep at most this many bytes of each of stdout and stderr. */
  maxOutputBytes: z.number().int().min(0).optional(),
  /** Open stdin as a pipe the caller can write to (background commands); else /dev/null. */
  stdin: z.boolean().optional(),
});
export type ProcessSpec = z.infer<typeof ProcessSpec>;

export const AgentExecResult = z.object({
  stdout: z.string(),
  stderr: z.string(),
  exitCode: z.number().int(),
  /** True when output beyond `maxOutputBytes` was dropped. */
  truncated: z.boolean(),
  timedOut: z.boolean(),
  signal: z.string().nullable(),
});
export type AgentExecResult = z.infer<typeof AgentExecResult>;

export const AgentProcessInfo = z.object({
  pid: z.number().int(),
  command: z.string(),
  startTime: z.string(),
  running: z.boolean(),
  exitCode: z.number().int().nullable(),
});
export type AgentProcessInfo = z.infer<typeof AgentProcessInfo>;

/** A kill's answer: the process once reaped (or the wait ran out), and whether it was still running when signalled. */
export const AgentKillResult = AgentProcessInfo.extend({ signalled: z.boolean() });
export type AgentKillResult = z.infer<typeof AgentKillResult>;

export const OutputEvent = z.discriminatedUnion('type', [
  z.object({ type: z.literal('stdout'), data: z.string() }),
  z.object({ type: z.literal('stderr'), data: z.string() }),
  z.object({ type: z.literal('exit'), exitCode: z.number().int(), signal: z.string().nullable(), timedOut: z.boolean() }),
  /** Output between the last event the caller saw and the oldest still buffered was dropped. */
  z.object({ type: z.literal('gap'), droppedBytes: z.number().int() }),
]);
export type OutputEvent = z.infer<typeof OutputEvent>;

export const AgentHealth = z.object({ ok: z.literal(true), pid: z.number().int(), uptimeMs: z.number(), processes: z.number().int() });
export type AgentHealth = z.infer<typeof AgentHealth>;
