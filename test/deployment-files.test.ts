import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse, parseAllDocuments } from 'yaml';
import { configVariables, loadConfig } from '../server/config.js';

/*
 * There is no Docker engine on the machines this is developed on, so the compose file and the
 * Dockerfile are never built or run here. These tests pin down what can be checked without one:
 * both files parse, and they agree with each other and with the server's config (variables, port,
 * state paths, the original VoidRun's MongoDB credentials).
 */

const root = join(import.meta.dirname, '..');
const compose = parse(readFileSync(join(root, 'docker-compose.yml'), 'utf8')) as {
  services: Record<string, { image?: string; build?: { context: string; dockerfile: string }; environment?: Record<string, string>; ports?: string[]; volumes?: string[]; devices?: string[]; cap_add?: string[]; depends_on?: Record<string, unknown> }>;
  volumes: Record<string, unknown>;
};

interface Instruction {
  op: string;
  args: string;
}
/** Dockerfile instructions, with continuation lines joined and comments dropped. */
function dockerfile(): Instruction[] {
  const text = readFileSync(join(root, 'Dockerfile'), 'utf8')
    .split('\n')
    .filter((line) => !line.trimStart().startsWith('#'))
    .join('\n')
    .replace(/\\\n/g, ' ');
  return text
    .split('\n')
    .map((line) => line.trim())
    .filter(Boolean)
    .map((line) => {
      const [op, ...rest] = line.split(/\s+/);
      return { op: op!.toUpperCase(), args: rest.join(' ') };
    });
}

/** `ENV A=1 B=2` → {A: '1', B: '2'} (the key=value form only, which is all the Dockerfile uses). */
function dockerEnv(instructions: Instruction[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const { args } of instructions.filter((i) => i.op === 'ENV')) {
    for (const pair of args.split(/\s+/)) {
      const eq = pair.indexOf('=');
      if (eq > 0) env[pair.slice(0, eq)] = pair.slice(eq + 1);
    }
  }
  return env;
}

describe('docker-compose.yml and Dockerfile (parsed, not run: no Docker engine here)', () => {
  const mongo = compose.services.mongo!;
  const server = compose.services.voidrun!;
  const instructions = dockerfile();
  const runtimeStage = instructions.slice(instructions.map((i) => i.op).lastIndexOf('FROM'));

  it('runs MongoDB 7 with the original VoidRun credentials and database', () => {
    expect(mongo.image).toMatch(/^mongo:7(\.|$)/);
    expect(mongo.environment).toMatchObject({ MONGO_INITDB_ROOT_USERNAME: 'root', MONGO_INITDB_ROOT_PASSWORD: 'Qaz123wsx123', MONGO_INITDB_DATABASE: 'vr-db' });
    expect(server.depends_on).toHaveProperty('mongo');
  });

  it('gives the server only variables it reads, with values its config accepts', () => {
    const env = server.environment!;
    expect(Object.keys(env).filter((name) => !configVariables.includes(name))).toEqual([]);
    expect(Object.keys(dockerEnv(instructions)).filter((name) => !configVariables.includes(name) && name !== 'NODE_ENV')).toEqual([]);
    expect(() => loadConfig({ ...dockerEnv(runtimeStage), ...env })).not.toThrow();
  });

  it('points MONGO_URI at the mongo service with its root credentials and database', () => {
    const env = server.environment!;
    const uri = new URL(env.MONGO_URI!);
    expect(uri.protocol).toBe('mongodb:');
    expect(uri.hostname).toBe('mongo');
    expect(decodeURIComponent(uri.username)).toBe(mongo.environment!.MONGO_INITDB_ROOT_USERNAME);
    expect(decodeURIComponent(uri.password)).toBe(mongo.environment!.MONGO_INITDB_ROOT_PASSWORD);
    expect(uri.searchParams.get('authSource')).toBe('admin');
    expect(uri.pathname.slice(1)).toBe(env.MONGO_DB);
    expect(env.MONGO_DB).toBe(mongo.environment!.MONGO_INITDB_DATABASE);
  });

  it('serves the API on localhost:8080 from the port the server listens on and the image exposes', () => {
    const config = loadConfig({ ...dockerEnv(runtimeStage), ...server.environment });
    expect(server.ports).toEqual([`8080:${config.SERVER_PORT}`]);
    expect(runtimeStage.filter((i) => i.op === 'EXPOSE').map((i) => i.args)).toEqual([String(config.SERVER_PORT)]);
  });

  it('keeps every state directory of the config on a volume', () => {
    const config = loadConfig({ ...dockerEnv(runtimeStage), ...server.environment });
    const targets = server.volumes!.map((v) => v.split(':')[1]);
    for (const dir of [config.DATA_DIR, config.BASE_IMAGES_DIR, config.INSTANCES_DIR, config.SNAPSHOTS_DIR]) expect(targets).toContain(dir);
    for (const named of server.volumes!.map((v) => v.split(':')[0]!).filter((src) => !src.startsWith('/'))) expect(compose.volumes).toHaveProperty(named);
    const declared = runtimeStage.find((i) => i.op === 'VOLUME')!.args;
    for (const dir of [config.DATA_DIR, config.BASE_IMAGES_DIR, config.INSTANCES_DIR, config.SNAPSHOTS_DIR]) expect(declared).toContain(`"${dir}"`);
  });

  it('hands the server /dev/kvm, TAP devices and the capabilities the drivers need', () => {
    expect(server.devices).toEqual(expect.arrayContaining(['/dev/kvm', '/dev/net/tun']));
    expect(server.cap_add).toEqual(expect.arrayContaining(['SYS_ADMIN', 'NET_ADMIN']));
  });

  it('builds in stages from the repository on Node 20 and starts the server the way the README does', () => {
    expect(server.build).toEqual({ context: '.', dockerfile: 'Dockerfile' });
    const stages = instructions.filter((i) => i.op === 'FROM').map((i) => i.args);
    expect(stages.length).toBeGreaterThanOrEqual(2);
    for (const from of stages) expect(from).toMatch(/^node:20[-.]/);
    // Every file copied from the build context exists in the repository.
    for (const copy of instructions.filter((i) => i.op === 'COPY' && !i.args.startsWith('--from'))) {
      const sources = copy.args.split(/\s+/).slice(0, -1);
      for (const source of sources) expect(existsSync(join(root, source)), `COPY ${source}`).toBe(true);
    }
    // The runtime has what scripts/setup-host.sh installs on a plain host.
    const apt = runtimeStage.filter((i) => i.op === 'RUN').map((i) => i.args).join(' ');
    for (const pkg of ['runc', 'debootstrap']) expect(apt).toMatch(new RegExp(`\\b${pkg}\\b`));
    expect(runtimeStage.at(-1)).toEqual({ op: 'CMD', args: '["npm", "start"]' });
    const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string>; dependencies: Record<string, string> };
    // `npm start` must still work after `npm prune --omit=dev`.
    // It runs the compiled server with plain node (no TypeScript loader), compiling it with esbuild when stale.
    expect(pkg.scripts.start).toMatch(/^node (--\S+ )*scripts\/start\.mjs$/);
    expect(pkg.dependencies).toHaveProperty('esbuild');
  });

  it('keeps local installs and state out of the build context', () => {
    const ignored = readFileSync(join(root, '.dockerignore'), 'utf8').split('\n');
    for (const entry of ['node_modules', 'dist', 'data', '.git']) expect(ignored).toContain(entry);
  });
});

/** `${NAME:?message}` and `${NAME:-default}` as compose substitutes them, with `vars` set. */
function substitute(value: string, vars: Record<string, string>): string {
  return value.replace(/\$\{(\w+)(?::([?-])([^}]*))?\}/g, (_, name: string, kind?: string, rest?: string) => vars[name] ?? (kind === '-' ? (rest ?? '') : ''));
}

describe('docker-compose.fleet.yml (parsed, not run: no Docker engine here)', () => {
  const fleet = parse(readFileSync(join(root, 'docker-compose.fleet.yml'), 'utf8')) as {
    services: Record<string, { image?: string; command?: string[]; environment?: Record<string, string>; ports?: string[]; volumes?: string[]; devices?: string[]; cap_add?: string[]; hostname?: string; build?: unknown; depends_on?: Record<string, unknown> }>;
    volumes: Record<string, unknown>;
  };
  const vars = { VOIDRUN_CLUSTER_TOKEN: 'c'.repeat(64), VOIDRUN_ADMIN_KEY: 'a'.repeat(64) };
  const nodes = Object.entries(fleet.services).filter(([, s]) => s.environment?.VOIDRUN_ROLE);
  const env = (s: { environment?: Record<string, string> }) => Object.fromEntries(Object.entries(s.environment!).map(([k, v]) => [k, substitute(String(v), vars)]));

  it('runs a MongoDB replica set of 3, two API nodes and two hosts, all on the same store and token', () => {
    const mongos = Object.entries(fleet.services).filter(([, s]) => s.image?.startsWith('mongo:') && s.command?.[0] === 'mongod');
    expect(mongos.length).toBe(3);
    for (const [, m] of mongos) expect(m.command).toEqual(expect.arrayContaining(['--replSet', 'rs0']));
    expect(nodes.map(([, s]) => s.environment!.VOIDRUN_ROLE).sort()).toEqual(['api', 'api', 'host', 'host']);
    const uris = new Set(nodes.map(([, s]) => s.environment!.MONGO_URI));
    expect(uris.size).toBe(1);
    const uri = [...uris][0]!;
    for (const [name] of mongos) expect(uri).toContain(`${name}:27017`);
    expect(uri).toContain('replicaSet=rs0');
    expect(new Set(nodes.map(([, s]) => s.environment!.CLUSTER_TOKEN)).size).toBe(1);
    for (const [, s] of nodes) expect(s.depends_on).toHaveProperty('mongo-init');
  });

  it('gives every node only variables it reads, with values its config accepts', () => {
    for (const [name, s] of nodes) {
      expect(Object.keys(s.environment!).filter((v) => !configVariables.includes(v)), name).toEqual([]);
      expect(() => loadConfig(env(s)), name).not.toThrow();
    }
  });

  it('publishes the API nodes only; each host advertises its own service name on HOST_INTERNAL_PORT and keeps its state on its own volumes', () => {
    for (const [name, s] of nodes) {
      const config = loadConfig(env(s));
      if (config.VOIDRUN_ROLE === 'api') expect(s.ports, name).toEqual([expect.stringMatching(new RegExp(`^\\d+:${config.SERVER_PORT}$`))]);
      else {
        expect(s.ports, name).toBeUndefined();
        expect(config.HOST_ADVERTISE_ADDRESS).toBe(name);
        expect(s.hostname).toBe(name);
        expect(config.HOST_INTERNAL_PORT).toBe(33945);
        const targets = s.volumes!.map((v) => v.split(':')[1]);
        for (const dir of [config.DATA_DIR, config.BASE_IMAGES_DIR, config.INSTANCES_DIR, config.SNAPSHOTS_DIR]) expect(targets).toContain(dir);
        for (const src of s.volumes!.map((v) => v.split(':')[0]!).filter((v) => !v.startsWith('/'))) {
          expect(fleet.volumes).toHaveProperty(src);
          expect(src.startsWith(`${name}-`), src).toBe(true);
        }
        expect(s.cap_add).toEqual(expect.arrayContaining(['SYS_ADMIN', 'NET_ADMIN']));
      }
    }
  });

  it('refuses to start without the cluster token (compose stops with the message)', () => {
    const api = fleet.services.api1!;
    expect(api.environment!.CLUSTER_TOKEN).toMatch(/^\$\{VOIDRUN_CLUSTER_TOKEN:\?.+\}$/);
  });
});

describe('deploy/kubernetes (parsed, not applied: no cluster here)', () => {
  const dir = join(root, 'deploy', 'kubernetes');
  const kustomization = parse(readFileSync(join(dir, 'kustomization.yaml'), 'utf8')) as { resources: string[]; namespace: string };
  type Doc = { kind: string; metadata: { name: string }; spec?: any; stringData?: Record<string, string> };
  const docs: Doc[] = kustomization.resources.flatMap((file) => parseAllDocuments(readFileSync(join(dir, file), 'utf8')).map((d) => d.toJSON() as Doc));
  const find = (kind: string, name: string) => docs.find((d) => d.kind === kind && d.metadata.name === name)!;
  const secret = find('Secret', 'voidrun-fleet');
  /** A container's env with secrets and the downward API resolved as the cluster would. */
  const envOf = (workload: Doc) => {
    const container = workload.spec.template.spec.containers[0];
    const env: Record<string, string> = {};
    for (const e of container.env as Array<{ name: string; value?: string; valueFrom?: { secretKeyRef?: { name: string; key: string }; fieldRef?: { fieldPath: string } } }>) {
      if (e.value !== undefined) env[e.name] = e.value;
      else if (e.valueFrom?.secretKeyRef) {
        expect(e.valueFrom.secretKeyRef.name).toBe('voidrun-fleet');
        // The placeholders themselves are refused at startup (see the test below): an operator's secret stands in.
        env[e.name] = `${e.valueFrom.secretKeyRef.key}-${'s'.repeat(40)}`;
      } else if (e.valueFrom?.fieldRef?.fieldPath === 'status.podIP') env[e.name] = '10.0.0.12';
    }
    return { container, env };
  };

  it('lists every manifest in kustomization.yaml, each one parsing', () => {
    expect(kustomization.namespace).toBe('voidrun');
    expect(docs.map((d) => `${d.kind}/${d.metadata.name}`).sort()).toEqual(
      ['Deployment/voidrun-api', 'DaemonSet/voidrun-host', 'Job/mongodb-init', 'Namespace/voidrun', 'Secret/voidrun-fleet', 'Service/mongodb', 'Service/voidrun-api', 'StatefulSet/mongodb'].sort(),
    );
  });

  it('runs API nodes as a Deployment behind a Service on SERVER_PORT, and hosts as a privileged DaemonSet advertising the pod IP', () => {
    const api = envOf(find('Deployment', 'voidrun-api'));
    const host = envOf(find('DaemonSet', 'voidrun-host'));
    const apiConfig = loadConfig(api.env);
    const hostConfig = loadConfig(host.env);
    expect([apiConfig.VOIDRUN_ROLE, hostConfig.VOIDRUN_ROLE]).toEqual(['api', 'host']);
    for (const { env } of [api, host]) expect(Object.keys(env).filter((v) => !configVariables.includes(v))).toEqual([]);
    expect(api.container.ports).toEqual([{ name: 'http', containerPort: apiConfig.SERVER_PORT }]);
    expect(find('Service', 'voidrun-api').spec.ports[0].targetPort).toBe('http');
    expect(host.container.securityContext.privileged).toBe(true);
    expect(host.container.ports).toEqual(expect.arrayContaining([{ name: 'internal', containerPort: hostConfig.HOST_INTERNAL_PORT }]));
    expect(hostConfig.HOST_ADVERTISE_ADDRESS).toBe('10.0.0.12');
    expect(apiConfig.MONGO_URI).toBe(hostConfig.MONGO_URI);
    expect(apiConfig.CLUSTER_TOKEN).toBe(hostConfig.CLUSTER_TOKEN);
    const mounts = (host.container.volumeMounts as Array<{ mountPath: string }>).map((m) => m.mountPath);
    for (const d of [hostConfig.DATA_DIR, hostConfig.BASE_IMAGES_DIR, hostConfig.INSTANCES_DIR, hostConfig.SNAPSHOTS_DIR]) expect(mounts).toContain(d);
  });

  it("refuses to start with the secret's placeholders: the operator must set their own", () => {
    const api = find('Deployment', 'voidrun-api').spec.template.spec.containers[0].env as Array<{ name: string; value?: string }>;
    const env = Object.fromEntries(api.filter((e) => e.value !== undefined).map((e) => [e.name, e.value!]));
    expect(() => loadConfig({ ...env, CLUSTER_TOKEN: secret.stringData!['cluster-token']! })).toThrow(/CLUSTER_TOKEN is still the placeholder of the deployment files/);
    expect(() => loadConfig({ ...env, CLUSTER_TOKEN: 'c'.repeat(40), ADMIN_API_KEY: secret.stringData!['admin-api-key']! })).toThrow(/ADMIN_API_KEY is still the placeholder/);
  });

  it('points both tiers at the StatefulSet replica set (3 members, the headless service names)', () => {
    const mongo = find('StatefulSet', 'mongodb');
    expect(mongo.spec.replicas).toBe(3);
    expect(mongo.spec.serviceName).toBe('mongodb');
    const uri = loadConfig(envOf(find('Deployment', 'voidrun-api')).env).MONGO_URI!;
    for (const i of [0, 1, 2]) expect(uri).toContain(`mongodb-${i}.mongodb:27017`);
    expect(uri).toContain('replicaSet=rs0');
  });
});
