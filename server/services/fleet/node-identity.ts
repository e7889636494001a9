import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';

/**
 * This node's id: made once and kept in DATA_DIR/node-id, so a host that restarts comes back
 * under the same id (and re-registers with a new epoch) and its sandboxes' records still name it.
 */
export function nodeIdOf(dataDir: string): string {
  const file = join(dataDir, 'node-id');
  try {
    const id = readFileSync(file, 'utf8').trim();
    if (/^[a-z0-9-]{8,64}$/.test(id)) return id;
  } catch {
    // Made below.
  }
  const id = `node-${randomBytes(6).toString('hex')}`;
  mkdirSync(dataDir, { recursive: true });
  writeFileSync(file, `${id}\n`, { mode: 0o600 });
  return id;
}

/** HOST_ADVERTISE_ADDRESS, else this machine's first non-internal IPv4 address, else loopback. */
export function advertisedAddress(configured: string, port: number): string {
  if (configured) return isIP(configured) === 6 ? `[${configured}]:${port}` : `${configured}:${port}`;
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal) return `${a.address}:${port}`;
  }
  return `127.0.0.1:${port}`;
}
