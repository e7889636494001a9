import { tracked } from '@trpc/server';
import { z } from 'zod';
import {
  CommandKillResult,
  CommandList,
  CommandStarted,
  CommandWaitResult,
  ExecInput,
  ExecOutput,
  PidInput,
  RunCommandInput,
  SandboxIdInput,
  SessionExecInput,
  SessionExecResult,
  WaitInput,
  WriteStdinInput,
} from '../../shared/index.js';
import { authedProcedure, router } from '../trpc/init.js';
import { IdempotencyKeyHeaders } from '../../shared/schemas/idempotency.js';

const tags = ['Execution'];

/** What an idempotent `commands/run` stored with its key (ExecService.startCommand's handle). */
const StartedCommandSaved = z.object({ success: z.literal(true), pid: z.number().int(), command: z.string(), startTime: z.string() });

export const execRouter = router({
  run: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: '/sandboxes/{id}/exec',
        tags,
        summary: 'Run a command and wait for its result',
        description: 'With background=true, answers at once with the pid. Output over the cap is dropped and `truncated` says so.',
      },
      message: 'Command executed',
    })
    .input(ExecInput)
    .output(ExecOutput)
    .mutation(({ ctx, input }) => ctx.services.exec.exec(ctx.principal, input)),

  /**
   * Runs a command and yields its output. Each event has an id; a client that reconnects with
   * its last id re-attaches to the same process and continues after that event.
   */
  stream: authedProcedure.input(ExecInput.extend({ lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
    for await (const e of ctx.services.exec.stream(ctx.principal, input, input.lastEventId ?? null, signal)) yield tracked(e.id, e.chunk);
  }),
});

export const shellRouter = router({
  sessionExec: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: '/sandboxes/{id}/session-exec',
        tags,
        summary: 'Shell sessions without a terminal: create, exec, input, resize, close',
        description: 'A long-lived shell whose working directory and variables persist between exec calls. A command that reads stdin gets what `input` writes.',
      },
      message: 'Session command done',
      envelope: 'bare',
    })
    .input(SessionExecInput)
    .output(SessionExecResult)
    .mutation(({ ctx, input }) => ctx.services.exec.sessionExec(ctx.principal, input)),
});

export const commandsRouter = router({
  run: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes/{id}/commands/run', tags, summary: 'Start a background process', requestHeaders: IdempotencyKeyHeaders }, message: 'Process started', envelope: 'bare' })
    .input(RunCommandInput)
    .output(CommandStarted)
    .mutation(({ ctx, input }) => {
      // Once per idempotency key: a retry gets the same process handle (pid) while that pid still
      // names the process the key started (else a 409), never a second process.
      const { idempotency, exec } = ctx.services;
      const key = idempotency.keyOf(ctx.idempotencyKey, input.idempotencyKey);
      return idempotency.run(ctx.principal, 'exec.startCommand', key, input, { save: (r) => JSON.stringify(r), load: (saved) => exec.replayStarted(ctx.principal, input.id, key ?? '', StartedCommandSaved.parse(JSON.parse(saved))) }, () =>
        exec.startCommand(ctx.principal, input),
      );
    }),

  list: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/sandboxes/{id}/commands/list', tags, summary: 'List background processes' }, message: 'Processes fetched', envelope: 'bare' })
    .input(SandboxIdInput)
    .output(CommandList)
    .query(({ ctx, input }) => ctx.services.exec.listCommands(ctx.principal, input.id)),

  kill: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes/{id}/commands/kill', tags, summary: 'Kill a background process and its children' }, message: 'Process killed', envelope: 'bare' })
    .input(PidInput)
    .output(CommandKillResult)
    .mutation(({ ctx, input }) => ctx.services.exec.killCommand(ctx.principal, input.id, input.pid)),

  wait: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes/{id}/commands/wait', tags, summary: 'Wait for a background process to exit' }, message: 'Process completed', envelope: 'bare' })
    .input(WaitInput)
    .output(CommandWaitResult)
    .mutation(({ ctx, input, signal }) => ctx.services.exec.waitCommand(ctx.principal, input.id, input.pid, input.timeout, signal)),

  writeStdin: authedProcedure
    .input(WriteStdinInput)
    .output(z.object({ written: z.number().int() }))
    .mutation(({ ctx, input }) => ctx.services.exec.writeStdin(ctx.principal, input.id, input.pid, input.data, input.eof)),

  /** A background process's output from after `lastEventId` (or its start), live until it exits. */
  attach: authedProcedure.input(PidInput.extend({ lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
    const after = input.lastEventId?.split(':')[1] ?? null;
    for await (const e of ctx.services.exec.attach(ctx.principal, input.id, input.pid, after, signal)) yield tracked(e.id, e.chunk);
  }),
});
