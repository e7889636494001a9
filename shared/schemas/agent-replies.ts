import { z } from 'zod';
import { AgentExecResult, AgentHealth, AgentProcessInfo, OutputEvent } from './agent.js';
import { DiskUsage, FileInfo, FileStats, UploadResult, WatchMessage } from './files.js';
import { PtyEvent, PtySessionInfo } from './pty.js';

/**
 * What the server accepts from an agent, procedure by procedure. The agent runs inside the
 * sandbox, where the tenant can replace it, so every reply is parsed against its schema before
 * any service sees it; a reply that does not match fails that one call (502), never the server.
 * For subscriptions the schema is one event as it arrives on the wire (`tracked()` events come as
 * `{id, data}`).
 */

/** A tracked subscription event: `{id: "<seq>", data: event}`. */
const tracked = <T extends z.ZodType>(event: T) => z.object({ id: z.string().max(32), data: event });
const Written = z.object({ written: z.number().int().min(0) });
const Path = z.string();

export const agentReplies = {
  'files.list': z.array(FileInfo),
  'files.stat': FileStats,
  'files.remove': Path,
  'files.mkdir': Path,
  'files.create': Path,
  'files.copy': Path,
  'files.move': Path,
  'files.chmod': Path,
  'files.du': DiskUsage,
  'files.headTail': z.object({ path: Path, content: z.string(), lines: z.number().int() }),
  'files.search': z.object({ path: Path, matches: z.array(z.string()), truncated: z.boolean() }),
  'files.compress': z.object({ path: Path, archive: z.string() }),
  'files.extract': z.object({ path: Path, entries: z.number().int() }),
  'files.watch': z.discriminatedUnion('type', [
    z.object({ type: z.literal('ready'), path: Path }),
    z.object({ type: z.literal('events'), events: z.array(WatchMessage) }),
  ]),
  'shell.create': z.object({ sessionId: z.string().min(1).max(128) }),
  'shell.input': z.object({ ok: z.boolean() }),
  'shell.close': z.object({ ok: z.boolean() }),
  'shell.exec': z.object({ output: z.string(), error: z.string(), exitCode: z.number().int() }),
  'shell.execStream': z.discriminatedUnion('type', [
    z.object({ type: z.literal('stdout'), data: z.string() }),
    z.object({ type: z.literal('stderr'), data: z.string() }),
    z.object({ type: z.literal('exit'), exitCode: z.number().int() }),
  ]),
  'pty.create': PtySessionInfo,
  'pty.list': z.array(PtySessionInfo),
  'pty.write': Written,
  'pty.resize': PtySessionInfo,
  'pty.kill': z.object({ killed: z.boolean() }),
  'pty.pause': z.object({ paused: z.boolean() }),
  'pty.resume': z.object({ paused: z.boolean() }),
  'pty.buffer': z.object({ output: z.string() }),
  'pty.output': tracked(PtyEvent),
  health: AgentHealth,
  'process.run': AgentExecResult,
  'process.start': AgentProcessInfo,
  'process.list': z.array(AgentProcessInfo),
  'process.kill': AgentProcessInfo,
  'process.wait': z.object({ exited: z.boolean(), exitCode: z.number().int().nullable() }),
  'process.writeStdin': Written,
  'process.output': tracked(OutputEvent),
} as const satisfies Record<string, z.ZodType>;

export type AgentReplyPath = keyof typeof agentReplies;

/** The agent's raw `PUT /files/content` answer. */
export const AgentUploadReply = UploadResult;

/** The agent's raw error body (`{error, code}`) on its file routes. */
export const AgentHttpErrorReply = z.object({ error: z.string().optional(), code: z.string().max(64).optional() });

/** The largest error message from an agent the server passes on; longer ones are cut. */
export const AGENT_MESSAGE_MAX_CHARS = 2000;
