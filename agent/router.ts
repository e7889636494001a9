import { initTRPC, tracked } from '@trpc/server';
import { z } from 'zod';
import { AgentExecResult, AgentHealth, AgentKillResult, AgentProcessInfo, ProcessSpec } from '../shared/schemas/agent.js';
import { AsyncQueue } from '../shared/async-queue.js';
import { ArchiveFormat } from '../shared/schemas/files.js';
import { compress, extract } from './services/files/archive.js';
import * as files from './services/files/operations.js';
import { listListeningPorts } from './services/ports/list.js';
import type { SequencedMessage, WatchSessions } from './services/files/watch-sessions.js';
import type { ProcessManager } from './services/process/process-manager.js';
import type { PtyManager } from './services/pty/pty-manager.js';
import type { ShellSessions } from './services/shell/shell-sessions.js';
import { SandboxEnvInput, type SandboxEnv } from './services/env/sandbox-env.js';
import { PtySize } from '../shared/schemas/pty.js';
import type { SequencedEvent } from './services/process/output-log.js';

export interface AgentContext {
  processes: ProcessManager;
  ptys: PtyManager;
  shells: ShellSessions;
  env: SandboxEnv;
  watches: WatchSessions;
  startedAt: number;
}

/** The most events one watch message carries. */
const WATCH_BATCH = 1000;

const t = initTRPC.context<AgentContext>().create();
const Pid = z.object({ pid: z.number().int().positive() });
const Path = z.object({ path: z.string().min(1) });
const FromTo = z.object({ from: z.string().min(1), to: z.string().min(1) });

const filesRouter = t.router({
  list: t.procedure.input(Path).query(({ input }) => files.listDir(input.path)),
  stat: t.procedure.input(Path).query(({ input }) => files.statPath(input.path)),
  remove: t.procedure.input(Path).mutation(({ input }) => files.removePath(input.path)),
  mkdir: t.procedure.input(Path).mutation(({ input }) => files.makeDir(input.path)),
  create: t.procedure.input(Path.extend({ content: z.string() })).mutation(({ input }) => files.createFile(input.path, input.content)),
  copy: t.procedure.input(FromTo).mutation(({ input }) => files.copyPath(input.from, input.to)),
  move: t.procedure.input(FromTo).mutation(({ input }) => files.movePath(input.from, input.to)),
  chmod: t.procedure.input(Path.extend({ mode: z.string().regex(/^[0-7]{3,4}$/) })).mutation(({ input }) => files.changeMode(input.path, input.mode)),
  du: t.procedure.input(Path).query(({ input }) => files.diskUsage(input.path)),
  headTail: t.procedure
    .input(Path.extend({ lines: z.number().int().min(1), head: z.boolean() }))
    .query(({ input }) => files.headTail(input.path, input.lines, input.head)),
  search: t.procedure.input(Path.extend({ pattern: z.string().min(1) })).query(({ input }) => files.searchFiles(input.path, input.pattern)),
  compress: t.procedure.input(Path.extend({ format: ArchiveFormat })).mutation(({ input }) => compress(input.path, input.format)),
  extract: t.procedure.input(z.object({ archive: z.string().min(1), dest: z.string().min(1) })).mutation(({ input }) => extract(input.archive, input.dest)),
  /** Starts a watch session (see WatchSessions); answers once the watch is set. */
  watchStart: t.procedure.input(Path.extend({ recursive: z.boolean(), ignoreHidden: z.boolean() })).mutation(async ({ ctx, input }) => {
    const session = await ctx.watches.start(input);
    return { sessionId: session.id, path: session.root };
  }),
  watchList: t.procedure.query(({ ctx }) => ctx.watches.list()),
  watchStop: t.procedure.input(z.object({ sessionId: z.string() })).mutation(async ({ ctx, input }) => {
    await ctx.watches.stop(input.sessionId);
    return { stopped: true };
  }),
  /**
   * A session's events after `lastEventId` (a sequence number; all it kept when absent), then live,
   * in batches of consecutive events (`first` is the first one's number; the id the last one's),
   * and `ended` with the reason when the session ends.
   */
  watchEvents: t.procedure.input(z.object({ sessionId: z.string(), lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
    const session = ctx.watches.get(input.sessionId);
    const queue = new AsyncQueue<SequencedMessage[] | { ended: string }>();
    let open: SequencedMessage[] | null = null;
    const detach = session.attach(
      {
        onMessage: (m) => {
          const last = open?.[open.length - 1];
          if (open && last && last.seq + 1 === m.seq && open.length < WATCH_BATCH) open.push(m);
          else queue.push((open = [m]));
        },
        onEnd: (reason) => {
          open = null;
          queue.push({ ended: reason });
          queue.end();
        },
      },
      input.lastEventId ? Number(input.lastEventId) || 0 : 0,
    );
    try {
      for await (const item of queue.drain(signal)) {
        if (item === open) open = null;
        if ('ended' in item) {
          yield tracked('end', { type: 'ended' as const, reason: item.ended });
          return;
        }
        yield tracked(String(item[item.length - 1]!.seq), { type: 'events' as const, first: item[0]!.seq, events: item.map((m) => m.message) });
      }
    } finally {
      detach();
    }
  }),
});

/** The agent's procedures. Its only caller is the server's agent-client. */
export const agentRouter = t.router({
  files: filesRouter,
  shell: t.router({
    create: t.procedure.input(z.object({ shell: z.string().optional() })).mutation(({ ctx, input }) => ({ sessionId: ctx.shells.create(input.shell).id })),
    input: t.procedure.input(z.object({ sessionId: z.string(), input: z.string() })).mutation(({ ctx, input }) => {
      ctx.shells.get(input.sessionId).input(input.input);
      return { ok: true };
    }),
    close: t.procedure.input(z.object({ sessionId: z.string() })).mutation(({ ctx, input }) => {
      ctx.shells.close(input.sessionId);
      return { ok: true };
    }),
    exec: t.procedure.input(z.object({ sessionId: z.string(), command: z.string(), timeoutMs: z.number().int().min(1) })).mutation(async ({ ctx, input }) => {
      let output = '';
      let error = '';
      const exitCode = await ctx.shells.get(input.sessionId).exec(input.command, input.timeoutMs, (c) => {
        if (c.stream === 'stdout') output += c.data;
        else error += c.data;
      });
      return { output, error, exitCode };
    }),
    /** The same, as it comes: output chunks, then `{type: 'exit'}`. */
    execStream: t.procedure
      .input(z.object({ sessionId: z.string(), command: z.string(), timeoutMs: z.number().int().min(1) }))
      .subscription(async function* ({ ctx, input, signal }) {
        const queue = new AsyncQueue<{ type: 'stdout' | 'stderr'; data: string } | { type: 'exit'; exitCode: number }>();
        ctx.shells
          .get(input.sessionId)
          .exec(input.command, input.timeoutMs, (c) => queue.push({ type: c.stream, data: c.data }))
          .then((exitCode) => {
            queue.push({ type: 'exit', exitCode });
            queue.end();
          }, (err: unknown) => queue.fail(err));
        yield* queue.drain(signal);
      }),
  }),
  pty: t.router({
    create: t.procedure.input(PtySize).mutation(({ ctx, input }) => ctx.ptys.create(input.cols, input.rows).info()),
    list: t.procedure.query(({ ctx }) => ctx.ptys.list()),
    write: t.procedure.input(z.object({ sessionId: z.string(), data: z.string() })).mutation(({ ctx, input }) => {
      ctx.ptys.write(input.sessionId, input.data);
      return { written: input.data.length };
    }),
    resize: t.procedure.input(PtySize.extend({ sessionId: z.string() })).mutation(({ ctx, input }) => ctx.ptys.resize(input.sessionId, input.cols, input.rows)),
    kill: t.procedure.input(z.object({ sessionId: z.string() })).mutation(({ ctx, input }) => {
      ctx.ptys.kill(input.sessionId);
      return { killed: true };
    }),
    pause: t.procedure.input(z.object({ sessionId: z.string() })).mutation(({ ctx, input }) => {
      ctx.ptys.pause(input.sessionId);
      return { paused: true };
    }),
    resume: t.procedure.input(z.object({ sessionId: z.string() })).mutation(({ ctx, input }) => {
      ctx.ptys.resume(input.sessionId);
      return { paused: false };
    }),
    buffer: t.procedure.input(z.object({ sessionId: z.string() })).query(({ ctx, input }) => ({ output: ctx.ptys.buffer(input.sessionId) })),
    /** The session's scrollback after `lastEventId` (all of it when absent), then live output until it exits. */
    output: t.procedure.input(z.object({ sessionId: z.string(), lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
      const session = ctx.ptys.get(input.sessionId);
      const queue = new AsyncQueue<SequencedEvent>();
      const unsubscribe = session.output.subscribe((e) => queue.push(e));
      session.attachClient();
      try {
        let last = input.lastEventId ? Number(input.lastEventId) : 0;
        for (const e of session.output.since(last)) yield* emit(e);
        for await (const e of queue.drain(signal)) yield* emit(e);
        function* emit(e: SequencedEvent) {
          if (e.seq <= last && e.event.type !== 'gap') return;
          last = Math.max(last, e.seq);
          const ev = e.event;
          if (ev.type === 'stdout') yield tracked(String(e.seq), { type: 'data' as const, data: ev.data });
          else if (ev.type === 'exit') {
            yield tracked(String(e.seq), { type: 'exit' as const, exitCode: ev.exitCode });
            queue.end();
          } else if (ev.type === 'gap') yield tracked(String(e.seq), { type: 'gap' as const, droppedBytes: ev.droppedBytes });
        }
      } finally {
        session.detachClient();
        unsubscribe();
      }
    }),
  }),
  ports: t.router({
    /** The TCP ports listening inside the sandbox. */
    list: t.procedure.query(() => listListeningPorts()),
  }),
  /**
   * A warm-pool sandbox handed to its owner: its envVars for commands started from now on, and the
   * pool's warm-up commands forgotten (the owner's listing starts empty).
   */
  pool: t.router({
    claim: t.procedure.input(SandboxEnvInput).mutation(({ ctx, input }) => {
      ctx.processes.forgetFinished();
      return ctx.env.replace(input.vars);
    }),
  }),
  health: t.procedure.output(AgentHealth).query(({ ctx }) => ({
    ok: true as const,
    pid: process.pid,
    uptimeMs: Date.now() - ctx.startedAt,
    processes: ctx.processes.size,
  })),

  process: t.router({
    run: t.procedure.input(ProcessSpec).output(AgentExecResult).mutation(({ ctx, input }) => ctx.processes.run(input)),
    start: t.procedure.input(ProcessSpec).output(AgentProcessInfo).mutation(({ ctx, input }) => ctx.processes.start(input).info()),
    list: t.procedure.output(z.array(AgentProcessInfo)).query(({ ctx }) => ctx.processes.list()),
    kill: t.procedure
      .input(Pid.extend({ signal: z.enum(['SIGTERM', 'SIGKILL', 'SIGINT', 'SIGHUP']).default('SIGKILL') }))
      .output(AgentKillResult)
      .mutation(async ({ ctx, input }) => {
        const proc = ctx.processes.get(input.pid);
        const signalled = proc.running;
        await proc.terminate(input.signal);
        return { ...proc.info(), signalled };
      }),
    wait: t.procedure
      .input(Pid.extend({ timeoutMs: z.number().int().min(0) }))
      .output(z.object({ exited: z.boolean(), exitCode: z.number().int().nullable() }))
      .mutation(async ({ ctx, input, signal }) => {
        const proc = ctx.processes.get(input.pid);
        let timer: NodeJS.Timeout | undefined;
        const timeout = new Promise<null>((resolve) => {
          if (input.timeoutMs > 0) timer = setTimeout(() => resolve(null), input.timeoutMs);
          signal?.addEventListener('abort', () => resolve(null), { once: true });
        });
        const exit = await Promise.race([proc.exited, timeout]);
        clearTimeout(timer);
        return exit ? { exited: true, exitCode: exit.exitCode } : { exited: false, exitCode: null };
      }),
    writeStdin: t.procedure
      .input(Pid.extend({ data: z.string(), eof: z.boolean().default(false) }))
      .output(z.object({ written: z.number().int() }))
      .mutation(async ({ ctx, input }) => {
        const proc = ctx.processes.get(input.pid);
        if (input.data) await proc.writeStdin(input.data);
        if (input.eof) proc.closeStdin();
        return { written: Buffer.byteLength(input.data) };
      }),
    /**
     * The process's output from after `lastEventId` (or its start), then live until it exits.
     * Subscribes before replaying, so nothing falls between backlog and live events.
     */
    output: t.procedure.input(Pid.extend({ lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
      const proc = ctx.processes.get(input.pid);
      const queue = new AsyncQueue<SequencedEvent>();
      const unsubscribe = proc.output.subscribe((e) => queue.push(e));
      try {
        let last = input.lastEventId ? Number(input.lastEventId) : 0;
        for (const e of proc.output.since(last)) yield* emit(e);
        for await (const e of queue.drain(signal)) yield* emit(e);
        function* emit(e: SequencedEvent) {
          if (e.seq <= last && e.event.type !== 'gap') return; // already sent from the backlog
          last = Math.max(last, e.seq);
          yield tracked(String(e.seq), e.event);
          if (e.event.type === 'exit') queue.end();
        }
      } finally {
        unsubscribe();
      }
    }),
  }),
});

export type AgentRouter = typeof agentRouter;
