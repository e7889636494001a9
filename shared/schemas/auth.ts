import { z } from 'zod';
import { Id } from './common.js';
import { GeneratedApiKey } from './org.js';

export const RegisterInput = z
  .object({
    name: z.string().trim().min(2, 'must be 2 to 100 characters').max(100, 'must be 2 to 100 characters').meta({ example: 'Admin User' }),
    email: z.email('must be a valid email address').max(254).meta({ example: 'admin@example.com' }),
  })
  .meta({ id: 'RegisterRequest' });
export type RegisterInput = z.infer<typeof RegisterInput>;

export const RegisterResult = z
  .object({
    orgId: Id,
    userId: Id,
    keyId: Id,
    apiKey: z.string().meta({ description: 'The plain API key. Shown only once: store it now.', example: 'vr_3Jd…' }),
    user: z.object({ id: Id, name: z.string(), email: z.string() }),
    org: z.object({ id: Id, name: z.string() }),
    generatedKey: GeneratedApiKey.meta({
      description: "The key in full. The original VoidRun's code sends this object as `apiKey`; its contract, and the clients generated from it, read `apiKey` as the plain key, as it is here.",
    }),
  })
  .meta({ id: 'RegisterResult' });
export type RegisterResult = z.infer<typeof RegisterResult>;

export const VersionInfo = z
  .object({
    version: z.string().meta({ example: '0.1.0' }),
    commit: z.string().meta({ example: '1a2b3c4' }),
    buildTime: z.string().meta({ example: '2026-11-28T12:00:00.000Z' }),
    driver: z
      .object({
        name: z.enum(['container', 'qemu', 'cloud-hypervisor']).nullable().meta({ description: 'null when no driver can run here (sandbox requests answer 503)' }),
        accelerator: z.enum(['kvm', 'tcg']).optional().meta({ description: 'qemu only: hardware virtualization or software emulation' }),
        reason: z.string().meta({ example: 'auto: container (runc); qemu would run on TCG only' }),
      })
      .optional()
      .meta({ description: 'The sandbox driver this server runs (not in the original VoidRun)' }),
    role: z.enum(['all', 'api', 'host']).optional().meta({ description: 'VOIDRUN_ROLE: one process (all), an API node or a sandbox host of a fleet (not in the original VoidRun)' }),
    nodeId: z.string().optional().meta({ description: "This node's id (kept in DATA_DIR/node-id); a host registers under it (not in the original VoidRun)", example: 'node-3f9a1c2b7d4e' }),
  })
  .meta({ id: 'VersionInfo' });
export type VersionInfo = z.infer<typeof VersionInfo>;
