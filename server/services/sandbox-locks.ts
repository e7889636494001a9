/**
 * Serialises lifecycle operations per sandbox (create, start, stop, pause, delete, snapshot), so
 * two requests never drive one sandbox's runtime at the same time. Other sandboxes are not blocked.
 */
export class SandboxLocks {
  readonly #tails = new Map<string, Promise<unknown>>();

  run<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.#tails.get(id) ?? Promise.resolve();
    const next = previous.then(fn, fn);
    const tail = next.catch(() => {});
    this.#tails.set(id, tail);
    void tail.then(() => {
      if (this.#tails.get(id) === tail) this.#tails.delete(id);
    });
    return next;
  }
}
