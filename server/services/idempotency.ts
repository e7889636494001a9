import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { IDEMPOTENCY_KEY_PATTERN as KEY_PATTERN, IDEMPOTENCY_KEY_RULE as KEY_RULE } from '../../shared/schemas/idempotency.js';
import { ConflictError, InvalidInputError, TooManyRequestsError } from '../errors.js';
import type { IdempotencyClaim, IdempotencyRepository } from '../store/types.js';
import type { Principal } from './auth-service.js';

/** How long a key holds its first request's result: a retry later than this runs again. */
export const IDEMPOTENCY_TTL_MS = 24 * 60 * 60 * 1000;
/** The longest a retry waits for the first request with its key, still running in this server, to finish. */
export const IDEMPOTENCY_WAIT_MS = 60_000;
/**
 * A fleet node's unfinished claim holds its key this long past its last renewal (every quarter of
 * it while it runs): long beside the renewal period, so a stalled event loop, a slow store or
 * clocks some seconds apart do not let another node take a running request over.
 */
export const IDEMPOTENCY_FLEET_LEASE_MS = 120_000;
/** Default bound on an org's keys held at once (IDEMPOTENCY_MAX_KEYS_PER_ORG). */
export const IDEMPOTENCY_MAX_KEYS_PER_ORG = 10_000;
/**
 * How long past its expiry a claim is kept before pruning. A request that read a key's claim and
 * takes it over inserts the next generation; the row it read must still exist then, or a request
 * seeing no row at all could claim generation 0 beside it. This is the margin for that gap
 * (a few store round trips in practice).
 */
export const IDEMPOTENCY_PRUNE_GRACE_MS = 10 * 60 * 1000;

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
  /** Keys one org may hold at once (default IDEMPOTENCY_MAX_KEYS_PER_ORG); a new key past it is a 429. */
  maxKeysPerOrg?: number;
  /** How often expired keys are removed (default hourly). */
  pruneIntervalMs?: number;
  /**
   * With several servers on one store (a fleet): an unfinished claim holds its key only this long,
   * renewed by its running claimer every quarter of it, and one its server stopped renewing (stopped,
   * died) expires, so the next request takes the key over. Without it (one server), a claim left
   * unfinished from before this server started is taken over at once.
   */
  leaseMs?: number;
}

/**
 * Idempotent requests. The first request with a key claims it by an insert keyed by
 * (org, operation, key, generation 0) holding the hash of its canonical body; only the claimer runs
 * the operation. Its result is stored with the claim, and a retry within 24 h with the same body gets
 * it again (a sandbox's current answer, the same process handle), never a second run. Another body
 * under the key is a 409 naming it. A retry arriving while the first request still runs in this
 * server waits for it (at most IDEMPOTENCY_WAIT_MS, then 409 "in progress"); one running in another
 * server is a 409 "in progress" at once. A claim whose request failed, that expired (24 h), or that a
 * server which stopped left unfinished (one server: claimed before it started; a fleet: its lease
 * was not renewed, `leaseMs`) is taken over by inserting the next generation: of concurrent
 * retries exactly one inserts it and runs, and no claim is ever deleted or overwritten by anyone
 * but its claimer, so a retry can never free a claim another retry has just won. An org holds at
 * most `maxKeysPerOrg` live keys (a new key past it is a 429). Expired claims are pruned hourly.
 */
export class IdempotencyService {
  /** Per (org, operation, key): the turn of the one request of this server reading or running it now. */
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

  /** Removes claims expired more than IDEMPOTENCY_PRUNE_GRACE_MS before `now`; resolves to how many went. */
  prune(now = new Date()): Promise<number> {
    return this.opts.repository.prune(new Date(now.getTime() - IDEMPOTENCY_PRUNE_GRACE_MS)).catch((err: Error) => {
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
    const { orgId } = principal;
    const requestHash = hashOf(body);
    const slot = JSON.stringify([orgId, operation, key]);
    // Each turn either runs the operation, answers the stored result, or finds the key's holder changed meanwhile.
    for (let turn = 0; turn < 5; turn++) {
      // One request per key at a time in this server reads and claims it; the others wait for it
      // (for a run, its result), so a claim won here is never seen as another server's.
      const first = this.#inFlight.get(slot);
      if (first) {
        const waited = await settledWithin(first, this.opts.waitMs ?? IDEMPOTENCY_WAIT_MS);
        if (!waited) throw new ConflictError(`The first ${operation} request with Idempotency-Key ${key} is still in progress; retry later`);
        continue;
      }
      let turnDone = () => {};
      this.#inFlight.set(slot, new Promise<void>((resolve) => (turnDone = resolve)));
      try {
        const answer = await this.#turn(orgId, operation, key, requestHash, replay, fn);
        if (answer) return answer.value;
      } finally {
        this.#inFlight.delete(slot);
        turnDone();
      }
    }
    throw new ConflictError(`Idempotency-Key ${key} is contended; retry later`);
  }

  /** One read of the key's holder: the answer (a replay, or the run of a claim won), or null when the key's holder changed meanwhile. */
  async #turn<T>(orgId: string, operation: IdempotentOperation, key: string, requestHash: string, replay: Replay<T>, fn: () => Promise<T>): Promise<{ value: T } | null> {
    const { repository } = this.opts;
    const now = new Date();
    const holder = await repository.find(orgId, operation, key);
    let gen: number;
    if (!holder) {
      await this.#admitNewKey(orgId, now);
      gen = 0;
    } else if (holder.expiresAt <= now) {
      // Expired, or its request failed.
      gen = holder.gen + 1;
    } else {
      if (holder.requestHash !== requestHash) {
        throw new ConflictError(`Idempotency-Key ${key} was used for a different ${operation} request in the last 24 h; send a new key for a new request`);
      }
      if (holder.result !== null) return { value: await replay.load(holder.result) };
      // Unfinished, and not running in this server: another server runs it, or one that stopped
      // left it. In a fleet its lease says which (an abandoned claim has expired, above); alone,
      // a claim from before this server started was left.
      if (this.opts.leaseMs !== undefined || holder.createdAt >= this.#startedAt) throw new ConflictError(`The first ${operation} request with Idempotency-Key ${key} is still in progress; retry later`);
      gen = holder.gen + 1;
    }
    // The insert of generation `gen` decides which of the requests (of any server) that saw the same
    // holder runs; the others read the winner's claim on their next turn.
    const ttl = this.opts.ttlMs ?? IDEMPOTENCY_TTL_MS;
    const held = this.opts.leaseMs ?? ttl;
    if (!(await repository.claim({ orgId, operation, key, gen, requestHash, createdAt: now, expiresAt: new Date(now.getTime() + held) }))) return null;
    return { value: await this.#runClaimed({ orgId, operation, key, gen }, new Date(now.getTime() + ttl), replay, fn) };
  }

  /** A 429 when the org already holds its bound of live keys (counted, so concurrent new keys may pass it by a few). */
  async #admitNewKey(orgId: string, now: Date): Promise<void> {
    const max = this.opts.maxKeysPerOrg ?? IDEMPOTENCY_MAX_KEYS_PER_ORG;
    if ((await this.opts.repository.countLive(orgId, now)) >= max) {
      throw new TooManyRequestsError(`This org holds ${max} idempotency keys from the last 24 h (IDEMPOTENCY_MAX_KEYS_PER_ORG); retry with a key already used, or without a key, or later`);
    }
  }

  async #runClaimed<T>(claim: IdempotencyClaim, expiresAt: Date, replay: Replay<T>, fn: () => Promise<T>): Promise<T> {
    const lease = this.#renewing(claim);
    let result: T;
    try {
      result = await fn();
    } catch (err) {
      await lease.stop();
      // Failed: the claim ends now, and the next request with the key takes it over.
      await this.opts.repository.expire(claim, new Date()).catch(() => {});
      throw err;
    }
    // No renewal is under way when the result is written (a store that writes whole documents
    // back would let a late renewal undo it).
    await lease.stop();
    await this.opts.repository.complete(claim, replay.save(result), this.opts.leaseMs !== undefined ? expiresAt : undefined);
    return result;
  }

  /** Renews a running claim's lease (fleet) every quarter of it until stopped; `stop` waits for a renewal under way. */
  #renewing(claim: IdempotencyClaim): { stop: () => Promise<void> } {
    const leaseMs = this.opts.leaseMs;
    if (leaseMs === undefined) return { stop: async () => {} };
    let writing: Promise<void> = Promise.resolve();
    const timer = setInterval(() => {
      writing = writing
        .then(() => this.opts.repository.expire(claim, new Date(Date.now() + leaseMs)))
        .catch((err: Error) => this.opts.log.warn({ key: claim.key, err: err.message }, 'could not renew an idempotency key in progress'));
    }, Math.max(1, Math.floor(leaseMs / 4)));
    timer.unref();
    return {
      stop: async () => {
        clearInterval(timer);
        await writing;
      },
    };
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

/**
 * SHA-256 of the request's canonical JSON: keys sorted at every level, and the request's own
 * `idempotencyKey` (top level only: an env var or label of that name is part of the body) left out.
 */
export function hashOf(body: unknown): string {
  const canonical = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(canonical);
    if (v && typeof v === 'object') {
      return Object.fromEntries(
        Object.entries(v as Record<string, unknown>)
          .filter(([, x]) => x !== undefined)
          .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
          .map(([k, x]) => [k, canonical(x)]),
      );
    }
    return v;
  };
  const top = body && typeof body === 'object' && !Array.isArray(body) ? Object.fromEntries(Object.entries(body).filter(([k]) => k !== 'idempotencyKey')) : body;
  return createHash('sha256').update(JSON.stringify(canonical(top))).digest('hex');
}
