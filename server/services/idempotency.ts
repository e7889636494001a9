import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { IDEMPOTENCY_KEY_PATTERN as KEY_PATTERN, IDEMPOTENCY_KEY_RULE as KEY_RULE } from '../../shared/schemas/idempotency.js';
import { ConflictError, InvalidInputError } from '../errors.js';
import type { IdempotencyRepository } from '../store/types.js';
import type { Principal } from './auth-service.js';

/** How long a key holds its first request's result: a retry later than this runs again. */
export const IDEMPOTENCY_TTL_MS = 24 * 60 * 60 * 1000;
/** The longest a retry waits for the first request with its key, still running in this server, to finish. */
export const IDEMPOTENCY_WAIT_MS = 60_000;

/** The operations that take a key, each its own key space. */
export type IdempotentOperation = 'sandbox.create' | 'sandbox.restore' | 'exec.startCommand';

/** How an operation's result is kept with its key and answered again to a retry. */
export interface Replay<T> {
  /** The result as stored (JSON text, small: an id, a process handle). */
  save(result: T): string;
  /** The answer to a retry: for a sandbox, its current state. */
  load(saved: string): Promise<T>;
}

export interface IdempotencyOptions {
  repository: IdempotencyRepository;
  log: Logger;
  ttlMs?: number;
  waitMs?: number;
  /** How often expired keys are removed (default hourly). */
  pruneIntervalMs?: number;
}

/**
 * Idempotent requests. The first request with a key claims it by an insert keyed by
 * (org, operation, key) holding the hash of its canonical body; only the claimer runs the
 * operation. Its result is stored with the key, and a retry within 24 h with the same body gets it
 * again (a sandbox's current answer, the same process handle), never a second run. Another body
 * under the key is a 409 naming it. A retry arriving while the first request still runs in this
 * server waits for it (at most IDEMPOTENCY_WAIT_MS, then 409 "in progress"); one running in another
 * server is a 409 "in progress" at once. A first request that fails frees its key, so a retry runs;
 * so does a key left unfinished by a server that stopped. Keys expire after 24 h (pruned hourly).
 */
export class IdempotencyService {
  readonly #inFlight = new Map<string, Promise<unknown>>();
  /** Keys still unfinished from before this start were left by a server that stopped: free to claim again. */
  readonly #startedAt = new Date();
  readonly #timer: NodeJS.Timeout;

  constructor(private readonly opts: IdempotencyOptions) {
    this.#timer = setInterval(() => void this.prune(), opts.pruneIntervalMs ?? 60 * 60 * 1000);
    this.#timer.unref();
  }

  close(): void {
    clearInterval(this.#timer);
  }

  /** Removes expired keys; resolves to how many went. */
  prune(now = new Date()): Promise<number> {
    return this.opts.repository.prune(now).catch((err: Error) => {
      this.opts.log.warn({ err: err.message }, 'could not prune expired idempotency keys');
      return 0;
    });
  }

  /**
   * The key a request carries: the REST header or the tRPC input (both, if they differ, is a 400);
   * null without one. A malformed key is a 400 saying what a key may hold.
   */
  keyOf(header: string | null | undefined, input: string | undefined): string | null {
    if (header != null && input !== undefined && header !== input) throw new InvalidInputError('the Idempotency-Key header and idempotencyKey differ; send the key once');
    const key = header ?? input ?? null;
    if (key !== null && !KEY_PATTERN.test(key)) throw new InvalidInputError(`Idempotency-Key is not valid: ${KEY_RULE}`);
    return key;
  }

  /** Runs `fn` once per (org, operation, key) and request body; see the class comment. Without a key, just runs it. */
  async run<T>(principal: Principal, operation: IdempotentOperation, key: string | null, body: unknown, replay: Replay<T>, fn: () => Promise<T>): Promise<T> {
    if (key === null) return fn();
    const { repository } = this.opts;
    const requestHash = hashOf(body);
    const slot = JSON.stringify([principal.orgId, operation, key]);
    // Each turn either runs the operation, answers the stored result, or finds the key freed meanwhile.
    for (let turn = 0; turn < 5; turn++) {
      const now = new Date();
      const ttl = this.opts.ttlMs ?? IDEMPOTENCY_TTL_MS;
      if (await repository.claim({ orgId: principal.orgId, operation, key, requestHash, createdAt: now, expiresAt: new Date(now.getTime() + ttl) })) {
        const running = this.#runClaimed(principal.orgId, operation, key, replay, fn);
        this.#inFlight.set(slot, running);
        try {
          return await running;
        } finally {
          this.#inFlight.delete(slot);
        }
      }
      const existing = await repository.find(principal.orgId, operation, key);
      if (!existing) continue;
      if (existing.expiresAt <= now) {
        await repository.release(principal.orgId, operation, key);
        continue;
      }
      if (existing.requestHash !== requestHash) {
        throw new ConflictError(`Idempotency-Key ${key} was used for a different ${operation} request in the last 24 h; send a new key for a new request`);
      }
      if (existing.result !== null) return replay.load(existing.result);
      const first = this.#inFlight.get(slot);
      if (first) {
        const waited = await settledWithin(first, this.opts.waitMs ?? IDEMPOTENCY_WAIT_MS);
        if (!waited) throw new ConflictError(`The first ${operation} request with Idempotency-Key ${key} is still in progress; retry later`);
        continue;
      }
      if (existing.createdAt < this.#startedAt) {
        await repository.release(principal.orgId, operation, key);
        continue;
      }
      throw new ConflictError(`The first ${operation} request with Idempotency-Key ${key} is still in progress; retry later`);
    }
    throw new ConflictError(`Idempotency-Key ${key} is contended; retry later`);
  }

  async #runClaimed<T>(orgId: string, operation: IdempotentOperation, key: string, replay: Replay<T>, fn: () => Promise<T>): Promise<T> {
    let result: T;
    try {
      result = await fn();
    } catch (err) {
      await this.opts.repository.release(orgId, operation, key).catch(() => {});
      throw err;
    }
    await this.opts.repository.complete(orgId, operation, key, replay.save(result));
    return result;
  }
}

/** Whether `p` settled (either way) within `ms`. */
function settledWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.then(
      () => true,
      () => true,
    ),
    new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms))),
  ]).finally(() => clearTimeout(timer));
}

/** SHA-256 of the request's canonical JSON (keys sorted at every level; the key itself left out). */
export function hashOf(body: unknown): string {
  const canonical = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(canonical);
    if (v && typeof v === 'object') {
      return Object.fromEntries(
        Object.entries(v as Record<string, unknown>)
          .filter(([k, x]) => k !== 'idempotencyKey' && x !== undefined)
          .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
          .map(([k, x]) => [k, canonical(x)]),
      );
    }
    return v;
  };
  return createHash('sha256').update(JSON.stringify(canonical(body))).digest('hex');
}
