import { z } from 'zod';
import { AgentText, Id, Timestamp } from './common.js';

const dns1123Subdomain = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

export const SandboxStatus = z
  .enum(['creating', 'running', 'stopped', 'paused', 'error'])
  .meta({ description: "`creating` only while a `sync: false` create is still booting; the original VoidRun's four values otherwise." });
export type SandboxStatus = z.infer<typeof SandboxStatus>;

/** The contract's four statuses: REST answers carry only these in `status`. */
export const ContractSandboxStatus = z
  .enum(['running', 'stopped', 'paused', 'error'])
  .meta({ description: 'A sandbox still booting after a `sync: false` create is `running` (as the original VoidRun reports it) with `phase: "creating"` and `ready: false`.' });
export type ContractSandboxStatus = z.infer<typeof ContractSandboxStatus>;

/** The fields REST shows for a sandbox's status: the contract's `status`, our finer `phase`, and `ready`. */
const restStatusShape = {
  status: ContractSandboxStatus,
  phase: SandboxStatus.meta({ description: 'The status with `creating` kept apart: `creating` while a `sync: false` create boots.' }),
  ready: z.boolean().meta({ description: 'The sandbox runs and its agent answers: commands and file operations work now.' }),
};

/** `status` as REST shows it, with `phase` and `ready` beside it. */
export function restStatus(status: SandboxStatus): { status: ContractSandboxStatus; phase: SandboxStatus; ready: boolean } {
  return { status: status === 'creating' ? 'running' : status, phase: status, ready: status === 'running' };
}

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
  });
export type Sandbox = z.infer<typeof Sandbox>;

/** A sandbox as REST answers carry it: `status` within the contract's enum (see `restStatus`). */
export const RestSandbox = Sandbox.extend(restStatusShape).meta({ id: 'Sandbox' });
export type RestSandbox = z.infer<typeof RestSandbox>;

/** `sandbox` as REST shows it. */
export function toRestSandbox(sandbox: Sandbox): RestSandbox {
  return { ...sandbox, ...restStatus(sandbox.status) };
}

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
  page: z.number().int().default(1).meta({ description: 'Page number from 1; a smaller one is read as 1 (as the original VoidRun does).' }),
  limit: z
    .number()
    .int()
    .meta({ description: 'Sandboxes per page, 1 to 100 (SANDBOX_LIST_DEFAULT_LIMIT when omitted); one below 1 is read as the default, one above 100 as 100.' })
    .optional(),
});

export const PageMeta = z.object({
  page: z.number().int(),
  limit: z.number().int(),
  total: z.number().int(),
  totalPages: z.number().int(),
});

export const SandboxPage = z.object({ data: z.array(Sandbox), meta: PageMeta });
export type SandboxPage = z.infer<typeof SandboxPage>;
export const RestSandboxPage = z.object({ data: z.array(RestSandbox), meta: PageMeta });

export const SandboxIdInput = z.object({ id: Id });

export const DeleteSandboxInput = SandboxIdInput.extend({
  keepSnapshots: z.boolean().default(false).meta({ description: "Keep the sandbox's snapshots for later restores." }),
});

export const SandboxActionResult = z.object({ id: Id, status: SandboxStatus });
export type SandboxActionResult = z.infer<typeof SandboxActionResult>;
export const RestSandboxActionResult = SandboxActionResult.extend(restStatusShape).meta({ id: 'SandboxActionResult' });

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
