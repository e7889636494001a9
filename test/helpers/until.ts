/**
 * Polls `read` every `everyMs` until `ok` holds of its value (bounded by `timeoutMs`); returns that
 * value. For conditions no event announces; the error names `what` and the last value seen.
 */
export async function until<T>(read: () => T | Promise<T>, ok: (value: T) => boolean, what: string, timeoutMs = 10_000, everyMs = 25): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await read();
    if (ok(value)) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last: ${JSON.stringify(value)?.slice(0, 600)}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
