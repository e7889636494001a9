import type { Duplex } from 'node:stream';
import type { PortAccess, PortList, PreviewToken, PublicUrl } from '../../shared/index.js';
import { ConflictError, ForbiddenError, NotFoundError, UnauthorizedError } from '../errors.js';
import { listsPorts } from '../hypervisor/types.js';
import type { SandboxRecord, SandboxRepository } from '../store/types.js';
import type { AuthService, Principal } from './auth-service.js';
import type { PreviewTokens } from './preview-tokens.js';
import type { SandboxService } from './sandbox-service.js';

/** The most ports one sandbox may have public at once. */
export const MAX_PUBLIC_PORTS = 64;

export interface PortServiceDeps {
  sandboxes: SandboxService;
  repository: SandboxRepository;
  auth: AuthService;
  tokens: PreviewTokens;
  /** PREVIEW_DOMAIN; unset, there are no preview hosts (the API path still proxies). */
  previewDomain?: string;
  /** PREVIEW_URL_SCHEME */
  previewScheme: 'https' | 'http';
}

/** What a request to a preview host presents. */
export interface PreviewCredentials {
  token: string | null;
  apiKey: string | null;
  requestedOrgId: string | null;
}

/**
 * Ports of sandboxes: which listen, who may reach them (private: an API key of the org or a
 * preview token; public: anyone, opened by the owner and kept on the sandbox record), and the
 * byte streams to them, through the sandbox's agent (`AgentClients.openPort`).
 */
export class PortService {
  constructor(private readonly deps: PortServiceDeps) {}

  /** The sandbox's listening ports with their access and URLs; 409 unless it runs. */
  async list(principal: Principal, id: string): Promise<PortList> {
    const record = await this.deps.sandboxes.running(principal, id);
    const listening = await this.#listening(record);
    const open = new Set(record.publicPorts ?? []);
    return {
      ports: listening.map((port) => ({ port, public: open.has(port), previewUrl: this.previewUrl(id, port), proxyPath: proxyPath(id, port) })),
      publicNotListening: [...open].filter((p) => !listening.includes(p)).sort((a, b) => a - b),
    };
  }

  /** A preview token for one port of the caller's sandbox (any state: it is checked when used). */
  async mintToken(principal: Principal, id: string, port: number, ttlSeconds: number): Promise<PreviewToken> {
    await this.deps.sandboxes.record(principal, id);
    const { token, expiresAt } = this.deps.tokens.mint(id, port, ttlSeconds);
    const preview = this.previewUrl(id, port);
    return { port, token, expiresAt: expiresAt.toISOString(), url: preview ? `${preview}?voidrun_token=${encodeURIComponent(token)}` : null };
  }

  /** Opens a port to everyone (`isPublic`) or closes it to all but keys and tokens; kept on the record. */
  async setAccess(principal: Principal, id: string, port: number, isPublic: boolean): Promise<PortAccess> {
    // Under the sandbox's own lock: a status write beside this one could put the old ports back.
    return this.deps.sandboxes.underLock(id, async (): Promise<PortAccess> => {
      const record = await this.deps.sandboxes.record(principal, id);
      const ports = new Set(record.publicPorts ?? []);
      if (isPublic) ports.add(port);
      else ports.delete(port);
      if (ports.size > MAX_PUBLIC_PORTS) throw new ConflictError(`A sandbox may have at most ${MAX_PUBLIC_PORTS} public ports; make another private first`);
      const updated = await this.deps.repository.update(record.orgId, id, { publicPorts: [...ports].sort((a, b) => a - b) });
      if (!updated) throw new NotFoundError(`Sandbox ${id} not found`, { code: 'SANDBOX_NOT_FOUND' });
      return { port, public: isPublic, previewUrl: this.previewUrl(id, port) };
    });
  }

  /** The original VoidRun's public URLs: one per public port, its preview URL (the API path without PREVIEW_DOMAIN). */
  async publicUrls(principal: Principal, id: string): Promise<PublicUrl[]> {
    const record = await this.deps.sandboxes.record(principal, id);
    return (record.publicPorts ?? []).map((port) => ({ port, url: this.previewUrl(id, port) ?? proxyPath(id, port) }));
  }

  /** The expiry of `token` if it opens `port` of sandbox `id` now, else null. */
  tokenExpiry(token: string, id: string, port: number): Date | null {
    return this.deps.tokens.verify(token, id, port);
  }

  /** The scheme preview URLs are handed out with (PREVIEW_URL_SCHEME). */
  get previewScheme(): 'https' | 'http' {
    return this.deps.previewScheme;
  }

  /** `{scheme}://{port}-{id}.{PREVIEW_DOMAIN}/`, or null without a PREVIEW_DOMAIN. */
  previewUrl(id: string, port: number): string | null {
    return this.deps.previewDomain ? `${this.deps.previewScheme}://${port}-${id}.${this.deps.previewDomain}/` : null;
  }

  /**
   * The sandbox and port a request's Host names (`{port}-{id}.{PREVIEW_DOMAIN}`, any case, any
   * :port), or null for a host outside PREVIEW_DOMAIN. Any other name under PREVIEW_DOMAIN is a 404
   * naming the form: those names are tenants' site, never the API's or the console's origin.
   */
  previewTarget(host: string | undefined): { id: string; port: number } | null {
    const domain = this.deps.previewDomain;
    if (!domain || !host) return null;
    const bare = domain.replace(/:\d+$/, '');
    const name = host.toLowerCase().replace(/:\d+$/, '').replace(/\.$/, '');
    const label = name.endsWith(`.${bare}`) ? name.slice(0, -bare.length - 1) : null;
    if (label === null) return null;
    const m = /^(\d{1,5})-([a-z0-9]{1,64})$/.exec(label);
    const port = m ? Number(m[1]) : 0;
    if (!m || port < 1 || port > 65535) {
      throw new NotFoundError(`No preview host ${name.slice(0, 200)}: preview hosts are {port}-{sandbox id}.${bare}, with a port from 1 to 65535`, { code: 'ROUTE_NOT_FOUND' });
    }
    return { id: m[2]!, port };
  }

  /**
   * The sandbox behind a preview host, if the request may reach the port: a public port, a valid
   * token for it, or an API key of the sandbox's org; then 409 unless it runs. Without any of
   * those the answer is 401 (nothing presented) or 403 (a token that does not open this port), the
   * same whether or not the sandbox exists.
   */
  async authorizePreview(id: string, port: number, creds: PreviewCredentials): Promise<SandboxRecord> {
    const record = await this.deps.repository.findByIdInAnyOrg(id);
    if (record?.publicPorts?.includes(port)) return this.deps.sandboxes.ensureRunning(record);
    if (creds.token !== null) {
      if (!record || !this.deps.tokens.verify(creds.token, id, port)) {
        throw new ForbiddenError(`The preview token does not open port ${port} of sandbox ${id} (expired, or minted for another port or sandbox); mint a new one with POST /api/sandboxes/${id}/ports/${port}/token`);
      }
      return this.deps.sandboxes.ensureRunning(record);
    }
    if (creds.apiKey !== null) {
      const principal = await this.deps.auth.authenticate(creds.apiKey, creds.requestedOrgId);
      return this.deps.sandboxes.running(principal, id);
    }
    throw new UnauthorizedError(
      `Port ${port} of this sandbox is private: open the preview URL with ?voidrun_token=<token> (POST /api/sandboxes/${id}/ports/${port}/token mints one), send the token as x-voidrun-preview-token, or send the org's X-API-Key`,
    );
  }

  /** A byte stream to `port` inside the running sandbox `record` (see `AgentClients.openPort`). */
  openPort(record: SandboxRecord, port: number): Promise<Duplex> {
    return this.deps.sandboxes.agents.openPort(record, port);
  }

  /** Host-side from the driver when it can (never the agent's word), else from the agent (schema-checked, bounded). */
  async #listening(record: SandboxRecord): Promise<number[]> {
    const driver = this.deps.sandboxes.driver;
    if (listsPorts(driver)) {
      const ports = await driver.listeningPorts(record.id);
      if (ports) return ports;
    }
    const reply = await this.deps.sandboxes.agents.call(record, (agent) => agent.ports.list.query());
    return reply.ports;
  }
}

/** The API path that proxies to `port` of sandbox `id`. */
export function proxyPath(id: string, port: number): string {
  return `/api/sandboxes/${id}/ports/${port}/`;
}
