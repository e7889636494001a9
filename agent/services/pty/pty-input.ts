import { writeSync } from 'node:fs';
import type { IPty } from 'node-pty';

/** Past this many bytes queued for a terminal, more input is refused (the shell is not reading). */
const MAX_QUEUED_BYTES = 8 * 1024 * 1024;

/**
 * Input for one terminal, written to its pty's descriptor on the main thread only.
 *
 * node-pty's own writer hands each write to libuv's thread pool: a write still waiting there when
 * the terminal is killed runs after its descriptor was closed, and by then the number can be the
 * write end of a new command's stdout pipe — the queued keystrokes came out as that command's
 * output. Here every write is a non-blocking `writeSync` (the master is O_NONBLOCK), made only
 * while the pty's socket — the descriptor's one closer, which closes it synchronously in
 * `destroy()` — is not destroyed, so no write can reach a closed or reused descriptor. A full
 * pty buffer (EAGAIN) is retried shortly; `close` drops what is queued.
 */
export class PtyInput {
  readonly #queue: Buffer[] = [];
  #offset = 0;
  #queuedBytes = 0;
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(private readonly pty: IPty) {}

  get #fd(): number | null {
    const p = this.pty as unknown as { _fd?: unknown; _socket?: { destroyed?: boolean } };
    if (this.#closed || p._socket?.destroyed !== false || typeof p._fd !== 'number') return null;
    return p._fd;
  }

  /** Queues `data`; false when more than MAX_QUEUED_BYTES wait already (nothing is queued then). */
  write(data: string): boolean {
    if (this.#closed) return false;
    const buffer = Buffer.from(data, 'utf8');
    if (buffer.length === 0) return true;
    if (this.#queuedBytes + buffer.length > MAX_QUEUED_BYTES) return false;
    this.#queue.push(buffer);
    this.#queuedBytes += buffer.length;
    if (this.#queue.length === 1 && !this.#timer) this.#flush();
    return true;
  }

  #flush(): void {
    this.#timer = undefined;
    while (this.#queue.length > 0) {
      const fd = this.#fd;
      if (fd === null) return this.close();
      const head = this.#queue[0]!;
      let written: number;
      try {
        written = writeSync(fd, head, this.#offset, head.length - this.#offset);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
          this.#timer = setTimeout(() => this.#flush(), 2);
          return;
        }
        return this.close();
      }
      this.#offset += written;
      this.#queuedBytes -= written;
      if (this.#offset >= head.length) {
        this.#queue.shift();
        this.#offset = 0;
      }
    }
  }

  /** Drops what is queued; later writes are refused. Call before the pty is killed or destroyed. */
  close(): void {
    this.#closed = true;
    this.#queue.length = 0;
    this.#queuedBytes = 0;
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
