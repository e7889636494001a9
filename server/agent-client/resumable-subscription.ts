import { AsyncQueue } from '../../shared/async-queue.js';

interface SubscriptionHandlers<T> {
  onData(value: T): void;
  onError(err: unknown): void;
  onComplete(): void;
  onStopped?(): void;
}

/** Events held for a slow reader before the agent subscription is paused. */
const HIGH_WATER_EVENTS = 256;

/**
 * Turns a resumable tRPC subscription into an async iterable with a bounded queue: when the reader
 * falls `HIGH_WATER_EVENTS` behind, the subscription is dropped and re-opened from the last event
 * once the reader has caught up (the agent keeps a bounded log, and reports a `gap` if it overflowed).
 */
export async function* resumableSubscription<T extends { id: string }>(
  subscribe: (h: SubscriptionHandlers<T>, after: string | null) => { unsubscribe(): void },
  from: string | null,
): AsyncGenerator<T> {
  const queue = new AsyncQueue<T>();
  let last = from;
  let sub: { unsubscribe(): void } | null = null;
  const open = () => {
    sub = subscribe(
      {
        onData: (v) => {
          queue.push(v);
          last = v.id;
          if (queue.length >= HIGH_WATER_EVENTS && sub) {
            sub.unsubscribe();
            sub = null;
          }
        },
        onError: (err) => queue.fail(err ?? new Error('subscription failed')),
        onComplete: () => queue.end(),
        onStopped: () => queue.end(),
      },
      last,
    );
  };
  open();
  try {
    for await (const item of queue.drain()) {
      yield item;
      if (!sub && queue.length === 0) open();
    }
  } finally {
    (sub as { unsubscribe(): void } | null)?.unsubscribe();
  }
}
