import { tracked } from '@trpc/server';
import { z } from 'zod';
import { CreatePtyInput, PtyBuffer, PtyExecuteInput, PtyResizeInput, PtySessionCreated, PtySessionInfo, PtySessionList, PtySessionRef, PtyWriteInput, SandboxIdInput } from '../../shared/index.js';
import { authedProcedure, router } from '../trpc/init.js';

const tags = ['Execution'];
const base = '/sandboxes/{id}/pty/sessions';

export const ptyRouter = router({
  create: authedProcedure
    .meta({ openapi: { method: 'POST', path: base, tags, summary: 'Create a persistent terminal session (cols × rows honoured)' }, message: 'PTY session created' })
    .input(CreatePtyInput)
    .output(PtySessionCreated)
    .mutation(({ ctx, input }) => ctx.services.pty.create(ctx.principal, input.id, input.cols, input.rows)),

  list: authedProcedure
    .meta({ openapi: { method: 'GET', path: base, tags, summary: "List the sandbox's terminal sessions" }, message: 'PTY sessions fetched' })
    .input(SandboxIdInput)
    .output(PtySessionList)
    .query(({ ctx, input }) => ctx.services.pty.list(ctx.principal, input.id)),

  kill: authedProcedure
    .meta({ openapi: { method: 'DELETE', path: `${base}/{sessionId}`, tags, summary: 'End a terminal session' }, message: 'PTY session deleted' })
    .input(PtySessionRef)
    .output(z.object({ sessionId: z.string(), killed: z.literal(true) }))
    .mutation(({ ctx, input }) => ctx.services.pty.kill(ctx.principal, input.id, input.sessionId)),

  execute: authedProcedure
    .meta({ openapi: { method: 'POST', path: `${base}/{sessionId}/execute`, tags, summary: 'Type a command (and Enter) into a session' }, message: 'Command sent' })
    .input(PtyExecuteInput)
    .output(z.object({ sessionId: z.string(), sent: z.literal(true) }))
    .mutation(({ ctx, input }) => ctx.services.pty.execute(ctx.principal, input.id, input.sessionId, input.command)),

  buffer: authedProcedure
    .meta({ openapi: { method: 'GET', path: `${base}/{sessionId}/buffer`, tags, summary: "A session's scrollback (last 1 MiB)" }, message: 'Buffer fetched' })
    .input(PtySessionRef)
    .output(PtyBuffer)
    .query(({ ctx, input }) => ctx.services.pty.buffer(ctx.principal, input.id, input.sessionId)),

  resize: authedProcedure
    .meta({ openapi: { method: 'POST', path: `${base}/{sessionId}/resize`, tags, summary: 'Resize a session' }, message: 'Terminal resized' })
    .input(PtyResizeInput)
    .output(PtySessionInfo)
    .mutation(({ ctx, input }) => ctx.services.pty.resize(ctx.principal, input.id, input.sessionId, input.cols, input.rows)),

  write: authedProcedure
    .input(PtyWriteInput)
    .output(z.object({ written: z.number().int() }))
    .mutation(({ ctx, input }) => ctx.services.pty.write(ctx.principal, input.id, input.sessionId, input.data)),

  /** A session's output: scrollback first, then live; reconnect with the last id to get exactly what was missed. */
  attach: authedProcedure.input(PtySessionRef.extend({ lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
    const after = input.lastEventId?.split(':').pop() ?? null;
    for await (const e of ctx.services.pty.attach(ctx.principal, input.id, input.sessionId, after, signal)) yield tracked(e.id, e.event);
  }),
});
