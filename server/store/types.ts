/**
 * The store's ports: one repository per collection. Adapters (`sqlite/`, `mongo/`) implement them
 * and pass the shared contract suite in `test/store-contract.test.ts`. Repositories throw
 * `ConflictError` on a duplicate unique key and return `null` for a missing record; they never
 * throw driver errors at callers. An id that is not one of ours (not 24 lowercase hex characters)
 * is simply not found: lookups return `null`, updates and deletes change nothing.
 */
import type { NetworkPolicy, OrgNetworkDefaults } from '../../shared/schemas/network.js';
import type { EndedReason, IdlePolicy, OnTimeout } from '../../shared/schemas/sandbox.js';
import type { ImageProgress, ImageSource, ImageStatus, Recipe } from '../../shared/schemas/images.js';

export interface UserRecord {
  id: string;
  name: string;
  email: string;
  createdAt: Date;
  updatedAt: Date;
}

export interface OrgRecord {
  id: string;
  name: string;
  ownerId: string;
  members: string[];
  plan: string;
  usage: number;
  createdBy: string;
  /** The org's default network policy for its new sandboxes; absent: none (the server's defaults apply). */
  network?: OrgNetworkDefaults;
  createdAt: Date;
  updatedAt: Date;
}

export interface ApiKeyRecord {
  id: string;
  orgId: string;
  name: string;
  /** SHA-256 of the plain key, hex. The plain key is never stored. */
  keyHash: string;
  /** The key's first characters, kept to tell keys apart in listings. */
  prefix: string;
  createdBy: string;
  isActive: boolean;
  lastUsedAt: Date | null;
  createdAt: Date;
  updatedAt: Date;
}

export type SandboxStatus = 'creating' | 'running' | 'stopped' | 'paused' | 'error';

export interface SandboxRecord {
  id: string;
  name: string;
  orgId: string;
  createdBy: string;
  imageId: string;
  ip: string;
  cpu: number;
  mem: number;
  diskMb: number;
  status: SandboxStatus;
  envVars: Record<string, string>;
  /** Set at creation, never changed; a record stored before labels existed reads as `{}`. */
  labels: Record<string, string>;
  /** The resolved network policy; a record stored before policies existed reads as loopback only (`SANDBOX_NETWORK_NONE`). */
  network: NetworkPolicy;
  /** The ports its owner opened to everyone (preview URLs without a token), ascending; absent: none. */
  publicPorts?: number[];
  /** Timeout, idle and auto-resume policies and why it last ended by itself; absent (records stored before them): none. */
  lifecycle?: SandboxLifecycle;
  /**
   * Set on a warm-pool member (owned by no org, `orgId` ''): the shape it was built for
   * (`debian:1cpu:1024mb`, see WARM_POOL); absent or '' on every sandbox an org owns.
   */
  pool?: string;
  /**
   * The fleet host that runs it (VOIDRUN_ROLE=host, README "Fleet"): API nodes forward its requests
   * there, and only that host's loops touch it. Absent or '': a single-process server's (VOIDRUN_ROLE=all).
   */
  hostId?: string;
  createdAt: Date;
  updatedAt: Date;
}

/** What a claim of a warm-pool member sets: the record becomes the org's sandbox, no longer the pool's. */
export type PoolMemberClaim = Pick<SandboxRecord, 'orgId' | 'name' | 'createdBy' | 'envVars' | 'labels' | 'network'>;

/** A sandbox's lifecycle policies as stored (see shared/schemas/sandbox.ts and services/lifecycle-policy.ts). */
export interface SandboxLifecycle {
  /** Seconds it may run from each start or resume; 0: none. */
  timeout: number;
  /** ISO time the timeout acts; null without a timeout or while the sandbox is not running. */
  expiresAt: string | null;
  onTimeout: OnTimeout;
  idle: IdlePolicy | null;
  autoResume: boolean;
  /** Why it last paused or stopped by itself; null once started or resumed again. */
  endedReason: EndedReason | null;
  /** ISO time of `endedReason`. */
  endedAt: string | null;
}

/** A sandbox deleted by its timeout (`onTimeout: 'delete'`): kept so later calls answer 410 with the reason, not 404. */
export interface SandboxTombstoneRecord {
  id: string;
  orgId: string;
  name: string;
  reason: 'timeout';
  endedAt: Date;
}

/** Tombstones are inserted once per id (a second write of one id changes nothing) and read by (org, id). */
export interface SandboxTombstoneRepository {
  put(tombstone: SandboxTombstoneRecord): Promise<void>;
  findById(orgId: string, id: string): Promise<SandboxTombstoneRecord | null>;
  /** Removes the tombstones that ended before `before` (retention); resolves to how many went. */
  deleteEndedBefore(before: Date): Promise<number>;
  delete(orgId: string, id: string): Promise<boolean>;
}

/** The policy of a sandbox stored before network policies existed: such sandboxes had loopback only. */
export const SANDBOX_NETWORK_NONE: NetworkPolicy = { mode: 'none', egress: 'allow', allow: [], deny: [], maxEgressBytes: null, egressCut: false };

export interface ImageRecord {
  id: string;
  name: string;
  tag: string;
  description: string;
  /** The system root filesystem at the bottom of its stack (e.g. "debian"); '' for an OCI import, whose own layer is the bottom. */
  base: string;
  /** null for system images, visible to every org. */
  orgId: string | null;
  isSystem: boolean;
  createdBy: string;
  createdAt: Date;
  updatedAt: Date;
  status: ImageStatus;
  source: ImageSource;
  /** Layer ids above `base`, bottom first: the parent's layers, then its own. */
  layers: string[];
  /** The image a recipe or sandbox image was built on. */
  parentId: string | null;
  recipe: Recipe | null;
  env: Record<string, string>;
  workdir: string | null;
  /** Bytes of its own layers (those not in its parent's stack). */
  sizeBytes: number;
  error: string | null;
  progress: ImageProgress | null;
  /**
   * In a fleet, the host whose layer store holds the image's own layers (it built, imported or
   * captured them; a config-only recipe image inherits its parent's): sandboxes of it run there,
   * and its builds, logs and delete are that host's. null: no layers of a host's own (system
   * images and aliases, which every host prepares itself; every image of a single server).
   */
  hostId: string | null;
}

/** What images stored before layered images existed read as: ready aliases of a system rootfs (or the system image itself). */
export function imageDefaults(isSystem: boolean): Pick<ImageRecord, ImageDetailKey> {
  return { status: 'ready', source: isSystem ? 'system' : 'alias', layers: [], parentId: null, recipe: null, env: {}, workdir: null, sizeBytes: 0, error: null, progress: null, hostId: null };
}
/** `o` without its undefined-valued keys, so a spread of it never overwrites a default with undefined. */
export function withoutUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}
export type ImageDetailKey = 'status' | 'source' | 'layers' | 'parentId' | 'recipe' | 'env' | 'workdir' | 'sizeBytes' | 'error' | 'progress' | 'hostId';
export const IMAGE_DETAIL_KEYS: readonly ImageDetailKey[] = ['status', 'source', 'layers', 'parentId', 'recipe', 'env', 'workdir', 'sizeBytes', 'error', 'progress', 'hostId'];
/** `images.create` input: the detail fields default as `imageDefaults` says. */
export type NewImageRecord = Omit<NewRecord<ImageRecord>, ImageDetailKey> & Partial<Pick<ImageRecord, ImageDetailKey>>;
/** What `images.update` may change. */
export type ImagePatch = Partial<Pick<ImageRecord, ImageDetailKey | 'description'>>;

/** A guest address leased to one sandbox; the address is the key, so no two sandboxes share one. */
export interface IpLeaseRecord {
  ip: string;
  sandboxId: string;
  createdAt: Date;
}

/** What `create` takes: the record without what the store assigns. */
export type NewRecord<T extends { id: string; createdAt: Date; updatedAt: Date }> = Omit<T, 'id' | 'createdAt' | 'updatedAt'> & {
  /** Supplied by callers that must know the id before the record exists (rarely). */
  id?: string;
};

export interface Page<T> {
  items: T[];
  total: number;
}

export interface UserRepository {
  create(user: NewRecord<UserRecord>): Promise<UserRecord>;
  findById(id: string): Promise<UserRecord | null>;
  findByEmail(email: string): Promise<UserRecord | null>;
  delete(id: string): Promise<boolean>;
}

export interface OrgRepository {
  create(org: NewRecord<OrgRecord>): Promise<OrgRecord>;
  findById(id: string): Promise<OrgRecord | null>;
  /** The orgs `userId` owns or is a member of, oldest first. */
  listByMember(userId: string): Promise<OrgRecord[]>;
  /** Adds `userId` to the org's members (once); false when there is no such org. */
  addMember(orgId: string, userId: string): Promise<boolean>;
  /** Replaces the org's default network policy (null removes it); the updated org, or null when there is no such org. */
  setNetwork(orgId: string, network: OrgNetworkDefaults | null): Promise<OrgRecord | null>;
  delete(id: string): Promise<boolean>;
}

export interface ApiKeyRepository {
  create(key: NewRecord<ApiKeyRecord>): Promise<ApiKeyRecord>;
  /** The hot path of every authenticated request: one lookup on a unique index. */
  findByHash(keyHash: string): Promise<ApiKeyRecord | null>;
  findById(orgId: string, keyId: string): Promise<ApiKeyRecord | null>;
  /**
   * The keys of these ids that exist, whatever their org (ids that are none of ours are skipped):
   * for a fleet node re-checking the keys its open streams were opened with.
   */
  findByIds(keyIds: readonly string[]): Promise<ApiKeyRecord[]>;
  listByOrg(orgId: string): Promise<ApiKeyRecord[]>;
  setActive(orgId: string, keyId: string, isActive: boolean): Promise<ApiKeyRecord | null>;
  /**
   * Writes many `lastUsedAt` values at once, by key id alone (callers check the org first); a value
   * never moves a key's time backwards, and an id that is no key's is skipped.
   */
  recordLastUsed(times: ReadonlyMap<string, Date>): Promise<void>;
  delete(orgId: string, keyId: string): Promise<boolean>;
}

export interface SandboxRepository {
  create(sandbox: NewRecord<SandboxRecord>): Promise<SandboxRecord>;
  findById(orgId: string, id: string): Promise<SandboxRecord | null>;
  /**
   * Newest first. `page` starts at 1. With `labels`, only sandboxes carrying every one of those
   * label values (AND), and `total` counts only those.
   */
  listByOrg(orgId: string, page: number, limit: number, labels?: Readonly<Record<string, string>>): Promise<Page<SandboxRecord>>;
  /** Every sandbox of every org, for the health loop and startup reconciliation. */
  listAll(): Promise<SandboxRecord[]>;
  /** A sandbox by id alone, whatever its org: only for requests that prove their right to it otherwise (a preview URL's token or public port). */
  findByIdInAnyOrg(id: string): Promise<SandboxRecord | null>;
  update(orgId: string, id: string, patch: Partial<Pick<SandboxRecord, 'status' | 'ip' | 'cpu' | 'mem' | 'envVars' | 'network' | 'publicPorts' | 'lifecycle' | 'hostId'>>): Promise<SandboxRecord | null>;
  /**
   * Hands warm-pool member `id` (a record with `orgId` '') to an org in one write: owner, name and
   * the rest of `claim`, `pool` cleared, `createdAt` now (it is the org's sandbox from now on). The caller must hold the member's claim (`PoolClaimRepository`):
   * this write is not the arbiter. `ConflictError` (member untouched) when the org already has a
   * sandbox of that name; null when there is no such member.
   */
  claimPoolMember(id: string, claim: PoolMemberClaim): Promise<SandboxRecord | null>;
  delete(orgId: string, id: string): Promise<boolean>;
}

export interface ImageRepository {
  create(image: NewImageRecord): Promise<ImageRecord>;
  findById(id: string): Promise<ImageRecord | null>;
  /** An org's own image of that name, or else the system image of that name. */
  findByName(orgId: string | null, name: string): Promise<ImageRecord | null>;
  /** The system images plus the org's own. */
  listVisible(orgId: string): Promise<ImageRecord[]>;
  /** Every image of every org (layer GC, build resume). */
  listAll(): Promise<ImageRecord[]>;
  /**
   * Sets the patched fields (and `updatedAt`); null when there is no such image. Not atomic against
   * another writer of the same image: each image has one writer (its builder, or the service before
   * a build starts).
   */
  update(id: string, patch: ImagePatch): Promise<ImageRecord | null>;
  delete(id: string): Promise<boolean>;
}

/**
 * Guest addresses in use. Claiming inserts a record keyed by the address, so concurrent claims of
 * one address (from any number of server processes) have exactly one winner.
 */
export interface IpLeaseRepository {
  /** Leases `ip` to `sandboxId`; false when the address is already leased (to anyone). */
  claim(ip: string, sandboxId: string): Promise<boolean>;
  /** The sandbox's lease (of addresses starting `ipPrefix`, when given: a fleet host's own), or null. A sandbox holds at most one lease when it goes through `IpPool`. */
  findBySandbox(sandboxId: string, ipPrefix?: string): Promise<IpLeaseRecord | null>;
  /** Frees every address leased to the sandbox (of those starting `ipPrefix`, when given); resolves to how many were freed. */
  releaseBySandbox(sandboxId: string, ipPrefix?: string): Promise<number>;
  /** Every lease, in no particular order. */
  list(): Promise<IpLeaseRecord[]>;
}

/**
 * Claims on warm-pool members, keyed by the member's sandbox id: of any number of concurrent claims
 * of one member (from any number of server processes) exactly one inserts its row.
 */
export interface PoolClaimRepository {
  /** True for the one caller whose insert made the claim; false when it was already claimed. */
  claim(sandboxId: string): Promise<boolean>;
  /** Frees a claim (a claim that failed gives its member back to the pool; a deleted sandbox's claim goes). */
  release(sandboxId: string): Promise<void>;
  /** The sandbox ids claimed, in no particular order. */
  list(): Promise<string[]>;
}

/** One claim of an org operation's idempotency key: the request's hash and, once it finished, its result. */
export interface IdempotencyRecord {
  orgId: string;
  /** `sandbox.create`, `sandbox.restore`, `exec.startCommand`. */
  operation: string;
  key: string;
  /**
   * The claim's generation: 0 for a key's first claim, one more for each takeover of a claim that
   * failed, expired or was left unfinished by a server that stopped. The highest is the key's holder.
   */
  gen: number;
  /** SHA-256 of the request's canonical JSON (without the key). */
  requestHash: string;
  /** The result as JSON text once the request succeeded; null while it runs (or after it failed). */
  result: string | null;
  createdAt: Date;
  /** When the claim stops holding the key (a failed request's claim: the time it failed). */
  expiresAt: Date;
}

/** Names one claim: its key and generation. */
export type IdempotencyClaim = Pick<IdempotencyRecord, 'orgId' | 'operation' | 'key' | 'gen'>;

/**
 * Idempotency keys. Every claim — a key's first, and each takeover of a claim that failed, expired
 * or was left unfinished — is an insert against the unique `(orgId, operation, key, gen)`: of
 * concurrent requests making the same claim exactly one wins, on either store (FerretDB loses
 * concurrent conditional updates and deletes, never a unique insert). A claim's row is written
 * afterwards by its claimer alone, and never deleted while it may hold its key (only `prune`, well
 * past its expiry), so a generation cannot be claimed twice.
 */
export interface IdempotencyRepository {
  /** Inserts `record` (result null); false, with nothing written, when that generation of the key is taken. */
  claim(record: Omit<IdempotencyRecord, 'result'>): Promise<boolean>;
  /** The key's holder: its claim with the highest generation; null when it has none. */
  find(orgId: string, operation: string, key: string): Promise<IdempotencyRecord | null>;
  /** Stores the result of the claim's request, and its new expiry when given (only its claimer writes it). */
  complete(claim: IdempotencyClaim, result: string, expiresAt?: Date): Promise<void>;
  /**
   * Sets the claim's expiry to `at` (only its claimer writes it): now, to end a claim whose request
   * failed (the next request takes the key over), or later, to renew a running claim's lease.
   */
  expire(claim: IdempotencyClaim, at: Date): Promise<void>;
  /** How many of the org's claims have not expired at `now` (the per-org bound on keys). */
  countLive(orgId: string, now: Date): Promise<number>;
  /** Removes claims that expired before `before`; resolves to how many went. */
  prune(before: Date): Promise<number>;
}

/** One event of a sandbox's stream; `(sandboxId, seq)` is unique, and `seq` only grows per sandbox. */
export interface SandboxEventRecord {
  sandboxId: string;
  seq: number;
  orgId: string;
  type: string;
  data: Record<string, unknown>;
  createdAt: Date;
}

/**
 * Sandboxes' event streams. `append` is an insert against the unique `(sandboxId, seq)` key, so
 * two writers can never both write one id (the loser gets a `ConflictError`).
 */
export interface SandboxEventRepository {
  /** Stores the event; `ConflictError` when its `(sandboxId, seq)` is taken. */
  append(event: SandboxEventRecord): Promise<void>;
  /** The sandbox's events with `seq > after`, ascending, at most `limit`. */
  listAfter(sandboxId: string, after: number, limit: number): Promise<SandboxEventRecord[]>;
  /** The sandbox's highest stored `seq`; 0 when it has none. */
  lastSeq(sandboxId: string): Promise<number>;
  /**
   * Removes the sandbox's events with `seq <= upTo` (retention), except those whose type is in
   * `keepTypes`; resolves to how many went.
   */
  deleteUpTo(sandboxId: string, upTo: number, keepTypes?: readonly string[]): Promise<number>;
  /** Removes every event of the sandbox; resolves to how many went. */
  deleteForSandbox(sandboxId: string): Promise<number>;
  /** The ids of the sandboxes that have events, in no particular order. */
  sandboxIds(): Promise<string[]>;
}

/** An org's webhook: where its sandboxes' events are POSTed, signed with `secret`. */
export interface WebhookRecord {
  id: string;
  orgId: string;
  url: string;
  /** Event types (or `prefix.*` patterns) it receives; empty: every event. */
  events: string[];
  secret: string;
  createdBy: string;
  createdAt: Date;
  updatedAt: Date;
}

/** One event to deliver to one webhook, until it is delivered or its attempts run out. */
export interface WebhookDeliveryRecord {
  id: string;
  webhookId: string;
  orgId: string;
  /** `<sandboxId>:<seq>` of the event. */
  eventId: string;
  eventType: string;
  /** The JSON body sent, the same on every attempt. */
  body: string;
  /** Attempts made so far. */
  attempts: number;
  /** When the next attempt is due. */
  nextAttemptAt: Date;
  createdAt: Date;
  updatedAt: Date;
}

/** One attempt to deliver, as the delivery log shows it. */
export interface WebhookAttemptRecord {
  id: string;
  deliveryId: string;
  webhookId: string;
  orgId: string;
  eventId: string;
  eventType: string;
  attempt: number;
  /** The receiver's HTTP status; null when none came (refused, timed out, not allowed). */
  statusCode: number | null;
  error: string | null;
  ok: boolean;
  createdAt: Date;
  updatedAt: Date;
}

export interface WebhookRepository {
  create(webhook: NewRecord<WebhookRecord>): Promise<WebhookRecord>;
  findById(orgId: string, id: string): Promise<WebhookRecord | null>;
  /** Oldest first. */
  listByOrg(orgId: string): Promise<WebhookRecord[]>;
  /** Deletes the webhook with its pending deliveries, their claims and its log. */
  delete(orgId: string, id: string): Promise<boolean>;
}

/**
 * Deliveries waiting for their next attempt, and the log of attempts. Each attempt of a delivery
 * is claimed first (`claimAttempt`: an insert against a unique key, the one write atomic on every
 * MongoDB-wire store), so of several servers on one store exactly one makes it, and only the
 * claimer writes the delivery (`reschedule`, `finish`): those never race each other.
 */
export interface WebhookDeliveryRepository {
  create(delivery: NewRecord<WebhookDeliveryRecord>): Promise<WebhookDeliveryRecord>;
  findById(id: string): Promise<WebhookDeliveryRecord | null>;
  /**
   * Claims attempt `attempt` of the delivery, in generation `gen` (a claim whose holder went away
   * is taken over in the next generation): true for the one caller whose insert made it.
   */
  claimAttempt(claim: { deliveryId: string; webhookId: string; attempt: number; gen: number }): Promise<boolean>;
  /** When that claim was made; null when there is none. */
  attemptClaimedAt(deliveryId: string, attempt: number, gen: number): Promise<Date | null>;
  /** Records attempts made and when the next is due. */
  reschedule(id: string, attempts: number, nextAttemptAt: Date): Promise<void>;
  /** A delivery that is done (delivered, or out of attempts) leaves the queue, with its claims. */
  finish(id: string): Promise<void>;
  /** Pending deliveries, the earliest due first, at most `limit`; with `after`, those after that one in this order (a page). */
  listPending(limit: number, after?: Pick<WebhookDeliveryRecord, 'id' | 'nextAttemptAt'>): Promise<WebhookDeliveryRecord[]>;
  /** Drops one claim (one that turned out not to be needed: its delivery was done, or had moved on). */
  releaseAttemptClaim(deliveryId: string, attempt: number, gen: number): Promise<void>;
  addAttempt(attempt: NewRecord<WebhookAttemptRecord>): Promise<WebhookAttemptRecord>;
  /** The webhook's attempts, newest first, at most `limit`. */
  listAttempts(orgId: string, webhookId: string, limit: number): Promise<WebhookAttemptRecord[]>;
  /** Keeps the newest `keep` attempts of the webhook; resolves to how many went. */
  pruneAttempts(webhookId: string, keep: number): Promise<number>;
}

/** A sandbox host's state in the fleet (README "Fleet"): only `ready` hosts take new sandboxes. */
export type HostState = 'ready' | 'draining' | 'unresponsive' | 'gone';

/** What a host offers: cpu cores, memory and disk in MiB, and how many sandboxes it runs at most. */
export interface HostCapacity {
  cpu: number;
  memoryMb: number;
  diskMb: number;
  slots: number;
}

/**
 * One sandbox host of the fleet, keyed by its node id (not an ObjectId: `host-` and hex, chosen by
 * the host and kept in its DATA_DIR). Written by the host itself (registration, heartbeat) and by
 * API nodes and admins only to change `state`; each write replaces the fields it names.
 */
export interface HostRecord {
  id: string;
  /** `host:port` of its internal listener (HOST_ADVERTISE_ADDRESS, HOST_INTERNAL_PORT). */
  address: string;
  capacity: HostCapacity;
  labels: Record<string, string>;
  /** Ids of the images whose root filesystem is present on the host (placement prefers those hosts). */
  images: string[];
  state: HostState;
  /** The epoch it last registered with (see HostEpochRepository): one more on every registration. */
  epoch: number;
  heartbeatAt: Date;
  registeredAt: Date;
}

/** A host's state as read: a `ready` record with a drain is `draining` (see HostRepository). */
export function drainedState(state: HostState, drained: boolean): HostState {
  return drained && state === 'ready' ? 'draining' : state;
}

/**
 * Hosts. A drain is kept apart from the record (an insert keyed by the host's id; undrain deletes
 * it by that key), because heartbeats and registrations rewrite the record and a store that writes
 * whole documents back (FerretDB) would let one undo a drain made meanwhile. The records read back
 * carry it: a `ready` host with a drain reads `draining`.
 */
export interface HostRepository {
  /** Writes the whole record (registration). */
  put(host: HostRecord): Promise<void>;
  findById(id: string): Promise<HostRecord | null>;
  /** Every host, by id. */
  list(): Promise<HostRecord[]>;
  /** The host takes no new sandboxes until `undrain` (idempotent; survives its re-registrations). */
  drain(id: string): Promise<void>;
  undrain(id: string): Promise<void>;
  /** Sets `heartbeatAt` (and `images` when given); false when there is no such host. */
  heartbeat(id: string, at: Date, images?: string[]): Promise<boolean>;
  /** Sets `state`; the updated record, or null when there is no such host. */
  setState(id: string, state: HostState): Promise<HostRecord | null>;
}

/**
 * Host epochs: registering as epoch N is an insert of `(hostId, N)` against a unique key, so of
 * hosts (or restarts of one) registering concurrently under one id exactly one gets each epoch —
 * the one primitive atomic on MongoDB, DocumentDB and FerretDB alike.
 */
export interface HostEpochRepository {
  /** True for the one caller whose insert took `epoch`; false when it was already taken. */
  claim(hostId: string, epoch: number): Promise<boolean>;
  /** The highest epoch claimed for the host; 0 when none. */
  latest(hostId: string): Promise<number>;
  /**
   * Declares the host's registration `epoch` lost (its heartbeats stopped): an insert against the
   * unique key `(hostId, epoch)`, so any number of API nodes declaring it at once agree, and one
   * that read an old record declares only that old epoch lost, never the host's newer registration.
   * True for the insert that made it.
   */
  declareLost(hostId: string, epoch: number): Promise<boolean>;
  /** Whether that registration was declared lost. */
  isLost(hostId: string, epoch: number): Promise<boolean>;
}

/**
 * A sandbox slot on a host, held from placement until the sandbox is deleted: `(hostId, slot)` is
 * unique and `slot` is below the host's `capacity.slots`, so concurrent placements from any number
 * of API nodes never hold more slots on a host than it has. Each holding of a slot is a
 * `reservation` of its own, and it is assigned and freed by that key: a release or assign late
 * for a reservation already freed never touches the one that holds the slot now.
 */
export interface HostSlotRecord {
  hostId: string;
  slot: number;
  /** This holding's key, made by its reserver (`newId()`); '' for slots held before reservations had keys. */
  reservation: string;
  /** The sandbox it was placed for; '' while the create is in flight. */
  sandboxId: string;
  /** A slot still '' after this is a create that never finished, and may be freed. */
  expiresAt: Date;
  createdAt: Date;
}

/** Names one holding of a slot. */
export type HostSlotKey = Pick<HostSlotRecord, 'hostId' | 'slot' | 'reservation'>;

export interface HostSlotRepository {
  /** Inserts the slot; false, with nothing written, when that slot of the host is held. */
  reserve(slot: HostSlotRecord): Promise<boolean>;
  /** Records the sandbox a held slot is for (only its reserver writes it); nothing when that reservation no longer holds it. */
  assign(key: HostSlotKey, sandboxId: string): Promise<void>;
  /** The host's held slots, by slot number. */
  listByHost(hostId: string): Promise<HostSlotRecord[]>;
  /** Frees the slot if that reservation still holds it (a delete by its key); false when it did not. */
  release(key: HostSlotKey): Promise<boolean>;
}

export interface Store {
  readonly kind: 'sqlite' | 'mongo';
  readonly users: UserRepository;
  readonly orgs: OrgRepository;
  readonly apiKeys: ApiKeyRepository;
  readonly sandboxes: SandboxRepository;
  readonly images: ImageRepository;
  readonly ipLeases: IpLeaseRepository;
  readonly sandboxTombstones: SandboxTombstoneRepository;
  readonly poolClaims: PoolClaimRepository;
  readonly idempotency: IdempotencyRepository;
  readonly sandboxEvents: SandboxEventRepository;
  readonly webhooks: WebhookRepository;
  readonly webhookDeliveries: WebhookDeliveryRepository;
  readonly hosts: HostRepository;
  readonly hostEpochs: HostEpochRepository;
  readonly hostSlots: HostSlotRepository;
  close(): Promise<void>;
}
