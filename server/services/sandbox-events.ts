/**
 * A sandbox's event stream: what happened to it, in order, each with an id that only grows. Services
 * report into a `SandboxEventSink` without waiting: reporting never delays or fails the operation
 * that caused the event.
 */

/** Every kind of event a sandbox's stream carries. */
export const SANDBOX_EVENT_TYPES = [
  'sandbox.created',
  'sandbox.started',
  'sandbox.paused',
  'sandbox.resumed',
  'sandbox.stopped',
  'sandbox.timeout',
  'sandbox.timeout_changed',
  'sandbox.idle',
  'sandbox.oom_killed',
  'sandbox.error',
  'sandbox.deleted',
  'process.started',
  'process.exited',
  'terminal.opened',
  'terminal.closed',
  'watch.overflow',
  'port.opened',
  'port.closed',
  'network.policy_changed',
  'network.egress_cut',
] as const;
export type SandboxEventType = (typeof SANDBOX_EVENT_TYPES)[number];

/** One event as a service reports it; the sink assigns its id and time. */
export interface SandboxEventInput {
  sandboxId: string;
  orgId: string;
  type: SandboxEventType;
  data?: Record<string, unknown>;
}

/** Where services report events. `emit` returns at once and never throws. */
export interface SandboxEventSink {
  emit(event: SandboxEventInput): void;
}

/** A sink that drops everything (services built without an event stream). */
export const noEvents: SandboxEventSink = { emit() {} };
