/**
 * A queue read as an async iterator: producers `push`, then `end` or `fail`; one reader drains it
 * with `for await`. Reading stops early when `signal` aborts. The reader's pace is the caller's
 * concern: producers that can outrun it bound the queue themselves (see `length`, `dropOldest`).
 */
export class AsyncQueue<T> {
  #items: T[] = [];
  #ended = false;
  #failure: { error: unknown } | null = null;
  #wake: (() => void) | null = null;

  push(item: T): void {
    this.#items.push(item);
    this.#notify();
  }

  end(): void {
    this.#ended = true;
    this.#notify();
  }

  fail(error: unknown): void {
    this.#failure = { error };
    this.#notify();
  }

  get length(): number {
    return this.#items.length;
  }

  /** Drops the oldest queued items until at most `max` remain; returns how many were dropped. */
  dropOldest(max: number): number {
    const excess = Math.max(0, this.#items.length - max);
    if (excess) this.#items.splice(0, excess);
    return excess;
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  /** Yields items as they come until the queue ends (or fails: the error is thrown) or `signal` aborts. */
  async *drain(signal?: AbortSignal): AsyncGenerator<T> {
    const onAbort = () => this.#notify();
    signal?.addEventListener('abort', onAbort);
    try {
      while (!signal?.aborted) {
        if (this.#items.length) {
          yield this.#items.shift()!;
          continue;
        }
        if (this.#failure) throw this.#failure.error;
        if (this.#ended) return;
        await new Promise<void>((resolve) => (this.#wake = resolve));
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }
}
