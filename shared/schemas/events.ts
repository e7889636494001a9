import { z } from 'zod';
import { Id, Timestamp } from './common.js';

/** The largest page of events one call answers with. */
export const MAX_EVENTS_PAGE = 1000;

/** An event id: the sandbox's own counter, from 1, only growing. */
export const EventId = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

/** One event of a sandbox's stream. */
export const SandboxEvent = z
  .object({
    id: z.number().int().meta({ description: "The event's id in its sandbox's stream: from 1, only growing (never reused, also across server restarts)", example: 7 }),
    sandboxId: z.string(),
    type: z.string().meta({ example: 'process.exited' }),
    data: z.record(z.string(), z.unknown()).meta({ description: 'What the type says happened, e.g. {"pid":12,"exitCode":0,"signal":null} for process.exited' }),
    createdAt: Timestamp,
  })
  .meta({ id: 'SandboxEvent' });
export type SandboxEvent = z.infer<typeof SandboxEvent>;

export const SandboxEventsInput = z.object({
  id: Id,
  after: EventId.optional().meta({ description: 'Only events with a larger id (0 or omitted: from the oldest kept)' }),
  limit: z.number().int().min(1).max(MAX_EVENTS_PAGE).optional().meta({ description: `Events per page, 1 to ${MAX_EVENTS_PAGE} (default 100)` }),
});
export type SandboxEventsInput = z.infer<typeof SandboxEventsInput>;

export const SandboxEventPage = z
  .object({
    events: z.array(SandboxEvent),
    next: z.number().int().meta({ description: 'Pass as `after` for the next page: the last id of this page, or `after` when it is empty' }),
    hasMore: z.boolean(),
  })
  .meta({ id: 'SandboxEventPage' });
export type SandboxEventPage = z.infer<typeof SandboxEventPage>;

/** The tRPC subscription's input: resume after `lastEventId` (tRPC sends the last tracked id back on reconnect). */
export const SandboxEventsSubscribeInput = z.object({
  id: Id,
  lastEventId: z.string().max(20).nullish(),
});

/** An event type, or a prefix pattern such as `sandbox.*` (every type starting with `sandbox.`); `*` alone: every event. */
export const EventFilter = z
  .string()
  .max(64)
  .regex(/^(\*|[a-z_]+(\.[a-z_]+)*(\.\*)?)$/, 'an event type such as sandbox.created, a prefix pattern such as sandbox.*, or *');

/** The shortest webhook secret accepted. */
export const MIN_WEBHOOK_SECRET = 16;

export const CreateWebhookInput = z.object({
  orgId: Id,
  url: z.string().min(1).max(2048).meta({ description: 'http:// or https:// URL the events are POSTed to', example: 'https://example.com/voidrun-events' }),
  events: z.array(EventFilter).max(32).optional().meta({ description: 'Event types or prefix patterns (`sandbox.*`); omitted or empty: every event' }),
  secret: z
    .string()
    .min(MIN_WEBHOOK_SECRET, `must be at least ${MIN_WEBHOOK_SECRET} characters`)
    .max(256)
    .meta({ description: `The HMAC-SHA256 key of X-VoidRun-Signature, at least ${MIN_WEBHOOK_SECRET} characters; never shown again` }),
});
export type CreateWebhookInput = z.infer<typeof CreateWebhookInput>;

export const Webhook = z
  .object({
    id: z.string(),
    orgId: z.string(),
    url: z.string(),
    events: z.array(z.string()),
    createdBy: z.string(),
    createdAt: Timestamp,
  })
  .meta({ id: 'Webhook' });
export type Webhook = z.infer<typeof Webhook>;

export const WebhookRef = z.object({ orgId: Id, webhookId: Id });

export const WebhookDeliveriesInput = WebhookRef.extend({
  limit: z.number().int().min(1).max(1000).optional().meta({ description: 'Attempts to list, newest first, 1 to 1000 (default 100)' }),
});

export const WebhookAttempt = z
  .object({
    deliveryId: z.string().meta({ description: 'X-VoidRun-Delivery: the same on every attempt of one event' }),
    eventId: z.string().meta({ description: '`<sandboxId>:<event id>`', example: '65ae1234567890abcdef1234:7' }),
    eventType: z.string(),
    attempt: z.number().int(),
    ok: z.boolean(),
    statusCode: z.number().int().nullable(),
    error: z.string().nullable(),
    at: Timestamp,
  })
  .meta({ id: 'WebhookAttempt' });
export type WebhookAttempt = z.infer<typeof WebhookAttempt>;
