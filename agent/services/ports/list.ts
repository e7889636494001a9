import { readFile } from 'node:fs/promises';
import { GUEST_AGENT_PORT } from '../../../shared/guest-protocol.js';
import { listeningPorts } from '../../../shared/listening-ports.js';

/**
 * The TCP ports listening in the sandbox's network namespace (IPv4 and IPv6), ascending; in a
 * microVM guest without the agent's own port (the host's token-guarded way in, no server of the
 * sandbox's).
 */
export async function listListeningPorts(): Promise<{ ports: number[] }> {
  const tables = await Promise.all(['/proc/net/tcp', '/proc/net/tcp6'].map((p) => readFile(p, 'utf8').catch(() => '')));
  const own = process.env.VOIDRUN_GUEST_CONFIG ? GUEST_AGENT_PORT : null;
  return { ports: listeningPorts(...tables).filter((p) => p !== own) };
}
