import * as crypto from 'node:crypto';
import { createHash, randomBytes } from 'node:crypto';

/** Every key starts with this, so a leaked key is recognisable (and scannable) as a VoidRun key. */
export const API_KEY_PREFIX = 'vr_';

/** A new plain key: the prefix and 32 random bytes in base64url (43 characters). */
export function generatePlainKey(): string {
  return API_KEY_PREFIX + randomBytes(32).toString('base64url');
}

/** The stored form of a key. SHA-256 suffices: keys are random, not passwords, so there is nothing to brute-force. */
export function hashKey(plainKey: string): string {
  // crypto.hash (Node ≥ 20.12) is the one-shot form: no Hash object per request.
  return oneShotHash ? oneShotHash('sha256', plainKey, 'hex') : createHash('sha256').update(plainKey).digest('hex');
}
const oneShotHash = (crypto as { hash?: (algorithm: string, data: string, encoding: 'hex') => string }).hash;

/** The part of a key shown in listings. */
export function displayPrefix(plainKey: string): string {
  return plainKey.slice(0, API_KEY_PREFIX.length + 6);
}
