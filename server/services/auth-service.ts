import { ForbiddenError, InvalidInputError, UnauthorizedError } from '../errors.js';
import { isObjectIdHex } from '../store/ids.js';
import type { ApiKeyRepository, OrgRepository } from '../store/types.js';
import { hashKey } from './api-key-material.js';
import type { LastUsedTracker } from './last-used-tracker.js';

/** Who is calling: the org and key an authenticated request acts for. */
export interface Principal {
  /** The org the request acts in: the key's own, or the one `X-Org-ID` asked for. */
  orgId: string;
  keyId: string;
  /** The user who created the key; requests act on that user's behalf. */
  userId: string;
}

/**
 * Turns a plain API key into a `Principal`. Keys are looked up by their SHA-256 on every request
 * (a unique index; from memory with the embedded store, dropped on every revoke or deactivation, see
 * store/auth-caches.ts), so revoking or deactivating a key takes effect on the next request.
 */
export class AuthService {
  constructor(
    private readonly deps: { apiKeys: ApiKeyRepository; orgs: Pick<OrgRepository, 'findById'>; lastUsed: LastUsedTracker },
  ) {}

  /**
   * `requestedOrgId` (the `X-Org-ID` header) makes the request act in that org instead of the
   * key's, if the key's user owns it or is one of its members: 403 otherwise, 400 when it is not
   * an org id at all. The key is checked first, so a bad key is 401 whatever the header says.
   */
  async authenticate(plainKey: string | null | undefined, requestedOrgId?: string | null): Promise<Principal> {
    if (!plainKey) throw new UnauthorizedError('Missing API key: send it in the X-API-Key header (or as ?apiKey=)');
    const key = await this.deps.apiKeys.findByHash(hashKey(plainKey));
    if (!key) throw new UnauthorizedError('Invalid API key: it does not exist or was revoked');
    if (!key.isActive) throw new UnauthorizedError('This API key is deactivated; reactivate it or use another key');
    this.deps.lastUsed.touch(key.id);
    const principal: Principal = { orgId: key.orgId, keyId: key.id, userId: key.createdBy };
    if (!requestedOrgId || requestedOrgId === key.orgId) return principal;
    return { ...principal, orgId: await this.#memberOrg(requestedOrgId, key.createdBy) };
  }

  async #memberOrg(orgId: string, userId: string): Promise<string> {
    if (!isObjectIdHex(orgId)) throw new InvalidInputError(`Invalid X-Org-ID: ${orgId.slice(0, 64)} is not an organization id (24 hexadecimal characters)`);
    const org = await this.deps.orgs.findById(orgId);
    if (!org || (org.ownerId !== userId && !org.members.includes(userId))) {
      throw new ForbiddenError(`The user of this API key is not a member of organization ${orgId} (X-Org-ID); leave the header out to act in the key's own organization`);
    }
    return org.id;
  }
}
