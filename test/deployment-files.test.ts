import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
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
