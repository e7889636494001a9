/**
 * The embedded store's schema. Each statement is idempotent so opening a store always brings it to
 * the current shape. Times are ISO-8601 text (sortable); arrays and maps are JSON text.
 */
export const sqliteSchema = `
CREATE TABLE IF NOT EXISTS users (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  email TEXT NOT NULL UNIQUE,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orgs (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  owner_id TEXT NOT NULL,
  members TEXT NOT NULL,
  plan TEXT NOT NULL,
  usage INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  network TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY,
  org_id TEXT NOT NULL,
  name TEXT NOT NULL,
  key_hash TEXT NOT NULL UNIQUE,
  prefix TEXT NOT NULL,
  created_by TEXT NOT NULL,
  is_active INTEGER NOT NULL,
  last_used_at TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_by_org ON api_keys (org_id, created_at);
CREATE TABLE IF NOT EXISTS sandboxes (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  org_id TEXT NOT NULL,
  created_by TEXT NOT NULL,
  image_id TEXT NOT NULL,
  ip TEXT NOT NULL,
  cpu INTEGER NOT NULL,
  mem INTEGER NOT NULL,
  disk_mb INTEGER NOT NULL,
  status TEXT NOT NULL,
  env_vars TEXT NOT NULL,
  labels TEXT NOT NULL DEFAULT '{}',
  network TEXT,
  public_ports TEXT NOT NULL DEFAULT '[]',
  pool TEXT NOT NULL DEFAULT '',
  host_id TEXT NOT NULL DEFAULT '',
  lifecycle TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_by_org ON sandboxes (org_id, created_at DESC, id DESC);
CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_name_per_org ON sandboxes (org_id, name);
CREATE TABLE IF NOT EXISTS images (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  tag TEXT NOT NULL,
  description TEXT NOT NULL,
  base TEXT NOT NULL,
  org_id TEXT,
  is_system INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  details TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS images_by_owner_name ON images (COALESCE(org_id, ''), name);
CREATE TABLE IF NOT EXISTS ip_leases (
  ip TEXT PRIMARY KEY,
  sandbox_id TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ip_leases_by_sandbox ON ip_leases (sandbox_id);
CREATE TABLE IF NOT EXISTS pool_claims (
  sandbox_id TEXT PRIMARY KEY,
  created_at TEXT NOT NULL
);
-- One row per claim of a key (gen 0, then one per takeover), so every claim is a unique insert.
-- (idempotency_keys, one row per key, was this table's first shape, in the same release.)
DROP TABLE IF EXISTS idempotency_keys;
CREATE TABLE IF NOT EXISTS idempotency_claims (
  org_id TEXT NOT NULL,
  operation TEXT NOT NULL,
  key TEXT NOT NULL,
  gen INTEGER NOT NULL,
  request_hash TEXT NOT NULL,
  result TEXT,
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  PRIMARY KEY (org_id, operation, key, gen)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_claims_expiry ON idempotency_claims (expires_at);
CREATE INDEX IF NOT EXISTS idempotency_claims_by_org ON idempotency_claims (org_id, expires_at);
CREATE TABLE IF NOT EXISTS sandbox_events (
  sandbox_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  org_id TEXT NOT NULL,
  type TEXT NOT NULL,
  data TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS sandbox_events_seq ON sandbox_events (sandbox_id, seq);
CREATE TABLE IF NOT EXISTS webhooks (
  id TEXT PRIMARY KEY,
  org_id TEXT NOT NULL,
  url TEXT NOT NULL,
  events TEXT NOT NULL,
  secret TEXT NOT NULL,
  created_by TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_by_org ON webhooks (org_id, created_at);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
  id TEXT PRIMARY KEY,
  webhook_id TEXT NOT NULL,
  org_id TEXT NOT NULL,
  event_id TEXT NOT NULL,
  event_type TEXT NOT NULL,
  body TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  next_attempt_at TEXT NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id);
CREATE TABLE IF NOT EXISTS webhook_attempts (
  id TEXT PRIMARY KEY,
  delivery_id TEXT NOT NULL,
  webhook_id TEXT NOT NULL,
  org_id TEXT NOT NULL,
  event_id TEXT NOT NULL,
  event_type TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  status_code INTEGER,
  error TEXT,
  ok INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_attempts_by_webhook ON webhook_attempts (webhook_id, created_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS webhook_attempt_claims (
  id TEXT PRIMARY KEY,
  delivery_id TEXT NOT NULL,
  webhook_id TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_attempt_claims_by_delivery ON webhook_attempt_claims (delivery_id);
CREATE INDEX IF NOT EXISTS webhook_attempt_claims_by_webhook ON webhook_attempt_claims (webhook_id);
`;
