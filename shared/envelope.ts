import { z } from 'zod';
import { errorCodes } from './errors.js';

/**
 * The original VoidRun's REST envelopes. REST success bodies are `{status, message, data, meta?}`;
 * REST error bodies are the original's `{error, details?}` plus our stable machine `code`. tRPC
 * callers never see them (their errors carry the same code in `data.errorCode`).
 */
export const ErrorResponse = z
  .object({
    error: z.string().meta({ description: 'What went wrong and what to fix, for people', example: 'Invalid email: Invalid email address' }),
    code: z.enum(errorCodes).meta({ description: 'What went wrong, for programs: stable, branch on it (never on the status or message)', example: 'INVALID_INPUT' }),
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
