import type { Logger } from 'pino';
import type { ApiKeyRepository } from '../../store/types.js';

export interface KeyEndWatchOptions {
  apiKeys: ApiKeyRepository;
  /** The ids of the keys with calls or connections open on this node. */
  trackedKeys: () => string[];
  /** Closes what a key opened here (OpenStreams.closeKey). */
  closeKey: (keyId: string) => void;
  intervalMs: number;
  log: Logger;
}

/** The most key ids read in one query. */
const BATCH = 500;

/**
 * A fleet node's check of the keys its open streams were opened with. A key revoked or
 * deactivated through one node closes that node's streams at once (OrgService.onKeyEnded); every
 * other node — the hosts that serve the streams, the API nodes that forward them — finds it here,
 * reading the keys it holds streams for every `intervalMs`, and closes theirs. One query per
 * interval while streams are open; none while none are.
 */
export class KeyEndWatch {
  #timer: NodeJS.Timeout | null = null;
  #running = false;

  constructor(private readonly o: KeyEndWatchOptions) {}

  start(): void {
    this.#timer ??= setInterval(() => void this.check(), this.o.intervalMs).unref();
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  /** One pass: closes what every ended key among the tracked ones opened; resolves how many keys ended. */
  async check(): Promise<number> {
    if (this.#running) return 0;
    this.#running = true;
    try {
      const keys = this.o.trackedKeys();
      let ended = 0;
      for (let i = 0; i < keys.length; i += BATCH) {
        const batch = keys.slice(i, i + BATCH);
        const live = new Set((await this.o.apiKeys.findByIds(batch)).filter((k) => k.isActive).map((k) => k.id));
        for (const id of batch) {
          if (live.has(id)) continue;
          ended++;
          this.o.closeKey(id);
        }
      }
      if (ended) this.o.log.info({ keys: ended }, 'fleet: closed the open streams of revoked or deactivated API keys');
      return ended;
    } catch (err) {
      // The store is away: the next pass tries again (new requests fail on their own key check).
      this.o.log.warn({ err: (err as Error).message }, 'fleet: could not re-check the API keys of open streams');
      return 0;
    } finally {
      this.#running = false;
    }
  }
}
