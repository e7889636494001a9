import { z } from 'zod';

/** A fleet host as the admin routes show it (README "Fleet"). */
export const FleetHost = z
  .object({
    id: z.string().meta({ example: 'node-3f9a1c2b7d4e' }),
    address: z.string().meta({ description: "Where API nodes reach its internal listener", example: '10.0.0.12:33945' }),
    state: z.enum(['ready', 'draining', 'unresponsive', 'gone']),
    epoch: z.number().int().meta({ description: 'Its registration count: a host that comes back registers with the next one' }),
    heartbeatAt: z.string().meta({ example: '2026-12-04T10:00:00.000Z' }),
    registeredAt: z.string(),
    capacity: z.object({ cpu: z.number(), memoryMb: z.number(), diskMb: z.number(), slots: z.number().int() }),
    labels: z.record(z.string(), z.string()),
    slotsHeld: z.number().int().meta({ description: 'Sandbox slots held now (sandboxes and creates under way)' }),
    sandboxes: z.number().int().meta({ description: 'Sandbox records that name this host' }),
  })
  .meta({ id: 'FleetHost' });
export type FleetHost = z.infer<typeof FleetHost>;

export const FleetHostIdInput = z.object({ id: z.string().regex(/^[a-z0-9-]{8,64}$/, 'must be a host id (node-…)') });
