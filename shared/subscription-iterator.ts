import { AsyncQueue } from './async-queue.js';

interface Handlers<T> {
  onData(value: T): void;
  onError(err: unknown): void;
  onComplete(): void;
  onStopped(): void;
}

/**
 * A tRPC subscription as an async iterator. Leaving the loop early (break, throw) unsubscribes.
 * Events that arrive faster than the loop reads them wait in memory; the server bounds how far a
 * stream can run ahead.
 */
export async function* iterateSubscription<T>(subscribe: (h: Handlers<T>) => { unsubscribe(): void }): AsyncGenerator<T> {
  const queue = new AsyncQueue<T>();
  const sub = subscribe({
    onData: (v) => queue.push(v),
    onError: (err) => queue.fail(err ?? new Error('subscription failed')),
    onComplete: () => queue.end(),
    onStopped: () => queue.end(),
  });
  try {
    yield* queue.drain();
  } finally {
    sub.unsubscribe();
  }
}
