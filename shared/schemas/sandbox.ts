import { z } from 'zod';
import { AgentText, Id, Timestamp } from './common.js';
import { NetworkPolicy, NetworkPolicyInput } from './network.js';
import { IdempotencyKey } from './idempotency.js';

const dns1123Subdomain = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

export const SandboxStatus = z
  .enum(['creating', 'running', 'stopped', 'paused', 'error'])
  .meta({ description: "`creating` only while a `sync: false` create is still booting; the original VoidRun's four values otherwise." });
export type SandboxStatus = z.infer<typeof SandboxStatus>;

/** The contract's four statuses: REST answers carry only these in `status`. */
export const ContractSandboxStatus = z
  .enum(['running', 'stopped', 'paused', 'error'])
  .meta({ description: 'A sandbox still booting after a `sync: false` create is `running` (as the original VoidRun reports it) with `phase: "creating"` and `ready: false`.' });
export type ContractSandboxStatus = z.infer<typeof ContractSandboxStatus>;

/** The fields REST shows for a sandbox's status: the contract's `status`, our finer `phase`, and `ready`. */
const restStatusShape = {
  status: ContractSandboxStatus,
  phase: SandboxStatus.meta({ description: 'The status with `creating` kept apart: `creating` while a `sync: false` create boots.' }),
  ready: z.boolean().meta({ description: 'The sandbox runs and its agent answers: commands and file operations work now.' }),
};

/** `status` as REST shows it, with `phase` and `ready` beside it. */
export function restStatus(status: SandboxStatus): { status: ContractSandboxStatus; phase: SandboxStatus; ready: boolean } {
  return { status: status === 'creating' ? 'running' : status, phase: status, ready: status === 'running' };
}

export const EnvVars = z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a valid environment variable name'), AgentText);

/** How many labels a sandbox may carry, and how long each key and value may be (the VoidRun client libraries' bounds). */
export const MAX_LABELS = 5;
export const MAX_LABEL_CHARS = 20;
const labelKeyPattern = /^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$/;

const LabelKey = z
  .string()
  .max(MAX_LABEL_CHARS, `label keys must be at most ${MAX_LABEL_CHARS} characters`)
  .regex(labelKeyPattern, 'label keys are lowercase letters, digits, "-" and "_", starting and ending with a letter or digit');
const LabelValue = z
  .string()
  .max(MAX_LABEL_CHARS, `label values must be at most ${MAX_LABEL_CHARS} characters`)
  .refine((v) => !/[,=]/.test(v), 'label values must not contain "," or "="');

/** A sandbox's labels: set at creation, never changed. */
export const Labels = z
  .record(LabelKey, LabelValue)
  .refine((labels) => Object.keys(labels).length <= MAX_LABELS, `a sandbox has at most ${MAX_LABELS} labels`)
  .meta({
    description: `Set at creation and never changed. At most ${MAX_LABELS}; keys and values at most ${MAX_LABEL_CHARS} characters; keys are lowercase letters, digits, "-" and "_"; neither holds "," or "=".`,
    example: { env: 'prod', team: 'backend' },
  });

/**
 * A label filter as the query string carries it: `key=value` pairs separated by commas, every one
 * required (AND). Pairs that no label could match (a bad key, too many) are refused, not ignored.
 */
export const LabelFilter = z
  .string()
  .max(MAX_LABELS * (2 * MAX_LABEL_CHARS + 2), 'labels is too long: at most 5 key=value pairs')
  .superRefine((filter, ctx) => {
    const pairs = filter === '' ? [] : filter.split(',');
    if (pairs.length > MAX_LABELS) ctx.addIssue({ code: 'custom', message: `labels holds ${pairs.length} pairs; a sandbox has at most ${MAX_LABELS} labels` });
    for (const pair of pairs) {
      const eq = pair.indexOf('=');
      if (eq < 0 || !labelKeyPattern.test(pair.slice(0, eq)) || pair.length - eq - 1 > MAX_LABEL_CHARS || pair.includes('=', eq + 1)) {
        ctx.addIssue({ code: 'custom', message: `labels must be key=value pairs separated by commas (like env=prod,team=api); "${pair.slice(0, 50)}" is not one` });
      }
    }
  })
  .meta({ description: 'Only sandboxes carrying all of these labels: `key=value` pairs separated by commas, e.g. `env=prod,team=api`.', example: 'env=prod' });

/** The labels a valid `LabelFilter` asks for. */
export function parseLabelFilter(filter: string | undefined): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const pair of filter ? filter.split(',') : []) {
    const eq = pair.indexOf('=');
    labels[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  return labels;
}

/** An org or user id a client may send on create and restore: empty (as common clients always send) means the API key's. */
const OwnerId = z.string().max(64).optional();

/** Bytes through a sandbox's link, counted on the host. */
export const NetworkBytes = z
  .object({
    egress: z.number().int().min(0).meta({ description: 'Bytes the sandbox sent', example: 1520 }),
    ingress: z.number().int().min(0).meta({ description: 'Bytes the sandbox received', example: 48211 }),
  })
  .meta({
    id: 'NetworkBytes',
    description:
      "Counted by the host's kernel on the host end of the sandbox's link on the bridge (never by the sandbox), since the sandbox last started; zero while it has no link (network mode none, stopped).",
  });
export type NetworkBytes = z.infer<typeof NetworkBytes>;

/**
 * Lifecycle policies (README "Lifecycle: timeouts, idle and auto-resume"). `timeout` counts while
 * the sandbox runs: a start or resume sets `expiresAt` to now + timeout again.
 */
export const OnTimeout = z.enum(['pause', 'stop', 'delete'], { error: 'must be pause, stop or delete' });
export type OnTimeout = z.infer<typeof OnTimeout>;
export const IdleAction = z.enum(['pause', 'stop'], { error: 'must be pause or stop' });
export type IdleAction = z.infer<typeof IdleAction>;
/** The shortest idle period a policy may set: quiet is judged on the scheduler's tick, so less would be noise. */
export const MIN_IDLE_AFTER_SEC = 1;
/** The idle period `autoSleep: true` means. */
export const DEFAULT_AUTO_SLEEP_SEC = 300;
/** The schema's own bound on any timeout or idle period (ten years); SANDBOX_MAX_TIMEOUT_SEC bounds timeouts further. */
export const MAX_LIFECYCLE_SEC = 315_360_000;
/** Why a sandbox stopped running by itself: its timeout, or its idle policy. */
export const EndedReason = z.enum(['timeout', 'idle', 'host-lost']);
export type EndedReason = z.infer<typeof EndedReason>;

const seconds = (what: string, min: number) =>
  z
    .number({ error: `${what} must be a whole number of seconds` })
    .int(`${what} must be a whole number of seconds`)
    .min(min, `${what} must be at least ${min} seconds`)
    .max(MAX_LIFECYCLE_SEC, `${what} must be at most ${MAX_LIFECYCLE_SEC} seconds`);

export const TimeoutSeconds = seconds('timeout', 0).meta({
  description: 'Seconds the sandbox may run from now (from each start or resume); 0 = no timeout. Above SANDBOX_MAX_TIMEOUT_SEC is a 400 naming it. Absent on create: SANDBOX_DEFAULT_TIMEOUT_SEC (default 0, none).',
  example: 300,
});

export const IdlePolicy = z
  .object({
    after: seconds('idle.after', MIN_IDLE_AFTER_SEC).meta({ description: 'Seconds without activity after which the action is taken', example: 600 }),
    action: IdleAction.default('pause').meta({ description: 'What happens to an idle sandbox (default pause)' }),
  })
  .meta({
    id: 'IdlePolicy',
    description:
      'Activity is any call that reaches into the sandbox (exec, files, terminals, ports; reading its record is not), an open terminal or stream (exec-stream, attach, watch, WebSocket; not its event stream), a command started through the API still running, an open preview or port-proxy connection, and CPU use above SANDBOX_IDLE_CPU_PERCENT (read on the host).',
  });
export type IdlePolicy = z.infer<typeof IdlePolicy>;

/** The lifecycle fields of a create (and restore). */
export const LifecycleInput = {
  timeout: TimeoutSeconds.optional(),
  onTimeout: OnTimeout.optional().meta({ description: 'What happens at `expiresAt`: pause, stop (default) or delete (the record stays; later calls answer 410).' }),
  idle: IdlePolicy.nullable().optional().meta({ description: 'Pause or stop the sandbox after `after` seconds without activity; null or absent: never.' }),
  autoResume: z.boolean().optional().meta({ description: 'A call needing a running sandbox (exec, files, terminal, preview, watch) on a paused one resumes it first (default false: 409).' }),
};

/**
 * `autoSleep` as the VoidRun client libraries send it: seconds without activity before the sandbox
 * pauses, `true` for the default (300 s), `false` or 0 for never. Shorthand for `idle: {after, action: 'pause'}`.
 */
export const AutoSleep = z
  .union([z.boolean(), seconds('autoSleep', 0)], { error: 'autoSleep must be true, false or a whole number of seconds' })
  .meta({ description: `Shorthand for \`idle: {after: <seconds>, action: "pause"}\`: seconds, \`true\` (${DEFAULT_AUTO_SLEEP_SEC} s) or \`false\`/0 (never).`, example: 600 });

/** The idle policy `autoSleep` stands for. */
export function idleFromAutoSleep(autoSleep: boolean | number): IdlePolicy | null {
  const after = autoSleep === true ? DEFAULT_AUTO_SLEEP_SEC : autoSleep === false ? 0 : autoSleep;
  return after > 0 ? { after: Math.max(after, MIN_IDLE_AFTER_SEC), action: 'pause' } : null;
}

/** What every sandbox answer says of its lifecycle. */
const lifecycleShape = {
  timeout: z.number().int().meta({ description: 'Seconds it may run from each start or resume; 0 = none' }),
  expiresAt: Timestamp.nullable().meta({ description: 'When its timeout acts (pause, stop or delete per onTimeout); null without a timeout or while not running' }),
  onTimeout: OnTimeout,
  idle: IdlePolicy.nullable(),
  autoResume: z.boolean(),
  endedReason: EndedReason.nullable().meta({ description: 'Why it stopped or paused by itself (its timeout, its idle policy); null once started or resumed again' }),
  endedAt: Timestamp.nullable().meta({ description: 'When `endedReason` happened' }),
  lastActivityAt: Timestamp.nullable().meta({ description: 'The last activity this server saw (kept in memory: null after a restart until the next)' }),
};

export const Sandbox = z
  .object({
    id: Id,
    name: z.string().meta({ example: 'vm-01' }),
    imageId: Id,
    ip: z.string().meta({ description: 'The sandbox\'s address on the host bridge; empty for sandboxes with loopback networking only (network mode none).', example: '192.168.100.2' }),
    cpu: z.number().int().meta({ example: 2 }),
    mem: z.number().int().meta({ description: 'Memory limit in MiB', example: 2048 }),
    status: SandboxStatus,
    createdAt: Timestamp,
    createdBy: Id,
    orgId: Id,
    envVars: z.record(z.string(), z.string()),
    labels: z.record(z.string(), z.string()).meta({ description: 'Set at creation, never changed; `{}` when it has none.', example: { env: 'prod' } }),
    network: NetworkPolicy,
    networkBytes: NetworkBytes,
    ...lifecycleShape,
  });
export type Sandbox = z.infer<typeof Sandbox>;

/** A sandbox as REST answers carry it: `status` within the contract's enum (see `restStatus`). */
export const RestSandbox = Sandbox.extend(restStatusShape).meta({ id: 'Sandbox' });
export type RestSandbox = z.infer<typeof RestSandbox>;

/** `sandbox` as REST shows it. */
export function toRestSandbox(sandbox: Sandbox): RestSandbox {
  return { ...sandbox, ...restStatus(sandbox.status) };
}

export const CreateSandboxInput = z
  .object({
    name: z
      .string()
      .max(253, 'must be at most 253 characters')
      .regex(dns1123Subdomain, 'must be a DNS-1123 subdomain: lowercase letters, digits, "-" and "."')
      .meta({ example: 'vm-01' }),
    templateId: z.string().optional().meta({ description: 'Image id or name; the default image when omitted.' }),
    cpu: z.number().int().min(1, 'must be 1 to 8').max(8, 'must be 1 to 8').optional().meta({ description: 'Number of vCPUs (CPU quota for containers)' }),
    mem: z.number().int().min(1024, 'must be 1024 to 16384 MiB').max(16384, 'must be 1024 to 16384 MiB').optional().meta({ description: 'Memory in MiB' }),
    orgId: OwnerId.meta({ description: "Must be the API key's org when given; empty or omitted: the key's org." }),
    userId: OwnerId.meta({ description: 'Ignored (empty or any id): the creator is the user of the API key.' }),
    sync: z.boolean().default(true).meta({ description: 'If true (default), answers once the sandbox agent responds.' }),
    envVars: EnvVars.optional().meta({ description: 'Environment variables every command in the sandbox sees' }),
    labels: Labels.optional(),
    network: NetworkPolicyInput.optional(),
    ...LifecycleInput,
    idempotencyKey: IdempotencyKey.optional(),
  })
  .meta({ id: 'CreateSandboxRequest' });
export type CreateSandboxInput = z.infer<typeof CreateSandboxInput>;

export const ListSandboxesInput = z.object({
  page: z.number().int().default(1).meta({ description: 'Page number from 1; a smaller one is read as 1 (as the original VoidRun does).' }),
  limit: z
    .number()
    .int()
    .meta({ description: 'Sandboxes per page, 1 to 100 (SANDBOX_LIST_DEFAULT_LIMIT when omitted); one below 1 is read as the default, one above 100 as 100.' })
    .optional(),
  labels: LabelFilter.optional(),
});

export const PageMeta = z.object({
  page: z.number().int(),
  limit: z.number().int(),
  total: z.number().int(),
  totalPages: z.number().int(),
});

export const SandboxPage = z.object({ data: z.array(Sandbox), meta: PageMeta });
export type SandboxPage = z.infer<typeof SandboxPage>;
export const RestSandboxPage = z.object({ data: z.array(RestSandbox), meta: PageMeta });

export const SandboxIdInput = z.object({ id: Id });

export const DeleteSandboxInput = SandboxIdInput.extend({
  keepSnapshots: z.boolean().default(false).meta({ description: "Keep the sandbox's snapshots for later restores." }),
});

export const SandboxActionResult = z.object({ id: Id, status: SandboxStatus });
export type SandboxActionResult = z.infer<typeof SandboxActionResult>;
export const RestSandboxActionResult = SandboxActionResult.extend(restStatusShape).meta({ id: 'SandboxActionResult' });

export const Snapshot = z
  .object({
    id: z.string().meta({ example: 'snap-6b0adb0da20420ffef769788' }),
    created_at: Timestamp,
    full_path: z.string().meta({
      description: 'The reference to pass as `snapshot_path` to restore: `<sandboxId>/<snapshotId>` (never a host path).',
      example: '6b0adb0da20420ffef769788/snap-6b0adb0da20420ffef769790',
    }),
    kind: z.enum(['filesystem', 'memory+filesystem']).meta({ description: 'Container snapshots capture the filesystem only: a restored sandbox boots fresh.' }),
    size: z.number().int(),
  })
  .meta({ id: 'Snapshot' });
export type Snapshot = z.infer<typeof Snapshot>;

export const RestoreSandboxInput = z
  .object({
    snapshot_path: z.string().min(1).meta({ description: 'A snapshot\'s `full_path` (or its id)' }),
    new_id: z
      .string()
      .max(253)
      .regex(dns1123Subdomain, 'must be a DNS-1123 subdomain')
      .optional()
      .meta({ description: "The new sandbox's name; generated when omitted." }),
    new_ip: z.string().optional().meta({ description: 'Ignored by container sandboxes (loopback only).' }),
    cold: z.boolean().default(false).meta({ description: 'Leave the restored sandbox stopped.' }),
    cpu: z.number().int().min(1).max(8).optional(),
    mem: z.number().int().min(1024).max(16384).optional(),
    orgId: OwnerId.meta({ description: "Must be the API key's org when given; empty or omitted: the key's org." }),
    userId: OwnerId.meta({ description: 'Ignored (empty or any id): the creator is the user of the API key.' }),
    ...LifecycleInput,
    idempotencyKey: IdempotencyKey.optional(),
  })
  .meta({ id: 'RestoreSandboxRequest' });
export type RestoreSandboxInput = z.infer<typeof RestoreSandboxInput>;

/** `POST /sandboxes/{id}/timeout`: the sandbox may run `timeout` more seconds from now (0: no timeout). */
export const SetTimeoutInput = z.object({ id: Id, timeout: TimeoutSeconds }).meta({ id: 'SetTimeoutRequest' });
export type SetTimeoutInput = z.infer<typeof SetTimeoutInput>;

/** What `PATCH /sandboxes/{id}` changes, for its messages. */
const UPDATABLE = 'timeout, onTimeout, idle, autoResume and autoSleep';

/**
 * `PATCH /sandboxes/{id}`: the lifecycle fields given replace the sandbox's; the others stay. Any
 * other field (a name, a size) is refused rather than ignored, so a caller never reads "updated"
 * for a change that did not happen; so is a body changing nothing.
 */
export const UpdateSandboxInput = z
  .strictObject(
    {
      id: Id,
      ...LifecycleInput,
      autoSleep: AutoSleep.optional(),
    },
    { error: (issue) => (issue.code === 'unrecognized_keys' ? `a sandbox update changes only ${UPDATABLE}; not ${issue.keys.join(', ')}` : undefined) },
  )
  .refine((v) => Object.keys(v).some((key) => key !== 'id'), { message: `send at least one of ${UPDATABLE}` })
  .refine((v) => !(v.autoSleep !== undefined && v.idle !== undefined), { message: 'send autoSleep or idle, not both (autoSleep is shorthand for idle with action pause)', path: ['autoSleep'] })
  .meta({ id: 'UpdateSandboxRequest' });
export type UpdateSandboxInput = z.infer<typeof UpdateSandboxInput>;
