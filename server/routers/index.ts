import { router } from '../trpc/init.js';
import { authRouter, orgRouter } from './org.js';
import { systemRouter } from './system.js';

export const appRouter = router({
  system: systemRouter,
  auth: authRouter,
  org: orgRouter,
});

/** The router's type, imported by `client/` for end-to-end types. */
export type AppRouter = typeof appRouter;
