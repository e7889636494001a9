import { RestSandbox, Sandbox, SetTimeoutInput, toRestSandbox, UpdateSandboxInput } from '../../shared/index.js';
import { authedProcedure, restView } from '../trpc/init.js';

const tags = ['Sandboxes'];
const restSandbox = restView(RestSandbox, toRestSandbox);

/** A sandbox's timeout and idle policies (README "Lifecycle: timeouts, idle and auto-resume"); spread into the sandbox router. */
export const sandboxLifecycleProcedures = {
  setTimeout: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: '/sandboxes/{id}/timeout',
        tags,
        summary: "Set a sandbox's timeout from now",
        description:
          'The sandbox may run `timeout` more seconds from now (E2B semantics): it becomes its timeout, and `expiresAt` is now + timeout while it runs (a stopped or paused one counts from its next start or resume). 0 removes the timeout. Above SANDBOX_MAX_TIMEOUT_SEC: 400 naming it.',
      },
      message: 'Sandbox timeout set',
      restView: restSandbox,
    })
    .input(SetTimeoutInput)
    .output(Sandbox)
    .mutation(({ ctx, input }) => ctx.services.lifecycle.setTimeout(ctx.principal, input)),

  update: authedProcedure
    .meta({
      openapi: {
        method: 'PATCH',
        path: '/sandboxes/{id}',
        tags,
        summary: "Change a sandbox's lifecycle policies",
        description:
          'The fields given replace the sandbox\'s, the others stay: `timeout` (as POST /sandboxes/{id}/timeout), `onTimeout`, `idle` (null: none), `autoResume`, and `autoSleep` (the VoidRun client libraries\' shorthand: seconds, true for 300 s, false or 0 for never; it sets `idle` to pause after that long). `autoSleep` and `idle` together are a 400; so is any other field (named in the message: a PATCH never reads as a rename or resize that did not happen), a body that is not an object, and one changing nothing. Over REST a null field reads as absent (`timeout: null` leaves the timeout; alone it changes nothing, a 400), except `idle: null`, no idle policy.',
      },
      message: 'Sandbox updated',
      restView: restSandbox,
    })
    .input(UpdateSandboxInput)
    .output(Sandbox)
    .mutation(({ ctx, input }) => ctx.services.lifecycle.update(ctx.principal, input)),
};
