import { z } from 'zod';
import { AgentText, Id, Timestamp } from './common.js';

const dns1123Subdomain = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

export const SandboxStatus = z
  .enum(['creating', 'running', 'stopped', 'paused', 'error'])
  .meta({ description: "`creating` only while a `sync: false` create is still booting; the original VoidRun's four values otherwise." });
export type SandboxStatus = z.infer<typeof SandboxStatus>;

export const EnvVars = z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a valid environment variable name'), AgentText);

/** An org or user id a client may send on create and restore: empty (as common clients always send) means the API key's. */
const OwnerId = z.string().max(64).optional();

export const Sandbox = z
  .object({
    id: Id,
    name: z.string().meta({ example: 'vm-01' }),
    imageId: Id,
    ip: z.string().meta({ description: 'Empty for container sandboxes, which have loopback networking only.', example: '' }),
    cpu: z.number().int().meta({ example: 2 }),
    mem: z.number().int().meta({ description: 'Memory limit in MiB', example: 2048 }),
    status: SandboxStatus,
    createdAt: Timestamp,
    createdBy: Id,
    orgId: Id,
    envVars: z.record(z.string(), z.string()),
  })
  .meta({ id: 'Sandbox' });
export type Sandbox = z.infer<typeof Sandbox>;

export const CreateSandboxInput = z
  .object({
    name: z
      .string()
      .max(253, 'must be at most 253 characters')
      .regex(dns1123Subdomain, 'must be a DNS-1123 subdomain: lowercase letters, digits, "-" and "."')
      .meta({ example: 'vm-01' }),
    templateId: z.string().optional().meta({ description: 'Image id or name; the default image when omitted.' }),
    cpu: z.number().int().min(1, 'must be 1 to 8').max(8, 'must be 1 to 8').optional().meta({ description: 'Number of vCPUs (CPU quota for containers)' }),
    mem: z.number().int().min(1024, 'must be 1024 to 16384 MiB').max(16384, 'must be 1024 to 16384 MiB').optional().meta({ description: 'Memory in MiB' }),
    orgId: OwnerId.meta({ description: "Must be the API key's org when given; empty or omitted: the key's org." }),
    userId: OwnerId.meta({ description: 'Ignored (empty or any id): the creator is the user of the API key.' }),
    sync: z.boolean().default(true).meta({ description: 'If true (default), answers once the sandbox agent responds.' }),
    envVars: EnvVars.optional().meta({ description: 'Environment variables every command in the sandbox sees' }),
  })
  .meta({ id: 'CreateSandboxRequest' });
export type CreateSandboxInput = z.infer<typeof CreateSandboxInput>;

export const ListSandboxesInput = z.object({
  page: z.number().int().min(1, 'must be 1 or more').default(1),
  limit: z.number().int().min(1, 'must be 1 to 100').max(100, 'must be 1 to 100').optional(),
});

export const PageMeta = z.object({
  page: z.number().int(),
  limit: z.number().int(),
  total: z.number().int(),
  totalPages: z.number().int(),
});

export const SandboxPage = z.object({ data: z.array(Sandbox), meta: PageMeta });
export type SandboxPage = z.infer<typeof SandboxPage>;

export const SandboxIdInput = z.object({ id: Id });

export const DeleteSandboxInput = SandboxIdInput.extend({
  keepSnapshots: z.boolean().default(false).meta({ description: "Keep the sandbox's snapshots for later restores." }),
});

export const SandboxActionResult = z.object({ id: Id, status: SandboxStatus }).meta({ id: 'SandboxActionResult' });
export type SandboxActionResult = z.infer<typeof SandboxActionResult>;

export const Snapshot = z
  .object({
    id: z.string().meta({ example: 'snap-6b0adb0da20420ffef769788' }),
    created_at: Timestamp,
    full_path: z.string().meta({
      description: 'The reference to pass as `snapshot_path` to restore: `<sandboxId>/<snapshotId>` (never a host path).',
      example: '6b0adb0da20420ffef769788/snap-6b0adb0da20420ffef769790',
    }),
    kind: z.enum(['filesystem', 'memory+filesystem']).meta({ description: 'Container snapshots capture the filesystem only: a restored sandbox boots fresh.' }),
    size: z.number().int(),
  })
  .meta({ id: 'Snapshot' });
export type Snapshot = z.infer<typeof Snapshot>;

export const RestoreSandboxInput = z
  .object({
    snapshot_path: z.string().min(1).meta({ description: 'A snapshot\'s `full_path` (or its id)' }),
    new_id: z
      .string()
      .max(253)
      .regex(dns1123Subdomain, 'must be a DNS-1123 subdomain')
      .optional()
      .meta({ description: "The new sandbox's name; generated when omitted." }),
    new_ip: z.string().optional().meta({ description: 'Ignored by container sandboxes (loopback only).' }),
    cold: z.boolean().default(false).meta({ description: 'Leave the restored sandbox stopped.' }),
    cpu: z.number().int().min(1).max(8).optional(),
    mem: z.number().int().min(1024).max(16384).optional(),
    orgId: OwnerId.meta({ description: "Must be the API key's org when given; empty or omitted: the key's org." }),
    userId: OwnerId.meta({ description: 'Ignored (empty or any id): the creator is the user of the API key.' }),
  })
  .meta({ id: 'RestoreSandboxRequest' });
export type RestoreSandboxInput = z.infer<typeof RestoreSandboxInput>;
