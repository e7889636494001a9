import { z } from 'zod';
import { CreateWebhookInput, OrgIdInput, Webhook, WebhookAttempt, WebhookDeliveriesInput, WebhookRef } from '../../shared/index.js';
import { authedProcedure, router } from '../trpc/init.js';

const tags = ['Webhooks'];
const base = '/orgs/{orgId}/webhooks';

export const webhooksRouter = router({
  create: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: base,
        tags,
        summary: "Register a webhook for the organization's sandbox events",
        description:
          "Every event of the org's sandboxes whose type matches `events` (exact types or prefix patterns like `sandbox.*`; omitted: all) is POSTed to `url` as JSON, signed with `secret` (X-VoidRun-Signature). Only the org's owner may (403 for members). A URL whose host is or resolves to a loopback, private or link-local address is refused (400) unless the operator's WEBHOOK_ALLOW_PRIVATE opens it. The secret is never shown again. See the README, \"Events and webhooks\".",
      },
      message: 'Webhook created',
      successStatus: 201,
    })
    .input(CreateWebhookInput)
    .output(Webhook)
    .mutation(({ ctx, input }) => ctx.services.webhooks.create(ctx.principal, input)),

  list: authedProcedure
    .meta({ openapi: { method: 'GET', path: base, tags, summary: "The organization's webhooks, oldest first (without their secrets)" }, message: 'Webhooks fetched' })
    .input(OrgIdInput)
    .output(z.array(Webhook))
    .query(({ ctx, input }) => ctx.services.webhooks.list(ctx.principal, input.orgId)),

  delete: authedProcedure
    .meta({ openapi: { method: 'DELETE', path: `${base}/{webhookId}`, tags, summary: 'Delete a webhook, its pending deliveries and its log (owner only)' }, message: 'Webhook deleted' })
    .input(WebhookRef)
    .output(z.object({ id: z.string(), deleted: z.literal(true) }))
    .mutation(({ ctx, input }) => ctx.services.webhooks.delete(ctx.principal, input.orgId, input.webhookId)),

  deliveries: authedProcedure
    .meta({
      openapi: {
        method: 'GET',
        path: `${base}/{webhookId}/deliveries`,
        tags,
        summary: "The webhook's delivery log, newest attempt first",
        description: 'One entry per attempt: the event, the attempt number, and the receiver\'s status code or why there was none. The newest 1000 attempts are kept.',
      },
      message: 'Deliveries fetched',
    })
    .input(WebhookDeliveriesInput)
    .output(z.array(WebhookAttempt))
    .query(({ ctx, input }) => ctx.services.webhooks.attempts(ctx.principal, input.orgId, input.webhookId, input.limit)),
});
