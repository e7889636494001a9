import { randomBytes } from 'node:crypto';

let counter = randomBytes(3).readUIntBE(0, 3);
const processUnique = randomBytes(5);

/**
 * A new id in MongoDB ObjectId form (24 hex characters: seconds, 5 random bytes, a counter), so ids
 * look alike in both stores and sort roughly by creation time.
 */
export function newId(): string {
  const buf = Buffer.alloc(12);
  buf.writeUInt32BE(Math.floor(Date.now() / 1000), 0);
  processUnique.copy(buf, 4);
  counter = (counter + 1) % 0xffffff;
  buf.writeUIntBE(counter, 9, 3);
  return buf.toString('hex');
}

export function isObjectIdHex(id: string): boolean {
  return /^[0-9a-f]{24}$/.test(id);
}
