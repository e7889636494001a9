import { initTRPC, tracked } from '@trpc/server';
import { z } from 'zod';
import { AgentExecResult, AgentHealth, AgentProcessInfo, ProcessSpec } from '../shared/schemas/agent.js';
import type { ProcessManager } from './services/process/process-manager.js';
import type { SequencedEvent } from './services/process/output-log.js';

export interface AgentContext {
  processes: ProcessManager;
  startedAt: number;
}

const t = initTRPC.context<AgentContext>().create();
const Pid = z.object({ pid: z.number().int().positive() });

/** The agent's procedures. Its only caller is the server's agent-client. */
export const agentRouter = t.router({
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
      .output(AgentProcessInfo)
      .mutation(({ ctx, input }) => {
        const proc = ctx.processes.get(input.pid);
        proc.kill(input.signal);
        return proc.info();
      }),
    wait: t.procedure
      .input(Pid.extend({ timeoutMs: z.number().int().min(0) }))
      .output(z.object({ exited: z.boolean(), exitCode: z.number().int().nullable() }))
      .mutation(async ({ ctx, input, signal }) => {
        const proc = ctx.processes.get(input.pid);
        let timer: NodeJS.Timeout | undefined;
        const timeout = new Promise<null>((resolve) => {
          if (input.timeoutMs > 0) timer = setTimeout(() => resolve(null), input.timeoutMs);
          signal?.addEventListener('abort', () => resolve(null));
        });
        const exit = await Promise.race([proc.exited, timeout]);
        clearTimeout(timer);
        return exit ? { exited: true, exitCode: exit.exitCode } : { exited: false, exitCode: null };
      }),
    writeStdin: t.procedure
      .input(Pid.extend({ data: z.string(), eof: z.boolean().default(false) }))
      .output(z.object({ written: z.number().int() }))
      .mutation(({ ctx, input }) => {
        const proc = ctx.processes.get(input.pid);
        if (input.data) proc.writeStdin(input.data);
        if (input.eof) proc.closeStdin();
        return { written: Buffer.byteLength(input.data) };
      }),
    /**
     * The process's output from after `lastEventId` (or its start), then live until it exits.
     * Subscribes before replaying, so nothing falls between backlog and live events.
     */
    output: t.procedure.input(Pid.extend({ lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
      const proc = ctx.processes.get(input.pid);
      const queue: SequencedEvent[] = [];
      let wake: (() => void) | undefined;
      const unsubscribe = proc.output.subscribe((e) => {
        queue.push(e);
        wake?.();
      });
      try {
        let last = input.lastEventId ? Number(input.lastEventId) : 0;
        const backlog = proc.output.since(last);
        queue.unshift(...backlog);
        while (!signal?.aborted) {
          const next = queue.shift();
          if (!next) {
            await new Promise<void>((resolve) => {
              wake = resolve;
              signal?.addEventListener('abort', () => resolve(), { once: true });
            });
            wake = undefined;
            continue;
          }
          if (next.seq <= last && next.event.type !== 'gap') continue;
          last = Math.max(last, next.seq);
          yield tracked(String(next.seq), next.event);
          if (next.event.type === 'exit') return;
        }
      } finally {
        unsubscribe();
      }
    }),
  }),
});

export type AgentRouter = typeof agentRouter;
