import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv, type ValidateFunction } from 'ajv';
import { parse } from 'yaml';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

/**
 * Where the original VoidRun contract is read from at test time: beside the clone
 * (`../shared/reference/voidrun-openapi.yml`), or VOIDRUN_REFERENCE_CONTRACT. It is never copied
 * into this repository.
 */
export const referenceContractPath = process.env.VOIDRUN_REFERENCE_CONTRACT ?? resolve(repoRoot, '../shared/reference/voidrun-openapi.yml');

/** One operation of an OpenAPI document: `POST /sandboxes/{id}/exec` (paths relative to `/api`). */
export interface Operation {
  method: string;
  path: string;
  key: string;
}

type Node = Record<string, unknown>;

/**
 * Properties the contract declares that a client must not count on. Every other declared property of
 * a response object is treated as required (the contract marks none required, but a client reading
 * `.pid` breaks when it is missing); `nullable` ones may be absent too.
 */
const optionalProperties: Record<string, readonly string[]> = {
  ErrorResponse: ['details'], // the original omits it when empty
  SuccessResponse: ['data'], // "structure varies by endpoint"; the original omits it when nil
  FileEvent: ['oldPath', 'size'], // "(optional)" in the contract
};

function isNode(v: unknown): v is Node {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** `METHOD /path/{}`: the identity of an operation whatever its path parameters are called. */
export function operationKey(method: string, path: string): string {
  return `${method.toUpperCase()} ${path.replace(/\{[^}]+\}/g, '{}')}`;
}

/** The operations of an OpenAPI document (its `paths`), in document order. */
export function operationsOf(doc: Node): Operation[] {
  const out: Operation[] = [];
  for (const [path, item] of Object.entries((doc.paths ?? {}) as Record<string, Node>)) {
    for (const method of ['get', 'put', 'post', 'delete', 'patch', 'options', 'head']) {
      if (isNode(item[method])) out.push({ method: method.toUpperCase(), path, key: operationKey(method, path) });
    }
  }
  return out;
}

/** Our generated openapi.yml, parsed. */
export function loadOurDocument(): Node {
  return parse(readFileSync(join(repoRoot, 'openapi.yml'), 'utf8')) as Node;
}

const dateTime = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/i;

/**
 * The original contract, with a validator for every documented response: OpenAPI 3.0 schemas turned
 * into JSON Schema (`nullable` → a `null` alternative, `$ref`s resolved from its components, a `$ref`
 * with sibling keywords read as `allOf`), checked with ajv. Extra fields are allowed; missing
 * declared fields (see `optionalProperties`), other types and values outside enums are not.
 */
export class Contract {
  readonly doc: Node;
  readonly operations: Operation[];
  private readonly components: Record<string, Node>;
  private readonly ajv = new Ajv({
    strict: false,
    allErrors: true,
    formats: {
      'date-time': (s: string) => dateTime.test(s) && !Number.isNaN(Date.parse(s)),
      uuid: /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i,
      email: true,
      binary: true,
      int64: true,
    },
  });
  private readonly compiled = new Map<string, ValidateFunction>();

  constructor(doc: Node) {
    this.doc = doc;
    this.operations = operationsOf(doc);
    this.components = (((doc.components as Node | undefined)?.schemas ?? {}) as Record<string, Node>);
  }

  /** The contract's operation for `method path` (path as the contract writes it, e.g. `/sandboxes/{id}`). */
  operation(method: string, path: string): Node {
    const op = ((this.doc.paths as Record<string, Node>)[path] ?? {})[method.toLowerCase()];
    if (!isNode(op)) throw new Error(`the contract has no ${method} ${path}`);
    return op;
  }

  /** The statuses the contract documents for an operation. */
  statuses(method: string, path: string): string[] {
    return Object.keys((this.operation(method, path).responses ?? {}) as Node);
  }

  /**
   * Checks one answer against the contract: its status must be documented for the operation and its
   * JSON body must match that status's schema. Returns the problems, one line each (empty: conforms).
   */
  check(method: string, path: string, status: number, body: unknown): string[] {
    const responses = (this.operation(method, path).responses ?? {}) as Record<string, Node>;
    const response = responses[String(status)];
    if (!response) return [`status ${status} is not documented for ${method} ${path} (documented: ${Object.keys(responses).join(', ')})`];
    const schema = ((response.content as Record<string, Node> | undefined)?.['application/json'] as Node | undefined)?.schema;
    if (!schema) return [];
    return this.problems(this.validator(`${method} ${path} ${status}`, schema), body);
  }

  /** Checks a value against one of the contract's component schemas (e.g. `FileEvent`); returns the problems. */
  checkSchema(component: string, value: unknown): string[] {
    const ref = `#/components/schemas/${component}`;
    return this.problems(this.validator(ref, { $ref: ref }), value);
  }

  /** The compiled validator of an OpenAPI schema, cached under `id`. */
  private validator(id: string, schema: unknown): ValidateFunction {
    let validate = this.compiled.get(id);
    if (!validate) {
      validate = this.ajv.compile(this.toJsonSchema(schema, null) as object);
      this.compiled.set(id, validate);
    }
    return validate;
  }

  private problems(validate: ValidateFunction, value: unknown): string[] {
    if (validate(value)) return [];
    return (validate.errors ?? []).map((e) => {
      const where = e.instancePath || '(body)';
      const allowed = 'allowedValues' in e.params ? ` ${JSON.stringify(e.params.allowedValues)}` : '';
      return `${where} ${e.message ?? 'is invalid'}${allowed}`;
    });
  }

  private toJsonSchema(node: unknown, componentName: string | null): unknown {
    if (Array.isArray(node)) return node.map((n) => this.toJsonSchema(n, null));
    if (!isNode(node)) return node;
    if (typeof node.$ref === 'string') {
      const name = node.$ref.replace('#/components/schemas/', '');
      const target = this.components[name];
      if (!target) throw new Error(`unresolved $ref ${node.$ref}`);
      const resolved = this.toJsonSchema(target, name);
      const { $ref: _ref, description: _d, example: _e, ...siblings } = node;
      return Object.keys(siblings).length ? { allOf: [resolved, this.toJsonSchema(siblings, null)] } : resolved;
    }
    const out: Node = {};
    for (const [k, v] of Object.entries(node)) {
      if (k === 'example' || k === 'nullable' || k === 'description' || k === 'default') continue;
      if (k === 'properties' && isNode(v)) out[k] = Object.fromEntries(Object.entries(v).map(([p, s]) => [p, this.toJsonSchema(s, null)]));
      else if (k === 'items' || k === 'additionalProperties' || k === 'not') out[k] = this.toJsonSchema(v, null);
      else if (k === 'allOf' || k === 'anyOf' || k === 'oneOf') out[k] = this.toJsonSchema(v, null);
      else out[k] = v;
    }
    if (node.nullable === true) {
      if (typeof out.type === 'string') out.type = [out.type, 'null'];
      if (Array.isArray(out.enum)) out.enum = [...(out.enum as unknown[]), null];
    }
    if (isNode(node.properties) && !('required' in node)) {
      const optional = new Set(componentName ? (optionalProperties[componentName] ?? []) : []);
      out.required = Object.entries(node.properties).filter(([p, s]) => !optional.has(p) && !(isNode(s) && s.nullable === true)).map(([p]) => p);
    }
    return out;
  }
}

/** The original contract, or null (with the reason) when it is not beside the clone. */
export function loadReferenceContract(): { contract: Contract; reason: '' } | { contract: null; reason: string } {
  if (!existsSync(referenceContractPath)) {
    return { contract: null, reason: `the original VoidRun contract is not at ${referenceContractPath} (CI has it beside the clone, in ../shared/reference; VOIDRUN_REFERENCE_CONTRACT names another place)` };
  }
  return { contract: new Contract(parse(readFileSync(referenceContractPath, 'utf8')) as Node), reason: '' };
}
