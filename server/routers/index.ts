import { router } from '../trpc/init.js';
import { adminRouter } from './admin.js';
import { authRouter, orgRouter, usersRouter } from './org.js';
import { commandsRouter, execRouter, shellRouter } from './exec.js';
import { filesRouter } from './files.js';
import { imagesRouter } from './images.js';
import { portsRouter } from './ports.js';
import { ptyRouter } from './pty.js';
import { sandboxRouter } from './sandbox.js';
import { systemRouter } from './system.js';
import { webhooksRouter } from './webhooks.js';

export const appRouter = router({
  system: systemRouter,
  auth: authRouter,
  org: orgRouter,
  users: usersRouter,
  sandbox: sandboxRouter,
  exec: execRouter,
  commands: commandsRouter,
  shell: shellRouter,
  images: imagesRouter,
  files: filesRouter,
  pty: ptyRouter,
  ports: portsRouter,
  webhooks: webhooksRouter,
  admin: adminRouter,
});

/** The router's type, imported by `client/` for end-to-end types. */
export type AppRouter = typeof appRouter;
