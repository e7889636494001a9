import { getTRPCErrorFromUnknown, initTRPC, tracked, type TRPCError } from '@trpc/server';
import { TRPC_ERROR_CODES_BY_KEY } from '@trpc/server/rpc';
import { getStatusCodeFromKey, middlewareMarker } from '@trpc/server/unstable-core-do-not-import';
import superjson from 'superjson';
import type { z } from 'zod';
import type { OpenApiMeta } from 'trpc-to-openapi';
import { errorCodeFromTrpc, errorCodeTable, type ErrorCode } from '../../shared/errors.js';
import { DomainError, HostUnavailableError, InvalidInputError, NotFoundError } from '../errors.js';
import { assertJsonDepth } from '../http/json-body.js';
import type { HoldKind } from '../http/open-streams.js';
import type { CallConnection, Context } from './context.js';
import { describeIssues, fieldIssues, toTRPCError, type ErrorData } from './errors.js';
import type { Principal } from '../services/auth-service.js';
import { isObjectIdHex } from '../store/ids.js';
import { sandboxIdOfCall, vouchFor, type InternalCall } from '../services/fleet/internal-protocol.js';
import type { HostRecord, ImageRecord } from '../store/types.js';
import type { Placed } from '../services/fleet/placement.js';
import { RECIPE_KEYS } from '../../shared/schemas/images.js';

/** Procedure metadata: trpc-to-openapi's `openapi` plus what our REST envelope needs. */
export type Meta = OpenApiMeta & {
  /** The envelope's `message` on success. */
  message?: string;
  /** The REST status on success (default 200). */
  successStatus?: number;
  /** The output is `{data, meta}`: REST puts `meta` beside `data` in the envelope (paginated lists). */
  paged?: boolean;
  /**
   * Inputs of a POST route that the contract passes in the query string. The REST layer merges the
   * query into the body for every POST; this only documents them as query parameters.
   */
  queryInputs?: string[];
  /**
   * How REST carries the output (tRPC always sends the output itself): by default in the original
   * VoidRun's envelope `{status, message, data}`; `bare`: the output itself, where the contract and
   * the original send it so; `both`: the output's fields beside the envelope's, in one body that
   * reads as either (an object output whose fields are not `status`, `message` or `data`);
   * `output-first`: the output's fields with the envelope's `message` and `data` beside them, for an
   * output that has its own `status` (the output's wins: the contract's bare schema is the strict one).
   */
  envelope?: 'bare' | 'both' | 'output-first';
  /** The envelope also carries `success: true` beside `status` (the contract's `ApiResponse…` schemas). */
  successFlag?: boolean;
  /** REST's view of the output where it differs from tRPC's (see `restView`). */
  restView?: RestView;
};

/** REST's view of a procedure's output: `from` builds it, `schema` documents it in openapi.yml. */
export interface RestView {
  schema: z.ZodType;
  from: (output: never) => unknown;
}

/** A typed `RestView`: `from` takes the procedure's output and returns what `schema` describes. */
export function restView<In, Out>(schema: z.ZodType<Out>, from: (output: In) => Out): RestView {
  return { schema, from };
}

/**
 * What the transformer hands on, in place of the input, for one nested deeper than MAX_JSON_DEPTH:
 * the call it belongs to fails with that 400 (in mapDomainErrors), answered under the call's id. (A
 * throw in the transformer would fail the whole message: a WebSocket reply with `id: null`.)
 */
class TooDeepInput {
  constructor(readonly error: DomainError) {}
}

/** superjson, with inputs deeper than MAX_JSON_DEPTH refused before superjson walks them recursively. */
const transformer = {
  input: {
    serialize: (value: unknown) => superjson.serialize(value),
    deserialize: (value: unknown) => {
      try {
        assertJsonDepth(value);
      } catch (err) {
        if (err instanceof DomainError) return new TooDeepInput(err);
        throw err;
      }
      return superjson.deserialize(value as Parameters<typeof superjson.deserialize>[0]);
    },
  },
  output: superjson,
};

const t = initTRPC
  .context<Context>()
  .meta<Meta>()
  .create({
    transformer,
    errorFormatter({ shape, error }) {
      const domain = error.cause instanceof DomainError ? error.cause : undefined;
      const issues = domain?.issues ?? fieldIssues(error.cause);
      let message = shape.message;
      let details = domain?.details;
      if (issues?.length) ({ message, details } = describeIssues(issues));
      // tRPC's own messages for these limits name neither the limit nor what to do.
      if (error.code === 'PAYLOAD_TOO_LARGE' && message === 'PAYLOAD_TOO_LARGE') message = 'Request body is larger than the server accepts (MAX_JSON_BODY_BYTES)';
      if (message === 'Batch call exceeds maximum size') message = 'The batch holds more calls than the server accepts (TRPC_MAX_BATCH_SIZE); send fewer at once';
      const errorCode: ErrorCode = domain?.code ?? errorCodeFromTrpc[error.code] ?? 'INTERNAL';
      // Internal errors keep their cause in the server log only.
      if (errorCode === 'INTERNAL') message = 'Internal server error';
      const data: ErrorData & typeof shape.data = { ...shape.data, stack: undefined, errorCode, details, issues };
      // A domain error thrown inside a subscription's iterator reaches tRPC unmapped (as
      // INTERNAL_SERVER_ERROR): it is answered with its own code (a 404 is no 500).
      if (domain && error.code === 'INTERNAL_SERVER_ERROR' && errorCode !== 'INTERNAL') {
        const key = errorCodeTable[errorCode].trpc;
        return { ...shape, code: TRPC_ERROR_CODES_BY_KEY[key], message, data: { ...data, code: key, httpStatus: getStatusCodeFromKey(key) } };
      }
      return { ...shape, message, data };
    },
  });

export const router = t.router;
export const createCallerFactory = t.createCallerFactory;

/**
 * Turns domain errors thrown by `run` (the rest of the middleware chain) into TRPCErrors with the
 * mapped code; logs unexpected ones. A throw from `run` itself is taken as the failed result a
 * middleware level of its own would have returned, so authenticated procedures run this and their
 * key check as one level (tRPC copies a call's options at every level).
 * A query or mutation over a WebSocket counts as in flight on its socket until it has returned.
 */
async function mappingDomainErrors<R extends { ok: boolean }>(
  opts: { ctx: Context; path: string; type: string; getRawInput: () => Promise<unknown> },
  run: () => Promise<R>,
): Promise<R> {
  const raw = await opts.getRawInput();
  if (raw instanceof TooDeepInput) throw toTRPCError(raw.error);
  const ended = opts.type === 'subscription' ? undefined : opts.ctx.connection.callStarted?.();
  const result = await run()
    .catch((cause: unknown) => ({ ok: false, error: getTRPCErrorFromUnknown(cause) }) as unknown as R)
    .finally(ended);
  if (result.ok) return result;
  const error = (result as unknown as { error: TRPCError }).error;
  const cause = error.cause;
  if (cause instanceof DomainError) throw toTRPCError(cause);
  if (error.code === 'INTERNAL_SERVER_ERROR') opts.ctx.log.error({ err: cause ?? error, procedure: opts.path }, 'unexpected error');
  return result;
}

export const publicProcedure = t.procedure.use((opts) => mappingDomainErrors(opts, () => opts.next()));

/**
 * Requires a valid, active API key; narrows `ctx` with the caller's `principal`. Calls that can hold
 * a large answer or a long stream take one of the org's slots (see `heldCallKind`) until their
 * response is written, and every such call or WebSocket is closed if its key is revoked.
 */
export const authedProcedure = t.procedure.use((opts) =>
  mappingDomainErrors(opts, async () => {
    const { ctx, path, type, signal } = opts;
    const checkStarted = ctx.streams.keyCheckStarted();
    // A host trusts who the forwarding API node found the caller to be (its key read there).
    const principal = ctx.vouched ?? (await ctx.services.auth.authenticate(ctx.apiKey, ctx.requestedOrgId));
    ctx.record.orgId = principal.orgId;
    // On an API node, a call on a sandbox runs on its host (and a create on the host placement chose).
    const remote = ctx.fleet ? await forwardedCall(ctx, ctx.fleet, principal, path, type, await opts.getRawInput(), signal) : null;
    const next: typeof opts.next = remote ? ((() => remote()) as unknown as typeof opts.next) : opts.next;
    const active = type === 'subscription' && !notActivity.has(path) && !remote ? sandboxHold(ctx, principal, await opts.getRawInput()) : null;
    const kind = heldCallKind(path, type);
    if (!kind) return next({ ctx: { principal } });
    let slot: () => void;
    try {
      slot = ctx.streams.acquire(principal, kind, () => ctx.connection.cut(), checkStarted);
    } catch (err) {
      active?.();
      throw err;
    }
    // A subscription's hold on its sandbox ends with its slot (response written, stopped, or its iterator done).
    const release = active ? () => (slot(), active()) : slot;
    if (ctx.transport !== 'trpc-ws') {
      ctx.connection.onClose(release); // once the response has been written
      return next({ ctx: { principal } });
    }
    // A WebSocket outlives its calls: each releases when it ends (and every call ends when the socket closes).
    const result = await next({ ctx: { principal } });
    if (!result.ok) {
      release();
      return result;
    }
    if (type === 'subscription') {
      signal?.addEventListener('abort', release, { once: true });
      return { ...result, data: pacedForWebSocket(result.data as AsyncIterable<unknown>, ctx.connection, release) };
    }
    // The answer is sent once this returns; the slot is held until the peer has taken it.
    void untilDrained(ctx.connection).then(release);
    return result;
  }),
);

/** A middleware result made here, not by the rest of the chain (a forwarded call's answer). */
function resultOf(data: unknown) {
  return { ok: true as const, data, marker: middlewareMarker };
}

/**
 * The call as its host runs it, or null when it is answered here: a call on a sandbox of a fleet
 * host goes to that host with the caller's own credentials (the host authenticates and authorizes
 * it again); `sandbox.create` first holds a slot on the host placement chose (429 "fleet full"),
 * released when the create fails there.
 */
async function forwardedCall(ctx: Context, fleet: NonNullable<Context['fleet']>, principal: Principal, path: string, type: string, input: unknown, signal: AbortSignal | undefined) {
  const call = { path, type: type as InternalCall['type'], input: superjson.serialize(input), apiKey: ctx.apiKey, orgId: ctx.requestedOrgId, idempotencyKey: ctx.idempotencyKey ?? null, principal: vouchFor(principal) };
  if (path === 'sandbox.create') {
    const shape = (typeof input === 'object' && input !== null ? input : {}) as { cpu?: unknown; vcpus?: unknown; mem?: unknown; memory?: unknown; templateId?: unknown; image?: unknown };
    const num = (...v: unknown[]) => v.find((x): x is number => typeof x === 'number' && x > 0) ?? 1;
    // An image whose own layers a host made (built, imported, captured there) runs on that host only.
    const image = await ctx.services.images.resolve(principal, typeof shape.templateId === 'string' ? shape.templateId : undefined).catch(() => null);
    const placed = await fleet.placement.place({ cpu: num(shape.cpu, shape.vcpus), memMb: num(shape.mem, shape.memory), ...(image?.hostId ? { hostId: image.hostId } : {}) });
    return async () => resultOf(await placedCall(fleet, placed, call, signal));
  }
  if (path === 'sandbox.restore') {
    const fields = (typeof input === 'object' && input !== null ? input : {}) as { snapshot_path?: unknown; cpu?: unknown; mem?: unknown };
    const ref = /^([0-9a-f]{24})\/snap-[0-9a-f]{24}(?:\.tar\.gz)?$/.exec(typeof fields.snapshot_path === 'string' ? fields.snapshot_path : '');
    if (!ref) throw new InvalidInputError('snapshot_path must be a snapshot\'s full_path, "<sandboxId>/<snapshotId>"');
    const size = { cpu: typeof fields.cpu === 'number' ? fields.cpu : 1, memMb: typeof fields.mem === 'number' ? fields.mem : 1 };
    // A snapshot is a file on the host its sandbox ran on: restored there. One whose sandbox was
    // deleted (its snapshots kept) is looked for on each ready host in turn.
    const source = await fleet.forwarder.target(ref[1]!);
    // Another org's sandbox: its snapshots are not this org's (a restore looks in the caller's org only).
    if (source && source.orgId !== principal.orgId) throw new NotFoundError(`Snapshot ${String(fields.snapshot_path)} not found`, { code: 'SNAPSHOT_NOT_FOUND' });
    const hosts = source ? [source.host] : await fleet.placement.candidates(size);
    return async () => {
      let notFound: unknown = new NotFoundError(`Snapshot ${String(fields.snapshot_path)} not found`, { code: 'SNAPSHOT_NOT_FOUND' });
      let refused: unknown = null;
      for (const host of hosts) {
        let placed: Placed;
        try {
          placed = await fleet.placement.place({ ...size, hostId: host.id, holds: 'the snapshot' });
        } catch (err) {
          // Its host is full or not serving: said so. Searched for, that host is passed over.
          if (hosts.length === 1) throw err;
          refused = err;
          continue;
        }
        try {
          return resultOf(await placedCall(fleet, placed, call, signal));
        } catch (err) {
          if (!(err instanceof DomainError && err.code === 'SNAPSHOT_NOT_FOUND')) throw err;
          notFound = err;
        }
      }
      // Not on any host that could take it: a host passed over may hold it.
      throw refused ?? notFound;
    };
  }
  const imageHost = await imageCallHost(ctx, fleet, principal, path, input);
  if (imageHost) {
    if (type !== 'subscription') return async () => resultOf(await fleet.forwarder.call(imageHost, call, signal));
    return async () => resultOf(trackedAgain(fleet.forwarder.subscribe(imageHost, call, signal)));
  }
  const id = sandboxIdOfCall(path, input);
  const target = id ? await fleet.forwarder.target(id) : null;
  // Another org's sandbox is answered here, as one that does not exist (404), like any other.
  if (!target || target.orgId !== principal.orgId) return null;
  const host = target.host;
  // A lost host's sandbox is still read and deleted here (its record says `host-lost`); nothing else runs.
  if (answeredWhenLost.has(path) && !fleet.forwarder.serving(host)) return null;
  fleet.forwarder.assertServing(host, id!);
  if (type !== 'subscription') return async () => resultOf(await fleet.forwarder.call(host, call, signal));
  return async () => resultOf(trackedAgain(fleet.forwarder.subscribe(host, call, signal)));
}

/**
 * A create or restore run on the host placement chose, in the slot held there: the sandbox made
 * is given the slot; the host's own refusal frees it. Cut off on the way (the host may have made
 * the sandbox): the slot stays reserved, and the host adopts it for the sandbox or frees it.
 */
async function placedCall(fleet: NonNullable<Context['fleet']>, placed: Placed, call: InternalCall, signal: AbortSignal | undefined): Promise<unknown> {
  let out: { id?: unknown };
  try {
    out = (await fleet.forwarder.call(placed.host, call, signal)) as { id?: unknown };
  } catch (err) {
    if (!(err instanceof HostUnavailableError)) await placed.release().catch(() => {});
    throw err;
  }
  // An idempotent replay returns the sandbox made the first time, which holds its slot already
  // (and may be on another host): this one is given back.
  const made = typeof out?.id === 'string' ? await fleet.forwarder.target(out.id) : null;
  if (made?.host.id === placed.host.id && !(await fleet.placement.holdsSlot(placed.host.id, out.id as string))) await placed.assign(out.id as string);
  else await placed.release();
  return out;
}

/** Image procedures whose work is on the image's own host: its build's log, live and so far, and its delete (its layers, its build). */
const imageHostCalls = new Set(['images.buildLog', 'images.logs', 'images.delete']);

/**
 * The host an image call runs on, or null when this node answers it (reading records; aliases;
 * images without layers of a host's own). A recipe build goes to the host of the image it builds
 * on when that has one, else to a ready host placement picks; a build log or delete to the host
 * that holds the image's layers. 503 when that host is not serving.
 */
async function imageCallHost(ctx: Context, fleet: NonNullable<Context['fleet']>, principal: Principal, path: string, input: unknown): Promise<HostRecord | null> {
  const fields = (typeof input === 'object' && input !== null ? input : {}) as Record<string, unknown>;
  let image: ImageRecord | null = null;
  if (path === 'images.create') {
    if (!RECIPE_KEYS.some((k) => fields[k] !== undefined)) return null;
    image = await ctx.services.images.resolve(principal, typeof fields.base === 'string' ? fields.base : 'debian').catch(() => null);
    if (!image?.hostId) return fleet.placement.builder();
  } else if (imageHostCalls.has(path) && typeof fields.id === 'string' && isObjectIdHex(fields.id)) {
    image = await ctx.services.images.resolve(principal, fields.id).catch(() => null);
    if (!image?.hostId || image.orgId !== principal.orgId) return null;
  } else return null;
  if (path === 'images.delete') {
    // A host removed from the fleet took the layers with it: the record is deleted here.
    const host = await fleet.forwarder.host(image.hostId!);
    if (!host || host.state === 'gone') return null;
  }
  return fleet.forwarder.imageHost(image);
}

/** What an API node answers itself for a sandbox whose host is lost: reading its record, and deleting it. */
const answeredWhenLost = new Set(['sandbox.get', 'sandbox.delete']);

/** A forwarded subscription's events, tracked ones tracked again here (a client resumes by their ids). */
async function* trackedAgain(events: AsyncIterable<{ event: unknown; id?: string }>): AsyncGenerator<unknown> {
  for await (const e of events) yield e.id !== undefined ? tracked(e.id, e.event) : e.event;
}

/**
 * Subscriptions that are not activity on their sandbox: its event stream reads the server's
 * records, never the sandbox, and a client watching for `sandbox.idle` must not keep that from coming.
 */
const notActivity = new Set(['sandbox.events']);

/**
 * A subscription on a sandbox (its input's `id`) keeps that sandbox awake for its idle policy while
 * it is open; the caller releases it with the subscription's stream slot. Held with the caller's
 * org before the sandbox is looked up, so it counts (and touches) only a sandbox of that org: an id
 * of another org's sandbox (refused a moment later) moves nothing (see ActivityTracker.hold).
 */
function sandboxHold(ctx: Context, principal: Principal, raw: unknown): (() => void) | null {
  const id = typeof raw === 'object' && raw !== null ? (raw as { id?: unknown }).id : undefined;
  if (typeof id !== 'string' || !isObjectIdHex(id)) return null;
  return ctx.services.activity.hold(principal.orgId, id);
}

/** Procedures whose answer the server builds whole in memory: they count against ORG_MAX_CONCURRENT_EXECS. */
const execLikeCalls = new Set(['exec.run', 'shell.sessionExec', 'commands.wait', 'files.list', 'files.headTail', 'files.search', 'pty.buffer']);

function heldCallKind(path: string, type: string): HoldKind | null {
  if (type === 'subscription') return 'stream';
  return execLikeCalls.has(path) ? 'exec' : null;
}

/** Past this many unsent bytes on a tRPC WebSocket, a subscription waits for the peer to read. */
const wsHighWater = 1024 * 1024;

const tick = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function untilDrained(connection: CallConnection, below = 64 * 1024): Promise<void> {
  await new Promise((r) => setImmediate(r));
  while (connection.isOpen() && (connection.bufferedAmount?.() ?? 0) > below) await tick(50);
}

/**
 * A subscription's events with backpressure: tRPC's WebSocket adapter sends without waiting, so
 * the source is not pulled while the socket holds more than `wsHighWater` unsent bytes.
 */
async function* pacedForWebSocket<T>(events: AsyncIterable<T>, connection: CallConnection, release: () => void): AsyncGenerator<T> {
  try {
    for await (const e of events) {
      if ((connection.bufferedAmount?.() ?? 0) > wsHighWater) await untilDrained(connection, wsHighWater / 4);
      yield e;
    }
  } finally {
    release();
  }
}
