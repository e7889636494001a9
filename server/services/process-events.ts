import { constants } from 'node:os';
import type { Logger } from 'pino';
import { countsOomKills } from '../hypervisor/types.js';
import type { SandboxRecord } from '../store/types.js';
import type { SandboxEventSink } from './sandbox-events.js';
import type { SandboxService } from './sandbox-service.js';

/** The most characters of a command line an event carries. */
const MAX_COMMAND_CHARS = 256;
/** Background commands followed for their exit at once (across sandboxes); past it, a command's exit is not reported. */
export const MAX_EXIT_WATCHERS = 1000;

const signalNames = new Map(Object.entries(constants.signals).map(([name, n]) => [n as number, name]));

/**
 * The signal that ended a process, as its exit code says it (128 + n, as shells report it; the
 * agent reports a timeout as 124 and a signal that way). Null for a normal exit or a timeout.
 */
export function exitSignal(exitCode: number | null, timedOut = false): string | null {
  if (exitCode === null || timedOut || exitCode <= 128) return null;
  return signalNames.get(exitCode - 128) ?? null;
}

function commandLine(command: string, args?: readonly string[]): string {
  const line = [command, ...(args ?? [])].join(' ');
  return line.length > MAX_COMMAND_CHARS ? `${line.slice(0, MAX_COMMAND_CHARS)}…` : line;
}

/**
 * `process.started` / `process.exited` events of commands started through the API. The exit of
 * a background command is learned by a watcher per command (the agent's `process.wait`, its reply
 * schema-checked by the agent client like every reply); at most MAX_EXIT_WATCHERS at once. OOM is
 * read host-side: the sandbox cgroup's OOM-kill counter rose while the command ran and it died of
 * SIGKILL.
 */
export class ProcessEvents {
  #watchers = 0;
  #warnedFull = false;

  constructor(private readonly deps: { events: SandboxEventSink; sandboxes: SandboxService; log: Logger }) {}

  /** Reports a command's start; resolves to the function that reports its exit. */
  async started(record: SandboxRecord, spec: { command: string; args?: readonly string[] }, extra: { pid?: number; background: boolean }): Promise<(exit: { exitCode: number | null; timedOut?: boolean; signal?: string | null }) => Promise<void>> {
    const command = commandLine(spec.command, spec.args);
    const ooms = await this.#oomKills(record);
    this.#emit(record, 'process.started', { ...(extra.pid ? { pid: extra.pid } : {}), command, background: extra.background });
    return async ({ exitCode, timedOut = false, signal }) => {
      const sig = signal ?? exitSignal(exitCode, timedOut);
      const after = sig === 'SIGKILL' && ooms !== null ? await this.#oomKills(record) : null;
      this.#emit(record, 'process.exited', {
        ...(extra.pid ? { pid: extra.pid } : {}),
        command,
        background: extra.background,
        exitCode,
        signal: sig,
        timedOut,
        oom: after !== null && ooms !== null ? after > ooms : false,
      });
    };
  }

  /** Follows a background command until it exits and reports that (nothing when its sandbox stops first). */
  async watch(record: SandboxRecord, pid: number, spec: { command: string; args?: readonly string[] }): Promise<void> {
    const exited = await this.started(record, spec, { pid, background: true });
    if (this.#watchers >= MAX_EXIT_WATCHERS) {
      if (!this.#warnedFull) this.deps.log.warn(`${MAX_EXIT_WATCHERS} background commands are followed for their exit already; later ones get no process.exited event`);
      this.#warnedFull = true;
      return;
    }
    this.#watchers++;
    try {
      // The agent client, not `agents.call`: a sandbox that stops ends the wait, and that is no agent failure.
      const r = await this.deps.sandboxes.agents.get(record.id).process.wait.mutate({ pid, timeoutMs: 0 }, { context: { timeoutMs: 0 } });
      if (r.exited) await exited({ exitCode: r.exitCode });
    } catch {
      // The sandbox stopped, paused past the connection or was deleted: its own events say so.
    } finally {
      this.#watchers--;
      if (this.#watchers < MAX_EXIT_WATCHERS) this.#warnedFull = false;
    }
  }

  async #oomKills(record: SandboxRecord): Promise<number | null> {
    const driver = this.deps.sandboxes.driverOrNull;
    return driver && countsOomKills(driver) ? driver.oomKills(record.id).catch(() => null) : null;
  }

  #emit(record: SandboxRecord, type: 'process.started' | 'process.exited', data: Record<string, unknown>): void {
    this.deps.events.emit({ sandboxId: record.id, orgId: record.orgId, type, data });
  }
}
