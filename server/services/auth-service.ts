import { UnauthorizedError } from '../errors.js';
import type { ApiKeyRepository } from '../store/types.js';
import { hashKey } from './api-key-material.js';
import type { LastUsedTracker } from './last-used-tracker.js';

/** Who is calling: the org and key an authenticated request acts for. */
export interface Principal {
  orgId: string;
  keyId: string;
  /** The user who created the key; requests act on that user's behalf. */
  userId: string;
}

/**
 * Turns a plain API key into a `Principal`. Keys are looked up by their SHA-256 on a unique index
 * on every request — no cache — so revoking or deactivating a key takes effect on the next request.
 */
export class AuthService {
  constructor(
    private readonly deps: { apiKeys: ApiKeyRepository; lastUsed: LastUsedTracker },
  ) {}

  async authenticate(plainKey: string | null | undefined): Promise<Principal> {
    if (!plainKey) throw new UnauthorizedError('Missing API key: send it in the X-API-Key header');
    const key = await this.deps.apiKeys.findByHash(hashKey(plainKey));
    if (!key) throw new UnauthorizedError('Invalid API key: it does not exist or was revoked');
    if (!key.isActive) throw new UnauthorizedError('This API key is deactivated; reactivate it or use another key');
    this.deps.lastUsed.touch(key.id);
    return { orgId: key.orgId, keyId: key.id, userId: key.createdBy };
  }
}
