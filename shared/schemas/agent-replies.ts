import { z } from 'zod';
import { AgentExecResult, AgentHealth, AgentProcessInfo, OutputEvent } from './agent.js';
import { DiskUsage, FileEvent, FileInfo, FileStats, UploadResult, UploadTarResult } from './files.js';
import { PtyEvent, PtySessionInfo } from './pty.js';
import { MAX_LISTENING_PORTS } from '../listening-ports.js';

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
/** A path in the sandbox as the agent reports it: no longer than Linux's PATH_MAX. */
const Path = z.string().max(4096);
/** One chunk of output as the agent reads it from a pipe or terminal (64 KiB reads; 1 MiB leaves room). */
const Chunk = z.string().max(1024 * 1024);
const Short = z.string().max(256);
const BoundedFileInfo = FileInfo.extend({ name: Path, path: Path, mode: Short, modTime: Short });
const BoundedStats = FileStats.extend({ name: Path, path: Path, mode: Short, modTime: Short, linkTarget: Path.nullable() });
const BoundedWatchMessage = z.union([
  FileEvent.extend({ path: Path, oldPath: Path.optional(), timestamp: Short }),
  z.object({ type: z.literal('overflow'), dropped: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER), timestamp: Short }),
]);
/** A watch session's id as the agent gives it (a UUID: the server's event ids embed it). */
const WatchSessionId = z.uuid();
const BoundedPtySession = PtySessionInfo.extend({ id: Short, createdAt: Short });
const BoundedProcessInfo = AgentProcessInfo.extend({ command: z.string().max(1024 * 1024), startTime: Short });

export const agentReplies = {
  'files.list': z.array(BoundedFileInfo),
  'files.stat': BoundedStats,
  'files.remove': Path,
  'files.mkdir': Path,
  'files.create': Path,
  'files.copy': Path,
  'files.move': Path,
  'files.chmod': Path,
  'files.du': DiskUsage.extend({ path: Path, humanReadable: Short }),
  'files.headTail': z.object({ path: Path, content: z.string(), lines: z.number().int() }),
  'files.search': z.object({ path: Path, matches: z.array(Path).max(10_000), truncated: z.boolean() }),
  'files.compress': z.object({ path: Path, archive: Path }),
  'files.extract': z.object({ path: Path, entries: z.number().int() }),
  'files.watchStart': z.object({ sessionId: WatchSessionId, path: Path }),
  'files.watchList': z.array(z.object({ id: WatchSessionId, path: Path, createdAt: Short, clients: z.number().int().min(0) })).max(10_000),
  'files.watchStop': z.object({ stopped: z.boolean() }),
  'files.watchEvents': z.union([
    tracked(z.object({ type: z.literal('events'), first: z.number().int().min(1), events: z.array(BoundedWatchMessage).min(1).max(1000) })),
    z.object({ id: z.literal('end'), data: z.object({ type: z.literal('ended'), reason: Short }) }),
  ]),
  'shell.create': z.object({ sessionId: z.string().min(1).max(128) }),
  'shell.input': z.object({ ok: z.boolean() }),
  'shell.close': z.object({ ok: z.boolean() }),
  'shell.exec': z.object({ output: z.string(), error: z.string(), exitCode: z.number().int() }),
  'shell.execStream': z.discriminatedUnion('type', [
    z.object({ type: z.literal('stdout'), data: Chunk }),
    z.object({ type: z.literal('stderr'), data: Chunk }),
    z.object({ type: z.literal('exit'), exitCode: z.number().int() }),
  ]),
  'pty.create': BoundedPtySession,
  'pty.list': z.array(BoundedPtySession).max(10_000),
  'pty.write': Written,
  'pty.resize': BoundedPtySession,
  'pty.kill': z.object({ killed: z.boolean() }),
  'pty.pause': z.object({ paused: z.boolean() }),
  'pty.resume': z.object({ paused: z.boolean() }),
  'pty.buffer': z.object({ output: z.string() }),
  'pty.output': tracked(z.discriminatedUnion('type', [z.object({ type: z.literal('data'), data: Chunk }), ...PtyEvent.options.slice(1)])),
  'ports.list': z.object({ ports: z.array(z.number().int().min(1).max(65535)).max(MAX_LISTENING_PORTS) }),
  health: AgentHealth,
  'pool.claim': z.object({ count: z.number().int().min(0) }),
  'process.run': AgentExecResult,
  'process.start': BoundedProcessInfo,
  'process.list': z.array(BoundedProcessInfo).max(10_000),
  'process.kill': BoundedProcessInfo.extend({ signalled: z.boolean() }),
  'process.wait': z.object({ exited: z.boolean(), exitCode: z.number().int().nullable() }),
  'process.writeStdin': Written,
  'process.output': tracked(
    z.discriminatedUnion('type', [z.object({ type: z.literal('stdout'), data: Chunk }), z.object({ type: z.literal('stderr'), data: Chunk }), ...OutputEvent.options.slice(2)]),
  ),
} as const satisfies Record<string, z.ZodType>;

export type AgentReplyPath = keyof typeof agentReplies;

/**
 * The largest reply (one WebSocket message) each procedure may send, in bytes; the connection's
 * own bound (`maxMessageBytes`) applies to the rest. Small answers stay small, so a lying agent
 * cannot make the server hold megabytes per call where a few hundred bytes are due.
 */
export const agentReplyMaxBytes: Partial<Record<AgentReplyPath, number>> = {
  'files.stat': 64 * 1024,
  'files.remove': 64 * 1024,
  'files.mkdir': 64 * 1024,
  'files.create': 64 * 1024,
  'files.copy': 64 * 1024,
  'files.move': 64 * 1024,
  'files.chmod': 64 * 1024,
  'files.du': 64 * 1024,
  'files.compress': 64 * 1024,
  'files.extract': 64 * 1024,
  'files.watchStart': 64 * 1024,
  'files.watchStop': 64 * 1024,
  'files.watchEvents': 8 * 1024 * 1024,
  'shell.create': 64 * 1024,
  'shell.input': 64 * 1024,
  'shell.close': 64 * 1024,
  'pty.create': 64 * 1024,
  'pty.write': 64 * 1024,
  'pty.resize': 64 * 1024,
  'pty.kill': 64 * 1024,
  'pty.pause': 64 * 1024,
  'pty.resume': 64 * 1024,
  'pty.output': 8 * 1024 * 1024,
  'shell.execStream': 8 * 1024 * 1024,
  'process.output': 8 * 1024 * 1024,
  'process.start': 8 * 1024 * 1024,
  'process.kill': 8 * 1024 * 1024,
  'process.wait': 64 * 1024,
  'process.writeStdin': 64 * 1024,
  'ports.list': 64 * 1024,
  health: 64 * 1024,
  'pool.claim': 1024,
};

/** The agent's raw `PUT /files/content` answer. */
export const AgentUploadReply = UploadResult;

/** The agent's answer to a tar upload. */
export const AgentUploadTarReply = UploadTarResult;

/** The agent's raw error body (`{error, code}`) on its file routes. */
export const AgentHttpErrorReply = z.object({ error: z.string().optional(), code: z.string().max(64).optional() });

/** The largest error message from an agent the server passes on; longer ones are cut. */
export const AGENT_MESSAGE_MAX_CHARS = 2000;

/**
 * One line of the agent's raw process-output stream (`POST /process/stream`, `GET
 * /process/output`): `started` first when the call started the process, then numbered events.
 * Output events carry what the agent read in one turn of its event loop (at most 64 KiB of bytes,
 * so at most that many characters; 1 MiB leaves room).
 */
const Seq = z.number().int().min(1);
export const AgentProcessStreamLine = z.discriminatedUnion('type', [
  z.object({ type: z.literal('started'), pid: z.number().int().min(1) }),
  z.object({ seq: Seq, type: z.literal('stdout'), data: Chunk }),
  z.object({ seq: Seq, type: z.literal('stderr'), data: Chunk }),
  z.object({ seq: Seq, type: z.literal('exit'), exitCode: z.number().int(), signal: Short.nullable(), timedOut: z.boolean() }),
  z.object({ seq: Seq, type: z.literal('gap'), droppedBytes: z.number().int().min(0) }),
]);
export type AgentProcessStreamLine = z.infer<typeof AgentProcessStreamLine>;

/**
 * One line of the agent's raw shell-command stream (`POST /shell/exec-stream`): output as the
 * shell's pipes give it, then the exit status, or the error that ended the command (its timeout).
 */
export const AgentShellStreamLine = z.discriminatedUnion('type', [
  z.object({ type: z.literal('stdout'), data: Chunk }),
  z.object({ type: z.literal('stderr'), data: Chunk }),
  z.object({ type: z.literal('exit'), exitCode: z.number().int() }),
  z.object({ type: z.literal('error'), error: z.string(), code: z.string().max(64) }),
]);
export type AgentShellStreamLine = z.infer<typeof AgentShellStreamLine>;

/** The longest line of an agent's process-output stream the server reads; a longer one fails the stream. */
export const AGENT_STREAM_MAX_LINE_BYTES = 8 * 1024 * 1024;
