/**
 * What counts as a sandbox being used, for idle policies (README "Lifecycle: timeouts, idle and
 * auto-resume"). Kept in memory and cheap on the hot path: an API call on a sandbox is one `Map.set`
 * of a timestamp, an open stream one counter up and down; nothing is written to the store.
 *
 * The other kinds of activity (commands started through the API still running, CPU use) are not
 * seen per request: the lifecycle policy asks for them only about a sandbox that looks idle here.
 *
 * Only a sandbox's own org moves its clock: `touch` is called once a call has found the sandbox in
 * the caller's org, and a hold (taken by the HTTP layer before the sandbox is looked up) counts, and
 * touches on release, only when its org is the sandbox's owner (`own`, from the records). So a
 * request naming another org's sandbox id — refused with a 404 — keeps nothing awake.
 */
export class ActivityTracker {
  /** Sandbox id → the last activity seen, in ms since the epoch. */
  readonly #last = new Map<string, number>();
  /** Sandbox id → org id → how many streams, terminals and connections are open on it. */
  readonly #holds = new Map<string, Map<string, number>>();
  /** Sandbox id → the org that owns it, as its record says (learned from every record the lifecycle policy sees). */
  readonly #owners = new Map<string, string>();

  /** Something happened on the sandbox just now: only after a call found it in the caller's org. */
  touch(id: string, at = Date.now()): void {
    const prev = this.#last.get(id);
    if (prev === undefined || prev < at) this.#last.set(id, at);
  }

  /** The sandbox belongs to `orgId` (its record, read or changed). */
  own(id: string, orgId: string): void {
    this.#owners.set(id, orgId);
  }

  /**
   * Counts the sandbox as active until the returned release runs (it may run more than once): a
   * terminal, stream, watch or preview connection while it is open. Callers may take it before the
   * sandbox is authorized: opening it touches nothing (the call's own lookup does, once it finds
   * the sandbox in the caller's org), it is counted only for a sandbox of the org that took it
   * (see `held`), and its release touches only such a sandbox. So a connection naming another
   * org's sandbox id (refused a moment later) never moves that sandbox's idle clock.
   */
  hold(orgId: string, id: string): () => void {
    let byOrg = this.#holds.get(id);
    if (!byOrg) this.#holds.set(id, (byOrg = new Map()));
    byOrg.set(orgId, (byOrg.get(orgId) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      // The idle period counts from the end of what was open, for the owner's holds only.
      if (this.#owners.get(id) === orgId) this.touch(id);
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
    this.#owners.delete(id);
  }

  /** Keeps only the entries of `ids` (the sandboxes that exist): deleted sandboxes' entries go. */
  retain(ids: ReadonlySet<string>): void {
    for (const id of this.#last.keys()) if (!ids.has(id)) this.#last.delete(id);
    for (const id of this.#owners.keys()) if (!ids.has(id)) this.#owners.delete(id);
  }
}
