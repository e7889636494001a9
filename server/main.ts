import { createApp } from './app.js';
import { ConfigError, loadConfig } from './config.js';
import { DomainError } from './errors.js';
import { installLastResortHandlers } from './last-resort.js';

/** Process entry: config → app → listen; SIGINT/SIGTERM close it gracefully. */
async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error(err.message);
      process.exit(1);
    }
    throw err;
  }
  let app;
  try {
    app = await createApp(config);
  } catch (err) {
    // Startup failures a user can fix (an unreachable MongoDB, …) are one line, not a stack.
    if (err instanceof DomainError) {
      console.error(`Cannot start: ${err.message}`);
      process.exit(1);
    }
    throw err;
  }
  installLastResortHandlers(app.log);
  let address;
  try {
    address = await app.listen();
  } catch (err) {
    // A port in use or not ours to bind: one line and a failed exit, never a server left running without a socket.
    const { code } = err as NodeJS.ErrnoException;
    const where = `${config.SERVER_HOST || '*'}:${config.SERVER_PORT}`;
    const why = code === 'EADDRINUSE' ? `${where} is already in use` : code === 'EACCES' ? `${where} needs privileges to bind` : `${where}: ${(err as Error).message}`;
    console.error(`Cannot start: ${why} (set SERVER_PORT or SERVER_HOST)`);
    await app.close().catch(() => {});
    process.exit(1);
  }
  app.log.info({ address: address.address, port: address.port, store: app.store.kind }, `VoidRun listening on http://${address.family === 'IPv6' ? `[${address.address}]` : address.address}:${address.port}`);

  let closing = false;
  const shutdown = (signal: string) => {
    if (closing) return;
    closing = true;
    app.log.info({ signal }, 'shutting down');
    app.close().then(
      () => process.exit(0),
      (err: unknown) => {
        app.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => shutdown('SIGINT'));
  process.on('SIGTERM', () => shutdown('SIGTERM'));
}

await main();
