import type { OutputEvent } from '../../../shared/schemas/agent.js';

export interface SequencedEvent {
  seq: number;
  event: OutputEvent;
}

/**
 * A process's output as numbered events, the oldest dropped once more than `capacityBytes` are
 * held. Readers resume after any sequence number; if what they missed is gone, they get a `gap`
 * event saying how much.
 */
export class OutputLog {
  #events: SequencedEvent[] = [];
  #bytes = 0;
  #droppedBytes = 0;
  #nextSeq = 1;
  #listeners = new Set<(e: SequencedEvent) => void>();

  constructor(private readonly capacityBytes: number) {}

  /** What the log holds now (string lengths), at most about `capacityBytes`. */
  get bytes(): number {
    return this.#bytes;
  }

  append(event: OutputEvent): void {
    const entry = { seq: this.#nextSeq++, event };
    this.#events.push(entry);
    this.#bytes += sizeOf(event);
    while (this.#bytes > this.capacityBytes && this.#events.length > 1) {
      const dropped = this.#events.shift()!;
      const size = sizeOf(dropped.event);
      this.#bytes -= size;
      this.#droppedBytes += size;
    }
    for (const listener of this.#listeners) listener(entry);
  }

  /** Events after `afterSeq` still held, preceded by a `gap` when some were dropped. */
  since(afterSeq: number): SequencedEvent[] {
    const first = this.#events[0];
    const out: SequencedEvent[] = [];
    if (first && first.seq > afterSeq + 1) {
      out.push({ seq: first.seq - 1, event: { type: 'gap', droppedBytes: this.#droppedBytes } });
    }
    for (const e of this.#events) if (e.seq > afterSeq) out.push(e);
    return out;
  }

  subscribe(listener: (e: SequencedEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }
}

function sizeOf(event: OutputEvent): number {
  return event.type === 'stdout' || event.type === 'stderr' ? event.data.length : 16;
}
