import { z } from 'zod';
import { VersionInfo } from '../../shared/index.js';
import { publicProcedure, router } from '../trpc/init.js';

export const systemRouter = router({
  version: publicProcedure
    .meta({
      openapi: { method: 'GET', path: '/version', protect: false, tags: ['System'], summary: 'Server version' },
      message: 'Version fetched',
      envelope: 'bare',
    })
    .input(z.void())
    .output(VersionInfo)
    .query(({ ctx }) => ctx.services.buildInfo),
});
