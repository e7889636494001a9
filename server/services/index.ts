import type { VersionInfo } from '../../shared/index.js';
import type { AuthService } from './auth-service.js';
import type { OrgService } from './org-service.js';

/** Every service, built once in the composition root (`server/app.ts`) and reached through the tRPC context. */
export interface Services {
  auth: AuthService;
  orgs: OrgService;
  buildInfo: VersionInfo;
}
