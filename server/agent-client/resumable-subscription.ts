import { AsyncQueue } from '../../shared/async-queue.js';

interface SubscriptionHandlers<T> {
  onData(value: T): void;
  onError(err: unknown): void;
  onComplete(): void;
  onStopped?(): void;
}

/** Events held for a slow reader before the agent subscription is paused… */
const HIGH_WATER_EVENTS = 256;
/** …or bytes of their output, whichever comes first. */
const HIGH_WATER_BYTES = 4 * 1024 * 1024;

/** What an event costs to hold: the length of its output, if it carries any. */
function sizeOfEvent(item: { data?: unknown }): number {
  const data = (item.data as { data?: unknown } | undefined)?.data;
  return 64 + (typeof data === 'string' ? data.length : 0);
}

/**
 * Turns a resumable tRPC subscription into an async iterable with a bounded queue: when the reader
 * falls `HIGH_WATER_EVENTS` events or `HIGH_WATER_BYTES` of output behind, the subscription is
 * dropped and re-opened from the last event once the reader has caught up (the agent keeps a
 * bounded log, and reports a `gap` if it overflowed).
 */
export async function* resumableSubscription<T extends { id: string; data?: unknown }>(
  subscribe: (h: SubscriptionHandlers<T>, after: string | null) => { unsubscribe(): void },
  from: string | null,
): AsyncGenerator<T> {
  const queue = new AsyncQueue<T>();
  let queuedBytes = 0;
  let last = from;
  let sub: { unsubscribe(): void } | null = null;
  const open = () => {
    sub = subscribe(
      {
        onData: (v) => {
          queue.push(v);
          queuedBytes += sizeOfEvent(v);
          last = v.id;
          if ((queue.length >= HIGH_WATER_EVENTS || queuedBytes >= HIGH_WATER_BYTES) && sub) {
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
      queuedBytes -= sizeOfEvent(item);
      yield item;
      if (!sub && queue.length === 0) open();
    }
  } finally {
    (sub as { unsubscribe(): void } | null)?.unsubscribe();
  }
}
