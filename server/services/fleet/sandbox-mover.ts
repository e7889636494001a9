import { randomUUID } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, rm, stat } from 'node:fs/promises';
import { request, type IncomingMessage, type ServerResponse } from 'node:http';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Logger } from 'pino';
import { ConflictError, DomainError, InvalidInputError, PayloadTooLargeError } from '../../errors.js';
import { sendError } from '../../http/envelope.js';
import { isObjectIdHex } from '../../store/ids.js';
import type { HostRecord, HostRepository, HostSlotRepository, ImageRepository, SandboxRecord, SandboxRepository } from '../../store/types.js';
import type { SandboxService } from '../sandbox-service.js';
import { CLUSTER_TOKEN_HEADER, INTERNAL_ADOPT_PATH, splitAddress } from './internal-protocol.js';
import type { Placed, Placement } from './placement.js';

/** How long a move's connection to the receiving host may stay silent (its restore included). */
const MOVE_IDLE_MS = 10 * 60_000;
/** When a sandbox taken in here is checked again (longer than a move's last steps can take). */
const ORPHAN_CHECK_MS = 15 * 60_000;

export interface SandboxMoverOptions {
  /** This host's node id. */
  hostId: string;
  hosts: HostRepository;
  /** Every sandbox record (the store's, not this host's view). */
  sandboxes: SandboxRepository;
  images: ImageRepository;
  slots: HostSlotRepository;
  placement: Placement;
  service: SandboxService;
  /** CLUSTER_TOKEN: host-to-host requests carry it like an API node's. */
  token: string;
  /** Where a moving sandbox's capture is kept while it is sent or received (a directory of this host's). */
  workDir: string;
  /** The largest capture taken in (SNAPSHOT_MAX_BYTES, or none). */
  maxBytes: number | null;
  log: Logger;
}

/**
 * Moves a draining host's stopped sandboxes to other hosts (README "Fleet", Draining). The
 * draining host, at each heartbeat, takes each of its stopped sandboxes whose image can run
 * elsewhere (no layers of this host's own) and has no snapshots of its own, captures its
 * filesystem under its lock, holds a slot on a host placement picks, and sends the capture to that
 * host's internal listener (`POST /internal/v1/adopt`, with the cluster secret), which restores it
 * there, stopped. Then the record names the new host, the slot is its, and the runtime and slot
 * here go. A failure anywhere leaves the sandbox where it was (the slot there is given back) and
 * is tried again at the next heartbeat. The receiver takes only a stopped sandbox whose record
 * names the sender as its host.
 */
export class SandboxMover {
  #running: Promise<number> | null = null;
  /** Per sandbox, when a move that failed is tried again (doubling from a minute to an hour). */
  readonly #retry = new Map<string, { at: number; delayMs: number }>();
  /** Sandboxes being taken in here now (a second adopt of one is refused). */
  readonly #adopting = new Set<string>();

  constructor(private readonly o: SandboxMoverOptions) {}

  /** Waits for a pass under way (at shutdown). */
  async close(): Promise<void> {
    await this.#running?.catch(() => {});
  }

  /** Moves what can move now (one pass; a pass under way is not doubled); resolves to how many moved. */
  moveStopped(): Promise<number> {
    this.#running ??= this.#pass().finally(() => (this.#running = null));
    return this.#running;
  }

  async #pass(): Promise<number> {
    let moved = 0;
    const own = (await this.o.sandboxes.listAll()).filter((r) => r.hostId === this.o.hostId && r.status === 'stopped' && !r.pool && r.orgId);
    for (const r of own) {
      if ((this.#retry.get(r.id)?.at ?? 0) > Date.now()) continue;
      // Undrained (or fenced, lost) meanwhile: the rest stay.
      if ((await this.o.hosts.findById(this.o.hostId))?.state !== 'draining') break;
      const image = await this.o.images.findById(r.imageId);
      if (!image || image.hostId) continue; // its layers are here (or its image is gone): it stays
      // A slot elsewhere first: a full fleet costs no capture.
      let placed: Placed;
      try {
        placed = await this.o.placement.place({ cpu: r.cpu, memMb: r.mem });
      } catch (err) {
        this.#failed(r.id, err);
        continue;
      }
      if (placed.host.id === this.o.hostId) {
        await placed.release();
        break;
      }
      await mkdir(this.o.workDir, { recursive: true, mode: 0o700 });
      const file = join(this.o.workDir, `${r.id}.${randomUUID()}.out.tar.gz`);
      let taken = false;
      try {
        const to = await this.o.service.moveOut(r.id, file, this.o.maxBytes ?? Number.MAX_SAFE_INTEGER, async (record) => {
          await this.#post(placed.host, record, file);
          taken = true;
          return { hostId: placed.host.id, commit: () => placed.assign(record.id) };
        });
        if (!to) {
          await placed.release();
          continue;
        }
        moved++;
        this.#retry.delete(r.id);
        const slot = (await this.o.slots.listByHost(this.o.hostId)).find((s) => s.sandboxId === r.id);
        if (slot) await this.o.slots.release(slot);
        this.o.log.info({ sandbox: r.id, to }, `fleet: moved stopped sandbox ${r.id} to host ${to} (this host is draining)`);
      } catch (err) {
        // Not taken there: its slot there goes. Taken (its record did not follow): that host removes its copy (see adopt).
        if (!taken) await placed.release().catch(() => {});
        this.#failed(r.id, err);
      } finally {
        await rm(file, { force: true });
      }
    }
    return moved;
  }

  #failed(id: string, err: unknown): void {
    const delayMs = Math.min(60 * 60_000, (this.#retry.get(id)?.delayMs ?? 30_000) * 2);
    this.#retry.set(id, { at: Date.now() + delayMs, delayMs });
    this.o.log.warn({ sandbox: id, err: (err as Error).message }, `fleet: could not move stopped sandbox ${id} off this draining host; trying again in ${Math.round(delayMs / 60_000)} min`);
  }

  #post(host: HostRecord, record: SandboxRecord, file: string): Promise<void> {
    const { host: hostname, port } = splitAddress(host.address);
    return stat(file).then(
      (st) =>
        new Promise<void>((resolve, reject) => {
          const req = request(
            {
              host: hostname,
              port,
              method: 'POST',
              path: `${INTERNAL_ADOPT_PATH}?sandbox=${record.id}&from=${encodeURIComponent(this.o.hostId)}`,
              headers: { [CLUSTER_TOKEN_HEADER]: this.o.token, 'content-type': 'application/gzip', 'content-length': st.size },
            },
            (res) => {
              let text = '';
              res.setEncoding('utf8');
              res.on('data', (c: string) => (text.length < 4096 ? (text += c) : undefined));
              res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`host ${host.id} refused the sandbox (HTTP ${res.statusCode}): ${text.slice(0, 500)}`))));
              res.on('error', reject);
            },
          );
          req.on('error', reject);
          // A host that stops answering does not hold the sandbox's lock here for good.
          req.setTimeout(MOVE_IDLE_MS, () => req.destroy(new Error(`host ${host.id} sent nothing for ${MOVE_IDLE_MS / 60_000} minutes`)));
          createReadStream(file).on('error', reject).pipe(req);
        }),
    );
  }

  /**
   * The receiving host's internal route: takes a stopped sandbox another host of the fleet sends.
   * Its copy here is checked again later: if the record never came to name this host (the sender
   * failed after the restore), the copy is removed.
   */
  async adopt(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://internal');
    const id = url.searchParams.get('sandbox') ?? '';
    const from = url.searchParams.get('from') ?? '';
    let file: string | null = null;
    let mine = false;
    try {
      if (!isObjectIdHex(id) || !from) throw new InvalidInputError('adopt needs ?sandbox=<id>&from=<hostId>');
      if (this.#adopting.has(id)) throw new ConflictError(`Sandbox ${id} is being taken in here already`);
      this.#adopting.add(id);
      mine = true;
      const record = await this.o.sandboxes.findByIdInAnyOrg(id);
      if (!record || record.hostId !== from || record.status !== 'stopped' || record.pool || from === this.o.hostId) {
        throw new ConflictError(`Sandbox ${id} is not a stopped sandbox of host ${from}`);
      }
      const declared = Number(req.headers['content-length'] ?? NaN);
      if (this.o.maxBytes !== null && !(declared <= this.o.maxBytes)) throw new PayloadTooLargeError(`A moved sandbox's capture is at most SNAPSHOT_MAX_BYTES (${this.o.maxBytes})`);
      await mkdir(this.o.workDir, { recursive: true, mode: 0o700 });
      file = join(this.o.workDir, `${id}.${randomUUID()}.in.tar.gz`);
      let received = 0;
      req.on('data', (c: Buffer) => {
        received += c.length;
        if (this.o.maxBytes !== null && received > this.o.maxBytes) req.destroy(new PayloadTooLargeError('past its content-length'));
      });
      await pipeline(req, createWriteStream(file, { mode: 0o600 }));
      await this.o.service.adoptMoved(record, file);
      setTimeout(() => void this.#dropIfNotMine(id), ORPHAN_CHECK_MS).unref();
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ok: true }));
    } catch (err) {
      req.resume();
      if (!(err instanceof DomainError)) this.o.log.warn({ sandbox: id, from, err: (err as Error).message }, 'fleet: could not take a sandbox moved from another host');
      if (!res.headersSent) sendError(res, err instanceof DomainError ? err : new ConflictError(`Sandbox ${id} could not be restored on host ${this.o.hostId} (its log says why)`));
    } finally {
      if (mine) this.#adopting.delete(id);
      if (file) await rm(file, { force: true });
    }
  }

  /** Removes the copy of a sandbox taken in here whose record does not name this host (its move failed after the restore). */
  async #dropIfNotMine(id: string): Promise<void> {
    try {
      const record = await this.o.sandboxes.findByIdInAnyOrg(id);
      if (record?.hostId === this.o.hostId || this.#adopting.has(id)) return;
      await this.o.service.dropCopy(id);
      this.o.log.info({ sandbox: id }, `fleet: removed the copy of sandbox ${id} taken in here (its move did not complete)`);
    } catch (err) {
      this.o.log.warn({ sandbox: id, err: (err as Error).message }, 'fleet: could not check a sandbox taken in here');
    }
  }
}
