import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { availableParallelism, totalmem } from 'node:os';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { hostPlacementSlots, type Config } from './config.js';
import { withSandboxCache } from './store/sandbox-cache.js';
import { withAuthCaches } from './store/auth-caches.js';
import { createHttpServer, type HttpServer } from './http/server.js';
import { HttpMetrics } from './http/metrics.js';
import { corsPolicy } from './http/cors.js';
import { sandboxSampler } from './services/sandbox-usage.js';
import { buildOpenApiDocument, openApiYaml } from './http/openapi-document.js';
import { appRouter } from './routers/index.js';
import { AuthService } from './services/auth-service.js';
import { readBuildInfo } from './services/build-info.js';
import type { Services } from './services/index.js';
import { LastUsedTracker } from './services/last-used-tracker.js';
import { OrgService } from './services/org-service.js';
import { openStore } from './store/index.js';
import { ensureAgentBundle } from './agent-client/agent-bundle.js';
import { AgentClients } from './agent-client/agent-clients.js';
import { RootfsImages } from './hypervisor/images/rootfs-images.js';
import { LayerStore } from './hypervisor/images/layer-store.js';
import { selectDriver } from './hypervisor/select-driver.js';
import { VmImages } from './hypervisor/vm/vm-images.js';
import { ExecService } from './services/exec-service.js';
import { FileService } from './services/file-service.js';
import { PtyService } from './services/pty-service.js';
import { PortService } from './services/port-service.js';
import { PreviewTokens } from './services/preview-tokens.js';
import { WatchService } from './services/watch-service.js';
import { HealthMonitor } from './services/health-monitor.js';
import { ImageService } from './services/image-service.js';
import { createImageBuilds } from './services/image-build-setup.js';
import { ImageImports } from './services/image-imports.js';
import { SandboxService } from './services/sandbox-service.js';
import { SandboxEventService } from './services/sandbox-events.js';
import { WebhookService } from './services/webhooks.js';
import { HostEventPoller } from './services/host-events.js';
import { ActivityTracker } from './services/activity.js';
import { LifecyclePolicy } from './services/lifecycle-policy.js';
import { WarmPool } from './services/warm-pool.js';
import { IDEMPOTENCY_FLEET_LEASE_MS, IdempotencyService } from './services/idempotency.js';
import { SandboxEgress } from './hypervisor/network/sandbox-egress.js';
import { canSnapshot, countsNetworkBytes, type SandboxDriver } from './hypervisor/types.js';
import { hostLimits, SandboxQuotas } from './services/sandbox-quotas.js';
import type { SandboxRepository, Store } from './store/types.js';
import { nodeIdOf, advertisedAddress } from './services/fleet/node-identity.js';
import { hostIpLeases, hostSandboxes, HostMembership, LostHostSweeper, lostLifecycle } from './services/fleet/host-membership.js';
import { HostRegistry } from './services/fleet/host-registry.js';
import { Placement } from './services/fleet/placement.js';
import { Forwarder } from './services/fleet/forwarder.js';
import { FleetAdmin } from './services/fleet/fleet-admin.js';
import { KeyEndWatch } from './services/fleet/key-end-watch.js';
import { SandboxMover } from './services/fleet/sandbox-mover.js';

export interface App {
  config: Config;
  store: Store;
  services: Services;
  log: Logger;
  http: HttpServer;
  /** Starts listening; resolves with the bound address (port 0 picks a free port). */
  listen(): Promise<AddressInfo>;
  /** Stops the HTTP server, flushes pending writes and closes the store. */
  close(): Promise<void>;
}

export interface AppOptions {
  /** Defaults to a pino logger at `config.LOG_LEVEL` on stdout, written off the event loop (see `stdoutLogger`). */
  log?: Logger;
}

/** The composition root: builds the store, services and HTTP server from a config. */
export async function createApp(config: Config, options: AppOptions = {}): Promise<App> {
  const stdout = options.log ? null : stdoutLogger(config.LOG_LEVEL);
  const log = options.log ?? stdout!.log;
  const role = config.VOIDRUN_ROLE;
  const nodeId = nodeIdOf(config.DATA_DIR);
  // Sandbox, API key and org lookups (one per exec, file call, keystroke; one per request) come from
  // memory where that is safe: in one process (VOIDRUN_ROLE=all). In a fleet another node writes
  // keys and sandbox records, and this node's caches would not hear of it.
  const opened = await openStore(config);
  const store = role === 'all' ? withAuthCaches(withSandboxCache(opened)) : opened;
  // A fleet host's loops see only its own sandboxes, and what it creates names it (README "Fleet").
  // Sandboxes this host moved to others while draining (README "Fleet"): its view answers them as moved.
  const movedAway = new Set<string>();
  const ownSandboxes = role === 'host' ? hostSandboxes(store.sandboxes, nodeId, store.hostSlots, movedAway) : store.sandboxes;
  // One replayable event stream per sandbox, and the org webhooks it feeds (README "Events and webhooks").
  const events = new SandboxEventService({
    repository: store.sandboxEvents,
    authorize: async (principal, id): Promise<void> => void (await sandboxes.record(principal, id)),
    log,
    retention: config.EVENTS_RETENTION,
    maxQueued: config.EVENTS_QUEUE_MAX,
    pruneIntervalMs: config.EVENTS_PRUNE_INTERVAL_SEC * 1000,
    rate: { perSecond: config.EVENTS_SANDBOX_RATE, burst: config.EVENTS_SANDBOX_BURST },
  });
  const webhooks = new WebhookService({
    webhooks: store.webhooks,
    deliveries: store.webhookDeliveries,
    orgs: store.orgs,
    log,
    maxAttempts: config.WEBHOOK_MAX_ATTEMPTS,
    retryBaseMs: config.WEBHOOK_RETRY_BASE_MS,
    timeoutMs: config.WEBHOOK_TIMEOUT_MS,
    maxInFlightPerOrg: config.WEBHOOK_MAX_IN_FLIGHT_PER_ORG,
    maxPendingPerOrg: config.WEBHOOK_MAX_PENDING_PER_ORG,
    maxPerOrg: config.ORG_MAX_WEBHOOKS,
    allowPrivate: config.WEBHOOK_ALLOW_PRIVATE,
    // Alone, every stored delivery is this server's; in a fleet the sweep takes up the overdue ones.
    resumeAtStart: role === 'all',
  });
  events.onWritten((event) => webhooks.handle(event));
  await webhooks.start();
  // Events of sandboxes whose deletion was cut short (the server stopped between the record and its stream).
  await events.removeOrphans(new Set((await store.sandboxes.listAll()).map((r) => r.id)), async (id) => (await store.sandboxes.findByIdInAnyOrg(id)) !== null);
  const lastUsed = new LastUsedTracker(store.apiKeys, log, config.API_KEY_LAST_USED_FLUSH_SEC * 1000);
  const serverNetwork = { egress: config.SANDBOX_DEFAULT_EGRESS, maxEgressBytes: config.SANDBOX_EGRESS_BYTES_MAX || null, privateAllow: config.SANDBOX_PRIVATE_ALLOW };
  const orgs = new OrgService({ store, lastUsed, network: serverNetwork, log });

  const idMap = { hostId: config.SANDBOX_UID_BASE, size: 65536 };
  const layers = new LayerStore({ baseImagesDir: config.BASE_IMAGES_DIR, log, uidBase: config.SANDBOX_UID_BASE });
  const rootfs = new RootfsImages({ baseImagesDir: config.BASE_IMAGES_DIR, idMap, mirror: config.DEBIAN_MIRROR, log, layers });
  const images = new ImageService({
    images: store.images,
    rootfs,
    layers,
    sandboxes: store.sandboxes,
    defaultImage: config.SANDBOX_DEFAULT_IMAGE,
    maxBuildsPerOrg: config.IMAGE_BUILDS_PER_ORG,
    layerCacheTtlMs: config.IMAGE_LAYER_CACHE_TTL_SEC * 1000,
    // Layers the sandboxes here mount (their `lower` files) stay through a layer GC.
    instancesDir: config.INSTANCES_DIR,
    snapshotsDir: config.SNAPSHOTS_DIR,
    ...(role === 'host' ? { hostId: nodeId } : {}),
    ...(role === 'api' ? { prepareRootfs: false } : {}),
    log,
  });
  const vmImages = new VmImages({ baseImagesDir: config.BASE_IMAGES_DIR, rootfs, containerUidBase: config.SANDBOX_UID_BASE, instancesDir: config.INSTANCES_DIR, log });
  // Sandboxes' egress on the bridge: the nftables firewall, the DNS resolver on the gateway, the byte caps.
  const egress = new SandboxEgress({ bridge: config.BRIDGE_NAME, gatewayCidr: config.GATEWAY_IP, networkCidr: config.NETWORK_CIDR, nameservers: config.DNS_NAMESERVERS, privateAllow: config.SANDBOX_PRIVATE_ALLOW, egressCeiling: config.SANDBOX_EGRESS_BYTES_MAX || null, log });
  const { driver, reason, accelerator, network } =
    role === 'api'
      ? { driver: null, reason: 'this is an API node (VOIDRUN_ROLE=api): sandboxes run on the fleet hosts', accelerator: undefined, network: { mode: 'none' as const, reason: 'an API node runs no sandboxes' } }
      : await selectDriver(config, { agent: await ensureAgentBundle(), idMap, vmImages, ipLeases: role === 'host' ? hostIpLeases(store.ipLeases, nodeId) : store.ipLeases, firewall: egress.firewall, log });
  if (network.mode === 'bridge') await egress.start();
  // Asked for and not possible here: a warning, as sandboxes will have no network.
  const networkLog = config.SANDBOX_NETWORK === 'bridge' && network.mode !== 'bridge' ? log.warn.bind(log) : log.info.bind(log);
  networkLog({ network: network.mode }, `sandbox network: ${network.reason}`);
  if (driver) log.info({ driver: driver.name }, `sandbox driver: ${driver.name} (${reason})`);
  else if (role === 'api') log.info({ role, nodeId }, `fleet: ${reason}`);
  else log.warn(`no sandbox driver: ${reason}; sandbox requests will answer 503`);
  // A reply may carry a command's stdout and stderr up to the output limit each, JSON-escaped.
  const agents = driver
    ? new AgentClients(driver, {
        maxMessageBytes: Math.max(16 * 1024 * 1024, 6 * config.EXEC_OUTPUT_LIMIT_BYTES + 1024 * 1024),
        // An unreachable or lying agent: refresh the sandbox's status before the caller hears of it.
        onUnavailable: async (ref, err) => {
          const record = await store.sandboxes.findById(ref.orgId, ref.id);
          const status = record ? await sandboxes.reconcile(record) : null;
          log.warn({ sandbox: ref.id, status, reason: err.message }, 'sandbox agent call failed');
        },
      })
    : null;
  // Idle policies' activity (API calls, open streams and connections), in memory.
  const activity = new ActivityTracker();
  const quotas = new SandboxQuotas({
    sandboxes: store.sandboxes,
    // The layers an org's images keep count against ORG_MAX_DISK_MB, each once (README "Images").
    images: store.images,
    layerBytes: (id) => layers.bytesOf(id),
    snapshotsDir: config.SNAPSHOTS_DIR,
    org: { sandboxes: config.ORG_MAX_SANDBOXES, vcpus: config.ORG_MAX_VCPUS, memoryMb: config.ORG_MAX_MEMORY_MB, diskMb: config.ORG_MAX_DISK_MB },
    snapshotMaxBytes: config.SNAPSHOT_MAX_BYTES,
    ...(role === 'host' ? { hostId: nodeId } : {}),
    // Each container holds a budget of SANDBOX_PIDS_LIMIT pids; the host's pid space bounds their number.
    host: hostLimits({ diskDir: config.INSTANCES_DIR, pidsLimit: driver?.name === 'container' ? config.SANDBOX_PIDS_LIMIT : null, reservedPids: config.HOST_RESERVED_PIDS, memoryCommitPercent: config.HOST_MEMORY_COMMIT_PERCENT, diskCommitPercent: config.HOST_DISK_COMMIT_PERCENT }),
  });
  images.useQuotas(quotas);
  const sandboxes = new SandboxService({
    movedAway,
    lifecycle: { activity, tombstones: store.sandboxTombstones, maxTimeoutSec: config.SANDBOX_MAX_TIMEOUT_SEC, defaultTimeoutSec: config.SANDBOX_DEFAULT_TIMEOUT_SEC },
    sandboxes: ownSandboxes,
    images,
    driver,
    driverUnavailable: reason,
    agents,
    snapshotsDir: config.SNAPSHOTS_DIR,
    events,
    agentSettings: { VOIDRUN_PTY_IDLE_SEC: String(config.PTY_IDLE_TIMEOUT_SEC), VOIDRUN_WATCH_IDLE_SEC: String(config.WATCH_IDLE_TIMEOUT_SEC) },
    hostPaths: [config.INSTANCES_DIR, config.BASE_IMAGES_DIR, config.SNAPSHOTS_DIR, config.DATA_DIR, config.RUNC_ROOT],
    defaults: { cpu: config.SANDBOX_DEFAULT_VCPUS, memMb: config.SANDBOX_DEFAULT_MEMORY_MB, diskMb: config.SANDBOX_DEFAULT_DISK_MB, listLimit: config.SANDBOX_LIST_DEFAULT_LIMIT },
    network: {
      // SANDBOX_NETWORK as resolved on this host (bridge where it can, else loopback only).
      mode: network.mode,
      ...(network.bridgeUnavailable ? { bridgeUnavailable: network.bridgeUnavailable } : {}),
      ...serverNetwork,
      enforce: (id, policy) => egress.enforce(id, policy),
      forOrg: async (orgId) => (await store.orgs.findById(orgId))?.network,
    },
    quotas,
    log,
  });
  const watch = new WatchService({ sandboxes, maxSessionsPerOrg: config.ORG_MAX_WATCH_SESSIONS, log, events });
  sandboxes.onStopped((id) => watch.endForSandbox(id));
  const auth = new AuthService({ apiKeys: store.apiKeys, orgs: store.orgs, lastUsed });
  // Timeouts and idle policies act on sandboxes through the service (README "Lifecycle: timeouts, idle and auto-resume").
  const lifecycle = new LifecyclePolicy({
    sandboxes: ownSandboxes,
    tombstones: store.sandboxTombstones,
    service: sandboxes,
    activity,
    driver,
    tickMs: config.LIFECYCLE_TICK_MS,
    idleCpuPercent: config.SANDBOX_IDLE_CPU_PERCENT,
    events,
    log,
  });
  // Recipe builds run in container sandboxes: this server's when it runs containers, else (a VM
  // driver) a container driver of their own with loopback-only sandboxes; none without runc.
  const imageBuilds = role === 'api' ? null : await createImageBuilds({
    config,
    layers,
    rootfs,
    log,
    images: images.repositoryForBuilds(),
    ...(role === 'host' ? { hostId: nodeId } : {}),
    budget: (orgId: string) => images.diskBudget(orgId, 'this image build').catch(() => 0),
    ...(driver && agents && driver.name === 'container' && canSnapshot(driver) ? { container: { driver, agents, network: sandboxes.defaultNetwork() } } : {}),
  }).catch((err: Error) => {
    log.warn({ err: err.message }, `image builds are not available: ${err.message}`);
    return null;
  });
  if (imageBuilds) images.useBuilds(imageBuilds.builds);
  const services: Services = {
    auth,
    orgs,
    sandboxes,
    exec: new ExecService({ sandboxes, limits: { maxOutputBytes: config.EXEC_OUTPUT_LIMIT_BYTES }, log, events, activity }),
    images,
    imageImports: new ImageImports({
      images,
      layers,
      baseImagesDir: config.BASE_IMAGES_DIR,
      uidBase: config.SANDBOX_UID_BASE,
      maxBytes: config.IMAGE_IMPORT_MAX_BYTES,
      maxFiles: config.IMAGE_IMPORT_MAX_FILES,
      log,
    }),
    files: new FileService({ sandboxes, maxUploadBytes: config.MAX_UPLOAD_BYTES }),
    watch,
    pty: new PtyService({ sandboxes, events }),
    lifecycle,
    activity,
    events,
    webhooks,
    ports: new PortService({
      sandboxes,
      repository: store.sandboxes,
      auth,
      tokens: PreviewTokens.fromDataDir(config.DATA_DIR),
      previewDomain: config.PREVIEW_DOMAIN,
      previewScheme: config.PREVIEW_URL_SCHEME,
    }),
    // In a fleet another node may be running a claim made before this one started: leases tell.
    idempotency: new IdempotencyService({ repository: store.idempotency, log, maxKeysPerOrg: config.IDEMPOTENCY_MAX_KEYS_PER_ORG, ...(role === 'all' ? {} : { leaseMs: IDEMPOTENCY_FLEET_LEASE_MS }) }),
    fleetAdmin: new FleetAdmin({ hosts: store.hosts, slots: store.hostSlots, sandboxes: store.sandboxes, adminKey: config.ADMIN_API_KEY }),
    buildInfo: { ...readBuildInfo({ commit: config.VOIDRUN_COMMIT, buildTime: config.VOIDRUN_BUILD_TIME }), driver: { name: driver?.name ?? null, accelerator, reason }, role, nodeId },
  };
  const systemUser = await orgs.ensureSystemUser(config.SYSTEM_USER_NAME, config.SYSTEM_USER_EMAIL);
  await images.seedSystemImages(systemUser.id);
  // Unused layers go hourly (and after each image delete), once past IMAGE_LAYER_CACHE_TTL_SEC.
  images.start();

  let warmPool: WarmPool | null = null;
  let hostEvents: HostEventPoller | null = null;
  const health = driver
    ? new HealthMonitor({ sandboxes: ownSandboxes, service: sandboxes, driver, intervalMs: config.HEALTH_INTERVAL_SEC * 1000, concurrency: config.HEALTH_CONCURRENCY, log, events })
    : null;
  if (health) {
    await health.adopt();
    if (network.mode === 'bridge') await adoptEgress(egress, ownSandboxes, sandboxes, driver!, log);
    if (config.HEALTH_ENABLED) health.start();
    // Port open/close and OOM kills, read on the host every EVENTS_POLL_INTERVAL_SEC.
    hostEvents = new HostEventPoller({ driver: driver!, sandboxes: ownSandboxes, events, onWritten: (l) => events.onWritten(l), intervalMs: config.EVENTS_POLL_INTERVAL_SEC * 1000, concurrency: config.HEALTH_CONCURRENCY, log });
    await hostEvents.start();
    // After adoption, so statuses are the driver's: sandboxes that expired while the server was down are acted on now.
    await lifecycle.start();
    // After adoption removed the build sandboxes a stopped server left: builds it left 'building' run again.
    await imageBuilds?.builds.resume();
    // After the health monitor's adoption (which knows pool members by their records): members
    // still running are kept; with WARM_POOL empty, any a previous run left are removed.
    warmPool = new WarmPool({
      entries: config.WARM_POOL,
      service: sandboxes,
      sandboxes: ownSandboxes,
      claims: store.poolClaims,
      images,
      diskMb: config.SANDBOX_DEFAULT_DISK_MB,
      networkMode: network.mode,
      log,
    });
    await warmPool.start();
    sandboxes.useWarmPool(warmPool);
    // Build the default image now, so the first sandbox does not wait for debootstrap.
    if (config.PREPARE_DEFAULT_IMAGE) images.prepareDefault().catch((err: Error) => log.error({ err: err.message }, 'could not prepare the default image'));
  }

  const openApiDoc = buildOpenApiDocument(appRouter, services.buildInfo.version);
  // One store listing and one host-side read per sandbox serve every sandbox gauge of a scrape.
  const sampleSandboxes = sandboxSampler({ sandboxes: ownSandboxes, driver, concurrency: config.METRICS_CONCURRENCY });
  const metrics = new HttpMetrics();
  metrics.addSandboxGauge(async () => {
    const counts: Record<string, number> = { creating: 0, running: 0, stopped: 0, paused: 0, error: 0 };
    for (const { record } of await sampleSandboxes()) counts[record.status] = (counts[record.status] ?? 0) + 1;
    return counts;
  });
  // In a fleet a host's series are labelled with its node id (what the admin routes call it).
  metrics.addSandboxGauges(sampleSandboxes, { perSandbox: Boolean(config.METRICS_TOKEN), ...(role === 'all' ? {} : { host: nodeId }) });
  metrics.addNodeInfo(role, nodeId);
  if (role === 'api') metrics.addFleetGauges(() => services.fleetAdmin.list());
  // The fleet (README "Fleet"): API nodes place creates and forward sandbox requests to hosts;
  // hosts register, heartbeat and serve API nodes on their internal listener.
  const deadAfterMs = config.HOST_DEAD_AFTER_SEC * 1000;
  const placement = role === 'all' ? null : new Placement({ hosts: store.hosts, slots: store.hostSlots, deadAfterMs });
  const forwarder =
    role === 'api'
      ? new Forwarder({ sandboxes: store.sandboxes, hosts: store.hosts, token: config.CLUSTER_TOKEN!, deadAfterMs, maxLineBytes: Math.max(16 * 1024 * 1024, 8 * config.EXEC_OUTPUT_LIMIT_BYTES + 1024 * 1024), log })
      : null;
  const sweeper =
    role === 'api'
      ? new LostHostSweeper({ hosts: store.hosts, epochs: store.hostEpochs, slots: store.hostSlots, sandboxes: store.sandboxes, images: store.images, deadAfterMs, intervalMs: config.HOST_HEARTBEAT_SEC * 1000, log, onLost: (r) => events.emit({ sandboxId: r.id, orgId: r.orgId, type: 'sandbox.error', data: { reason: 'host-lost' } }), onNotServing: (hostId) => forwarder!.cutHost(hostId) })
      : null;
  // A draining host moves its stopped sandboxes to the others; every host takes them in.
  const mover =
    role === 'host'
      ? new SandboxMover({ hostId: nodeId, hosts: store.hosts, sandboxes: store.sandboxes, images: store.images, slots: store.hostSlots, placement: placement!, service: sandboxes, token: config.CLUSTER_TOKEN!, workDir: join(config.DATA_DIR, 'moving'), maxBytes: config.SNAPSHOT_MAX_BYTES, log })
      : null;
  const membership =
    role === 'host'
      ? new HostMembership({
          registry: new HostRegistry(store.hosts, store.hostEpochs),
          slots: store.hostSlots,
          placement: placement!,
          sandboxes: ownSandboxes,
          hosts: store.hosts,
          whileDraining: () => mover!.moveStopped(),
          heartbeatMs: config.HOST_HEARTBEAT_SEC * 1000,
          log,
          identity: async () => ({
            id: nodeId,
            address: advertisedAddress(config.HOST_ADVERTISE_ADDRESS, config.HOST_INTERNAL_PORT),
            capacity: { cpu: availableParallelism(), memoryMb: Math.floor(totalmem() / 2 ** 20), diskMb: 0, slots: hostPlacementSlots(config) },
            labels: { driver: driver?.name ?? 'none', kvm: String(accelerator === 'kvm') },
            images: [],
          }),
          // Given up while away: every sandbox it had is lost (the fleet says so), and its runtime is stopped.
          reconcile: async () => {
            const at = new Date().toISOString();
            for (const r of await ownSandboxes.listAll()) {
              const lost = r.status === 'error' && r.lifecycle?.endedReason === 'host-lost' ? r : await ownSandboxes.update(r.orgId, r.id, { status: 'error', lifecycle: lostLifecycle(r, at) });
              if (lost) await sandboxes.reconcile(lost).catch(() => {});
            }
          },
        })
      : null;
  const http = createHttpServer({
    router: appRouter,
    ...(forwarder ? { fleet: { forwarder, placement: placement! } } : {}),
    ...(role === 'host' ? { clusterToken: config.CLUSTER_TOKEN!, adopt: (req: IncomingMessage, res: ServerResponse) => mover!.adopt(req, res) } : {}),
    services,
    log,
    metrics,
    openApi: lazyYaml(JSON.stringify(openApiDoc)),
    maxJsonBodyBytes: config.MAX_JSON_BODY_BYTES,
    limits: {
      maxBatchSize: config.TRPC_MAX_BATCH_SIZE,
      maxExecsPerOrg: config.ORG_MAX_CONCURRENT_EXECS,
      maxStreamsPerOrg: config.ORG_MAX_STREAMS,
      headersTimeoutMs: config.HTTP_HEADERS_TIMEOUT_MS,
      requestTimeoutMs: config.HTTP_REQUEST_TIMEOUT_MS,
      maxConnections: config.HTTP_MAX_CONNECTIONS,
      maxConnectionsPerAddress: config.HTTP_MAX_CONNECTIONS_PER_ADDRESS,
      wsAuthTimeoutMs: config.WS_AUTH_TIMEOUT_MS,
      portAnswerTimeoutMs: config.PORT_ANSWER_TIMEOUT_MS,
    },
    metricsToken: config.METRICS_TOKEN,
    metricsPath: config.METRICS_ENABLED ? config.METRICS_PATH : null,
    cors: corsPolicy(config),
  });
  // A revoked or deactivated key's open streams, terminals and WebSockets close at once; in a
  // fleet, those open on the other nodes within a heartbeat interval (each re-reads its keys).
  orgs.onKeyEnded((keyId) => http.streams.closeKey(keyId));
  const keyEndWatch =
    role === 'all'
      ? null
      : new KeyEndWatch({ apiKeys: store.apiKeys, trackedKeys: () => http.streams.trackedKeys(), closeKey: (id) => http.streams.closeKey(id), intervalMs: config.HOST_HEARTBEAT_SEC * 1000, log });

  return {
    config,
    store,
    services,
    log,
    http,
    listen() {
      return new Promise((resolve, reject) => {
        http.server.once('error', reject);
        http.server.listen(config.SERVER_PORT, config.SERVER_HOST || undefined, () => {
          http.server.off('error', reject);
          resolve(http.server.address() as AddressInfo);
        });
      }).then(async (address) => {
        if (http.internal) {
          await new Promise<void>((resolve, reject) => {
            http.internal!.once('error', reject);
            http.internal!.listen(config.HOST_INTERNAL_PORT, () => {
              http.internal!.off('error', reject);
              resolve();
            });
          });
          await membership?.start();
        }
        sweeper?.start();
        keyEndWatch?.start();
        return address as AddressInfo;
      });
    },
    async close() {
      await sweeper?.stop();
      keyEndWatch?.stop();
      await membership?.stop();
      await mover?.close();
      forwarder?.close();
      // Streams first (they end when their agent connections close), then the HTTP server.
      await lifecycle.stop();
      images.stop();
      await imageBuilds?.close();
      await health?.stop();
      await hostEvents?.stop();
      await warmPool?.close();
      services.idempotency.close();
      await egress.stop();
      watch.closeAll();
      await agents?.closeAll();
      await http.close();
      await webhooks.close();
      await events.close();
      await lastUsed.close();
      await store.close();
      // Every line logged so far reaches stdout before the process exits.
      await stdout?.flushed();
    },
  };
}

/**
 * Takes up the egress rules of sandboxes that ran through a restart, removes those of sandboxes
 * gone, and starts cutting egress at byte caps (host counters, once a second).
 */
async function adoptEgress(egress: SandboxEgress, repository: SandboxRepository, sandboxes: SandboxService, driver: SandboxDriver, log: Logger): Promise<void> {
  const records = await repository.listAll();
  const running = records.filter((r) => r.status === 'running' && r.network.mode === 'bridge').map((r) => ({ id: r.id, policy: r.network }));
  for (const change of await egress.adopt(running, new Set(records.map((r) => r.id)))) log.warn(`startup reconcile: ${change}`);
  if (!countsNetworkBytes(driver)) return;
  egress.watchCaps({
    bytesOf: (id) => driver.networkBytes(id),
    cut: async (id, egressBytes) => {
      const record = (await repository.listAll()).find((r) => r.id === id);
      if (record) await sandboxes.cutEgress(record, egressBytes);
    },
  });
}

/**
 * The OpenAPI document as JSON, and as YAML rendered from it on first use (rendering at start would
 * keep the YAML library's garbage and a second copy of the document for every server, most of which
 * never serve it).
 */
function lazyYaml(json: string): { json: string; readonly yaml: string } {
  let yaml: string | undefined;
  return {
    json,
    get yaml() {
      return (yaml ??= openApiYaml(JSON.parse(json) as Parameters<typeof openApiYaml>[0]));
    },
  };
}

/** How long a logged line may wait to be batched with others before it is written. */
const LOG_BATCH_MS = 50;
/** Queued log text past this is written at once. */
const LOG_BATCH_BYTES = 16 * 1024;

/**
 * The server's own logger: JSON lines on stdout, off the request path. Lines are queued and
 * written together at most `LOG_BATCH_MS` later (or once `LOG_BATCH_BYTES` are queued), through an
 * asynchronous destination (sonic-boom, `sync: false`): a request never waits for a write, and a
 * busy server makes one write per batch, not one per line. `flushed` resolves once every line
 * logged before it was called has been written (or stdout failed); `close` awaits it.
 */
function stdoutLogger(level: Config['LOG_LEVEL']): { log: Logger; flushed(): Promise<void> } {
  const dest = pino.destination({ dest: 1, sync: false });
  let queued = '';
  let timer: NodeJS.Timeout | null = null;
  const writeQueued = () => {
    if (timer) clearTimeout(timer);
    timer = null;
    if (queued) dest.write(queued);
    queued = '';
  };
  const batch = {
    write(line: string) {
      queued += line;
      if (queued.length >= LOG_BATCH_BYTES) writeQueued();
      else timer ??= setTimeout(writeQueued, LOG_BATCH_MS).unref();
    },
  };
  return {
    log: pino({ level, base: undefined }, batch),
    flushed: () => {
      writeQueued();
      return new Promise<void>((resolve) => {
        // An empty write queues behind what is pending; 'drain' follows once the queue is empty.
        const done = () => {
          dest.off('drain', done);
          dest.off('error', done);
          resolve();
        };
        dest.once('drain', done);
        dest.once('error', done);
        dest.write('');
      });
    },
  };
}
