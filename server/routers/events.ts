import { tracked } from '@trpc/server';
import { SandboxEventPage, SandboxEventsInput, SandboxEventsSubscribeInput } from '../../shared/index.js';
import { parseEventId } from '../services/sandbox-events.js';
import { authedProcedure } from '../trpc/init.js';

/** The sandbox router's event procedures: `sandbox.eventsPage` (REST `GET /sandboxes/{id}/events`) and the `sandbox.events` subscription. */
export const sandboxEventProcedures = {
  eventsPage: authedProcedure
    .meta({
      openapi: {
        method: 'GET',
        path: '/sandboxes/{id}/events',
        tags: ['Sandboxes'],
        summary: "A page of the sandbox's events, oldest first",
        description:
          'Lifecycle, process, terminal, watch, port and network events, each with an id that only grows. Page with `after` (the `next` of the previous page). The same stream live: `GET /sandboxes/{id}/events/stream` (Server-Sent Events, Last-Event-ID resumes) or the tRPC subscription `sandbox.events`. See the README, "Events and webhooks".',
      },
      message: 'Events fetched',
    })
    .input(SandboxEventsInput)
    .output(SandboxEventPage)
    .query(({ ctx, input }) => ctx.services.events.list(ctx.principal, input.id, input.after, input.limit)),

  /** The events after `lastEventId` (tRPC sends the last tracked id back when it reconnects), then live, until `sandbox.deleted`. */
  events: authedProcedure.input(SandboxEventsSubscribeInput).subscription(async function* ({ ctx, input, signal }) {
    const events = await ctx.services.events.open(ctx.principal, input.id, parseEventId(input.lastEventId), signal);
    for await (const e of events) yield tracked(String(e.id), e);
  }),
};
