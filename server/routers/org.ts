import { z } from 'zod';
import {
  ApiKey,
  ApiKeyRef,
  CurrentUser,
  GenerateApiKeyInput,
  GeneratedApiKey,
  GenerateOwnApiKeyInput,
  OrgIdInput,
  Organization,
  OrgNetworkPolicy,
  OrgQuota,
  OrgUser,
  OwnApiKeyRef,
  RegisterInput,
  RegisterResult,
  RevokedApiKey,
  SetApiKeyActiveInput,
  SetOwnApiKeyActiveInput,
  UpdateOrgNetworkInput,
} from '../../shared/index.js';
import { authedProcedure, publicProcedure, router } from '../trpc/init.js';

const tags = ['Organizations'];

export const authRouter = router({
  register: publicProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: '/register',
        protect: false,
        tags: ['Authentication'],
        summary: 'Register a new user',
        description:
          'Creates a user, their organization and a first API key. The key is shown only once. Answers 200, as the contract says (and clients generated from it expect); an email already registered is a 400.',
      },
      message: 'User registered successfully',
    })
    .input(RegisterInput)
    .output(RegisterResult)
    .mutation(({ ctx, input }) => ctx.services.orgs.register(input)),
});

export const orgRouter = router({
  me: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/orgs/me', tags, summary: 'Get the organization of the API key' }, message: 'Organization fetched', envelope: 'both' })
    .input(z.void())
    .output(Organization)
    .query(({ ctx }) => ctx.services.orgs.currentOrg(ctx.principal)),

  limits: authedProcedure
    .meta({
      openapi: {
        method: 'GET',
        path: '/orgs/me/limits',
        tags,
        summary: "The organization's quotas and their use",
        description: 'Creates and restores beyond a quota answer 429 naming the limit; a sandbox larger than the host answers 400.',
      },
      message: 'Organization limits fetched',
    })
    .input(z.void())
    .output(OrgQuota)
    .query(({ ctx }) => ctx.services.sandboxes.quota(ctx.principal)),

  network: authedProcedure
    .meta({
      openapi: {
        method: 'GET',
        path: '/orgs/me/network',
        tags,
        summary: "The default network policy of the organization's new sandboxes",
        description: "The org's own fields (`orgSet`) over the server's defaults (SANDBOX_DEFAULT_EGRESS, SANDBOX_EGRESS_BYTES_MAX). A create's own `network` fields win over both.",
      },
      message: 'Organization network policy fetched',
    })
    .input(z.void())
    .output(OrgNetworkPolicy)
    .query(({ ctx }) => ctx.services.orgs.network(ctx.principal)),

  updateNetwork: authedProcedure
    .meta({
      openapi: {
        method: 'PUT',
        path: '/orgs/me/network',
        tags,
        summary: "Set the default network policy of the organization's new sandboxes",
        description: "Replaces the org's default whole (`{}` removes it; fields left out fall back to the server's). Only the org's owner may (403 for members). Sandboxes that exist keep their policy; change one with `PUT /sandboxes/{id}/network`.",
      },
      message: 'Organization network policy updated',
    })
    .input(UpdateOrgNetworkInput)
    .output(OrgNetworkPolicy)
    .mutation(({ ctx, input }) => ctx.services.orgs.updateNetwork(ctx.principal, input)),

  listApiKeys: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/orgs/{orgId}/apikeys', tags, summary: 'List API keys, newest first' }, message: 'API keys fetched', envelope: 'bare' })
    .input(OrgIdInput)
    .output(z.array(ApiKey))
    .query(({ ctx, input }) => ctx.services.orgs.listKeys(ctx.principal, input.orgId)),

  createApiKey: authedProcedure
    .meta({
      openapi: { method: 'POST', path: '/orgs/{orgId}/apikeys', tags, summary: 'Generate a new API key', description: 'The plain key is returned only once.' },
      message: 'API key generated',
      envelope: 'bare',
    })
    .input(GenerateApiKeyInput)
    .output(GeneratedApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.createKey(ctx.principal, input.orgId, input.keyName)),

  revokeApiKey: authedProcedure
    .meta({ openapi: { method: 'DELETE', path: '/orgs/{orgId}/apikeys/{keyId}', tags, summary: 'Revoke an API key' }, message: 'API key revoked' })
    .input(ApiKeyRef)
    .output(RevokedApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.revokeKey(ctx.principal, input.orgId, input.keyId)),

  setApiKeyActive: authedProcedure
    .meta({
      openapi: { method: 'POST', path: '/orgs/{orgId}/apikeys/{keyId}/activate', tags, summary: 'Activate or deactivate an API key' },
      message: 'API key status updated',
    })
    .input(SetApiKeyActiveInput)
    .output(ApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.setKeyActive(ctx.principal, input.orgId, input.keyId, input.isActive)),

  touchApiKey: authedProcedure
    .meta({ openapi: { method: 'PATCH', path: '/orgs/{orgId}/apikeys/{keyId}/touch', tags, summary: "Record an API key's use now" }, message: 'API key touched' })
    .input(ApiKeyRef)
    .output(ApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.touchKey(ctx.principal, input.orgId, input.keyId)),

  users: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/orgs/{orgId}/users', tags, summary: "List the organization's members" }, message: 'users' })
    .input(OrgIdInput)
    .output(z.array(OrgUser))
    .query(({ ctx, input }) => ctx.services.orgs.listUsers(ctx.principal, input.orgId)),

  // The calling key's org, by the paths the VoidRun client libraries use (no org id in them).

  ownUsers: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/orgs/users', tags, summary: "List the members of the API key's organization" }, message: 'users' })
    .input(z.void())
    .output(z.array(OrgUser))
    .query(({ ctx }) => ctx.services.orgs.listUsers(ctx.principal, ctx.principal.orgId)),

  listOwnApiKeys: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/orgs/apikeys', tags, summary: "List the API keys of the key's organization, newest first" }, message: 'API keys fetched', envelope: 'bare' })
    .input(z.void())
    .output(z.array(ApiKey))
    .query(({ ctx }) => ctx.services.orgs.listKeys(ctx.principal, ctx.principal.orgId)),

  createOwnApiKey: authedProcedure
    .meta({
      openapi: { method: 'POST', path: '/orgs/apikeys', tags, summary: "Generate a new API key in the key's organization", description: 'The plain key is returned only once.' },
      message: 'API key generated',
      envelope: 'bare',
    })
    .input(GenerateOwnApiKeyInput)
    .output(GeneratedApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.createKey(ctx.principal, ctx.principal.orgId, input.keyName)),

  revokeOwnApiKey: authedProcedure
    .meta({ openapi: { method: 'DELETE', path: '/orgs/apikeys/{keyId}', tags, summary: "Revoke an API key of the key's organization" }, message: 'API key revoked' })
    .input(OwnApiKeyRef)
    .output(RevokedApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.revokeKey(ctx.principal, ctx.principal.orgId, input.keyId)),

  setOwnApiKeyActive: authedProcedure
    .meta({ openapi: { method: 'POST', path: '/orgs/apikeys/{keyId}/activate', tags, summary: "Activate or deactivate an API key of the key's organization" }, message: 'API key status updated' })
    .input(SetOwnApiKeyActiveInput)
    .output(ApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.setKeyActive(ctx.principal, ctx.principal.orgId, input.keyId, input.isActive)),

  touchOwnApiKey: authedProcedure
    .meta({ openapi: { method: 'PATCH', path: '/orgs/apikeys/{keyId}/touch', tags, summary: "Record the use now of an API key of the key's organization" }, message: 'API key touched' })
    .input(OwnApiKeyRef)
    .output(ApiKey)
    .mutation(({ ctx, input }) => ctx.services.orgs.touchKey(ctx.principal, ctx.principal.orgId, input.keyId)),
});

export const usersRouter = router({
  me: authedProcedure
    .meta({
      openapi: { method: 'GET', path: '/users/me', tags: ['Users'], summary: 'The user of the API key and their organizations' },
      message: 'User fetched',
      envelope: 'bare',
    })
    .input(z.void())
    .output(CurrentUser)
    .query(({ ctx }) => ctx.services.orgs.currentUser(ctx.principal)),
});
