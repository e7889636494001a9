/**
 * What counts as a sandbox being used, for idle policies (README "Lifecycle: timeouts, idle and
 * auto-resume"). Kept in memory and cheap on the hot path: an API call on a sandbox is one `Map.set`
 * of a timestamp, an open stream one counter up and down; nothing is written to the store.
 *
 * The other kinds of activity (commands started through the API still running, CPU use) are not
 * seen per request: the lifecycle policy asks for them only about a sandbox that looks idle here.
 */
export class ActivityTracker {
  /** Sandbox id → the last activity seen, in ms since the epoch. */
  readonly #last = new Map<string, number>();
  /** Sandbox id → org id → how many streams, terminals and connections are open on it. */
  readonly #holds = new Map<string, Map<string, number>>();

  /** Something happened on the sandbox just now (an authenticated call found it in its org). */
  touch(id: string, at = Date.now()): void {
    const prev = this.#last.get(id);
    if (prev === undefined || prev < at) this.#last.set(id, at);
  }

  /**
   * Counts the sandbox as active until the returned release runs (it may run more than once): a
   * terminal, stream, watch or preview connection while it is open. Held with the org that opened
   * it, and counted only for a sandbox of that org (see `held`): a connection naming another
   * org's sandbox id (refused a moment later) never keeps that sandbox awake.
   */
  hold(orgId: string, id: string): () => void {
    this.touch(id);
    let byOrg = this.#holds.get(id);
    if (!byOrg) this.#holds.set(id, (byOrg = new Map()));
    byOrg.set(orgId, (byOrg.get(orgId) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.touch(id);
      const n = (byOrg.get(orgId) ?? 1) - 1;
      if (n > 0) byOrg.set(orgId, n);
      else byOrg.delete(orgId);
      if (byOrg.size === 0 && this.#holds.get(id) === byOrg) this.#holds.delete(id);
    };
  }

  /** Whether a stream or connection of the sandbox's own org is open on it now. */
  held(orgId: string, id: string): boolean {
    return (this.#holds.get(id)?.get(orgId) ?? 0) > 0;
  }

  /** The last activity seen on the sandbox (ms), or undefined when none since this server started. */
  lastActivity(id: string): number | undefined {
    return this.#last.get(id);
  }

  /** A deleted sandbox's entries go (open holds release into nothing). */
  forget(id: string): void {
    this.#last.delete(id);
  }

  /** Keeps only the entries of `ids` (the sandboxes that exist): deleted sandboxes' entries go. */
  retain(ids: ReadonlySet<string>): void {
    for (const id of this.#last.keys()) if (!ids.has(id)) this.#last.delete(id);
  }
}
