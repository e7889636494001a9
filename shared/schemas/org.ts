import { z } from 'zod';
import { Id, Timestamp } from './common.js';

export const Organization = z
  .object({
    id: Id,
    name: z.string().meta({ example: 'My Organization' }),
    ownerId: Id,
    members: z.array(Id),
    plan: z.string().meta({ example: 'free' }),
    usage: z.number().int().meta({ example: 5 }),
    createdAt: Timestamp,
    createdBy: Id,
    updatedAt: Timestamp,
  })
  .meta({ id: 'Organization' });
export type Organization = z.infer<typeof Organization>;

export const ApiKey = z
  .object({
    id: Id,
    orgId: Id,
    name: z.string().meta({ example: 'CI/CD Key' }),
    prefix: z.string().meta({ description: 'The first characters of the key, to tell keys apart.', example: 'vr_3Jd9' }),
    createdBy: Id,
    createdAt: Timestamp,
    lastUsedAt: Timestamp.nullable(),
    isActive: z.boolean(),
    updatedAt: Timestamp,
  })
  .meta({ id: 'APIKeyResponse' });
export type ApiKey = z.infer<typeof ApiKey>;

export const OrgIdInput = z.object({ orgId: Id });

/** A member of an organization, as the original VoidRun lists them. */
export const OrgUser = z
  .object({
    id: Id,
    name: z.string().meta({ example: 'Admin User' }),
    email: z.string().meta({ example: 'admin@example.com' }),
    imageUrl: z.string().meta({ description: 'Always empty: this server keeps no avatars.', example: '' }),
    createdAt: Timestamp,
  })
  .meta({ id: 'OrgUser' });
export type OrgUser = z.infer<typeof OrgUser>;

/** The user an API key acts for, and the orgs they own or belong to (any of which `X-Org-ID` may name). */
export const CurrentUser = OrgUser.extend({
  orgs: z.array(z.object({ id: Id, name: z.string().meta({ example: 'My Organization' }) })),
}).meta({ id: 'CurrentUser' });
export type CurrentUser = z.infer<typeof CurrentUser>;

export const GenerateApiKeyInput = z
  .object({
    orgId: Id,
    keyName: z.string().trim().min(1, 'must not be empty').max(100, 'must be at most 100 characters').meta({ example: 'CI/CD Key' }),
  })
  .meta({ id: 'GenerateAPIKeyRequest' });
export type GenerateApiKeyInput = z.infer<typeof GenerateApiKeyInput>;

export const GeneratedApiKey = z
  .object({
    plainKey: z.string().meta({ description: 'Only returned once, at generation time.', example: 'vr_3Jd…' }),
    keyId: Id,
    keyName: z.string(),
    orgId: Id,
    createdAt: Timestamp,
    expiresIn: z.string().meta({ example: 'never (revoke it to end it)' }),
  })
  .meta({ id: 'GeneratedAPIKeyResponse' });
export type GeneratedApiKey = z.infer<typeof GeneratedApiKey>;

export const ApiKeyRef = z.object({ orgId: Id, keyId: Id });
export type ApiKeyRef = z.infer<typeof ApiKeyRef>;

/** A key of the calling key's org (the `/orgs/apikeys/…` routes of the VoidRun client libraries). */
export const OwnApiKeyRef = ApiKeyRef.omit({ orgId: true });
export const GenerateOwnApiKeyInput = GenerateApiKeyInput.omit({ orgId: true }).meta({ id: 'GenerateOwnAPIKeyRequest' });

export const SetApiKeyActiveInput = ApiKeyRef.extend({
  isActive: z.boolean().meta({ description: 'false deactivates the key at once; true reactivates it.' }),
});
export type SetApiKeyActiveInput = z.infer<typeof SetApiKeyActiveInput>;
export const SetOwnApiKeyActiveInput = SetApiKeyActiveInput.omit({ orgId: true });

export const RevokedApiKey = z.object({ keyId: Id, revoked: z.literal(true) }).meta({ id: 'RevokedAPIKey' });
export type RevokedApiKey = z.infer<typeof RevokedApiKey>;

export const OrgQuota = z
  .object({
    orgId: Id,
    limits: z
      .object({
        sandboxes: z.number().int().meta({ description: 'ORG_MAX_SANDBOXES: sandboxes that exist at once, whatever their status' }),
        vcpus: z.number().int().meta({ description: "ORG_MAX_VCPUS: the sum of the org's sandboxes' cpu" }),
        memoryMb: z.number().int().meta({ description: "ORG_MAX_MEMORY_MB: the sum of the org's sandboxes' mem" }),
        diskMb: z.number().int().meta({ description: "ORG_MAX_DISK_MB: the sum of the org's sandboxes' diskMb plus its snapshot archives plus its images' sizeBytes" }),
        snapshotMaxBytes: z.number().int().meta({ description: 'SNAPSHOT_MAX_BYTES: the largest one snapshot archive may be' }),
      })
      .meta({ description: 'What the org may hold; a create or restore beyond them answers 429.' }),
    usage: z.object({
      sandboxes: z.number().int(),
      vcpus: z.number().int(),
      memoryMb: z.number().int(),
      diskMb: z.number().int().meta({ description: "Sandboxes' diskMb plus snapshots and images (each rounded up to MB), plus snapshots being written" }),
      snapshotBytes: z.number().int().meta({ description: "The org's snapshot archives, in bytes" }),
      imageBytes: z.number().int().meta({ description: "The org's images' own layers (their sizeBytes), in bytes" }),
    }),
    perSandbox: z
      .object({ maxCpu: z.number().int(), maxMemoryMb: z.number().int() })
      .meta({ description: 'What this host has: one sandbox asking for more answers 400.' }),
  })
  .meta({ id: 'OrgQuota' });
export type OrgQuota = z.infer<typeof OrgQuota>;
