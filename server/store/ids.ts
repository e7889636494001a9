import { randomBytes } from 'node:crypto';

/**
 * A new id in MongoDB ObjectId form (24 hex characters): 4 bytes of seconds, then 8 random bytes.
 * Ids look alike in both stores and sort roughly by creation time, and knowing one id (your own
 * sandbox's) says nothing about any other: they are unguessable, not counters.
 */
export function newId(): string {
  const buf = randomBytes(12);
  buf.writeUInt32BE(Math.floor(Date.now() / 1000), 0);
  return buf.toString('hex');
}

export function isObjectIdHex(id: string): boolean {
  return /^[0-9a-f]{24}$/.test(id);
}
