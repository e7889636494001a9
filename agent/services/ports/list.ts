import { readFile } from 'node:fs/promises';
import { listeningPorts } from '../../../shared/listening-ports.js';

/** The TCP ports listening in the sandbox's network namespace (IPv4 and IPv6), ascending. */
export async function listListeningPorts(): Promise<{ ports: number[] }> {
  const tables = await Promise.all(['/proc/net/tcp', '/proc/net/tcp6'].map((p) => readFile(p, 'utf8').catch(() => '')));
  return { ports: listeningPorts(...tables) };
}
