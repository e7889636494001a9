import { z } from 'zod';

/** Ids are 24 hex characters (MongoDB ObjectId text) in every store, as in the original VoidRun. */
export const Id = z.string().min(1).max(64).meta({ example: '65ae1234567890abcdef1234' });

/** Timestamps travel as ISO-8601 strings on every face, so REST and tRPC see the same value. */
export const Timestamp = z.string().meta({ format: 'date-time', example: '2026-01-27T09:12:34.000Z' });


const withoutNul = (s: string) => !s.includes('\0');
const nulRefused = 'must not contain a NUL byte (\\0)';

/**
 * Text the sandbox's agent hands to the kernel (commands, arguments, environment, paths): the
 * kernel reads C strings, which end at a NUL byte, so a NUL is refused (400 naming the field).
 * Every such input field is built from this one schema.
 */
export const AgentText = z.string().refine(withoutNul, nulRefused);

/** A path the agent hands to the kernel: AgentText within Linux's PATH_MAX. */
export const PathText = AgentText.max(4096, 'must be at most 4096 characters');

/** Linux's MAX_ARG_STRLEN: one argument or one `NAME=value` environment entry, in bytes with its terminating NUL. */
export const MAX_ARG_BYTES = 128 * 1024;

/** The UTF-8 length of `s` in bytes, without encoding it. */
export function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

const argTooLong = `must be under ${MAX_ARG_BYTES / 1024} KiB in UTF-8 (the kernel's limit for one argument)`;

/** One command-line argument (or a shell command, which is one argument of `sh -c`): AgentText within MAX_ARG_BYTES. */
export const ArgText = AgentText.refine((s) => utf8Length(s) < MAX_ARG_BYTES, argTooLong);

/** Environment variables for a process: each `NAME=value` entry within MAX_ARG_BYTES, no NUL bytes. */
export const ProcessEnv = z.record(z.string(), AgentText).superRefine((env, ctx) => {
  for (const [name, value] of Object.entries(env)) {
    // Reported on `env` itself: a field name holding the NUL would carry it into the message.
    if (!withoutNul(name)) ctx.addIssue({ code: 'custom', path: [], message: `variable names ${nulRefused}` });
    if (utf8Length(name) + 1 + utf8Length(value) >= MAX_ARG_BYTES) ctx.addIssue({ code: 'custom', path: [name], message: `NAME=value ${argTooLong}` });
  }
});
