import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface ServerProcess {
  url: string;
  pid: number;
  instancesDir: string;
  /** The server process's resident memory now, in bytes. */
  rss(): number;
  stop(): Promise<void>;
}

/** The V8 flags `npm start` gives the server (package.json's `start` script), so a benchmark measures production settings. */
function startNodeFlags(): string[] {
  const start = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts.start ?? '';
  return start.split(' ').filter((word) => word.startsWith('--'));
}

/**
 * How the server is started: the compiled `dist/server/main.js`, as `npm start` runs it (compiled
 * first when a source is newer); `BENCH_SERVER_TSX=1` runs `server/main.ts` under tsx instead.
 */
async function serverEntryArgs(): Promise<string[]> {
  if (process.env.BENCH_SERVER_TSX === '1') return ['--import', 'tsx', join(root, 'server', 'main.ts')];
  // @ts-expect-error: a plain-JavaScript build script without type declarations
  const build = (await import('../../scripts/build-server.mjs')) as { buildServer(): Promise<void>; serverBuildStale(): boolean; serverEntry: string };
  if (build.serverBuildStale()) await build.buildServer();
  return [build.serverEntry];
}

/**
 * The real server (`server/main.ts`, compiled as `npm start` runs it) as its own process with fresh state directories, so a
 * benchmark's client and the server don't share an event loop, and the server's memory can be
 * read on its own.
 */
export async function startServerProcess(env: Record<string, string> = {}): Promise<ServerProcess> {
  const dir = mkdtempSync(join(tmpdir(), 'voidrun-bench-'));
  chmodSync(dir, 0o711);
  const runcRoot = join('/run/voidrun-bench', dir.split('/').pop()!);
  // BENCH_SERVER_NODE_ARGS: extra node flags for the server alone (`--cpu-prof --cpu-prof-dir=DIR` profiles it).
  const nodeArgs = process.env.BENCH_SERVER_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
  const child: ChildProcess = spawn(process.execPath, [...startNodeFlags(), ...nodeArgs, ...(await serverEntryArgs())], {
    cwd: root,
    env: {
      ...process.env,
      SERVER_PORT: '0',
      SERVER_HOST: '127.0.0.1',
      DATA_DIR: join(dir, 'data'),
      INSTANCES_DIR: join(dir, 'instances'),
      SNAPSHOTS_DIR: join(dir, 'snapshots'),
      RUNC_ROOT: runcRoot,
      PREPARE_DEFAULT_IMAGE: 'false',
      LOG_LEVEL: 'info',
      MONGO_URI: '',
      // The benchmarks measure the data plane, not the sandbox network: no bridge or NAT on the host.
      SANDBOX_NETWORK: 'none',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let port = 0;
  for await (const line of createInterface({ input: child.stdout! })) {
    const entry = JSON.parse(line) as { port?: number };
    if (entry.port) {
      port = entry.port;
      break;
    }
  }
  child.stdout!.resume();
  return {
    url: `http://127.0.0.1:${port}`,
    pid: child.pid!,
    instancesDir: join(dir, 'instances'),
    rss: () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))![1]) * 1024,
    async stop() {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
      // Sandboxes outlive a server stop by design; a benchmark's must not outlive the benchmark.
      const { execFileSync } = await import('node:child_process');
      try {
        for (const c of JSON.parse(execFileSync('runc', ['--root', runcRoot, 'list', '--format', 'json'], { encoding: 'utf8' }) || '[]') as Array<{ id: string }>) {
          execFileSync('runc', ['--root', runcRoot, 'delete', '--force', c.id]);
        }
        for (const line of readFileSync('/proc/self/mounts', 'utf8').split('\n')) {
          const mount = line.split(' ')[1];
          if (mount?.startsWith(dir)) execFileSync('umount', ['-l', mount]);
        }
      } catch {}
      rmSync(dir, { recursive: true, force: true });
      rmSync(runcRoot, { recursive: true, force: true });
    },
  };
}

/** The minimal Node proxy in front of one sandbox's agent (bench/lib/minimal-proxy.mjs), as its own process. */
export interface MinimalProxy {
  url: string;
  pid: number;
  stop(): void;
}

/**
 * Starts bench/lib/minimal-proxy.mjs for the agent listening on `agentSocket` under plain node with
 * `npm start`'s V8 flags: the floor any Node server on this machine starts from. `execSpec` is
 * what its POST /exec asks the agent to run.
 */
export async function startMinimalProxy(agentSocket: string, execSpec: unknown = { command: 'true' }): Promise<MinimalProxy> {
  const child = spawn(process.execPath, [...startNodeFlags(), join(root, 'bench', 'lib', 'minimal-proxy.mjs'), agentSocket], {
    cwd: root,
    env: { ...process.env, BENCH_EXEC_SPEC: JSON.stringify(execSpec) },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`the minimal proxy exited (${code})`)));
    child.stdout!.once('data', (d: Buffer) => resolve(Number(d.toString().trim())));
  });
  return { url: `http://127.0.0.1:${port}`, pid: child.pid!, stop: () => child.kill() };
}
