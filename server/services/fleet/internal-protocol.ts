import { z } from 'zod';
import { errorCodes } from '../../../shared/errors.js';

/**
 * The wire between API nodes and a host's internal listener (HOST_INTERNAL_PORT, README "Fleet").
 * Every request carries the cluster secret in this header; the listener refuses any other.
 */
export const CLUSTER_TOKEN_HEADER = 'x-voidrun-cluster-token';
/**
 * Who the caller is, as the API node that forwards a request authenticated it (its key read
 * there, on this request): JSON of a VouchedPrincipal. The host takes it instead of reading the
 * key again, only on its internal listener (with the cluster secret); a client's own header of
 * this name is dropped by every node before anything reads it.
 */
export const PRINCIPAL_HEADER = 'x-voidrun-principal';
const storeId = z.string().min(1).max(64).regex(/^[A-Za-z0-9_-]+$/);
export const VouchedPrincipal = z.object({ orgId: storeId, keyId: storeId, userId: storeId }).strict();
export type VouchedPrincipal = z.infer<typeof VouchedPrincipal>;
/** The most bytes of a PRINCIPAL_HEADER value that are parsed. */
export const PRINCIPAL_HEADER_MAX = 512;

/** A forwarded call's vouch (InternalCall.principal), or null when it has none or a malformed one. */
export function vouchOfCall(call: InternalCall): VouchedPrincipal | null {
  const parsed = VouchedPrincipal.safeParse(call.principal);
  return parsed.success ? parsed.data : null;
}

/** What an API node vouches for: the principal's fields, nothing else it may carry. */
export function vouchFor(p: VouchedPrincipal): VouchedPrincipal {
  return { orgId: p.orgId, keyId: p.keyId, userId: p.userId };
}

/** The path of a forwarded tRPC procedure call on the internal listener. */
export const INTERNAL_CALL_PATH = '/internal/v1/call';
/** Where a draining host sends a stopped sandbox it moves to this host (`?sandbox=<id>&from=<hostId>`, the capture as the body). */
export const INTERNAL_ADOPT_PATH = '/internal/v1/adopt';

/**
 * One procedure call an API node forwards to the host that runs the sandbox: the caller's own
 * credentials (the host authenticates them itself against the shared store), the raw input as the
 * API node received it (superjson).
 */
export const InternalCall = z.object({
  path: z.string().regex(/^[a-zA-Z]+(\.[a-zA-Z]+)+$/).max(100),
  type: z.enum(['query', 'mutation', 'subscription']),
  input: z.unknown(),
  apiKey: z.string().max(1024).nullable(),
  orgId: z.string().max(200).nullable(),
  idempotencyKey: z.string().max(1024).nullable(),
  /**
   * The caller as the API node authenticated it (see PRINCIPAL_HEADER), checked on its own by
   * `vouchOfCall`: one that is not a VouchedPrincipal is no vouch (the host reads `apiKey`), not a
   * refused call.
   */
  principal: z.unknown().optional(),
});
export type InternalCall = z.infer<typeof InternalCall>;

/** A failure as the host's tRPC formatter saw it: enough for the API node to throw the same error. */
export const WireError = z.object({
  errorCode: z.enum(errorCodes),
  message: z.string().max(64 * 1024),
  details: z.string().max(64 * 1024).optional(),
  issues: z.array(z.object({ field: z.string().max(1024), message: z.string().max(4096) })).max(1000).optional(),
});
export type WireError = z.infer<typeof WireError>;

/**
 * One NDJSON line of the answer: a query's or mutation's output (`ok`), a subscription's event
 * (`event`, with `id` when it is tracked: the client resumes by it), its end (`end`), or a failure.
 * Values are superjson-serialized.
 */
export const InternalLine = z.union([
  z.object({ ok: z.unknown() }).strict(),
  z.object({ event: z.unknown(), id: z.string().max(1024).optional() }).strict(),
  z.object({ end: z.literal(true) }).strict(),
  z.object({ error: WireError }).strict(),
]);
export type InternalLine = z.infer<typeof InternalLine>;

/** The tRPC routers whose procedures act on one sandbox, named by the input's `id` (or `sandboxId`). */
export const sandboxRouters = new Set(['sandbox', 'exec', 'commands', 'shell', 'files', 'pty', 'ports']);
/** Procedures of those routers that address no one sandbox: served by the API node itself. */
export const notSandboxScoped = new Set(['sandbox.create', 'sandbox.list']);

/** The sandbox id a forwarded call addresses, or null when the procedure is answered where it arrived. */
export function sandboxIdOfCall(path: string, input: unknown): string | null {
  if (notSandboxScoped.has(path) || !sandboxRouters.has(path.split('.')[0]!)) return null;
  if (typeof input !== 'object' || input === null) return null;
  const { id, sandboxId } = input as { id?: unknown; sandboxId?: unknown };
  const value = typeof id === 'string' ? id : typeof sandboxId === 'string' ? sandboxId : null;
  return value && /^[0-9a-f]{24}$/.test(value) ? value : null;
}

/** `host:port` of a host record's address, IPv6 in brackets. */
export function splitAddress(address: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(address);
  if (!m) throw new Error(`not a host:port address: ${address.slice(0, 100)}`);
  return { host: m[1] ?? m[2]!, port: Number(m[3]) };
}

/**
 * Whether a request path has `.` or `..` segments (plain or percent-encoded) or an encoded slash or
 * backslash: such a path is resolved by the URL parser into another route than the one it names, so
 * an API node would forward it by one path and its host serve another (e.g. a create, placed nowhere).
 */
export function hasDotSegments(path: string): boolean {
  if (/%2f|%5c|\\/i.test(path)) return true;
  return path.split('/').some((segment) => {
    const decoded = segment.replace(/%2e/gi, '.');
    return decoded === '.' || decoded === '..';
  });
}
