import { z } from 'zod';

/** What an idempotency key may hold: bounded, and nothing that needs escaping in a header or log. */
export const IDEMPOTENCY_KEY_PATTERN = /^[A-Za-z0-9._:~+/=-]{1,255}$/;
export const IDEMPOTENCY_KEY_RULE = 'an Idempotency-Key is 1 to 255 characters: letters, digits and . _ : ~ + / = -';

/** `idempotencyKey` as a tRPC input carries it (REST: the `Idempotency-Key` header). */
export const IdempotencyKey = z
  .string()
  .regex(IDEMPOTENCY_KEY_PATTERN, IDEMPOTENCY_KEY_RULE)
  .meta({
    description: "A retry with the same key within 24 h answers the first request's result instead of running again (a different body under the key: 409). REST clients send it as the Idempotency-Key header.",
    example: 'create-7f3a9c',
  });

/** The `Idempotency-Key` request header, as the OpenAPI document shows it on the routes that take one. */
export const IdempotencyKeyHeaders = z.object({
  'idempotency-key': z.string().optional().meta({
    description: "A retry with the same key within 24 h answers the first request's result (the same sandbox, the same process) instead of running again; a different body under the key is a 409. 1 to 255 characters: letters, digits and . _ : ~ + / = -",
  }),
});
