/**
 * What the client takes from the runtime it finds itself in. Nothing here imports a Node module:
 * a browser bundle of the client must not follow an import to `node:http` or `ws`, so Node's
 * modules are asked for at run time (`process.getBuiltinModule`, Node ≥ 20.16, Bun and Deno) and
 * are simply absent in a browser, where `fetch` and the global WebSocket do the work instead.
 */

type NodeProcess = {
  env?: Record<string, string | undefined>;
  getBuiltinModule?: NodeJS.Process['getBuiltinModule'];
};

function runtimeProcess(): NodeProcess | undefined {
  return (globalThis as { process?: NodeProcess }).process;
}

/** An environment variable where the runtime has them (never in a browser); unset or unreadable (Deno without --allow-env) is undefined. */
export function envVar(name: string): string | undefined {
  try {
    const value = runtimeProcess()?.env?.[name];
    return value === '' ? undefined : value;
  } catch {
    return undefined;
  }
}

/** Node's built-in modules the byte transfers stream with, or null where there are none (a browser). */
export function nodeModules() {
  const get = runtimeProcess()?.getBuiltinModule;
  if (typeof get !== 'function') return null;
  return {
    fs: get('node:fs'),
    fsPromises: get('node:fs/promises'),
    http: get('node:http'),
    https: get('node:https'),
    stream: get('node:stream'),
    streamPromises: get('node:stream/promises'),
  };
}

export type NodeModules = NonNullable<ReturnType<typeof nodeModules>>;

/**
 * The WebSocket class for subscriptions: the runtime's own (browsers, Bun, Deno, Node ≥ 22), else
 * the `ws` package loaded through Node's `require` (Node 20 has no global WebSocket). `ws`
 * implements the WHATWG interface tRPC uses; only its TypeScript declarations differ.
 */
export function webSocketClass(): typeof globalThis.WebSocket {
  if (typeof globalThis.WebSocket === 'function') return globalThis.WebSocket;
  const createRequire = runtimeProcess()?.getBuiltinModule?.('node:module').createRequire;
  if (!createRequire) throw new Error('This runtime has no WebSocket: pass one as the WebSocket option');
  return createRequire(import.meta.url)('ws') as typeof globalThis.WebSocket;
}
