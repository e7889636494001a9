/**
 * The listening TCP ports of a network namespace, read from its `/proc/net/tcp` and
 * `/proc/net/tcp6` tables (state `0A`, LISTEN). Shared by the agent (which reads its own
 * sandbox's tables) and the container driver (which reads them host-side from the sandbox's init
 * process). Pure: the caller reads the files.
 */

/** The most ports a listing holds; a namespace listening on more is reported cut at this many. */
export const MAX_LISTENING_PORTS = 1024;

/** The most bytes of one table a reader reads (a table of 1024 sockets is about 150 KiB). */
export const MAX_TCP_TABLE_BYTES = 4 * 1024 * 1024;

const LISTEN = '0A';

/**
 * The distinct listening ports in the text of one or more `/proc/net/tcp*` tables, ascending, at
 * most `MAX_LISTENING_PORTS`. Lines that are not socket entries (the header, anything malformed)
 * are skipped.
 */
export function listeningPorts(...tables: string[]): number[] {
  const ports = new Set<number>();
  for (const table of tables) {
    for (const line of table.split('\n')) {
      // "  0: 0100007F:1F90 00000000:0000 0A ..." — slot, local address, remote address, state.
      const fields = line.trim().split(/\s+/);
      if (fields.length < 4 || fields[3] !== LISTEN) continue;
      const local = fields[1]!;
      const colon = local.lastIndexOf(':');
      const hex = local.slice(colon + 1);
      if (colon < 0 || !/^[0-9A-Fa-f]{4}$/.test(hex)) continue;
      const port = parseInt(hex, 16);
      if (port >= 1) ports.add(port);
    }
  }
  return [...ports].sort((a, b) => a - b).slice(0, MAX_LISTENING_PORTS);
}
