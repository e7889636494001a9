import type { IncomingMessage } from 'node:http';
import { InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError } from '../errors.js';

function isJsonType(contentType: string | undefined): boolean {
  if (!contentType) return false;
  const type = contentType.split(';')[0]!.trim().toLowerCase();
  return type === 'application/json' || type.endsWith('+json');
}

/**
 * Reads a JSON request body of at most `limit` bytes. An empty body reads as `{}` (so a bare
 * `curl -X POST` works); anything else must be JSON. Stops reading as soon as the limit is passed.
 */
export async function readJsonBody(req: IncomingMessage, limit: number): Promise<unknown> {
  const declared = Number(req.headers['content-length'] ?? NaN);
  if (declared > limit) throw tooLarge(limit);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw tooLarge(limit);
    chunks.push(chunk);
  }
  if (size === 0) return {};
  if (!isJsonType(req.headers['content-type'])) {
    throw new UnsupportedMediaTypeError(`Unsupported Content-Type ${JSON.stringify(req.headers['content-type'] ?? '')}: send JSON with Content-Type: application/json`);
  }
  const text = Buffer.concat(chunks, size).toString('utf8');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new InvalidInputError('Malformed JSON body', { details: (err as Error).message });
  }
}

function tooLarge(limit: number): PayloadTooLargeError {
  return new PayloadTooLargeError(`Request body is larger than ${limit} bytes`, {
    details: 'Send a smaller body; file contents go to the upload route as raw bytes',
  });
}
