import { z } from 'zod';
import {
  CreateSandboxInput,
  DeleteSandboxInput,
  Image,
  ListSandboxesInput,
  parseLabelFilter,
  RestoreSandboxInput,
  RestSandbox,
  RestSandboxActionResult,
  RestSandboxPage,
  restStatus,
  Sandbox,
  SandboxActionResult,
  SandboxIdInput,
  SandboxImageInput,
  SandboxPage,
  Snapshot,
  toRestSandbox,
  UpdateNetworkInput,
} from '../../shared/index.js';
import { authedProcedure, restView, router } from '../trpc/init.js';
import { restImage } from './images.js';
import type { Context } from '../trpc/context.js';
import type { Principal } from '../services/auth-service.js';
import { IdempotencyKeyHeaders } from '../../shared/schemas/idempotency.js';
import { sandboxEventProcedures } from './events.js';
import { sandboxLifecycleProcedures } from './lifecycle.js';

const tags = ['Sandboxes'];
const Deleted = z.object({ id: z.string(), deleted: z.literal(true) });
/** REST carries sandboxes with `status` inside the contract's enum (tRPC keeps `creating`). */
const restSandbox = restView(RestSandbox, toRestSandbox);
const restAction = restView(RestSandboxActionResult, (r: SandboxActionResult) => ({ ...r, ...restStatus(r.status) }));
const restPage = restView(RestSandboxPage, (p: SandboxPage) => ({ ...p, data: p.data.map(toRestSandbox) }));

/** `POST /sandboxes/{id}/<verb>`: one lifecycle action on a sandbox, answering its new status. */
function lifecycle(verb: string, action: 'stop' | 'start' | 'pause' | 'resume', summary: string, message: string) {
  return authedProcedure
    .meta({ openapi: { method: 'POST', path: `/sandboxes/{id}/${verb}`, tags, summary }, message, restView: restAction })
    .input(SandboxIdInput)
    .output(SandboxActionResult)
    .mutation(({ ctx, input }) => ctx.services.sandboxes[action](ctx.principal, input.id));
}

/**
 * A create or restore run once per idempotency key (the `Idempotency-Key` header or `idempotencyKey`):
 * a retry gets the same sandbox, as it is now.
 */
function idempotentSandbox(ctx: Context & { principal: Principal }, operation: 'sandbox.create' | 'sandbox.restore', input: { idempotencyKey?: string }, run: () => Promise<Sandbox>): Promise<Sandbox> {
  const { idempotency, sandboxes } = ctx.services;
  const key = idempotency.keyOf(ctx.idempotencyKey, input.idempotencyKey);
  return idempotency.run(ctx.principal, operation, key, input, { save: (s) => JSON.stringify({ id: s.id }), load: (saved) => sandboxes.get(ctx.principal, (JSON.parse(saved) as { id: string }).id) }, run);
}

export const sandboxRouter = router({
  ...sandboxEventProcedures,
  ...sandboxLifecycleProcedures,

  create: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes', tags, summary: 'Create a sandbox', requestHeaders: IdempotencyKeyHeaders }, message: 'Sandbox created', successStatus: 201, restView: restSandbox })
    .input(CreateSandboxInput)
    .output(Sandbox)
    .mutation(({ ctx, input }) => idempotentSandbox(ctx, 'sandbox.create', input, () => ctx.services.sandboxes.create(ctx.principal, input))),

  list: authedProcedure
    .meta({
      openapi: { method: 'GET', path: '/sandboxes', tags, summary: "List the organization's sandboxes, newest first" },
      message: 'Sandboxes fetched',
      paged: true,
      restView: restPage,
    })
    .input(ListSandboxesInput)
    .output(SandboxPage)
    .query(({ ctx, input }) => ctx.services.sandboxes.list(ctx.principal, input.page, input.limit, parseLabelFilter(input.labels))),

  get: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/sandboxes/{id}', tags, summary: 'Get a sandbox' }, message: 'Sandbox details fetched successfully', successFlag: true, restView: restSandbox })
    .input(SandboxIdInput)
    .output(Sandbox)
    .query(({ ctx, input }) => ctx.services.sandboxes.get(ctx.principal, input.id)),

  delete: authedProcedure
    .meta({
      openapi: { method: 'DELETE', path: '/sandboxes/{id}', tags, summary: 'Delete a sandbox and everything it had', description: 'Its snapshots go too unless keepSnapshots=true.' },
      message: 'Sandbox deleted',
    })
    .input(DeleteSandboxInput)
    .output(Deleted)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.delete(ctx.principal, input.id, input.keepSnapshots)),

  stop: lifecycle('stop', 'stop', 'Stop a sandbox (its filesystem is kept)', 'Sandbox stopped'),
  start: lifecycle('start', 'start', 'Start a stopped sandbox', 'Sandbox started'),
  pause: lifecycle('pause', 'pause', 'Freeze every process of a sandbox', 'Sandbox paused'),
  resume: lifecycle('resume', 'resume', 'Resume a paused sandbox', 'Sandbox resumed'),
  // The VoidRun client libraries' names for pause and resume.
  sleep: lifecycle('sleep', 'pause', "Freeze every process of a sandbox (the client libraries' name for pause)", 'Sandbox paused'),
  wake: lifecycle('wake', 'resume', "Resume a paused sandbox (the client libraries' name for resume)", 'Sandbox resumed'),

  updateNetwork: authedProcedure
    .meta({
      openapi: {
        method: 'PUT',
        path: '/sandboxes/{id}/network',
        tags,
        summary: "Change a sandbox's network policy",
        description:
          'The fields given replace the sandbox\'s, the others stay. A running sandbox gets the new egress rules within a second; a stopped one when it starts. `mode` changes only while the sandbox is stopped (400 otherwise).',
      },
      message: 'Network policy updated',
      restView: restSandbox,
    })
    .input(UpdateNetworkInput)
    .output(Sandbox)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.updateNetwork(ctx.principal, input)),

  snapshot: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: '/sandboxes/{id}/snapshot',
        tags,
        summary: 'Snapshot a sandbox',
        description: 'Container sandboxes get a filesystem snapshot (taken while frozen); memory is not captured.',
      },
      message: 'Snapshot created',
    })
    .input(SandboxIdInput)
    .output(Snapshot)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.snapshot(ctx.principal, input.id)),

  toImage: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: '/sandboxes/{id}/image',
        tags,
        summary: "Make an image of your organization from a sandbox's filesystem",
        description:
          "What the sandbox wrote (its writable layer, captured while frozen) becomes a layer above its image's; sandboxes created from the new image (`templateId`) start with those files. Container driver only (409 elsewhere). Counts against ORG_MAX_DISK_MB (429 when it does not fit). See the README, \"Images\".",
      },
      message: 'Image created',
      successStatus: 201,
      restView: restImage,
    })
    .input(SandboxImageInput)
    .output(Image)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.toImage(ctx.principal, input)),

  snapshots: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/sandboxes/{id}/snapshots', tags, summary: "List a sandbox's snapshots" }, message: 'Snapshots fetched', envelope: 'bare' })
    .input(SandboxIdInput)
    .output(z.array(Snapshot))
    .query(({ ctx, input }) => ctx.services.sandboxes.listSnapshots(ctx.principal, input.id)),

  restore: authedProcedure
    .meta({
      openapi: { method: 'POST', path: '/sandboxes/restore', tags, summary: 'Create a sandbox from a snapshot (in your organization)', requestHeaders: IdempotencyKeyHeaders },
      message: 'Sandbox restored',
      successStatus: 201,
      restView: restSandbox,
      envelope: 'output-first',
    })
    .input(RestoreSandboxInput)
    .output(Sandbox)
    .mutation(({ ctx, input }) => idempotentSandbox(ctx, 'sandbox.restore', input, () => ctx.services.sandboxes.restore(ctx.principal, input))),
});
