import { TooManyRequestsError, UnauthorizedError } from '../errors.js';
import type { Principal } from '../services/auth-service.js';

/**
 * What a held call counts against: `exec` is a call whose whole answer the server builds in memory
 * (a synchronous exec, a command wait); `stream` is a long-lived response or socket (SSE, NDJSON,
 * downloads, terminals, file watches, tRPC subscriptions).
 */
export type HoldKind = 'exec' | 'stream';

export interface OpenStreamsLimits {
  /** ORG_MAX_CONCURRENT_EXECS */
  maxExecsPerOrg: number;
  /** ORG_MAX_STREAMS */
  maxStreamsPerOrg: number;
}

/** How long an ended key is remembered, for key checks that were under way when it ended. */
const endedKeyMemoryMs = 10 * 60 * 1000;

const limitNames: Record<HoldKind, { variable: string; what: string }> = {
  exec: { variable: 'ORG_MAX_CONCURRENT_EXECS', what: 'concurrent exec calls' },
  stream: { variable: 'ORG_MAX_STREAMS', what: 'open streams' },
};

/**
 * The calls and connections each org holds open, counted from their start until their response
 * has been written (or their socket closed), and indexed by the API key that opened them so a
 * revoked or deactivated key's connections can be closed at once.
 */
export class OpenStreams {
  readonly #counts = new Map<string, Record<HoldKind, number>>();
  readonly #byKey = new Map<string, Set<() => void>>();
  /** Keys ended recently (oldest first), with the key-check number current when they ended. */
  readonly #ended = new Map<string, { check: number; at: number }>();
  #checks = 0;

  constructor(private readonly limits: OpenStreamsLimits) {}

  /**
   * Call before reading a key from the store; pass the number to `acquire`/`trackKey`. A key
   * revoked after this (while its record was being read) is refused there, though the read saw it.
   */
  keyCheckStarted(): number {
    return ++this.#checks;
  }

  /**
   * Takes one of the org's `kind` slots until the returned release runs (it may run more than once).
   * `close` cuts the call if its key is revoked. Throws TooManyRequestsError when the org is at its
   * cap, UnauthorizedError when the key ended after `checkStarted` (see `keyCheckStarted`).
   */
  acquire(principal: Principal, kind: HoldKind, close: () => void, checkStarted: number): () => void {
    this.#assertNotEnded(principal.keyId, checkStarted);
    const counts = this.#counts.get(principal.orgId) ?? { exec: 0, stream: 0 };
    const max = kind === 'exec' ? this.limits.maxExecsPerOrg : this.limits.maxStreamsPerOrg;
    if (counts[kind] >= max) {
      const { variable, what } = limitNames[kind];
      throw new TooManyRequestsError(`This organization already has ${counts[kind]} ${what} in progress, the most allowed (${variable}=${max})`, {
        details: 'Wait for some to finish, or read the responses you have open, then retry',
      });
    }
    counts[kind]++;
    this.#counts.set(principal.orgId, counts);
    const untrack = this.trackKey(principal.keyId, close, checkStarted);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      untrack();
      counts[kind]--;
      if (counts.exec === 0 && counts.stream === 0 && this.#counts.get(principal.orgId) === counts) this.#counts.delete(principal.orgId);
    };
  }

  /**
   * Registers `close` to run if `keyId` is revoked, without counting it; returns the unregister.
   * Throws UnauthorizedError when the key ended after `checkStarted` (see `keyCheckStarted`).
   */
  trackKey(keyId: string, close: () => void, checkStarted: number): () => void {
    this.#assertNotEnded(keyId, checkStarted);
    let closers = this.#byKey.get(keyId);
    if (!closers) this.#byKey.set(keyId, (closers = new Set()));
    closers.add(close);
    return () => {
      closers.delete(close);
      if (closers.size === 0 && this.#byKey.get(keyId) === closers) this.#byKey.delete(keyId);
    };
  }

  /** Closes every call and connection opened with `keyId`; resolves how many there were. */
  closeKey(keyId: string): number {
    const now = Date.now();
    for (const [id, e] of this.#ended) {
      if (now - e.at < endedKeyMemoryMs) break;
      this.#ended.delete(id);
    }
    this.#ended.delete(keyId);
    this.#ended.set(keyId, { check: this.#checks, at: now });
    const closers = this.#byKey.get(keyId);
    if (!closers) return 0;
    this.#byKey.delete(keyId);
    for (const close of closers) {
      try {
        close();
      } catch {}
    }
    return closers.size;
  }

  #assertNotEnded(keyId: string, checkStarted: number): void {
    const ended = this.#ended.get(keyId);
    if (ended && ended.check >= checkStarted) {
      throw new UnauthorizedError('Invalid API key: it was revoked or deactivated while this request was being checked');
    }
  }

  /** The ids of the keys that have calls or connections open here now. */
  trackedKeys(): string[] {
    return [...this.#byKey.keys()];
  }

  /** An org's held slots right now. */
  usage(orgId: string): Record<HoldKind, number> {
    return { exec: 0, stream: 0, ...this.#counts.get(orgId) };
  }
}
