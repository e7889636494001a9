import type { AnyRouter } from '@trpc/server';
import type { Meta } from '../trpc/init.js';

/** Each procedure's metadata by its dotted path, read from the router once. */
export function procedureMetaIndex(router: AnyRouter): Map<string, Meta> {
  const index = new Map<string, Meta>();
  const procedures = router._def.procedures as Record<string, { _def: { meta?: Meta } }>;
  for (const [path, proc] of Object.entries(procedures)) index.set(path, proc._def.meta ?? {});
  return index;
}
