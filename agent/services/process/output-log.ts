import type { OutputEvent } from '../../../shared/schemas/agent.js';

export interface SequencedEvent {
  seq: number;
  event: OutputEvent;
  /** The bytes of output the event carries (its data as the process wrote it, in UTF-8). */
  bytes: number;
}

/**
 * A process's output as numbered events, the oldest dropped once more than `capacityBytes` (of
 * output, in bytes) are held. Readers resume after any sequence number; if what they missed is
 * gone, they get a `gap` event saying how many bytes.
 */
export class OutputLog {
  #events: SequencedEvent[] = [];
  /** Index of the oldest event still held in `#events` (dropped ones are cleared in batches). */
  #head = 0;
  #bytes = 0;
  #droppedBytes = 0;
  #nextSeq = 1;
  #listeners = new Set<(e: SequencedEvent) => void>();

  constructor(private readonly capacityBytes: number) {}

  /** What the log holds now, in bytes of output: at most about `capacityBytes`. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Appends an event; `bytes` is the output it carries (its data's UTF-8 length when not given). */
  append(event: OutputEvent, bytes = sizeOf(event)): void {
    const entry = { seq: this.#nextSeq++, event, bytes };
    this.#events.push(entry);
    this.#bytes += bytes;
    while (this.#bytes > this.capacityBytes && this.#events.length - this.#head > 1) {
      const dropped = this.#events[this.#head++]!;
      this.#bytes -= dropped.bytes;
      this.#droppedBytes += dropped.bytes;
    }
    if (this.#head > 1024 && this.#head * 2 > this.#events.length) {
      this.#events = this.#events.slice(this.#head);
      this.#head = 0;
    }
    for (const listener of this.#listeners) listener(entry);
  }

  /** Events after `afterSeq` still held, preceded by a `gap` when some were dropped. */
  since(afterSeq: number): SequencedEvent[] {
    const first = this.#events[this.#head];
    const out: SequencedEvent[] = [];
    if (first && first.seq > afterSeq + 1) {
      out.push({ seq: first.seq - 1, event: { type: 'gap', droppedBytes: this.#droppedBytes }, bytes: 0 });
    }
    for (let i = this.#head; i < this.#events.length; i++) if (this.#events[i]!.seq > afterSeq) out.push(this.#events[i]!);
    return out;
  }

  subscribe(listener: (e: SequencedEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }
}

function sizeOf(event: OutputEvent): number {
  return event.type === 'stdout' || event.type === 'stderr' ? Buffer.byteLength(event.data) : 0;
}
