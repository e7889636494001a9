import { z } from 'zod';
import { FleetHost, FleetHostIdInput } from '../../shared/index.js';
import { publicProcedure, router } from '../trpc/init.js';

const tags = ['Fleet admin'];

/** Checked against ADMIN_API_KEY (X-API-Key) before anything else (README "Fleet"). */
const adminProcedure = publicProcedure.use(({ ctx, next }) => {
  ctx.services.fleetAdmin.authorize(ctx.apiKey);
  return next();
});

export const adminRouter = router({
  hosts: adminProcedure
    .meta({ openapi: { method: 'GET', path: '/admin/hosts', tags, summary: 'The fleet hosts and their load (ADMIN_API_KEY)' }, message: 'Hosts fetched' })
    .input(z.void())
    .output(z.array(FleetHost))
    .query(({ ctx }) => ctx.services.fleetAdmin.list()),

  drain: adminProcedure
    .meta({
      openapi: { method: 'POST', path: '/admin/hosts/{id}/drain', tags, summary: 'Place no new sandboxes on a host (ADMIN_API_KEY)', description: 'Its sandboxes keep running and answering; creates go to other hosts. Survives the host restarting.' },
      message: 'Host draining',
    })
    .input(FleetHostIdInput)
    .output(FleetHost)
    .mutation(({ ctx, input }) => ctx.services.fleetAdmin.drain(input.id)),

  undrain: adminProcedure
    .meta({ openapi: { method: 'POST', path: '/admin/hosts/{id}/undrain', tags, summary: 'Let a draining host take new sandboxes again (ADMIN_API_KEY)' }, message: 'Host ready' })
    .input(FleetHostIdInput)
    .output(FleetHost)
    .mutation(({ ctx, input }) => ctx.services.fleetAdmin.undrain(input.id)),
});
