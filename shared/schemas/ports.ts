import { z } from 'zod';
import { Id, Timestamp } from './common.js';

/** A TCP port inside a sandbox. */
export const Port = z.number().int().min(1, 'ports are 1 to 65535').max(65535, 'ports are 1 to 65535').meta({ example: 8080 });

/** The shortest and longest lifetimes of a preview token, in seconds. */
export const PREVIEW_TOKEN_TTL = { min: 60, max: 7 * 24 * 3600, default: 3600 } as const;

export const SandboxPortInput = z.object({ id: Id, port: Port });

/** One listening port of a sandbox. */
export const PortInfo = z.object({
  port: Port,
  /** Opened to everyone by the owner (its preview URL needs no token). */
  public: z.boolean(),
  /** `https://{port}-{id}.{PREVIEW_DOMAIN}/`, or null when the server has no PREVIEW_DOMAIN. */
  previewUrl: z.string().nullable().meta({ example: 'https://8080-65ae1234567890abcdef1234.preview.example.com/' }),
  /** The API path that proxies to the port with an API key. */
  proxyPath: z.string().meta({ example: '/api/sandboxes/65ae1234567890abcdef1234/ports/8080/' }),
});
export type PortInfo = z.infer<typeof PortInfo>;

export const PortList = z.object({
  /** The TCP ports listening inside the sandbox (IPv4 and IPv6), ascending. */
  ports: z.array(PortInfo),
  /** Public ports nothing listens on right now (they stay public). */
  publicNotListening: z.array(Port),
});
export type PortList = z.infer<typeof PortList>;

export const PreviewTokenInput = SandboxPortInput.extend({
  ttlSeconds: z
    .number()
    .int()
    .min(PREVIEW_TOKEN_TTL.min, `must be ${PREVIEW_TOKEN_TTL.min} to ${PREVIEW_TOKEN_TTL.max} seconds`)
    .max(PREVIEW_TOKEN_TTL.max, `must be ${PREVIEW_TOKEN_TTL.min} to ${PREVIEW_TOKEN_TTL.max} seconds`)
    .default(PREVIEW_TOKEN_TTL.default)
    .meta({ description: 'How long the token is valid, in seconds (default 3600, at most 7 days)' }),
});

export const PreviewToken = z.object({
  port: Port,
  /** Send as `x-voidrun-preview-token`, or once as `?voidrun_token=` (a browser then keeps it in a cookie for that host). */
  token: z.string(),
  expiresAt: Timestamp,
  /** The preview URL with the token in its query, for a browser; null without PREVIEW_DOMAIN. */
  url: z.string().nullable(),
});
export type PreviewToken = z.infer<typeof PreviewToken>;

export const SetPortAccessInput = SandboxPortInput.extend({
  public: z.boolean().meta({ description: 'true: anyone with the preview URL reaches the port; false: an API key or a preview token is needed' }),
});

export const PortAccess = z.object({ port: Port, public: z.boolean(), previewUrl: z.string().nullable() });
export type PortAccess = z.infer<typeof PortAccess>;

/** The original VoidRun's `GET /sandboxes/{id}/public-urls` entry. */
export const PublicUrl = z.object({ port: Port, url: z.string() });
export type PublicUrl = z.infer<typeof PublicUrl>;
