import { z } from 'zod';
import {
  CreateSandboxInput,
  DeleteSandboxInput,
  ListSandboxesInput,
  RestoreSandboxInput,
  RestSandbox,
  RestSandboxActionResult,
  RestSandboxPage,
  restStatus,
  Sandbox,
  SandboxActionResult,
  SandboxIdInput,
  SandboxPage,
  Snapshot,
  toRestSandbox,
} from '../../shared/index.js';
import { authedProcedure, restView, router } from '../trpc/init.js';

const tags = ['Sandboxes'];
const Deleted = z.object({ id: z.string(), deleted: z.literal(true) });
/** REST carries sandboxes with `status` inside the contract's enum (tRPC keeps `creating`). */
const restSandbox = restView(RestSandbox, toRestSandbox);
const restAction = restView(RestSandboxActionResult, (r: SandboxActionResult) => ({ ...r, ...restStatus(r.status) }));
const restPage = restView(RestSandboxPage, (p: SandboxPage) => ({ ...p, data: p.data.map(toRestSandbox) }));

export const sandboxRouter = router({
  create: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes', tags, summary: 'Create a sandbox' }, message: 'Sandbox created', successStatus: 201, restView: restSandbox })
    .input(CreateSandboxInput)
    .output(Sandbox)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.create(ctx.principal, input)),

  list: authedProcedure
    .meta({
      openapi: { method: 'GET', path: '/sandboxes', tags, summary: "List the organization's sandboxes, newest first" },
      message: 'Sandboxes fetched',
      paged: true,
      restView: restPage,
    })
    .input(ListSandboxesInput)
    .output(SandboxPage)
    .query(({ ctx, input }) => ctx.services.sandboxes.list(ctx.principal, input.page, input.limit)),

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

  stop: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes/{id}/stop', tags, summary: 'Stop a sandbox (its filesystem is kept)' }, message: 'Sandbox stopped', restView: restAction })
    .input(SandboxIdInput)
    .output(SandboxActionResult)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.stop(ctx.principal, input.id)),

  start: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes/{id}/start', tags, summary: 'Start a stopped sandbox' }, message: 'Sandbox started', restView: restAction })
    .input(SandboxIdInput)
    .output(SandboxActionResult)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.start(ctx.principal, input.id)),

  pause: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes/{id}/pause', tags, summary: 'Freeze every process of a sandbox' }, message: 'Sandbox paused', restView: restAction })
    .input(SandboxIdInput)
    .output(SandboxActionResult)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.pause(ctx.principal, input.id)),

  resume: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/sandboxes/{id}/resume', tags, summary: 'Resume a paused sandbox' }, message: 'Sandbox resumed', restView: restAction })
    .input(SandboxIdInput)
    .output(SandboxActionResult)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.resume(ctx.principal, input.id)),

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

  snapshots: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/sandboxes/{id}/snapshots', tags, summary: "List a sandbox's snapshots" }, message: 'Snapshots fetched', envelope: 'bare' })
    .input(SandboxIdInput)
    .output(z.array(Snapshot))
    .query(({ ctx, input }) => ctx.services.sandboxes.listSnapshots(ctx.principal, input.id)),

  restore: authedProcedure
    .meta({
      openapi: { method: 'POST', path: '/sandboxes/restore', tags, summary: 'Create a sandbox from a snapshot (in your organization)' },
      message: 'Sandbox restored',
      successStatus: 201,
      restView: restSandbox,
    })
    .input(RestoreSandboxInput)
    .output(Sandbox)
    .mutation(({ ctx, input }) => ctx.services.sandboxes.restore(ctx.principal, input)),
});
