import { z } from 'zod';
import { Id, PortAccess, PortList, PreviewToken, PreviewTokenInput, PublicUrl, SetPortAccessInput } from '../../shared/index.js';
import { authedProcedure, router } from '../trpc/init.js';

const tags = ['Ports'];
const base = '/sandboxes/{id}/ports';

export const portsRouter = router({
  list: authedProcedure
    .meta({
      openapi: {
        method: 'GET',
        path: base,
        tags,
        summary: 'List the TCP ports listening in a sandbox',
        description: 'Each with whether it is public, its preview URL (with PREVIEW_DOMAIN) and the API path that proxies to it. 409 unless the sandbox runs.',
      },
      message: 'Ports listed',
    })
    .input(z.object({ id: Id }))
    .output(PortList)
    .query(({ ctx, input }) => ctx.services.ports.list(ctx.principal, input.id)),

  token: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: `${base}/{port}/token`,
        tags,
        summary: 'Mint a preview token for one port',
        description:
          'The token opens that port of that sandbox on its preview host until it expires: as the x-voidrun-preview-token header, or once as ?voidrun_token= (the answer sets a cookie for that host and redirects without it).',
      },
      message: 'Preview token minted',
    })
    .input(PreviewTokenInput)
    .output(PreviewToken)
    .mutation(({ ctx, input }) => ctx.services.ports.mintToken(ctx.principal, input.id, input.port, input.ttlSeconds)),

  setAccess: authedProcedure
    .meta({
      openapi: {
        method: 'PUT',
        path: `${base}/{port}`,
        tags,
        summary: 'Make a port public or private',
        description: 'Public: anyone with the preview URL reaches the port, without a key or token. Private (the default): an API key of the org or a preview token is needed. Kept across restarts.',
      },
      message: 'Port access updated',
    })
    .input(SetPortAccessInput)
    .output(PortAccess)
    .mutation(({ ctx, input }) => ctx.services.ports.setAccess(ctx.principal, input.id, input.port, input.public)),

  publicUrls: authedProcedure
    .meta({
      openapi: { method: 'GET', path: '/sandboxes/{id}/public-urls', tags, summary: 'The URLs of the public ports', description: 'One entry per public port: its preview URL (the API proxy path on a server without PREVIEW_DOMAIN).' },
      message: 'Public URLs fetched',
    })
    .input(z.object({ id: Id }))
    .output(z.array(PublicUrl))
    .query(({ ctx, input }) => ctx.services.ports.publicUrls(ctx.principal, input.id)),
});
