import type { AddressInfo } from 'node:net';
import { pino, type Logger } from 'pino';
import type { Config } from './config.js';
import { createHttpServer, type HttpServer } from './http/server.js';
import { HttpMetrics } from './http/metrics.js';
import { buildOpenApiDocument, openApiYaml } from './http/openapi-document.js';
import { appRouter } from './routers/index.js';
import { AuthService } from './services/auth-service.js';
import { readBuildInfo } from './services/build-info.js';
import type { Services } from './services/index.js';
import { LastUsedTracker } from './services/last-used-tracker.js';
import { OrgService } from './services/org-service.js';
import { openStore } from './store/index.js';
import type { Store } from './store/types.js';

export interface App {
  config: Config;
  store: Store;
  services: Services;
  log: Logger;
  http: HttpServer;
  /** Starts listening; resolves with the bound address (port 0 picks a free port). */
  listen(): Promise<AddressInfo>;
  /** Stops the HTTP server, flushes pending writes and closes the store. */
  close(): Promise<void>;
}

export interface AppOptions {
  /** Defaults to a pino logger at `config.LOG_LEVEL` on stdout. */
  log?: Logger;
}

/** The composition root: builds the store, services and HTTP server from a config. */
export async function createApp(config: Config, options: AppOptions = {}): Promise<App> {
  const log = options.log ?? pino({ level: config.LOG_LEVEL, base: undefined });
  const store = await openStore(config);
  const lastUsed = new LastUsedTracker(store.apiKeys, log, config.API_KEY_LAST_USED_FLUSH_SEC * 1000);
  const orgs = new OrgService({ store, lastUsed, log });
  const services: Services = {
    auth: new AuthService({ apiKeys: store.apiKeys, lastUsed }),
    orgs,
    buildInfo: readBuildInfo({ commit: config.VOIDRUN_COMMIT, buildTime: config.VOIDRUN_BUILD_TIME }),
  };
  await orgs.ensureSystemUser(config.SYSTEM_USER_NAME, config.SYSTEM_USER_EMAIL);

  const openApiDoc = buildOpenApiDocument(appRouter, services.buildInfo.version);
  const http = createHttpServer({
    router: appRouter,
    services,
    log,
    metrics: new HttpMetrics(),
    openApi: { json: JSON.stringify(openApiDoc), yaml: openApiYaml(openApiDoc) },
    maxJsonBodyBytes: config.MAX_JSON_BODY_BYTES,
  });

  return {
    config,
    store,
    services,
    log,
    http,
    listen() {
      return new Promise((resolve, reject) => {
        http.server.once('error', reject);
        http.server.listen(config.SERVER_PORT, config.SERVER_HOST || undefined, () => {
          http.server.off('error', reject);
          resolve(http.server.address() as AddressInfo);
        });
      });
    },
    async close() {
      await http.close();
      await lastUsed.close();
      await store.close();
    },
  };
}
