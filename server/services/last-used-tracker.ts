import type { Logger } from 'pino';
import type { ApiKeyRepository } from '../store/types.js';

/**
 * Remembers when each API key was last used and writes those times in one batch every
 * `flushIntervalMs`, so an authenticated request costs no database write. Listings read through
 * `lastUsed()` so they show times not yet flushed.
 */
export class LastUsedTracker {
  #pending = new Map<string, Date>();
  #recent = new Map<string, Date>();
  readonly #timer: NodeJS.Timeout;
  #flushing: Promise<void> = Promise.resolve();

  constructor(
    private readonly apiKeys: ApiKeyRepository,
    private readonly log: Logger,
    flushIntervalMs: number,
  ) {
    this.#timer = setInterval(() => void this.flush(), flushIntervalMs);
    this.#timer.unref();
  }

  touch(keyId: string, at = new Date()): void {
    this.#pending.set(keyId, at);
    this.#recent.set(keyId, at);
  }

  /** The newest known use of a key: unflushed if there is one, else what the store says. */
  lastUsed(keyId: string, stored: Date | null): Date | null {
    const recent = this.#recent.get(keyId);
    if (!recent) return stored;
    return stored && stored > recent ? stored : recent;
  }

  forget(keyId: string): void {
    this.#pending.delete(keyId);
    this.#recent.delete(keyId);
  }

  /** Writes pending times. Concurrent calls are serialised; a failed write is retried next time. */
  flush(): Promise<void> {
    this.#flushing = this.#flushing.then(async () => {
      if (this.#pending.size === 0) return;
      const batch = this.#pending;
      this.#pending = new Map();
      try {
        await this.apiKeys.recordLastUsed(batch);
        for (const [id, at] of batch) if (this.#recent.get(id) === at) this.#recent.delete(id);
      } catch (err) {
        for (const [id, at] of batch) if (!this.#pending.has(id)) this.#pending.set(id, at);
        this.log.warn({ err: (err as Error).message }, 'could not record API key last-used times; will retry');
      }
    });
    return this.#flushing;
  }

  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.flush();
  }
}
