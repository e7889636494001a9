import type { Logger } from 'pino';

/**
 * The last line of defence for availability: an exception that escapes every handler, or a
 * promise rejection nobody observed, is logged and the process keeps serving. Everything a
 * tenant can send is contained closer to where it arrives (per connection, per call); reaching
 * this logger is a bug to fix, never a reason to take every other tenant's requests down.
 * Returns a function that removes the handlers.
 */
export function installLastResortHandlers(log: Logger): () => void {
  const onException = (err: unknown) => {
    log.error({ err }, 'uncaught exception (contained; the server keeps running)');
  };
  const onRejection = (reason: unknown) => {
    log.error({ err: reason }, 'unhandled promise rejection (contained; the server keeps running)');
  };
  process.on('uncaughtException', onException);
  process.on('unhandledRejection', onRejection);
  return () => {
    process.off('uncaughtException', onException);
    process.off('unhandledRejection', onRejection);
  };
}
