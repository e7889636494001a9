import type { Logger } from 'pino';
import { agentProcessStream, agentShellExecStream, type ProcessStreamCall } from '../agent-client/process-stream.js';
import { AgentUnavailableError, fromAgentCode } from '../agent-client/agent-clients.js';
import { AGENT_MESSAGE_MAX_CHARS } from '../../shared/schemas/agent-replies.js';
import { DEFAULT_EXEC_TIMEOUT_SEC, type ExecChunk, type ExecInput, type ExecOutput, type ProcessInfo, type RunCommandInput, type SessionExecInput, type SessionExecResult } from '../../shared/index.js';
import { ConflictError, InvalidInputError } from '../errors.js';
import type { OutputEvent, ProcessSpec } from '../../shared/schemas/agent.js';
import type { AgentClient } from '../agent-client/agent-clients.js';
import type { Principal } from './auth-service.js';
import type { SandboxService } from './sandbox-service.js';
import type { SandboxEventSink } from './sandbox-events.js';
import { ProcessEvents } from './process-events.js';
import type { ActivityTracker } from './activity.js';
import type { SandboxRecord } from '../store/types.js';

/** A background command's handle as `commands/run` answers it, with the agent's start time of the process. */
export interface StartedCommand {
  success: true;
  pid: number;
  command: string;
  startTime: string;
}

/** What a session-exec stream carries. */
export type SessionStreamEvent = { type: 'stdout' | 'stderr'; data: string } | { type: 'exit'; exitCode: number };

export interface ExecLimits {
  /** Per stream; the rest is dropped and the result says `truncated`. */
  maxOutputBytes: number;
}

/** A streamed event with the id a reconnecting client passes back to resume after it. */
export interface TrackedChunk {
  id: string;
  chunk: ExecChunk;
}

/**
 * Commands in sandboxes: one-shot (`run`), streamed, and background processes. Everything runs
 * through the sandbox's agent; when the agent cannot be reached the sandbox's status is refreshed
 * first, so the answer and `GET /sandboxes/{id}` agree.
 */
export class ExecService {
  constructor(
    private readonly deps: { sandboxes: SandboxService; limits: ExecLimits; log: Logger; events?: SandboxEventSink; activity?: ActivityTracker },
  ) {}

  /** process.started / process.exited of the commands run here; null without an event sink. */
  #processes: ProcessEvents | null | undefined;

  #processEvents(): ProcessEvents | null {
    if (this.#processes === undefined) this.#processes = this.deps.events ? new ProcessEvents({ events: this.deps.events, sandboxes: this.deps.sandboxes, log: this.deps.log }) : null;
    return this.#processes;
  }

  async exec(principal: Principal, input: ExecInput): Promise<ExecOutput> {
    if (input.background) return this.startCommand(principal, { ...input, timeout: 0 });
    const timeout = input.timeout || DEFAULT_EXEC_TIMEOUT_SEC;
    const events = this.#processEvents();
    const { output, record, baseline } = await this.#withAgent(principal, input.id, async (agent, record) => {
      // The agent kills the command at its timeout; the call's own deadline leaves room for that.
      // The call is on its way to the agent when this returns; the host's OOM counter is read
      // right after, while the agent starts the command (not waited on here).
      const run = agent.process.run.mutate(this.#spec(input, timeout), { context: { timeoutMs: timeout * 1000 + 15_000 } });
      const baseline = events?.oomKills(record);
      const r = await run;
      return { output: { stdout: r.stdout, stderr: r.stderr, exitCode: r.exitCode, truncated: r.truncated, timedOut: r.timedOut }, record, baseline };
    });
    // A foreground command's start is confirmed by its answer: both events are reported then, and a
    // call that failed reports neither (never a start without an exit). Reported once the answer
    // is out (the event bus's work is not the caller's wait).
    if (events) setImmediate(() => void events.started(record, input, { background: false, baseline }).then((exited) => exited({ exitCode: output.exitCode, timedOut: output.timedOut })));
    return output;
  }

  /** The handle of a process started; `startTime` (the agent's) tells it from a later process given its pid (see `replayStarted`). */
  async startCommand(principal: Principal, input: RunCommandInput): Promise<StartedCommand> {
    const { started, record } = await this.#withAgent(principal, input.id, async (agent, record) => {
      const info = await agent.process.start.mutate({ ...this.#spec(input, input.timeout), stdin: true });
      return { started: { success: true as const, pid: info.pid, command: info.command, startTime: info.startTime }, record };
    });
    // process.started now that the agent confirmed it with its pid; followed for its exit whether or not anyone waits for it.
    void this.#processEvents()?.watch(record, started.pid, input);
    return started;
  }

  /**
   * An idempotent `commands/run` retry's answer: the handle its key's first run got, while the
   * newest process the agent lists under that pid is still that one (same start time and command).
   * Once the pid names a process started since, or the process is no longer listed, a 409: kill or
   * wait on the pid would act on an unrelated process. (The agent's list only decides this answer
   * for its own sandbox's caller.)
   */
  async replayStarted(principal: Principal, id: string, key: string, started: StartedCommand): Promise<StartedCommand> {
    const { processes } = await this.listCommands(principal, id);
    const newest = processes.filter((p) => p.pid === started.pid).at(-1);
    if (newest && newest.startTime === started.startTime && newest.command === started.command) return started;
    const now = newest ? 'now names another process' : 'is no longer listed';
    throw new ConflictError(`The process Idempotency-Key ${key} started has exited and pid ${started.pid} ${now}; send a new key to start a new one`);
  }

  async listCommands(principal: Principal, id: string): Promise<{ success: true; processes: ProcessInfo[] }> {
    return this.#withAgent(principal, id, async (agent) => ({ success: true as const, processes: await agent.process.list.query() }));
  }

  async killCommand(principal: Principal, id: string, pid: number): Promise<{ success: true; message: string }> {
    return this.#withAgent(principal, id, async (agent) => {
      // The agent answers once the process is reaped, or after its grace period with it still running.
      const info = await agent.process.kill.mutate({ pid, signal: 'SIGKILL' });
      if (!info.signalled) return { success: true as const, message: `Process ${pid} had already exited` };
      if (info.running) return { success: true as const, message: `Process ${pid} was sent SIGKILL but has not exited yet (it is blocked in the kernel); it stays listed as running until it does` };
      return { success: true as const, message: `Process ${pid} killed` };
    });
  }

  async waitCommand(principal: Principal, id: string, pid: number, timeoutSec: number, signal?: AbortSignal) {
    return this.#withAgent(principal, id, async (agent) => {
      const r = await agent.process.wait.mutate({ pid, timeoutMs: timeoutSec * 1000 }, { signal, context: { timeoutMs: timeoutSec ? timeoutSec * 1000 + 15_000 : 0 } });
      return r.exited
        ? { success: true, exitCode: r.exitCode, error: null }
        : { success: false, exitCode: null, error: `Process ${pid} was still running after ${timeoutSec} s` };
    });
  }

  async writeStdin(principal: Principal, id: string, pid: number, data: string, eof: boolean): Promise<{ written: number }> {
    return this.#withAgent(principal, id, (agent) => agent.process.writeStdin.mutate({ pid, data, eof }));
  }

  /**
   * Starts a command and yields its output until it exits. Start and subscription are one agent
   * call, and the output is pulled as the caller reads it: a reader that keeps up gets every byte,
   * and a reader that stalls stalls the process (its pipes are not read) instead of growing memory.
   * With `resumeFrom` (a previous event's id, `<pid>:<seq>`) it re-attaches to that process
   * instead of starting another, continuing after that event.
   */
  async *stream(principal: Principal, input: ExecInput, resumeFrom: string | null, signal?: AbortSignal): AsyncGenerator<TrackedChunk> {
    const resume = resumeFrom ? /^(\d{1,15}):(\d{1,15})$/.exec(resumeFrom) : null;
    if (resumeFrom && (!resume || Number(resume[1]) < 1)) throw badResumeId(resumeFrom);
    if (resume) {
      yield* this.attach(principal, input.id, Number(resume[1]), resume[2]!, signal);
      return;
    }
    const spec = this.#spec(input, input.timeout || DEFAULT_EXEC_TIMEOUT_SEC);
    yield* this.#output(principal, input.id, { start: spec }, signal);
  }

  /**
   * A background process's output from after event `after` (a sequence number), then live, until
   * it exits; pulled as the caller reads it (see `stream`). What the agent dropped from its log
   * before this reader attached is one `gap` event.
   */
  async *attach(principal: Principal, id: string, pid: number, after: string | null, signal?: AbortSignal): AsyncGenerator<TrackedChunk> {
    if (after !== null && !/^\d{1,15}$/.test(after)) throw badResumeId(`${pid}:${after}`);
    yield* this.#output(principal, id, { pid, after: Number(after ?? 0) }, signal);
  }

  async *#output(principal: Principal, id: string, call: ProcessStreamCall, signal?: AbortSignal): AsyncGenerator<TrackedChunk> {
    const record = await this.deps.sandboxes.running(principal, id);
    const agents = this.deps.sandboxes.agents;
    const since = agents.epoch(record.id);
    let pid = 'pid' in call ? call.pid : 0;
    let exited: Awaited<ReturnType<ProcessEvents['started']>> | null = null;
    try {
      for await (const line of agentProcessStream(agents, record.id, call, signal)) {
        if (line.type === 'started') {
          pid = line.pid;
          const events = 'start' in call ? this.#processEvents() : null;
          exited = events && 'start' in call ? await events.started(record, call.start as ProcessSpec, { pid, background: false }) : null;
          yield { id: `${pid}:0`, chunk: { type: 'started', pid } };
          continue;
        }
        const { seq, ...event } = line;
        const chunk = toChunk(event);
        yield { id: `${pid}:${seq}`, chunk };
        if (event.type === 'exit') {
          void exited?.({ exitCode: event.exitCode, timedOut: event.timedOut, signal: event.signal });
          return;
        }
      }
    } catch (err) {
      if (signal?.aborted) return; // the reader left: nothing to answer, and nothing wrong with the sandbox
      throw await agents.failure(record, err, since);
    }
  }

  /**
   * Shell sessions without a terminal (the original VoidRun's session-exec): `create` starts a
   * shell whose working directory and variables persist; `exec` runs one command in it; `input`
   * writes to its stdin; `resize` is accepted and does nothing (there is no terminal); `close` ends it.
   */
  async sessionExec(principal: Principal, input: SessionExecInput): Promise<SessionExecResult> {
    const need = (field: 'sessionId' | 'command' | 'input') => {
      const v = input[field];
      if (v === undefined) throw new InvalidInputError(`Invalid ${field}: required for action ${input.action}`);
      return v;
    };
    return this.#withAgent(principal, input.id, async (agent) => {
      const done = (sessionId: string, output = '', error = '', exitCode = 0) => ({ success: exitCode === 0, sessionId, output, error, exitCode });
      switch (input.action) {
        case 'create':
          return done((await agent.shell.create.mutate({ shell: input.shell || undefined })).sessionId);
        case 'exec': {
          const r = await agent.shell.exec.mutate(
            { sessionId: need('sessionId'), command: need('command'), timeoutMs: input.timeout * 1000 },
            { context: { timeoutMs: input.timeout * 1000 + 15_000 } },
          );
          return done(input.sessionId!, r.output, r.error, r.exitCode);
        }
        case 'input':
          await agent.shell.input.mutate({ sessionId: need('sessionId'), input: need('input') });
          return done(input.sessionId!);
        case 'resize':
          need('sessionId');
          return done(input.sessionId!);
        case 'close':
          await agent.shell.close.mutate({ sessionId: need('sessionId') });
          return done(input.sessionId!);
      }
    });
  }

  /**
   * One command in a shell session, as it runs: output chunks, then the exit code. The output is
   * pulled at the reader's pace: a reader that falls behind pauses the shell's command (its pipes
   * are not read), so nothing is dropped and nothing piles up.
   */
  async *sessionExecStream(principal: Principal, id: string, sessionId: string, command: string, timeoutSec: number, signal?: AbortSignal): AsyncGenerator<SessionStreamEvent> {
    const record = await this.deps.sandboxes.running(principal, id);
    const agents = this.deps.sandboxes.agents;
    const since = agents.epoch(record.id);
    try {
      for await (const line of agentShellExecStream(agents, record.id, { sessionId, command, timeoutMs: timeoutSec * 1000 }, signal)) {
        if (line.type === 'error') throw fromAgentCode(line.code, line.error.slice(0, AGENT_MESSAGE_MAX_CHARS)) ?? new AgentUnavailableError(`The sandbox agent failed: ${line.error.slice(0, AGENT_MESSAGE_MAX_CHARS)}`);
        yield line;
        if (line.type === 'exit') return;
      }
    } catch (err) {
      if (signal?.aborted) return; // the reader left
      throw await agents.failure(record, err, since);
    }
  }

  /** What the agent runs; an empty `cwd` (as clients that always send the field do) means the default. */
  #spec(input: { command: string; args?: string[]; env?: Record<string, string>; cwd?: string }, timeoutSec: number): ProcessSpec {
    return { command: input.command, args: input.args, env: input.env, cwd: input.cwd || undefined, timeoutMs: timeoutSec * 1000, maxOutputBytes: this.deps.limits.maxOutputBytes };
  }

  /** Runs `fn` with the caller's running sandbox's agent; `fn` also gets the record (read once per call). */
  async #withAgent<T>(principal: Principal, id: string, fn: (agent: AgentClient, record: SandboxRecord) => Promise<T>): Promise<T> {
    const record = await this.deps.sandboxes.running(principal, id);
    // A foreground command (or any agent call) is activity for the sandbox's idle policy while it runs.
    const active = this.deps.activity?.hold(record.orgId, record.id);
    try {
      return await this.deps.sandboxes.agents.call(record, (agent) => fn(agent, record));
    } finally {
      active?.();
    }
  }
}

/** A Last-Event-ID that no event of a command stream carries (they are `<pid>:<seq>`, both decimal). */
function badResumeId(value: string): InvalidInputError {
  return new InvalidInputError(`Invalid Last-Event-ID ${JSON.stringify(value.slice(0, 64))}: send the id of an event this stream sent (<pid>:<seq>), or none to start`);
}

function toChunk(e: OutputEvent): ExecChunk {
  return e.type === 'exit' ? { type: 'exit', exitCode: e.exitCode, timedOut: e.timedOut } : e;
}

