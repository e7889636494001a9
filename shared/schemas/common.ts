import { z } from 'zod';

/** Ids are 24 hex characters (MongoDB ObjectId text) in every store, as in the original VoidRun. */
export const Id = z.string().min(1).max(64).meta({ example: '65ae1234567890abcdef1234' });

/** Timestamps travel as ISO-8601 strings on every face, so REST and tRPC see the same value. */
export const Timestamp = z.string().meta({ format: 'date-time', example: '2026-01-27T09:12:34.000Z' });

