import { z } from 'zod';
import { AgentText, Id, Timestamp } from './common.js';

export const PtySize = z.object({
  cols: z.number().int().min(1, 'must be 1 to 500').max(500, 'must be 1 to 500'),
  rows: z.number().int().min(1, 'must be 1 to 200').max(200, 'must be 1 to 200'),
});

export const CreatePtyInput = z
  .object({
    id: Id,
    cols: z.number().int().min(1, 'must be 1 to 500').max(500, 'must be 1 to 500').default(80),
    rows: z.number().int().min(1, 'must be 1 to 200').max(200, 'must be 1 to 200').default(24),
  })
  .meta({ id: 'CreatePTYSessionRequest' });

export const PtySessionCreated = z.object({ sessionId: z.string(), createdAt: Timestamp }).meta({ id: 'PTYSessionCreated' });
export const PtySessionInfo = z
  .object({ id: z.string(), createdAt: Timestamp, clients: z.number().int(), alive: z.boolean(), exitCode: z.number().int().nullable(), cols: z.number().int(), rows: z.number().int() })
  .meta({ id: 'PTYSessionInfo' });
export type PtySessionInfo = z.infer<typeof PtySessionInfo>;
export const PtySessionList = z.object({ sessions: z.array(PtySessionInfo) });
export const PtySessionRef = z.object({ id: Id, sessionId: z.string().min(1) });
export const PtyExecuteInput = PtySessionRef.extend({ command: AgentText.min(1) }).meta({ id: 'ExecuteInSessionRequest' });
export const PtyResizeInput = PtySessionRef.extend(PtySize.shape).meta({ id: 'ResizeTerminalRequest' });
export const PtyBuffer = z.object({ output: z.string() });
export const PtyWriteInput = PtySessionRef.extend({ data: z.string() });

/** What an attached terminal client receives. */
export const PtyEvent = z.discriminatedUnion('type', [
  z.object({ type: z.literal('data'), data: z.string() }),
  z.object({ type: z.literal('exit'), exitCode: z.number().int() }),
  z.object({ type: z.literal('gap'), droppedBytes: z.number().int() }),
]);
export type PtyEvent = z.infer<typeof PtyEvent>;
