import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** The file under DATA_DIR holding the key preview tokens are signed with. */
export const PREVIEW_KEY_FILE = 'preview-token.key';

/** A token longer than this is not one of ours (ours are about 60 characters). */
const MAX_TOKEN_CHARS = 200;

/**
 * Preview tokens: `<expiry, unix seconds>.<HMAC-SHA256, base64url>` over the sandbox id, the port
 * and the expiry, keyed with a server secret. A token opens exactly one port of one sandbox until
 * it expires; it carries no org or key, so revoking the key that minted it does not end it (its
 * lifetime is bounded instead, PREVIEW_TOKEN_TTL).
 */
export class PreviewTokens {
  constructor(private readonly key: Buffer) {}

  /**
   * The tokens signed with the key in `<dataDir>/preview-token.key`, made (32 random bytes, mode
   * 0600) on first use, so tokens outlive a restart.
   */
  static fromDataDir(dataDir: string): PreviewTokens {
    const path = join(dataDir, PREVIEW_KEY_FILE);
    let key: Buffer;
    try {
      key = readFileSync(path);
    } catch {
      mkdirSync(dataDir, { recursive: true });
      try {
        writeFileSync(path, randomBytes(32), { mode: 0o600, flag: 'wx' });
      } catch {} // another process made it first: read theirs
      key = readFileSync(path);
    }
    if (key.length < 32) throw new Error(`${path} holds fewer than 32 bytes; delete it to have a new preview token key made`);
    return new PreviewTokens(key);
  }

  mint(sandboxId: string, port: number, ttlSeconds: number, now = Date.now()): { token: string; expiresAt: Date } {
    const expiry = Math.floor(now / 1000) + ttlSeconds;
    return { token: `${expiry}.${this.#sign(sandboxId, port, expiry)}`, expiresAt: new Date(expiry * 1000) };
  }

  /** The token's expiry if it opens `port` of `sandboxId` now, else null. */
  verify(token: string, sandboxId: string, port: number, now = Date.now()): Date | null {
    if (token.length > MAX_TOKEN_CHARS) return null;
    const m = /^(\d{1,12})\.([A-Za-z0-9_-]{43})$/.exec(token);
    if (!m) return null;
    const expiry = Number(m[1]);
    if (expiry * 1000 <= now) return null;
    const given = Buffer.from(m[2]!);
    const want = Buffer.from(this.#sign(sandboxId, port, expiry));
    return given.length === want.length && timingSafeEqual(given, want) ? new Date(expiry * 1000) : null;
  }

  #sign(sandboxId: string, port: number, expiry: number): string {
    return createHmac('sha256', this.key).update(`voidrun-preview:v1:${sandboxId}:${port}:${expiry}`).digest('base64url');
  }
}
