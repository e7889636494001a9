/**
 * Runs `fn` on every item in list order, at most `concurrency` at a time (the passes over every
 * sandbox: health checks, host event reads, usage samples), so a large fleet never opens one driver
 * call per sandbox at once. Resolves when all are done; `fn` handles its own failures.
 */
export async function forEachLimit<T>(items: readonly T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
}
