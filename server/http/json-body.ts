import type { IncomingMessage } from 'node:http';
import { InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError } from '../errors.js';
import { readAtMost } from '../read-at-most.js';

/**
 * The deepest nesting of arrays and objects a JSON input may have (README "REST API"). Every input
 * is a few levels deep; deeper values would make recursive walkers (validation, superjson)
 * overflow the stack.
 */
export const MAX_JSON_DEPTH = 64;

function mediaType(contentType: string | undefined): string {
  return (contentType ?? '').split(';')[0]!.trim().toLowerCase();
}

function isJsonType(type: string): boolean {
  return type === 'application/json' || type.endsWith('+json');
}

/**
 * Throws InvalidInputError (400) naming MAX_JSON_DEPTH when `value` nests arrays and objects
 * deeper than that, or when an object has a key named `__proto__` (which a record would silently
 * drop, e.g. an env var or label of that name). Walks iteratively, so any depth is measured without
 * recursion.
 */
export function assertJsonDepth(value: unknown): void {
  const stack: [unknown, number][] = [[value, 1]];
  while (stack.length > 0) {
    const [v, depth] = stack.pop()!;
    if (v === null || typeof v !== 'object') continue;
    if (depth > MAX_JSON_DEPTH) {
      throw new InvalidInputError(`The JSON input nests arrays and objects more than ${MAX_JSON_DEPTH} levels deep, the most accepted; send a flatter value`);
    }
    if (Object.hasOwn(v, '__proto__')) throw new InvalidInputError('A key named "__proto__" is not accepted in JSON input; rename it');
    for (const child of Object.values(v)) if (child !== null && typeof child === 'object') stack.push([child, depth + 1]);
  }
}

/**
 * Top-level `null` fields of a body object read as absent (as omitted optional fields), as the
 * original's Go handlers read them; except those `takesNull` names, where null is a value of its
 * own (`idle: null`: no idle policy).
 */
export function withoutNullFields(body: unknown, takesNull: (key: string) => boolean = () => false): unknown {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) return body;
  return Object.fromEntries(Object.entries(body).filter(([k, v]) => v !== null || takesNull(k)));
}

/**
 * Reads a JSON request body of at most `limit` bytes. An empty body reads as `{}` (so a bare
 * `curl -X POST` works). The body is read as JSON whatever its Content-Type (text/plain, curl's
 * default form type, none), as the original VoidRun does, except multipart/form-data; a body that
 * is not JSON is refused (415 when it did not claim to be JSON, else 400). Nesting deeper than
 * MAX_JSON_DEPTH is refused (400); top-level `null` fields are dropped (unless `keepNulls`: the
 * caller drops them knowing which fields take null). Stops reading as soon as the limit is passed.
 */
export async function readJsonBody(req: IncomingMessage, limit: number, opts: { keepNulls?: boolean } = {}): Promise<unknown> {
  const declared = Number(req.headers['content-length'] ?? NaN);
  if (declared > limit) throw tooLarge(limit);
  const type = mediaType(req.headers['content-type']);
  // A multipart body is not JSON: refused before it is read.
  if (type === 'multipart/form-data') throw notJson(req);
  const raw = await readAtMost(req, limit, () => {
    req.pause(); // not read further; the answer closes the connection
    return tooLarge(limit);
  });
  if (raw.length === 0) return {};
  const text = raw.toString('utf8');
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (err) {
    if (!isJsonType(type)) throw notJson(req);
    throw new InvalidInputError('Malformed JSON body', { details: whereJsonBreaks(text, err) });
  }
  assertJsonDepth(body);
  return opts.keepNulls ? body : withoutNullFields(body);
}

/**
 * Where a body stops being JSON, in our words (line, column and the character found there), rather
 * than the JSON parser's own message, which quotes the body back.
 */
function whereJsonBreaks(text: string, err: unknown): string {
  const message = err instanceof Error ? err.message : '';
  const m = /position (\d+)/.exec(message);
  const token = /^Unexpected token '(.)'/u.exec(message)?.[1];
  if (!m && token) return `The body is not valid JSON: unexpected ${JSON.stringify(token)}`;
  if (!m) return 'The body is not valid JSON: it ends before the value is complete';
  const at = Math.min(Number(m[1]), text.length);
  const before = text.slice(0, at);
  const line = before.split('\n').length;
  const column = at - before.lastIndexOf('\n');
  const found = at < text.length ? `${JSON.stringify(text[at])}` : 'the end of the body';
  return `The body is not valid JSON: unexpected ${found} at line ${line}, column ${column}`;
}

function notJson(req: IncomingMessage): UnsupportedMediaTypeError {
  return new UnsupportedMediaTypeError(`The body is not JSON (Content-Type ${JSON.stringify(req.headers['content-type'] ?? '')}): send a JSON body, with Content-Type: application/json`);
}

function tooLarge(limit: number): PayloadTooLargeError {
  return new PayloadTooLargeError(`Request body is larger than ${limit} bytes`, {
    details: 'Send a smaller body; file contents go to the upload route as raw bytes',
  });
}
