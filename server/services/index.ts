import type { VersionInfo } from '../../shared/index.js';
import type { AuthService } from './auth-service.js';
import type { ExecService } from './exec-service.js';
import type { FileService } from './file-service.js';
import type { IdempotencyService } from './idempotency.js';
import type { ImageService } from './image-service.js';
import type { ImageImports } from './image-imports.js';
import type { OrgService } from './org-service.js';
import type { PortService } from './port-service.js';
import type { PtyService } from './pty-service.js';
import type { SandboxService } from './sandbox-service.js';
import type { WatchService } from './watch-service.js';
import type { LifecyclePolicy } from './lifecycle-policy.js';
import type { ActivityTracker } from './activity.js';
import type { SandboxEventService } from './sandbox-events.js';
import type { WebhookService } from './webhooks.js';
import type { FleetAdmin } from './fleet/fleet-admin.js';

/** Every service, built once in the composition root (`server/app.ts`) and reached through the tRPC context. */
export interface Services {
  auth: AuthService;
  orgs: OrgService;
  sandboxes: SandboxService;
  exec: ExecService;
  images: ImageService;
  /** OCI image archive imports (`POST /images/import`). */
  imageImports: ImageImports;
  files: FileService;
  watch: WatchService;
  pty: PtyService;
  ports: PortService;
  /** Timeouts and idle policies: their routes and the schedule that acts on them. */
  lifecycle: LifecyclePolicy;
  /** What counts as a sandbox being used (idle policies): the HTTP layer holds it for open streams and connections. */
  activity: ActivityTracker;
  events: SandboxEventService;
  webhooks: WebhookService;
  /** Idempotency keys of creates, restores and background commands. */
  idempotency: IdempotencyService;
  buildInfo: VersionInfo;
  /** The fleet's hosts, drain and undrain (ADMIN_API_KEY). */
  fleetAdmin: FleetAdmin;
}
