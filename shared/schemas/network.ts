import { z } from 'zod';

/** How many entries `allow` and `deny` may each hold. */
export const MAX_NETWORK_RULES = 64;

const ipv4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
const domainLabel = /^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$/;

/**
 * One policy entry in canonical form, or an error saying what is wrong with it: an IPv4 CIDR
 * (`10.1.0.0/16`; a bare address is `/32`; host bits are cleared), a domain (`example.com`,
 * matched exactly, lowercase, without a trailing dot) or `*.domain` (any name under it, not the
 * domain itself).
 */
export function parseNetworkRule(raw: string): { rule: string } | { error: string } {
  const entry = raw.trim().toLowerCase().replace(/\.$/, '');
  const shown = JSON.stringify(raw.slice(0, 80));
  if (entry.length === 0) return { error: 'an entry is empty' };
  if (/^[0-9./]+$/.test(entry) || entry.includes(':')) {
    const [addr = '', bits, extra] = entry.split('/');
    if (addr.includes(':')) return { error: `${shown}: IPv6 is not supported (sandboxes have IPv4 only)` };
    const prefix = bits === undefined ? 32 : /^\d{1,2}$/.test(bits) ? Number(bits) : NaN;
    if (extra !== undefined || !ipv4.test(addr) || !(prefix >= 0 && prefix <= 32)) return { error: `${shown} is not an IPv4 CIDR like 203.0.113.0/24` };
    const value = addr.split('.').reduce((n, octet) => n * 256 + Number(octet), 0);
    const network = value - (value % 2 ** (32 - prefix));
    return { rule: `${[24, 16, 8, 0].map((s) => Math.floor(network / 2 ** s) % 256).join('.')}/${prefix}` };
  }
  const name = entry.startsWith('*.') ? entry.slice(2) : entry;
  const labels = name.split('.');
  if (name.length > 253 || !labels.every((l) => domainLabel.test(l)) || /^\d+$/.test(labels.at(-1)!)) {
    return { error: `${shown} is not a CIDR, a domain or "*.domain" (letters, digits, "-" and "_" in dot-separated labels of at most 63)` };
  }
  return { rule: entry };
}

/** True for a canonical rule that is a CIDR (see `parseNetworkRule`). */
export function isCidrRule(rule: string): boolean {
  return /^\d/.test(rule) && rule.includes('/');
}

/**
 * The private ranges: a sandbox reaches an address in them only where an allow CIDR lying inside
 * the range names it and the operator's SANDBOX_PRIVATE_ALLOW holds it.
 */
export const PRIVATE_RANGES = ['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '100.64.0.0/10'];

/** The first and last address of IPv4 CIDR `cidr` (an address alone is a /32), as numbers. */
export function cidrBounds(cidr: string): [number, number] {
  const [base = '', bits = '32'] = cidr.split('/');
  const size = 2 ** (32 - Number(bits));
  const first = Math.floor(base.split('.').reduce((n, octet) => n * 256 + Number(octet), 0) / size) * size;
  return [first, first + size - 1];
}

/** Whether IPv4 CIDR `inner` lies inside CIDR `outer`. */
export function cidrWithin(inner: string, outer: string): boolean {
  const [first, last] = cidrBounds(inner);
  const [lo, hi] = cidrBounds(outer);
  return first >= lo && last <= hi;
}

/** Whether CIDR `cidr` lies inside one of the private ranges, i.e. names (part of) it explicitly. */
export function insidePrivateRange(cidr: string): boolean {
  return PRIVATE_RANGES.some((range) => cidrWithin(cidr, range));
}

/**
 * What is wrong with canonical allow rules under SANDBOX_PRIVATE_ALLOW (`privateAllow`): the first
 * CIDR lying inside a private range that is not inside one of its CIDRs, as a message; undefined
 * when there is none. CIDRs merely containing private ranges (`0.0.0.0/0`) are fine: they open
 * the public addresses only.
 */
export function privateAllowError(allow: readonly string[], privateAllow: readonly string[]): string | undefined {
  const bad = allow.find((rule) => isCidrRule(rule) && insidePrivateRange(rule) && !privateAllow.some((allowed) => cidrWithin(rule, allowed)));
  if (bad === undefined) return undefined;
  const allowed = privateAllow.length ? `only ${privateAllow.join(', ')}` : 'none';
  return `allow entry ${bad} is in a private range; this server's SANDBOX_PRIVATE_ALLOW lets sandboxes open ${allowed} of the private ranges (the operator sets it)`;
}

/**
 * The byte cap a tenant's `maxEgressBytes` asks for (undefined: not given; 0 or null: none), under
 * SANDBOX_EGRESS_BYTES_MAX as a ceiling (`ceiling`, null when unset): with a ceiling, no cap means
 * the ceiling and more than it is refused; without one, 0 or null means no cap. Returns the cap
 * (null: none) or the error for the caller.
 */
export function egressCapFor(asked: number | null, ceiling: number | null): { cap: number | null } | { error: string } {
  if (ceiling === null) return { cap: asked || null };
  if (asked && asked > ceiling) return { error: `maxEgressBytes ${asked} is above this server's ceiling SANDBOX_EGRESS_BYTES_MAX=${ceiling}; send at most ${ceiling} (0 or null: the ceiling)` };
  return { cap: asked || ceiling };
}

/** A byte cap stored before (null: none) under the ceiling `ceiling` (null: none): never above it. */
export function egressCapOrCeiling(stored: number | null, ceiling: number | null): number | null {
  if (ceiling === null) return stored;
  return stored === null ? ceiling : Math.min(stored, ceiling);
}

const ruleList = (what: string) =>
  z
    .array(z.string().max(300, 'entries are at most 300 characters'))
    .max(MAX_NETWORK_RULES, `${what} holds at most ${MAX_NETWORK_RULES} entries`)
    .transform((entries, ctx) => {
      const rules: string[] = [];
      entries.forEach((entry, i) => {
        const parsed = parseNetworkRule(entry);
        if ('error' in parsed) ctx.addIssue({ code: 'custom', path: [i], message: parsed.error });
        else if (!rules.includes(parsed.rule)) rules.push(parsed.rule);
      });
      return rules;
    });

export const NetworkMode = z.enum(['bridge', 'none']).meta({
  description: '`bridge`: an address on the host bridge with egress under the policy; `none`: loopback only.',
});
export type NetworkMode = z.infer<typeof NetworkMode>;

export const EgressDefault = z.enum(['allow', 'deny']).meta({
  description: '`allow`: every public address except `deny`; `deny`: only what `allow` names.',
});
export type EgressDefault = z.infer<typeof EgressDefault>;

const allowDescription =
  'IPv4 CIDRs (a bare address is /32), domains (exact) and `*.domain` (any subdomain). Domains open the addresses the server\'s DNS resolver hands the sandbox for them, for the record\'s TTL. A CIDR lying inside a private range (10/8, 172.16/12, 192.168/16, 100.64/10) is the only way to reach it, and only within the server\'s SANDBOX_PRIVATE_ALLOW (others are refused).';
const denyDescription = 'IPv4 CIDRs, domains and `*.domain`: refused even where `egress` or `allow` would let them through. Denied names do not resolve.';
const capDescription = 'Egress bytes after which the sandbox\'s egress is cut (until this is changed or removed); 0 or null: no cap, or the server\'s ceiling SANDBOX_EGRESS_BYTES_MAX where it sets one (a value above it is refused).';

/** The egress policy fields, as `PUT /sandboxes/{id}/network` and create take them. */
const policyInputShape = {
  egress: EgressDefault.optional(),
  allow: ruleList('allow').optional().meta({ description: allowDescription, example: ['pypi.org', '*.pythonhosted.org', '203.0.113.0/24'] }),
  deny: ruleList('deny').optional().meta({ description: denyDescription, example: [] }),
  maxEgressBytes: z.number().int().min(0, 'must be a byte count (0 for no cap)').max(Number.MAX_SAFE_INTEGER).nullable().optional().meta({ description: capDescription }),
};

/** `network` on create: every field optional (the server's defaults fill the rest). */
export const NetworkPolicyInput = z
  .object({ mode: NetworkMode.optional().meta({ description: 'SANDBOX_NETWORK when omitted.' }), ...policyInputShape })
  .strict()
  .meta({ id: 'NetworkPolicyRequest', description: 'Egress when omitted: SANDBOX_DEFAULT_EGRESS; lists: empty.' });
export type NetworkPolicyInput = z.infer<typeof NetworkPolicyInput>;

/** A sandbox's network policy, resolved: what it runs under. */
export const NetworkPolicy = z
  .object({
    mode: NetworkMode,
    egress: EgressDefault,
    allow: z.array(z.string()).meta({ description: allowDescription }),
    deny: z.array(z.string()).meta({ description: denyDescription }),
    maxEgressBytes: z.number().int().nullable().meta({ description: 'Egress bytes after which the sandbox\'s egress is cut (SANDBOX_EGRESS_BYTES_MAX unless set); null: no cap. Counted by the host on the sandbox\'s link since it last started.' }),
    egressCut: z.boolean().meta({ description: 'True once the sandbox sent more than `maxEgressBytes`: its egress is refused.' }),
  })
  .meta({ id: 'NetworkPolicy' });
export type NetworkPolicy = z.infer<typeof NetworkPolicy>;

/** `PUT /sandboxes/{id}/network`: the fields given replace the sandbox's; omitted ones stay. */
export const UpdateNetworkInput = z
  .object({
    id: z.string().min(1).max(64),
    mode: NetworkMode.optional().meta({ description: 'Only while the sandbox is stopped.' }),
    ...policyInputShape,
  })
  .strict();
export type UpdateNetworkInput = z.infer<typeof UpdateNetworkInput>;

/** The policy fields an org may set as the default of its new sandboxes (not `mode`: that is the host's). */
export const ORG_NETWORK_FIELDS = ['egress', 'allow', 'deny', 'maxEgressBytes'] as const;
export type OrgNetworkField = (typeof ORG_NETWORK_FIELDS)[number];

/** An org's own default policy as stored: only the fields it set (absent ones fall back to the server's). */
export interface OrgNetworkDefaults {
  egress?: EgressDefault;
  allow?: string[];
  deny?: string[];
  /** null: no cap, whatever SANDBOX_EGRESS_BYTES_MAX says. */
  maxEgressBytes?: number | null;
}

/** `PUT /orgs/me/network`: the org's default policy, replaced whole; the fields left out fall back to the server's. */
export const UpdateOrgNetworkInput = z
  .strictObject(policyInputShape, {
    error: (issue) =>
      issue.code === 'unrecognized_keys' && issue.keys.includes('mode')
        ? 'mode is not part of an org default (SANDBOX_NETWORK decides it; a create may set it): send egress, allow, deny and maxEgressBytes only'
        : undefined,
  })
  .meta({ id: 'OrgNetworkRequest', description: "The org's default for sandboxes whose create leaves these fields out; `{}` removes it (the server's defaults apply). Existing sandboxes keep their policy." });
export type UpdateOrgNetworkInput = z.infer<typeof UpdateOrgNetworkInput>;

/** The default policy new sandboxes of the org get, resolved: the org's own fields over the server's. */
export const OrgNetworkPolicy = z
  .object({
    egress: EgressDefault,
    allow: z.array(z.string()).meta({ description: allowDescription }),
    deny: z.array(z.string()).meta({ description: denyDescription }),
    maxEgressBytes: z.number().int().nullable().meta({ description: 'Egress bytes after which a new sandbox\'s egress is cut; null: no cap.' }),
    orgSet: z.array(z.enum(ORG_NETWORK_FIELDS)).meta({ description: 'The fields the org set; the others are the server\'s defaults (SANDBOX_DEFAULT_EGRESS, SANDBOX_EGRESS_BYTES_MAX, empty lists).' }),
  })
  .meta({ id: 'OrgNetworkPolicy' });
export type OrgNetworkPolicy = z.infer<typeof OrgNetworkPolicy>;
