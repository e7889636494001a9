import { tracked } from '@trpc/server';
import type { Context } from '../trpc/context.js';
import { z } from 'zod';
import {
  ArchiveResult,
  ChmodInput,
  CompressInput,
  CreateFileInput,
  DiskUsageResult,
  ExtractInput,
  ExtractResult,
  FileList,
  FileOpResult,
  FromToInput,
  HeadTailInput,
  HeadTailResult,
  PathInput,
  SandboxIdInput,
  SearchInput,
  SearchResult,
  StatResult,
  WatchInput,
  WatchSession,
  WatchSessionList,
  type WatchMessage,
} from '../../shared/index.js';
import { AsyncQueue } from '../../shared/async-queue.js';
import { authedProcedure, router } from '../trpc/init.js';

const tags = ['File System'];
const base = '/sandboxes/{id}/files';

export const filesRouter = router({
  list: authedProcedure
    .meta({ openapi: { method: 'GET', path: base, tags, summary: 'List a directory' }, message: 'Files listed' })
    .input(PathInput)
    .output(FileList)
    .query(({ ctx, input }) => ctx.services.files.list(ctx.principal, input.id, input.path)),

  delete: authedProcedure
    .meta({ openapi: { method: 'DELETE', path: base, tags, summary: 'Delete a file or directory (recursively)' }, message: 'File deleted' })
    .input(PathInput)
    .output(FileOpResult)
    .mutation(({ ctx, input }) => ctx.services.files.remove(ctx.principal, input.id, input.path)),

  headTail: authedProcedure
    .meta({ openapi: { method: 'GET', path: `${base}/head-tail`, tags, summary: 'The first or last lines of a file' }, message: 'File read' })
    .input(HeadTailInput)
    .output(HeadTailResult)
    .query(({ ctx, input }) => ctx.services.files.headTail(ctx.principal, input.id, input.path, input.lines, input.head)),

  search: authedProcedure
    .meta({ openapi: { method: 'GET', path: `${base}/search`, tags, summary: 'Find files whose names match a glob or contain a text' }, message: 'Search done' })
    .input(SearchInput)
    .output(SearchResult)
    .query(({ ctx, input }) => ctx.services.files.search(ctx.principal, input.id, input.path, input.pattern)),

  mkdir: authedProcedure
    .meta({ openapi: { method: 'POST', path: `${base}/mkdir`, tags, summary: 'Create a directory (and its parents)' }, message: 'Directory created', queryInputs: ['path'] })
    .input(PathInput)
    .output(FileOpResult)
    .mutation(({ ctx, input }) => ctx.services.files.mkdir(ctx.principal, input.id, input.path)),

  create: authedProcedure
    .meta({ openapi: { method: 'POST', path: `${base}/create`, tags, summary: 'Create a file with the given content' }, message: 'File created', queryInputs: ['path', 'content'] })
    .input(CreateFileInput)
    .output(FileOpResult)
    .mutation(({ ctx, input }) => ctx.services.files.create(ctx.principal, input.id, input.path, input.content)),

  copy: authedProcedure
    .meta({ openapi: { method: 'POST', path: `${base}/copy`, tags, summary: 'Copy a file or directory' }, message: 'File copied', queryInputs: ['from', 'to'] })
    .input(FromToInput)
    .output(FileOpResult)
    .mutation(({ ctx, input }) => ctx.services.files.copy(ctx.principal, input.id, input.from, input.to)),

  move: authedProcedure
    .meta({ openapi: { method: 'POST', path: `${base}/move`, tags, summary: 'Move or rename a file or directory' }, message: 'File moved', queryInputs: ['from', 'to'] })
    .input(FromToInput)
    .output(FileOpResult)
    .mutation(({ ctx, input }) => ctx.services.files.move(ctx.principal, input.id, input.from, input.to)),

  chmod: authedProcedure
    .meta({ openapi: { method: 'POST', path: `${base}/chmod`, tags, summary: 'Change permissions' }, message: 'Permissions changed', queryInputs: ['path', 'mode'] })
    .input(ChmodInput)
    .output(FileOpResult)
    .mutation(({ ctx, input }) => ctx.services.files.chmod(ctx.principal, input.id, input.path, input.mode)),

  stat: authedProcedure
    .meta({ openapi: { method: 'GET', path: `${base}/stat`, tags, summary: 'File details' }, message: 'File stat' })
    .input(PathInput)
    .output(StatResult)
    .query(({ ctx, input }) => ctx.services.files.stat(ctx.principal, input.id, input.path)),

  du: authedProcedure
    .meta({ openapi: { method: 'GET', path: `${base}/du`, tags, summary: 'Disk usage of a path' }, message: 'Disk usage' })
    .input(PathInput)
    .output(DiskUsageResult)
    .query(({ ctx, input }) => ctx.services.files.du(ctx.principal, input.id, input.path)),

  compress: authedProcedure
    .meta({
      openapi: { method: 'POST', path: `${base}/compress`, tags, summary: 'Archive a file or directory next to it (<path>.<format>)' },
      message: 'Archive created',
      queryInputs: ['path', 'format'],
    })
    .input(CompressInput)
    .output(ArchiveResult)
    .mutation(({ ctx, input }) => ctx.services.files.compress(ctx.principal, input.id, input.path, input.format)),

  extract: authedProcedure
    .meta({
      openapi: { method: 'POST', path: `${base}/extract`, tags, summary: 'Extract an archive; entries that would land outside dest are refused' },
      message: 'Archive extracted',
      queryInputs: ['archive', 'dest'],
    })
    .input(ExtractInput)
    .output(ExtractResult)
    .mutation(({ ctx, input }) => ctx.services.files.extract(ctx.principal, input.id, input.archive, input.dest)),

  startWatch: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: `${base}/watch`,
        tags,
        summary: 'Start watching a path',
        description: 'Then open GET /sandboxes/{id}/files/watch/{sessionId}/stream as a WebSocket. The session ends when the sandbox stops or after WATCH_IDLE_TIMEOUT_SEC with no client.',
      },
      message: 'watch started',
    })
    .input(WatchInput)
    .output(WatchSession)
    .mutation(({ ctx, input, signal }) => ctx.services.watch.start(ctx.principal, input, signal ?? untilCallerLeaves(ctx))),

  watchSessions: authedProcedure
    .meta({
      openapi: { method: 'GET', path: `${base}/watch`, tags, summary: "List the sandbox's file-watch sessions", description: 'Sessions live in the sandbox: they are listed with the same ids after a pause and resume or a server restart.' },
      message: 'Watch sessions fetched',
    })
    .input(SandboxIdInput)
    .output(WatchSessionList)
    .query(({ ctx, input }) => ctx.services.watch.list(ctx.principal, input.id)),

  /**
   * File events under a path. Each event's id is `<sessionId>:<seq>`; reconnecting with the last
   * id re-attaches to the same session and continues after it.
   */
  watch: authedProcedure.input(WatchInput.extend({ lastEventId: z.string().nullish() })).subscription(async function* ({ ctx, input, signal }) {
    const resume = input.lastEventId ? /^([0-9a-f-]{36}):(\d+)$/.exec(input.lastEventId) : null;
    const sessionId = resume ? resume[1]! : (await ctx.services.watch.start(ctx.principal, input, signal)).sessionId;
    // A resumed session is looked up in its sandbox's agent (404 when it ended): it may predate this server.
    if (resume) await ctx.services.watch.assertSession(ctx.principal, input.id, sessionId);
    const queue = new AsyncQueue<{ seq: number; message: WatchMessage }>();
    let dropped = 0;
    const detach = ctx.services.watch.attach(
      ctx.principal,
      input.id,
      sessionId,
      (m) => {
        if ('ended' in m) return queue.end();
        queue.push(m);
        // A reader that falls 1,000 messages behind loses the oldest and is told how many, in
        // place of what it lost.
        dropped += queue.dropOldest(1000);
      },
      resume ? Number(resume[2]) : 0,
    );
    try {
      for await (const m of queue.drain(signal)) {
        if (dropped) {
          ctx.services.events.emit({ sandboxId: input.id, orgId: ctx.principal.orgId, type: 'watch.overflow', data: { sessionId, dropped } });
          yield tracked(`${sessionId}:${m.seq - 1}`, { type: 'overflow' as const, dropped, timestamp: new Date().toISOString() });
          dropped = 0;
        }
        yield tracked(`${sessionId}:${m.seq}`, m.message);
      }
    } finally {
      detach();
    }
  }),
});

/**
 * A signal that aborts when the caller's connection closes. tRPC passes procedures one over HTTP;
 * REST calls (trpc-to-openapi's caller) get none, so it comes from the connection.
 */
function untilCallerLeaves(ctx: Context): AbortSignal {
  const left = new AbortController();
  ctx.connection.onClose(() => left.abort());
  return left.signal;
}
