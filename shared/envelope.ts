import { z } from 'zod';

/**
 * The original VoidRun's REST envelopes. REST success bodies are `{status, message, data, meta?}`;
 * REST error bodies are `{error, details?}`. tRPC callers never see them.
 */
export const ErrorResponse = z
  .object({
    error: z.string().meta({ example: 'Invalid request' }),
    details: z.string().optional().meta({ example: 'email: Invalid email address' }),
  })
  .meta({ id: 'ErrorResponse' });
export type ErrorResponse = z.infer<typeof ErrorResponse>;

export interface SuccessEnvelope<T> {
  status: 'success';
  message: string;
  data: T;
  meta?: Record<string, unknown>;
}
