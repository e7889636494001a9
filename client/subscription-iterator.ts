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
  const queue: T[] = [];
  let done = false;
  let failure: unknown;
  let wake: (() => void) | undefined;
  const notify = () => {
    wake?.();
    wake = undefined;
  };
  const sub = subscribe({
    onData: (v) => {
      queue.push(v);
      notify();
    },
    onError: (err) => {
      failure = err ?? new Error('subscription failed');
      notify();
    },
    onComplete: () => {
      done = true;
      notify();
    },
    onStopped: () => {
      done = true;
      notify();
    },
  });
  try {
    while (true) {
      if (queue.length) {
        yield queue.shift()!;
        continue;
      }
      if (failure) throw failure;
      if (done) return;
      await new Promise<void>((resolve) => (wake = resolve));
    }
  } finally {
    sub.unsubscribe();
  }
}
