import { createTRPCClient, createWSClient, httpBatchLink, splitLink, wsLink, type TRPCClient, type TRPCLink } from '@trpc/client';
import { observable } from '@trpc/server/observable';
import superjson from 'superjson';
import type { AppRouter } from '../server/routers/index.js';
import { toVoidRunError } from './errors.js';
import { webSocketClass } from './runtime.js';
import { postBytes, transportFor, withoutRedirects } from './transfer.js';

import { SandboxHandle } from './sandbox.js';
import type { RawHttp, UploadSource } from './files.js';
import type { CreateSandboxInput, OrgNetworkPolicy, RestImage, RestoreSandboxInput, UpdateOrgNetworkInput } from '../shared/index.js';

export * from './errors.js';
export { CommandHandle, SandboxHandle, type CommandOptions, type ExecOptions } from './sandbox.js';
export { SandboxFiles, type RawHttp, type UploadSource } from './files.js';
export { CommandExitError, CommandProcess, Sandbox, SandboxCommands, type CommandResult, type CommandRunOpts, type ConnectionOptions, type DisposeAction, type SandboxCreateOpts, type SandboxOpts } from './sdk.js';
export { PtyHandle } from './pty.js';
export type { AppRouter };
export type { SandboxEvent } from '../shared/index.js';

export interface ClientOptions {
  /** The server's base URL, e.g. `http://localhost:33944`. */
  url: string;
  /** An API key; omit it for public calls such as `auth.register`. */
  apiKey?: string;
  /** Act in this org instead of the key's own (one its user owns or belongs to): `X-Org-ID` on every call. */
  orgId?: string;
  /** Extra HTTP headers for every request. */
  headers?: Record<string, string>;
  /** A WebSocket implementation; defaults to the global one, or `ws` on Node (Node 20 has none). */
  WebSocket?: typeof globalThis.WebSocket;
  /**
   * A `fetch` for file transfers (and tRPC's HTTP calls). Without it, transfers stream through
   * node:http where the runtime has Node's modules (Node, Bun, Deno) and use the global `fetch`
   * elsewhere (browsers).
   */
  fetch?: typeof globalThis.fetch;
}

/** Turns every failed call's error into its class (`NotFoundError`, `UnauthorizedError`, …). */
const errorClassLink: TRPCLink<AppRouter> = () => ({ next, op }) =>
  observable((observer) =>
    next(op).subscribe({
      next: (value) => observer.next(value),
      error: (err) => observer.error(toVoidRunError(err)),
      complete: () => observer.complete(),
    }),
  );

export interface VoidRunClient {
  /** The end-to-end typed tRPC client: `trpc.org.me.query()`, `trpc.auth.register.mutate(…)`, … */
  readonly trpc: TRPCClient<AppRouter>;
  readonly sandboxes: {
    /** Creates a sandbox and resolves once it runs (unless `sync: false`). */
    create(input: Omit<CreateSandboxInput, 'sync'> & { sync?: boolean }): Promise<SandboxHandle>;
    get(id: string): Promise<SandboxHandle>;
    /** With `labels`, only the sandboxes carrying every one of them. */
    list(options?: { page?: number; limit?: number; labels?: Record<string, string> }): Promise<{ sandboxes: SandboxHandle[]; page: number; limit: number; total: number; totalPages: number }>;
    restore(input: Omit<RestoreSandboxInput, 'cold'> & { cold?: boolean }): Promise<SandboxHandle>;
  };
  readonly org: {
    /** The default network policy the org's new sandboxes get (its own fields over the server's). */
    network(): Promise<OrgNetworkPolicy>;
    /** Replaces the org's default network policy (`{}` removes it); only its owner may. Existing sandboxes keep theirs. */
    updateNetwork(input: UpdateOrgNetworkInput): Promise<OrgNetworkPolicy>;
  };
  readonly images: {
    /**
     * Imports an OCI image layout or `docker save` tar (optionally gzip), streamed like a file
     * upload: the new image of your org, ready to create sandboxes from (README "Importing an OCI image").
     */
    import(name: string, archive: UploadSource, options?: { version?: string }): Promise<RestImage>;
  };
  /** The base URL and headers the raw byte routes are called with (and the `fetch` option). */
  readonly http: RawHttp;
  /** Closes the WebSocket, if one was opened. */
  close(): Promise<void>;
}

/**
 * A typed client for a VoidRun server. Queries and mutations go over HTTP with batching;
 * subscriptions over one lazily opened WebSocket that authenticates with the same API key.
 */
export function createClient(options: ClientOptions): VoidRunClient {
  const base = options.url.replace(/\/+$/, '');
  const headers = { ...options.headers, ...(options.apiKey ? { 'x-api-key': options.apiKey } : {}), ...(options.orgId ? { 'x-org-id': options.orgId } : {}) };
  const wsClient = createWSClient({
    url: `${base.replace(/^http/, 'ws')}/trpc`,
    WebSocket: options.WebSocket ?? webSocketClass(),
    connectionParams: options.apiKey ? { apiKey: options.apiKey, ...(options.orgId ? { orgId: options.orgId } : {}) } : null,
    lazy: { enabled: true, closeMs: 0 },
  });
  const raw = { baseUrl: base, headers, fetch: options.fetch };
  const trpc = createTRPCClient<AppRouter>({
    links: [
      errorClassLink,
      splitLink({
        condition: (op) => op.type === 'subscription',
        true: wsLink({ client: wsClient, transformer: superjson }),
        // The server refuses batches of more than TRPC_MAX_BATCH_SIZE calls (at least 10).
        // Its fetch never follows a redirect (the API key would go along; see withoutRedirects).
        false: httpBatchLink({ url: `${base}/trpc`, transformer: superjson, headers: () => headers, maxItems: 10, fetch: withoutRedirects(() => options.fetch ?? globalThis.fetch) }),
      }),
    ],
  });
  return {
    trpc,
    http: raw,
    sandboxes: {
      create: async (input) => new SandboxHandle(trpc, await trpc.sandbox.create.mutate({ ...input, sync: input.sync ?? true }), raw),
      get: async (id) => new SandboxHandle(trpc, await trpc.sandbox.get.query({ id }), raw),
      list: async (options = {}) => {
        const labels = options.labels && Object.entries(options.labels).map(([k, v]) => `${k}=${v}`).join(',');
        const page = await trpc.sandbox.list.query({ page: options.page ?? 1, limit: options.limit, labels });
        return { sandboxes: page.data.map((s) => new SandboxHandle(trpc, s, raw)), ...page.meta };
      },
      restore: async (input) => new SandboxHandle(trpc, await trpc.sandbox.restore.mutate({ ...input, cold: input.cold ?? false }), raw),
    },
    images: {
      import: (name, archive, importOptions = {}) => {
        const url = new URL(`${base}/api/images/import`);
        url.searchParams.set('name', name);
        if (importOptions.version !== undefined) url.searchParams.set('version', importOptions.version);
        return postBytes<RestImage>(transportFor(options.fetch), url, headers, archive);
      },
    },
    org: {
      network: () => trpc.org.network.query(),
      updateNetwork: (input) => trpc.org.updateNetwork.mutate(input),
    },
    async close() {
      await wsClient.close();
    },
  };
}
