import type { TRPCClient } from '@trpc/client';
import type { PtyEvent } from '../shared/index.js';
import type { AppRouter } from '../server/routers/index.js';
import { iterateSubscription } from '../shared/subscription-iterator.js';

/** A terminal session in a sandbox. It keeps running when no one is attached, until killed. */
export class PtyHandle {
  readonly #exit: Promise<number>;
  #resolveExit!: (code: number) => void;
  #rejectExit!: (err: unknown) => void;
  #waiting = false;
  #listeners = new Set<(data: string) => void>();
  #attached: { unsubscribe(): void } | null = null;

  constructor(
    private readonly trpc: TRPCClient<AppRouter>,
    readonly sandboxId: string,
    readonly sessionId: string,
  ) {
    this.#exit = new Promise((resolve, reject) => {
      this.#resolveExit = resolve;
      this.#rejectExit = reject;
    });
    this.#exit.catch(() => {});
  }

  /** Sends keystrokes (raw terminal input: "ls\n", "\x03" for Ctrl-C, …). */
  async write(data: string): Promise<void> {
    await this.trpc.pty.write.mutate({ id: this.sandboxId, sessionId: this.sessionId, data });
  }

  async resize(cols: number, rows: number): Promise<void> {
    await this.trpc.pty.resize.mutate({ id: this.sandboxId, sessionId: this.sessionId, cols, rows });
  }

  /** Ends the session (its shell is killed). */
  async kill(): Promise<void> {
    await this.trpc.pty.kill.mutate({ id: this.sandboxId, sessionId: this.sessionId });
  }

  /**
   * Calls `listener` with the terminal's output (scrollback first, then live). Returns a function
   * that stops listening.
   */
  onData(listener: (data: string) => void): () => void {
    this.#listeners.add(listener);
    this.#attach();
    return () => {
      this.#listeners.delete(listener);
      if (this.#listeners.size === 0 && !this.#waiting) {
        this.#attached?.unsubscribe();
        this.#attached = null;
      }
    };
  }

  /** Resolves with the shell's exit code. */
  wait(): Promise<number> {
    this.#waiting = true;
    this.#attach();
    return this.#exit;
  }

  /** The output as an async iterator of events (`data`, `gap`, and a final `exit`). */
  output(): AsyncGenerator<PtyEvent> {
    const trpc = this.trpc;
    const input = { id: this.sandboxId, sessionId: this.sessionId };
    return (async function* () {
      for await (const e of iterateSubscription<{ id: string; data: PtyEvent }>((h) => trpc.pty.attach.subscribe(input, h))) {
        yield e.data;
        if (e.data.type === 'exit') return;
      }
    })();
  }

  #attach(): void {
    if (this.#attached) return;
    this.#attached = this.trpc.pty.attach.subscribe(
      { id: this.sandboxId, sessionId: this.sessionId },
      {
        onData: (e) => {
          if (e.data.type === 'data') for (const l of this.#listeners) l(e.data.data);
          if (e.data.type === 'exit') this.#resolveExit(e.data.exitCode);
        },
        onError: (err) => {
          this.#attached = null;
          this.#rejectExit(err);
        },
        onComplete: () => (this.#attached = null),
      },
    );
  }
}
