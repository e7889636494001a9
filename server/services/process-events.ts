import { constants } from 'node:os';
import type { Logger } from 'pino';
import { countsOomKills } from '../hypervisor/types.js';
import type { SandboxRecord } from '../store/types.js';
import type { SandboxEventSink } from './sandbox-events.js';
import type { SandboxService } from './sandbox-service.js';

/** The most characters of a command line an event carries. */
const MAX_COMMAND_CHARS = 256;
/** Background commands followed for their exit by a watcher at once, across sandboxes. */
export const MAX_EXIT_WATCHERS = 1000;
/** One org's share of MAX_EXIT_WATCHERS, and one sandbox's: no org (or sandbox) takes the watchers of the others. */
export const MAX_EXIT_WATCHERS_PER_ORG = 250;
export const MAX_EXIT_WATCHERS_PER_SANDBOX = 100;
/** How often sandboxes with commands past the watchers' shares are asked for their process list (their exits come that late). */
export const EXIT_POLL_INTERVAL_MS = 2000;
/** Commands past the shares followed by the process list, per sandbox (a sandbox's pids limit is below it). */
const MAX_POLLED_PER_SANDBOX = 10_000;
/** Process-list failures in a row after which a sandbox's polled commands are forgotten (it stopped or went). */
const MAX_POLL_FAILURES = 15;
/** How long one process-list call may take. */
const POLL_CALL_TIMEOUT_MS = 5000;

type Exited = (exit: { exitCode: number | null; timedOut?: boolean; signal?: string | null }) => Promise<void>;

/** A sandbox's commands past the watchers' shares: their exits come from its process list. */
interface Polled {
  record: SandboxRecord;
  pids: Map<number, Exited>;
  failures: number;
}

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
 * schema-checked by the agent client like every reply); at most MAX_EXIT_WATCHERS at once, of
 * which one org holds at most MAX_EXIT_WATCHERS_PER_ORG and one sandbox MAX_EXIT_WATCHERS_PER_SANDBOX.
 * A command past a share is followed by its sandbox's process list instead (asked every
 * EXIT_POLL_INTERVAL_MS while it has such commands), so its `process.exited` comes, a little late. OOM is
 * read host-side: the sandbox cgroup's OOM-kill counter rose while the command ran and it died of
 * SIGKILL.
 */
export class ProcessEvents {
  #watchers = 0;
  readonly #byOrg = new Map<string, number>();
  readonly #bySandbox = new Map<string, number>();
  readonly #polled = new Map<string, Polled>();
  #pollTimer: NodeJS.Timeout | null = null;
  #polling = false;
  #warnedFull = false;

  constructor(private readonly deps: { events: SandboxEventSink; sandboxes: SandboxService; log: Logger }) {}

  /**
   * Reports a command's start, once the agent has confirmed it (with its pid where it has one);
   * resolves to the function that reports its exit. The OOM-kill counter its exit is compared with
   * is `extra.baseline` (read before the command ran) or read now, and awaited only for an exit by
   * SIGKILL: nothing here waits on the host before the event is out.
   */
  async started(
    record: SandboxRecord,
    spec: { command: string; args?: readonly string[] },
    extra: { pid?: number; background: boolean; baseline?: Promise<number | null> },
  ): Promise<Exited> {
    const command = commandLine(spec.command, spec.args);
    const baseline = extra.baseline ?? this.oomKills(record);
    this.#emit(record, 'process.started', { ...(extra.pid ? { pid: extra.pid } : {}), command, background: extra.background });
    return async ({ exitCode, timedOut = false, signal }) => {
      const sig = signal ?? exitSignal(exitCode, timedOut);
      const ooms = sig === 'SIGKILL' ? await baseline : null;
      const after = ooms !== null ? await this.oomKills(record) : null;
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
    const org = this.#byOrg.get(record.orgId) ?? 0;
    const box = this.#bySandbox.get(record.id) ?? 0;
    if (this.#watchers >= MAX_EXIT_WATCHERS || org >= MAX_EXIT_WATCHERS_PER_ORG || box >= MAX_EXIT_WATCHERS_PER_SANDBOX) {
      if (!this.#warnedFull) this.deps.log.warn({ org: record.orgId, sandbox: record.id }, `background commands past the exit watchers' shares (${MAX_EXIT_WATCHERS} in all, ${MAX_EXIT_WATCHERS_PER_ORG} per org, ${MAX_EXIT_WATCHERS_PER_SANDBOX} per sandbox) get their process.exited from the sandbox's process list, every ${EXIT_POLL_INTERVAL_MS} ms`);
      this.#warnedFull = true;
      this.#poll(record, pid, exited);
      return;
    }
    this.#watchers++;
    this.#byOrg.set(record.orgId, org + 1);
    this.#bySandbox.set(record.id, box + 1);
    try {
      // The agent client, not `agents.call`: a sandbox that stops ends the wait, and that is no agent failure.
      const r = await this.deps.sandboxes.agents.get(record.id).process.wait.mutate({ pid, timeoutMs: 0 }, { context: { timeoutMs: 0 } });
      if (r.exited) await exited({ exitCode: r.exitCode });
    } catch {
      // The sandbox stopped, paused past the connection or was deleted: its own events say so.
    } finally {
      this.#watchers--;
      decrement(this.#byOrg, record.orgId);
      decrement(this.#bySandbox, record.id);
      if (this.#watchers < MAX_EXIT_WATCHERS) this.#warnedFull = false;
    }
  }

  /** Follows the command by its sandbox's process list (see EXIT_POLL_INTERVAL_MS). */
  #poll(record: SandboxRecord, pid: number, exited: Exited): void {
    let polled = this.#polled.get(record.id);
    if (!polled) this.#polled.set(record.id, (polled = { record, pids: new Map(), failures: 0 }));
    if (polled.pids.size >= MAX_POLLED_PER_SANDBOX) return;
    polled.pids.set(pid, exited);
    if (!this.#pollTimer) {
      this.#pollTimer = setInterval(() => void this.#pollAll(), EXIT_POLL_INTERVAL_MS);
      this.#pollTimer.unref();
    }
  }

  /** One process-list call per sandbox with polled commands; those no longer running are reported. */
  async #pollAll(): Promise<void> {
    if (this.#polling) return;
    this.#polling = true;
    try {
      for (const [sandboxId, polled] of [...this.#polled]) {
        try {
          const list = await this.deps.sandboxes.agents.get(sandboxId).process.list.query(undefined, { context: { timeoutMs: POLL_CALL_TIMEOUT_MS } });
          polled.failures = 0;
          const byPid = new Map(list.map((p) => [p.pid, p]));
          for (const [pid, exited] of [...polled.pids]) {
            const p = byPid.get(pid);
            if (p?.running) continue;
            polled.pids.delete(pid);
            // A pid the agent no longer lists ended without a code it kept.
            await exited({ exitCode: p ? p.exitCode : null });
          }
        } catch {
          if (++polled.failures >= MAX_POLL_FAILURES) polled.pids.clear();
        }
        if (polled.pids.size === 0) this.#polled.delete(sandboxId);
      }
    } finally {
      this.#polling = false;
      if (this.#polled.size === 0 && this.#pollTimer) {
        clearInterval(this.#pollTimer);
        this.#pollTimer = null;
      }
    }
  }

  /**
   * The sandbox's OOM-kill counter now, read on the host (null where the driver has none); never
   * rejects. As a command's baseline it is started beside the command and awaited only if it dies of SIGKILL.
   */
  async oomKills(record: SandboxRecord): Promise<number | null> {
    const driver = this.deps.sandboxes.driverOrNull;
    return driver && countsOomKills(driver) ? driver.oomKills(record.id).catch(() => null) : null;
  }

  #emit(record: SandboxRecord, type: 'process.started' | 'process.exited', data: Record<string, unknown>): void {
    this.deps.events.emit({ sandboxId: record.id, orgId: record.orgId, type, data });
  }
}

function decrement(counts: Map<string, number>, key: string): void {
  const n = (counts.get(key) ?? 1) - 1;
  if (n > 0) counts.set(key, n);
  else counts.delete(key);
}
