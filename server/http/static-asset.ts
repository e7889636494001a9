import { readFile } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';

/** Sends a file from an npm package (a whitelisted asset of a page), cacheable for a day. */
export async function sendAsset(res: ServerResponse, file: string, type: string): Promise<void> {
  const body = await readFile(file);
  res.writeHead(200, { 'content-type': type, 'content-length': body.length, 'cache-control': 'public, max-age=86400' });
  res.end(body);
}
