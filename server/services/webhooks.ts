import { createHmac } from 'node:crypto';
import { lookup } from 'node:dns/promises';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { BlockList, isIP, type LookupFunction } from 'node:net';
import { networkInterfaces } from 'node:os';
import type { Logger } from 'pino';
import type { CreateWebhookInput, Webhook, WebhookAttempt } from '../../shared/schemas/events.js';
import { ForbiddenError, InvalidInputError, NotFoundError, TooManyRequestsError } from '../errors.js';
import type { OrgRepository, SandboxEventRecord, WebhookDeliveryRecord, WebhookDeliveryRepository, WebhookRecord, WebhookRepository } from '../store/types.js';
import type { Principal } from './auth-service.js';
import { SANDBOX_EVENT_TYPES, toSandboxEvent } from './sandbox-events.js';
import { SandboxLocks } from './sandbox-locks.js';

/** How long a webhook URL's name may take to resolve when it is created. */
const CREATE_LOOKUP_TIMEOUT_MS = 2000;
/** The longest wait between two attempts, however many came before. */
const MAX_RETRY_DELAY_MS = 60 * 60 * 1000;
/** How often the count of an org's deliveries not stored (past WEBHOOK_MAX_PENDING_PER_ORG) is logged. */
const DROP_LOG_INTERVAL_MS = 60_000;
/** Attempts kept in a webhook's delivery log. */
const ATTEMPT_LOG_SIZE = 1000;
/** Pending deliveries taken up at startup. */
const RESUME_LIMIT = 10_000;
/** The most characters of an attempt's error kept in the log. */
const MAX_ERROR_CHARS = 300;
/** How long an org's list of webhooks is used before it is read again (a webhook created or deleted by another server is seen within it). */
const HOOKS_CACHE_MS = 30_000;
/** How many of the earliest-due deliveries one page of a sweep reads, and how many pages at most. */
const SWEEP_LIMIT = 1000;
const SWEEP_PAGES = 20;
/** Takeovers of one attempt's claim at most (each after its holder stayed away past the stale age). */
const MAX_CLAIM_GENS = 20;

/**
 * Addresses a tenant's webhook never reaches unless WEBHOOK_ALLOW_PRIVATE opens them: this host
 * (loopback), private and shared networks, link-local (cloud metadata at 169.254.169.254 and
 * fd00:ec2::254 included), and the reserved, documentation, multicast and translation ranges.
 */
const REFUSED_V4 = ['0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12', '192.0.0.0/24', '192.0.2.0/24', '192.88.99.0/24', '192.168.0.0/16', '198.18.0.0/15', '198.51.100.0/24', '203.0.113.0/24', '224.0.0.0/4', '240.0.0.0/4'];
// IPv4-mapped addresses (::ffff:a.b.c.d) are checked as the IPv4 address they stand for (see
// `unmapped`); the IPv4-compatible (::/96: :: and ::1 too) and IPv4-translated (::ffff:0:0:0/96)
// forms are refused whatever IPv4 address they embed (a translator may deliver them to it).
const REFUSED_V6 = ['::/96', '::ffff:0:0:0/96', '64:ff9b::/96', '64:ff9b:1::/48', '100::/64', '2001::/32', '2001:db8::/32', '2002::/16', 'fc00::/7', 'fe80::/10', 'fec0::/10', 'ff00::/8'];

function blockList(cidrs: readonly string[]): BlockList {
  const list = new BlockList();
  for (const cidr of cidrs) {
    const [addr = '', prefix] = cidr.split('/');
    const family = isIP(addr) === 6 ? 'ipv6' : 'ipv4';
    list.addSubnet(addr, prefix === undefined ? (family === 'ipv6' ? 128 : 32) : Number(prefix), family);
  }
  return list;
}
const refused = blockList([...REFUSED_V4, ...REFUSED_V6]);

/** An IPv6 address's eight 16-bit groups (a trailing dotted IPv4 part included), or null. */
function groups6(address: string): number[] | null {
  if (isIP(address) !== 6) return null;
  let text = address.replace(/%.*$/, '');
  const dotted = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted.slice(1).map(Number) as [number, number, number, number];
    text = `${text.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [left = '', right] = text.split('::');
  const l = left ? left.split(':') : [];
  const r = right === undefined ? [] : right ? right.split(':') : [];
  const fill = right === undefined ? [] : Array<string>(8 - l.length - r.length).fill('0');
  const all = [...l, ...fill, ...r].map((g) => parseInt(g, 16));
  return all.length === 8 && all.every((g) => g >= 0 && g <= 0xffff) ? all : null;
}

/** The IPv4 address an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`, in any spelling) stands for, else the address itself. */
function unmapped(address: string): string {
  const g = groups6(address);
  if (!g || g.slice(0, 5).some((x) => x !== 0) || g[5] !== 0xffff) return address;
  return [g[6]! >> 8, g[6]! & 255, g[7]! >> 8, g[7]! & 255].join('.');
}

/** This host's own addresses (every interface's), read when asked: a webhook never reaches the server's host. */
function ownAddresses(): Set<string> {
  const own = new Set<string>();
  for (const list of Object.values(networkInterfaces())) for (const a of list ?? []) own.add(unmapped(a.address.replace(/%.*$/, '')).toLowerCase());
  return own;
}

/**
 * Whether a webhook may connect to `address`: not in a refused range, or inside one of the
 * operator's WEBHOOK_ALLOW_PRIVATE CIDRs.
 */
export function webhookAddressAllowed(address: string, allowPrivate: BlockList, own: ReadonlySet<string> = ownAddresses()): boolean {
  const plain = unmapped(address);
  const family = isIP(plain) === 6 ? 'ipv6' : 'ipv4';
  if (!isIP(plain)) return false;
  if (allowPrivate.check(plain, family)) return true;
  const g = family === 'ipv6' ? groups6(plain) : null;
  const canonical = g ? g.map((x) => x.toString(16)).join(':') : plain;
  const isOwn = [...own].some((a) => a === plain.toLowerCase() || (g && groups6(a)?.map((x) => x.toString(16)).join(':') === canonical));
  return !refused.check(plain, family) && !isOwn;
}

/** Whether an event of `type` goes to a webhook with these filters (none: every event). */
export function webhookWants(filters: readonly string[], type: string): boolean {
  if (filters.length === 0) return true;
  return filters.some((f) => f === '*' || f === type || (f.endsWith('.*') && type.startsWith(f.slice(0, -1))));
}

/** `X-VoidRun-Signature`: `sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` keyed by the secret. */
export function webhookSignature(secret: string, timestamp: string, body: string): string {
  return `sha256=${createHmac('sha256', secret).update(`${timestamp}.${body}`).digest('hex')}`;
}

export interface WebhookServiceDeps {
  webhooks: WebhookRepository;
  deliveries: WebhookDeliveryRepository;
  orgs: Pick<OrgRepository, 'findById'>;
  log: Logger;
  /** WEBHOOK_MAX_ATTEMPTS */
  maxAttempts: number;
  /** WEBHOOK_RETRY_BASE_MS: the delay before the second attempt; each later one doubles it (at most an hour). */
  retryBaseMs: number;
  /** WEBHOOK_TIMEOUT_MS: connecting and receiving the answer's status line and headers, together. */
  timeoutMs: number;
  /** WEBHOOK_MAX_IN_FLIGHT_PER_ORG */
  maxInFlightPerOrg: number;
  /** WEBHOOK_MAX_PENDING_PER_ORG: deliveries one org may have pending here (in flight, waiting, or waiting for a retry). */
  maxPendingPerOrg: number;
  /** ORG_MAX_WEBHOOKS */
  maxPerOrg: number;
  /**
   * How often pending deliveries no process holds are looked for (default 30 s): those of a server
   * that stopped or died (another fleet node's, or this one's own attempts that failed to record).
   */
  sweepMs?: number;
  /** How many deliveries a sweep reads per page (default 1000). */
  sweepPageSize?: number;
  /** How long past its due time a delivery must be before a sweep takes it (default 5 s; its holder's own timer comes first). */
  sweepGraceMs?: number;
  /** An attempt's claim older than this is taken over: its holder is taken to be gone (default max(60 s, 4 × timeoutMs)). */
  staleClaimMs?: number;
  /**
   * Whether `start` takes up every stored delivery (one server alone: they are all its own). In a
   * fleet it does not: the sweep takes up only those overdue, so deliveries other nodes hold and
   * wait to retry are neither counted against this node's per-org bound nor scheduled twice.
   */
  resumeAtStart?: boolean;
  /** WEBHOOK_ALLOW_PRIVATE: CIDRs webhooks may reach though refused by default. */
  allowPrivate: readonly string[];
}

type AttemptResult = { statusCode: number; error: null } | { statusCode: null; error: string };

/**
 * Org webhooks: every stored sandbox event goes to the org's webhooks that want its type, as a
 * signed POST. A delivery is stored before its first attempt and removed once delivered or out of
 * attempts, so deliveries pending when the server stops are taken up when it starts, and by a
 * periodic sweep of any server on the store (a fleet node that died leaves its deliveries to the
 * others). Each attempt is claimed in the store before it is made (`claimAttempt`: an insert
 * against a unique key), so of the servers that hold one delivery exactly one makes each attempt; a
 * claim whose holder went away is taken over once stale. Each attempt
 * resolves the URL's name, refuses it unless every address is allowed (see
 * `webhookAddressAllowed`), and connects to the address it checked, so a name that resolves
 * differently a moment later (DNS rebinding) cannot redirect the request.
 */
export class WebhookService {
  readonly #allowPrivate: BlockList;
  /** Each org's webhooks, read at most every HOOKS_CACHE_MS, and dropped when one is created or deleted here. */
  readonly #byOrg = new Map<string, { hooks: Promise<WebhookRecord[]>; at: number }>();
  /** Creates of one org run one at a time (their count and insert). */
  readonly #createLocks = new SandboxLocks();
  readonly #inFlight = new Map<string, number>();
  readonly #waiting = new Map<string, WebhookDeliveryRecord[]>();
  readonly #timers = new Set<NodeJS.Timeout>();
  readonly #running = new Set<Promise<void>>();
  readonly #attemptsSincePrune = new Map<string, number>();
  /** Deliveries this server holds per org (in flight, waiting for a slot, or for a retry): at most WEBHOOK_MAX_PENDING_PER_ORG. */
  readonly #pending = new Map<string, number>();
  /** The ids of the deliveries this server holds (a sweep leaves them alone). */
  readonly #held = new Set<string>();
  #sweepTimer: NodeJS.Timeout | undefined;
  #sweeping = false;
  /** Deliveries not stored per org since its last log line, and the timer of its next one. */
  readonly #dropped = new Map<string, { count: number; timer: NodeJS.Timeout }>();
  #closed = false;

  constructor(private readonly deps: WebhookServiceDeps) {
    this.#allowPrivate = blockList(deps.allowPrivate);
  }

  /** Registers a webhook in the caller's org; only its owner may. The secret is never shown again. */
  async create(principal: Principal, input: CreateWebhookInput): Promise<Webhook> {
    await this.#assertOwner(principal, input.orgId, 'create webhooks');
    const events = [...new Set(input.events ?? [])];
    for (const f of events) {
      if (!SANDBOX_EVENT_TYPES.some((t) => webhookWants([f], t))) throw new InvalidInputError(`Invalid events: ${f} matches no event type (types: ${SANDBOX_EVENT_TYPES.join(', ')})`);
    }
    const url = await this.#checkedUrl(input.url);
    const max = this.deps.maxPerOrg;
    const full = (n: number) => new TooManyRequestsError(`This organization has ${n} webhooks, the most allowed (ORG_MAX_WEBHOOKS=${max}); delete one first`);
    // One create of an org at a time here; across processes (fleet API nodes) each inserts, then
    // counts, and one that finds the org over its cap takes its own back: of any two racers one
    // sees the other, so the cap holds (both may back off: a 429 to retry).
    const hook = await this.#createLocks.run(input.orgId, async () => {
      const existing = await this.deps.webhooks.listByOrg(input.orgId);
      if (existing.length >= max) throw full(existing.length);
      const made = await this.deps.webhooks.create({ orgId: input.orgId, url, events, secret: input.secret, createdBy: principal.userId });
      const after = await this.deps.webhooks.listByOrg(input.orgId);
      if (after.length > max) {
        await this.deps.webhooks.delete(input.orgId, made.id);
        throw full(after.length - 1);
      }
      return made;
    });
    this.#byOrg.delete(input.orgId);
    return toWebhook(hook);
  }

  /**
   * The org's webhooks. Their URLs often carry the receiver's token: the owner sees them whole,
   * members only `scheme://host[:port]/…`.
   */
  async list(principal: Principal, orgId: string): Promise<Webhook[]> {
    assertSameOrg(principal, orgId);
    const [hooks, org] = await Promise.all([this.deps.webhooks.listByOrg(orgId), this.deps.orgs.findById(orgId)]);
    const owner = org?.ownerId === principal.userId;
    return hooks.map((h) => toWebhook(owner ? h : { ...h, url: maskedUrl(h.url) }));
  }

  /** Deletes a webhook with its pending deliveries and log; only the org's owner may. */
  async delete(principal: Principal, orgId: string, webhookId: string): Promise<{ id: string; deleted: true }> {
    await this.#assertOwner(principal, orgId, 'delete webhooks');
    if (!(await this.deps.webhooks.delete(orgId, webhookId))) throw webhookNotFound(webhookId);
    this.#byOrg.delete(orgId);
    return { id: webhookId, deleted: true };
  }

  /** The webhook's delivery log, newest attempt first. */
  async attempts(principal: Principal, orgId: string, webhookId: string, limit = 100): Promise<WebhookAttempt[]> {
    assertSameOrg(principal, orgId);
    if (!(await this.deps.webhooks.findById(orgId, webhookId))) throw webhookNotFound(webhookId);
    const log = await this.deps.deliveries.listAttempts(orgId, webhookId, limit);
    return log.map((a) => ({ deliveryId: a.deliveryId, eventId: a.eventId, eventType: a.eventType, attempt: a.attempt, ok: a.ok, statusCode: a.statusCode, error: a.error, at: a.createdAt.toISOString() }));
  }

  /** Takes up the deliveries pending when the server last stopped, each when it is due. */
  async start(): Promise<void> {
    if (this.deps.resumeAtStart !== false) {
      const pending = await this.deps.deliveries.listPending(RESUME_LIMIT);
      for (const d of pending) {
        this.#hold(d);
        this.#schedule(d, d.nextAttemptAt.getTime() - Date.now());
      }
      if (pending.length) this.deps.log.info({ pending: pending.length }, 'webhook deliveries resumed');
    } else void this.sweep();
    this.#sweepTimer = setInterval(() => void this.sweep(), this.deps.sweepMs ?? 30_000);
    this.#sweepTimer.unref();
  }

  /**
   * Takes up the pending deliveries due for longer than the grace that this server does not hold
   * (while the org has room under WEBHOOK_MAX_PENDING_PER_ORG): each attempt's claim decides
   * whether this server or another makes it. Resolves to how many were taken up. Never throws.
   */
  async sweep(): Promise<number> {
    if (this.#closed || this.#sweeping) return 0;
    this.#sweeping = true;
    try {
      const before = Date.now() - (this.deps.sweepGraceMs ?? 5000);
      let taken = 0;
      // Page by page, earliest due first, to the first not yet overdue: deliveries held here or of
      // an org at its bound do not hide the others behind them.
      let after: WebhookDeliveryRecord | undefined;
      for (let page = 0; page < SWEEP_PAGES && !this.#closed; page++) {
        const size = this.deps.sweepPageSize ?? SWEEP_LIMIT;
        const rows = await this.deps.deliveries.listPending(size, after);
        for (const d of rows) {
          if (d.nextAttemptAt.getTime() > before) return taken;
          if (this.#held.has(d.id) || (this.#pending.get(d.orgId) ?? 0) >= this.deps.maxPendingPerOrg) continue;
          this.#hold(d);
          this.#enqueue(d);
          taken++;
        }
        if (rows.length < size) break;
        after = rows.at(-1);
      }
      return taken;
    } catch (err) {
      this.deps.log.warn({ err: (err as Error).message }, 'could not look for webhook deliveries to take up');
      return 0;
    } finally {
      this.#sweeping = false;
    }
  }

  /** A stored sandbox event: queues a delivery to each of the org's webhooks that want it. Never throws. */
  handle(event: SandboxEventRecord): void {
    if (this.#closed) return;
    void this.#dispatch(event).catch((err: Error) => this.deps.log.warn({ sandbox: event.sandboxId, type: event.type, err: err.message }, 'could not queue webhook deliveries'));
  }

  /** Stops attempting; waits (at most WEBHOOK_TIMEOUT_MS) for attempts under way. Pending deliveries stay stored. */
  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#sweepTimer);
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    this.#waiting.clear();
    for (const d of this.#dropped.values()) clearTimeout(d.timer);
    this.#dropped.clear();
    await Promise.race([Promise.allSettled([...this.#running]), new Promise((r) => setTimeout(r, this.deps.timeoutMs).unref())]);
  }

  /**
   * Stores and queues the event's deliveries, each only while its org holds fewer than
   * WEBHOOK_MAX_PENDING_PER_ORG (counted before the write: past it nothing is written, the drop is
   * counted and logged once a minute). Each event's work starts in its own turn of the event loop
   * (`setImmediate`), so a burst of events × webhooks never runs as one synchronous stretch.
   */
  async #dispatch(event: SandboxEventRecord): Promise<void> {
    await new Promise((resolve) => setImmediate(resolve));
    if (this.#closed) return;
    const hooks = (await this.#hooksOf(event.orgId)).filter((h) => webhookWants(h.events, event.type));
    if (hooks.length === 0) return;
    const body = JSON.stringify({ ...toSandboxEvent(event), orgId: event.orgId });
    for (const hook of hooks) {
      if ((this.#pending.get(hook.orgId) ?? 0) >= this.deps.maxPendingPerOrg) {
        this.#noteDropped(hook.orgId);
        continue;
      }
      this.#pending.set(hook.orgId, (this.#pending.get(hook.orgId) ?? 0) + 1);
      let delivery: WebhookDeliveryRecord;
      try {
        delivery = await this.deps.deliveries.create({ webhookId: hook.id, orgId: hook.orgId, eventId: `${event.sandboxId}:${event.seq}`, eventType: event.type, body, attempts: 0, nextAttemptAt: new Date() });
      } catch (err) {
        this.#ended(hook.orgId);
        throw err;
      }
      this.#held.add(delivery.id);
      this.#enqueue(delivery);
    }
  }

  /** This server holds the delivery from now on (counted against its org's WEBHOOK_MAX_PENDING_PER_ORG). */
  #hold(delivery: WebhookDeliveryRecord): void {
    this.#held.add(delivery.id);
    this.#pending.set(delivery.orgId, (this.#pending.get(delivery.orgId) ?? 0) + 1);
  }

  /** A delivery this server held for the org is done here (delivered, out of attempts, another server's, or left stored for a sweep or restart). */
  #ended(orgId: string, deliveryId?: string): void {
    if (deliveryId) this.#held.delete(deliveryId);
    const n = (this.#pending.get(orgId) ?? 1) - 1;
    if (n > 0) this.#pending.set(orgId, n);
    else this.#pending.delete(orgId);
  }

  /** Counts a delivery not stored; the first of a minute is logged at once, the rest in one line at the minute's end. */
  #noteDropped(orgId: string): void {
    const entry = this.#dropped.get(orgId);
    if (entry) return void entry.count++;
    const why = `WEBHOOK_MAX_PENDING_PER_ORG (${this.deps.maxPendingPerOrg}) deliveries of this organization are pending`;
    this.deps.log.warn({ org: orgId }, `webhook delivery dropped: ${why}`);
    const timer = setTimeout(() => {
      const count = this.#dropped.get(orgId)?.count ?? 0;
      this.#dropped.delete(orgId);
      if (count) this.deps.log.warn({ org: orgId, dropped: count }, `${count} more webhook deliveries dropped in the last minute: ${why}`);
    }, DROP_LOG_INTERVAL_MS);
    timer.unref();
    this.#dropped.set(orgId, { count: 0, timer });
  }

  #hooksOf(orgId: string): Promise<WebhookRecord[]> {
    const cached = this.#byOrg.get(orgId);
    if (cached && Date.now() - cached.at < HOOKS_CACHE_MS) return cached.hooks;
    const entry = { hooks: this.deps.webhooks.listByOrg(orgId), at: Date.now() };
    this.#byOrg.set(orgId, entry);
    entry.hooks.catch(() => {
      if (this.#byOrg.get(orgId) === entry) this.#byOrg.delete(orgId);
    });
    return entry.hooks;
  }

  #schedule(delivery: WebhookDeliveryRecord, delayMs: number): void {
    if (this.#closed) return;
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      this.#enqueue(delivery);
    }, Math.max(0, delayMs));
    timer.unref();
    this.#timers.add(timer);
  }

  /** Runs the delivery's next attempt now if its org has a slot free, else once one frees. */
  #enqueue(delivery: WebhookDeliveryRecord): void {
    if (this.#closed) return;
    const orgId = delivery.orgId;
    if ((this.#inFlight.get(orgId) ?? 0) >= this.deps.maxInFlightPerOrg) {
      // Never more than the org's pending deliveries (WEBHOOK_MAX_PENDING_PER_ORG), counted at dispatch.
      const waiting = this.#waiting.get(orgId) ?? [];
      waiting.push(delivery);
      this.#waiting.set(orgId, waiting);
      return;
    }
    this.#inFlight.set(orgId, (this.#inFlight.get(orgId) ?? 0) + 1);
    const run = this.#attempt(delivery)
      .then((retry) => {
        if (!retry) this.#ended(orgId, delivery.id);
      })
      .catch((err: Error) => {
        // Left stored as it was: taken up by a sweep once its claim is stale, or at the next start.
        this.#ended(orgId, delivery.id);
        this.deps.log.warn({ webhook: delivery.webhookId, err: err.message }, 'webhook attempt failed');
      })
      .finally(() => {
        this.#running.delete(run);
        const left = (this.#inFlight.get(orgId) ?? 1) - 1;
        if (left > 0) this.#inFlight.set(orgId, left);
        else this.#inFlight.delete(orgId);
        const next = this.#waiting.get(orgId)?.shift();
        if (this.#waiting.get(orgId)?.length === 0) this.#waiting.delete(orgId);
        if (next) this.#enqueue(next);
      });
    this.#running.add(run);
  }

  /**
   * Claims the delivery's next attempt for this server: the delivery as stored now, or null when
   * another server makes that attempt (its claim is fresh), made it already, or the delivery is done.
   */
  async #claim(held: WebhookDeliveryRecord): Promise<WebhookDeliveryRecord | null> {
    const attempt = held.attempts + 1;
    const staleMs = this.deps.staleClaimMs ?? Math.max(60_000, 4 * this.deps.timeoutMs);
    for (let gen = 0; gen < MAX_CLAIM_GENS; gen++) {
      if (await this.deps.deliveries.claimAttempt({ deliveryId: held.id, webhookId: held.webhookId, attempt, gen })) {
        // What this server held may be old (read at startup or by a sweep): the attempt is ours
        // only if the delivery is still at it. Else the claim is not needed (nor kept).
        const now = await this.deps.deliveries.findById(held.id);
        if (now && now.attempts === held.attempts) return now;
        await this.deps.deliveries.releaseAttemptClaim(held.id, attempt, gen);
        return null;
      }
      const at = await this.deps.deliveries.attemptClaimedAt(held.id, attempt, gen);
      if (!at || Date.now() - at.getTime() < staleMs) return null;
    }
    // Its attempts keep dying with their servers: it ends here, logged as failed.
    this.deps.log.warn({ delivery: held.id, attempt }, `webhook delivery ${held.id}: attempt ${attempt} was taken over ${MAX_CLAIM_GENS} times; giving it up`);
    await this.#record(held, attempt, { statusCode: null, error: `given up: attempt ${attempt} was taken over ${MAX_CLAIM_GENS} times (its servers stopped during it)` }, true);
    return null;
  }

  /** One attempt; resolves to whether a retry is scheduled (the delivery stays pending). */
  async #attempt(held: WebhookDeliveryRecord): Promise<boolean> {
    const delivery = await this.#claim(held);
    if (!delivery) return false;
    const hook = await this.deps.webhooks.findById(delivery.orgId, delivery.webhookId);
    if (!hook) {
      await this.deps.deliveries.finish(delivery.id);
      return false;
    }
    const attempt = delivery.attempts + 1;
    const result = await this.#post(hook, delivery, attempt);
    const ok = result.statusCode !== null && result.statusCode >= 200 && result.statusCode < 300;
    const last = ok || attempt >= this.deps.maxAttempts;
    await this.#record(delivery, attempt, result, last);
    if (last) return false;
    const delay = Math.min(MAX_RETRY_DELAY_MS, this.deps.retryBaseMs * 2 ** (attempt - 1));
    const next = { ...delivery, attempts: attempt, nextAttemptAt: new Date(Date.now() + delay) };
    await this.deps.deliveries.reschedule(delivery.id, attempt, next.nextAttemptAt);
    this.#schedule(next, delay);
    return true;
  }

  async #record(delivery: WebhookDeliveryRecord, attempt: number, result: AttemptResult, last: boolean): Promise<void> {
    const ok = result.statusCode !== null && result.statusCode >= 200 && result.statusCode < 300;
    await this.deps.deliveries.addAttempt({ deliveryId: delivery.id, webhookId: delivery.webhookId, orgId: delivery.orgId, eventId: delivery.eventId, eventType: delivery.eventType, attempt, statusCode: result.statusCode, error: result.error, ok });
    if (last) await this.deps.deliveries.finish(delivery.id);
    const since = (this.#attemptsSincePrune.get(delivery.webhookId) ?? 0) + 1;
    if (since >= ATTEMPT_LOG_SIZE / 10) {
      this.#attemptsSincePrune.delete(delivery.webhookId);
      await this.deps.deliveries.pruneAttempts(delivery.webhookId, ATTEMPT_LOG_SIZE);
    } else this.#attemptsSincePrune.set(delivery.webhookId, since);
  }

  /** One signed POST to the webhook, connected to an address checked now; its status, or why there is none. */
  async #post(hook: WebhookRecord, delivery: WebhookDeliveryRecord, attempt: number): Promise<AttemptResult> {
    const url = new URL(hook.url);
    let target: { address: string; family: number };
    try {
      target = await this.#resolveAllowed(url);
    } catch (err) {
      return { statusCode: null, error: clip((err as Error).message) };
    }
    const timestamp = String(Math.floor(Date.now() / 1000));
    const headers = {
      'content-type': 'application/json',
      'content-length': String(Buffer.byteLength(delivery.body)),
      'user-agent': 'VoidRun-Webhooks',
      'x-voidrun-event': delivery.eventType,
      'x-voidrun-delivery': delivery.id,
      'x-voidrun-attempt': String(attempt),
      'x-voidrun-timestamp': timestamp,
      'x-voidrun-signature': webhookSignature(hook.secret, timestamp, delivery.body),
    };
    // The connection goes to the address checked above, whatever the name resolves to now; the
    // Host header and TLS (SNI, certificate) still use the name.
    const pinned: LookupFunction = (_host, options, callback) => {
      if ((options as { all?: boolean }).all) (callback as unknown as (e: null, a: { address: string; family: number }[]) => void)(null, [target]);
      else callback(null, target.address, target.family);
    };
    const request = url.protocol === 'https:' ? httpsRequest : httpRequest;
    return new Promise<AttemptResult>((resolve) => {
      let settled = false;
      const done = (r: AttemptResult) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(r);
      };
      const req = request(url, { method: 'POST', headers, lookup: pinned, agent: false }, (res: IncomingMessage) => {
        // Only the status counts: the answer's body is never read.
        done({ statusCode: res.statusCode ?? 0, error: null });
        res.destroy();
      });
      const timer = setTimeout(() => {
        done({ statusCode: null, error: `no answer within ${this.deps.timeoutMs} ms (WEBHOOK_TIMEOUT_MS)` });
        req.destroy();
      }, this.deps.timeoutMs);
      req.on('error', (err) => done({ statusCode: null, error: clip(err.message) }));
      req.end(delivery.body);
    });
  }

  /** The address to connect to for `url`: every address its name resolves to must be allowed. */
  async #resolveAllowed(url: URL): Promise<{ address: string; family: number }> {
    const host = url.hostname.replace(/^\[|\]$/g, '');
    // Within WEBHOOK_TIMEOUT_MS too: a slow resolver must not stretch an attempt past its claim's stale age.
    let timer: NodeJS.Timeout | undefined;
    const addresses = isIP(host)
      ? [{ address: host, family: isIP(host) }]
      : await Promise.race([
          lookup(host, { all: true, verbatim: true }),
          new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${host} did not resolve within ${this.deps.timeoutMs} ms (WEBHOOK_TIMEOUT_MS)`)), this.deps.timeoutMs))),
        ]).finally(() => clearTimeout(timer));
    if (addresses.length === 0) throw new Error(`${host} resolves to no address`);
    const bad = addresses.find((a) => !webhookAddressAllowed(a.address, this.#allowPrivate));
    if (bad) throw new Error(`${host} resolves to ${bad.address}, a loopback, private or link-local address (or one of this host's own) webhooks may not reach (the operator opens such addresses with WEBHOOK_ALLOW_PRIVATE)`);
    return addresses[0]!;
  }

  /** The URL as stored, if webhooks may be sent to it (400 naming what is wrong otherwise). */
  async #checkedUrl(text: string): Promise<string> {
    let url: URL;
    try {
      url = new URL(text);
    } catch {
      throw new InvalidInputError(`Invalid url: ${JSON.stringify(text.slice(0, 200))} is not an absolute URL (https://host/path)`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new InvalidInputError(`Invalid url: the scheme must be http or https, not ${url.protocol.slice(0, -1).slice(0, 20)}`);
    if (url.username || url.password) throw new InvalidInputError('Invalid url: credentials in the URL are not accepted; receivers verify X-VoidRun-Signature instead');
    if (!url.hostname) throw new InvalidInputError('Invalid url: it names no host');
    try {
      await Promise.race([
        this.#resolveAllowed(url),
        new Promise((_, reject) => setTimeout(() => reject(new Error(`its host did not resolve within ${CREATE_LOOKUP_TIMEOUT_MS} ms`)), CREATE_LOOKUP_TIMEOUT_MS).unref()),
      ]);
    } catch (err) {
      const reason = (err as NodeJS.ErrnoException).code === 'ENOTFOUND' ? `${url.hostname} does not resolve` : (err as Error).message;
      throw new InvalidInputError(`Invalid url: ${clip(reason)}`);
    }
    url.hash = '';
    return url.toString();
  }

  async #assertOwner(principal: Principal, orgId: string, what: string): Promise<void> {
    assertSameOrg(principal, orgId);
    const org = await this.deps.orgs.findById(orgId);
    if (!org) throw new NotFoundError(`Organization ${orgId} no longer exists`, { code: 'ORG_NOT_FOUND' });
    if (org.ownerId !== principal.userId) throw new ForbiddenError(`Only the organization's owner can ${what}; this API key's user is a member (role owner needed)`);
  }
}

function assertSameOrg(principal: Principal, orgId: string): void {
  if (principal.orgId !== orgId) throw new ForbiddenError(`This API key belongs to another organization and cannot manage organization ${orgId}`);
}

function webhookNotFound(id: string): NotFoundError {
  return new NotFoundError(`Webhook ${id} not found in this organization`);
}

function clip(message: string): string {
  return message.length > MAX_ERROR_CHARS ? `${message.slice(0, MAX_ERROR_CHARS)}…` : message;
}

/** `scheme://host[:port]/…`: a URL without its path and query (a member's view of a webhook). */
function maskedUrl(text: string): string {
  try {
    return `${new URL(text).origin}/…`;
  } catch {
    return '…';
  }
}

function toWebhook(h: WebhookRecord): Webhook {
  return { id: h.id, orgId: h.orgId, url: h.url, events: h.events, createdBy: h.createdBy, createdAt: h.createdAt.toISOString() };
}
