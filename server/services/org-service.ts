import type { Logger } from 'pino';
import type { ApiKey, CurrentUser, EgressDefault, GeneratedApiKey, Organization, OrgNetworkDefaults, OrgNetworkPolicy, OrgUser, RegisterInput, RegisterResult, UpdateOrgNetworkInput } from '../../shared/index.js';
import { egressCapFor, egressCapOrCeiling, ORG_NETWORK_FIELDS, privateAllowError } from '../../shared/index.js';
import { ConflictError, ForbiddenError, InvalidInputError, NotFoundError } from '../errors.js';
import type { ApiKeyRecord, OrgRecord, Store, UserRecord } from '../store/types.js';
import { displayPrefix, generatePlainKey, hashKey } from './api-key-material.js';
import type { Principal } from './auth-service.js';
import type { LastUsedTracker } from './last-used-tracker.js';

const DEFAULT_KEY_NAME = 'Default Key';

/** Registration, organizations and their API keys. */
export class OrgService {
  readonly #keyEnded: ((keyId: string) => void)[] = [];
  constructor(
    private readonly deps: {
      store: Pick<Store, 'users' | 'orgs' | 'apiKeys'>;
      lastUsed: LastUsedTracker;
      /** The server's network defaults (SANDBOX_DEFAULT_EGRESS, SANDBOX_EGRESS_BYTES_MAX), where an org sets none. */
      network: ServerNetworkDefaults;
      log: Logger;
    },
  ) {}

  /** The default network policy the org's new sandboxes get: its own fields over the server's. */
  async network(principal: Principal): Promise<OrgNetworkPolicy> {
    return resolveOrgNetwork((await this.#ownOrg(principal)).network, this.deps.network);
  }

  /**
   * Replaces the org's default network policy (`{}` removes it). Only the org's owner may: members
   * get a 403 saying so. Sandboxes that exist keep their own policy.
   */
  async updateNetwork(principal: Principal, input: UpdateOrgNetworkInput): Promise<OrgNetworkPolicy> {
    const org = await this.#ownOrg(principal);
    if (org.ownerId !== principal.userId) {
      throw new ForbiddenError("Only the organization's owner can change its default network policy; this API key's user is a member (role owner needed)");
    }
    const network: OrgNetworkDefaults = {};
    if (input.egress !== undefined) network.egress = input.egress;
    const privateError = input.allow && privateAllowError(input.allow, this.deps.network.privateAllow ?? []);
    if (privateError) throw new InvalidInputError(privateError);
    if (input.allow !== undefined) network.allow = input.allow;
    if (input.deny !== undefined) network.deny = input.deny;
    // 0 or null: no cap, or the ceiling where SANDBOX_EGRESS_BYTES_MAX sets one (REST bodies drop null fields, so 0 is how a REST client says so).
    if (input.maxEgressBytes !== undefined) {
      const asked = egressCapFor(input.maxEgressBytes, this.deps.network.maxEgressBytes);
      if ('error' in asked) throw new InvalidInputError(asked.error);
      // Kept as asked: null (none of its own) follows the ceiling as it is when read.
      network.maxEgressBytes = input.maxEgressBytes || null;
    }
    const updated = await this.deps.store.orgs.setNetwork(org.id, Object.keys(network).length > 0 ? network : null);
    if (!updated) throw orgGone();
    return resolveOrgNetwork(updated.network, this.deps.network);
  }

  async #ownOrg(principal: Principal): Promise<OrgRecord> {
    const org = await this.deps.store.orgs.findById(principal.orgId);
    if (!org) throw orgGone();
    return org;
  }

  /**
   * Creates a user, their org and a first API key. Without transactions (FerretDB has none), a step
   * that fails undoes the steps before it, so a failed registration leaves no half-made account.
   * An email already registered is a 400 naming the field, as the contract and the original say
   * (the unique index decides between two concurrent registrations of one email).
   */
  async register(input: RegisterInput): Promise<RegisterResult> {
    const { users, orgs } = this.deps.store;
    const email = input.email.toLowerCase();
    const taken = () => new InvalidInputError(`A user with email ${email} is already registered`, { issues: [{ field: 'email', message: 'is already registered' }] });
    if (await users.findByEmail(email)) throw taken();
    const user = await users.create({ name: input.name, email }).catch((err: unknown) => {
      throw err instanceof ConflictError ? taken() : err;
    });
    let org: OrgRecord | undefined;
    try {
      org = await orgs.create({
        name: `${input.name}'s Organization`,
        ownerId: user.id,
        members: [user.id],
        plan: 'free',
        usage: 0,
        createdBy: user.id,
      });
      const key = await this.#issueKey(org.id, user.id, DEFAULT_KEY_NAME);
      return {
        orgId: org.id,
        userId: user.id,
        keyId: key.keyId,
        apiKey: key.plainKey,
        user: { id: user.id, name: user.name, email: user.email },
        org: { id: org.id, name: org.name },
        generatedKey: key,
      };
    } catch (err) {
      if (org) await orgs.delete(org.id).catch(() => {});
      await users.delete(user.id).catch(() => {});
      throw err;
    }
  }

  /** The system user that owns system images; created on first start. */
  async ensureSystemUser(name: string, email: string): Promise<UserRecord> {
    const { users } = this.deps.store;
    const existing = await users.findByEmail(email);
    if (existing) return existing;
    try {
      return await users.create({ name, email });
    } catch (err) {
      // Another server process created it between our read and write.
      if (err instanceof ConflictError) return (await users.findByEmail(email))!;
      throw err;
    }
  }

  async currentOrg(principal: Principal): Promise<Organization> {
    return toOrganization(await this.#ownOrg(principal));
  }

  /** The members of the org (its owner included), oldest account first. */
  async listUsers(principal: Principal, orgId: string): Promise<OrgUser[]> {
    assertSameOrg(principal, orgId);
    const org = await this.deps.store.orgs.findById(orgId);
    if (!org) throw new NotFoundError(`Organization ${orgId} no longer exists`, { code: 'ORG_NOT_FOUND' });
    const ids = [...new Set([org.ownerId, ...org.members])];
    const users = (await Promise.all(ids.map((id) => this.deps.store.users.findById(id)))).filter((u): u is UserRecord => u !== null);
    return users.sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime()).map(toOrgUser);
  }

  /** The user the API key acts for, with every org they own or belong to. */
  async currentUser(principal: Principal): Promise<CurrentUser> {
    const user = await this.deps.store.users.findById(principal.userId);
    if (!user) throw new NotFoundError('The user who created this API key no longer exists');
    const orgs = await this.deps.store.orgs.listByMember(user.id);
    return { ...toOrgUser(user), orgs: orgs.map((o) => ({ id: o.id, name: o.name })) };
  }

  async listKeys(principal: Principal, orgId: string): Promise<ApiKey[]> {
    assertSameOrg(principal, orgId);
    const keys = await this.deps.store.apiKeys.listByOrg(orgId);
    // Newest first, as the original VoidRun lists them (the stores answer oldest first).
    return keys.map((k) => this.#toApiKey(k)).reverse();
  }

  async createKey(principal: Principal, orgId: string, keyName: string): Promise<GeneratedApiKey> {
    assertSameOrg(principal, orgId);
    return this.#issueKey(orgId, principal.userId, keyName);
  }

  /** Runs `listener` with the id of every key revoked or deactivated from now on. */
  onKeyEnded(listener: (keyId: string) => void): void {
    this.#keyEnded.push(listener);
  }

  #keyHasEnded(keyId: string): void {
    for (const listener of this.#keyEnded) {
      try {
        listener(keyId);
      } catch (err) {
        this.deps.log.error({ err, keyId }, 'could not close the connections of an ended API key');
      }
    }
  }

  async revokeKey(principal: Principal, orgId: string, keyId: string): Promise<{ keyId: string; revoked: true }> {
    assertSameOrg(principal, orgId);
    if (!(await this.deps.store.apiKeys.delete(orgId, keyId))) throw keyNotFound(keyId);
    this.deps.lastUsed.forget(keyId);
    this.#keyHasEnded(keyId);
    return { keyId, revoked: true };
  }

  async setKeyActive(principal: Principal, orgId: string, keyId: string, isActive: boolean): Promise<ApiKey> {
    assertSameOrg(principal, orgId);
    const key = await this.deps.store.apiKeys.setActive(orgId, keyId, isActive);
    if (!key) throw keyNotFound(keyId);
    if (!isActive) this.#keyHasEnded(keyId);
    return this.#toApiKey(key);
  }

  /**
   * Marks a key used now and writes it at once (the explicit form of what every request does
   * lazily). The key is found in the org first: another org's key is not found and not written.
   */
  async touchKey(principal: Principal, orgId: string, keyId: string): Promise<ApiKey> {
    assertSameOrg(principal, orgId);
    const key = await this.deps.store.apiKeys.findById(orgId, keyId);
    if (!key) throw keyNotFound(keyId);
    const now = new Date();
    await this.deps.store.apiKeys.recordLastUsed(new Map([[key.id, now]]));
    return this.#toApiKey({ ...key, lastUsedAt: key.lastUsedAt && key.lastUsedAt > now ? key.lastUsedAt : now });
  }

  async #issueKey(orgId: string, userId: string, name: string): Promise<GeneratedApiKey> {
    const plainKey = generatePlainKey();
    const key = await this.deps.store.apiKeys.create({
      orgId,
      name,
      keyHash: hashKey(plainKey),
      prefix: displayPrefix(plainKey),
      createdBy: userId,
      isActive: true,
      lastUsedAt: null,
    });
    return {
      plainKey,
      keyId: key.id,
      keyName: key.name,
      orgId,
      createdAt: key.createdAt.toISOString(),
      expiresIn: 'never (revoke or deactivate it to end it)',
    };
  }

  #toApiKey(k: ApiKeyRecord): ApiKey {
    const lastUsedAt = this.deps.lastUsed.lastUsed(k.id, k.lastUsedAt);
    return {
      id: k.id,
      orgId: k.orgId,
      name: k.name,
      prefix: k.prefix,
      createdBy: k.createdBy,
      createdAt: k.createdAt.toISOString(),
      lastUsedAt: lastUsedAt ? lastUsedAt.toISOString() : null,
      isActive: k.isActive,
      updatedAt: k.updatedAt.toISOString(),
    };
  }
}

function assertSameOrg(principal: Principal, orgId: string): void {
  if (principal.orgId !== orgId) throw new ForbiddenError(`This API key belongs to another organization and cannot manage organization ${orgId}`);
}

/** The server-wide network defaults an org's own fields override. */
export interface ServerNetworkDefaults {
  egress: EgressDefault;
  /** SANDBOX_EGRESS_BYTES_MAX: the default cap and, set, the ceiling of every policy's; null: no cap. */
  maxEgressBytes: number | null;
  /** SANDBOX_PRIVATE_ALLOW: the private CIDRs allow entries may lie inside; absent: none. */
  privateAllow?: readonly string[];
}

/** An org's default network policy over the server's: what a create that omits every field gets. */
export function resolveOrgNetwork(org: OrgNetworkDefaults | undefined, server: ServerNetworkDefaults): OrgNetworkPolicy {
  return {
    egress: org?.egress ?? server.egress,
    allow: org?.allow ?? [],
    deny: org?.deny ?? [],
    maxEgressBytes: org?.maxEgressBytes !== undefined ? egressCapOrCeiling(org.maxEgressBytes, server.maxEgressBytes) : server.maxEgressBytes,
    orgSet: ORG_NETWORK_FIELDS.filter((field) => org?.[field] !== undefined),
  };
}

function orgGone(): NotFoundError {
  return new NotFoundError('The organization of this API key no longer exists', { code: 'ORG_NOT_FOUND' });
}

function keyNotFound(keyId: string): NotFoundError {
  return new NotFoundError(`API key ${keyId} not found in this organization`, { code: 'API_KEY_NOT_FOUND' });
}

function toOrgUser(u: UserRecord): OrgUser {
  // No avatars here: `imageUrl` is always empty, as the original sends it for users without one.
  return { id: u.id, name: u.name, email: u.email, imageUrl: '', createdAt: u.createdAt.toISOString() };
}

function toOrganization(o: OrgRecord): Organization {
  return {
    id: o.id,
    name: o.name,
    ownerId: o.ownerId,
    members: o.members,
    plan: o.plan,
    usage: o.usage,
    createdAt: o.createdAt.toISOString(),
    createdBy: o.createdBy,
    updatedAt: o.updatedAt.toISOString(),
  };
}
