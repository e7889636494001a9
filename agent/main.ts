/**
 * The agent: runs inside each sandbox (PID 2, under the sandbox's init or tini in a VM), serves the agent router over HTTP +
 * WebSocket on the transport the driver gives it: an already-listening socket inherited as file
 * descriptor VOIDRUN_AGENT_FD (container driver), a unix socket path in VOIDRUN_AGENT_SOCKET, or —
 * inside a microVM, where VOIDRUN_GUEST_CONFIG names the config disk — a TCP port guarded by the
 * sandbox's token.
 */
import { execFile } from 'node:child_process';
import { existsSync, statSync, unlinkSync } from 'node:fs';
import { createServer } from 'node:http';
import { applyWSSHandler } from '@trpc/server/adapters/ws';
import { WebSocketServer } from 'ws';
import { AGENT_REQUEST_HEADER, GUEST_AGENT_PORT, type GuestIdentity } from '../shared/guest-protocol.js';
import { applyGuestIdentity, configureGuest, listenWithToken, readGuestConfig } from './guest-system.js';
import { agentRouter, type AgentContext } from './router.js';
import { handleFileTransfer } from './services/files/transfer.js';
import { handlePortConnect } from './services/ports/connect.js';
import { handleProcessStream } from './services/process/output-stream.js';
import { ProcessManager } from './services/process/process-manager.js';
import { PtyManager } from './services/pty/pty-manager.js';
import { ShellSessions } from './services/shell/shell-sessions.js';
import { SandboxEnv } from './services/env/sandbox-env.js';
import { WatchSessions } from './services/files/watch-sessions.js';

const guest = process.env.VOIDRUN_GUEST_CONFIG ? readGuestConfig(process.env.VOIDRUN_GUEST_CONFIG) : null;
const busybox = process.env.VOIDRUN_BUSYBOX ?? 'busybox';
// The agent's own settings: from its environment, or in a guest from the config disk.
const settings: Record<string, string | undefined> = { ...process.env, ...guest?.agentSettings };
const listenFd = settings.VOIDRUN_AGENT_FD ? Number(settings.VOIDRUN_AGENT_FD) : null;
// In a container, sandbox commands share the agent's uid: a change of effective gid makes the
// kernel mark the agent non-dumpable (fs.suid_dumpable, which the driver requires not to be 1), so
// they cannot ptrace it, read /proc/<pid>/mem or fd/, or copy its socket with pidfd_getfd.
// Commands it starts exec and are dumpable again.
if (listenFd !== null) {
  process.setegid!(65534);
  process.setegid!(0);
}
const socketPath = settings.VOIDRUN_AGENT_SOCKET;
if (!guest && listenFd === null && !socketPath) {
  console.error('agent: none of VOIDRUN_AGENT_FD, VOIDRUN_AGENT_SOCKET, VOIDRUN_GUEST_CONFIG is set');
  process.exit(2);
}
// Before the first connection is accepted: commands must see the hostname and network.
const guestReady = guest ? configureGuest(guest, busybox) : Promise.resolve();

// What sandbox commands inherit: the agent's plain environment (PATH, HOME, …) without its own
// settings, plus the sandbox's envVars, which the driver passes encoded so they never configure
// the agent's Node.
const baseEnv: NodeJS.ProcessEnv = {};
for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('VOIDRUN_') && !k.startsWith('WS_NO_')) baseEnv[k] = v;
const plainEnv = { ...baseEnv };
const sandboxEnvVars: Record<string, string> = guest
  ? guest.env
  : settings.VOIDRUN_SANDBOX_ENV
    ? (JSON.parse(Buffer.from(settings.VOIDRUN_SANDBOX_ENV, 'base64').toString('utf8')) as Record<string, string>)
    : {};
Object.assign(baseEnv, sandboxEnvVars);
baseEnv.VOIDRUN_SANDBOX_ID = settings.VOIDRUN_SANDBOX_ID;
// Where commands, shells and terminals start: the image's workdir (VOIDRUN_WORKDIR, as Docker's
// WORKDIR) when it is a directory here, else the sandbox user's home.
const workdir = settings.VOIDRUN_WORKDIR;
const home = workdir && isDirectory(workdir) ? workdir : (process.env.HOME ?? '/');
const ctx: AgentContext = { processes: new ProcessManager(baseEnv, home), ptys: new PtyManager(baseEnv, home, Number(settings.VOIDRUN_PTY_IDLE_SEC ?? 3600) * 1000),
  shells: new ShellSessions(baseEnv, home), env: new SandboxEnv(baseEnv, plainEnv, sandboxEnvVars),
  watches: new WatchSessions(Number(settings.VOIDRUN_WATCH_IDLE_SEC ?? 300) * 1000), startedAt: Date.now() };

const server = createServer((req, res) => {
  // The server's nonce for this request, echoed on the answer: the server keeps a connection
  // for another request only after an answer that carried it.
  const nonce = req.headers[AGENT_REQUEST_HEADER];
  if (typeof nonce === 'string' && nonce.length <= 64) res.setHeader(AGENT_REQUEST_HEADER, nonce);
  // The driver polls this to know the agent serves (the socket accepts connections before that).
  if (req.url === '/ready') {
    res.writeHead(200, { 'content-type': 'text/plain' }).end('ok');
    return;
  }
  // A VM's clean stop: the guest has no ACPI daemon, so the driver asks the agent to power off.
  if (guest && req.url === '/poweroff' && req.method === 'POST') {
    res.writeHead(202).end();
    execFile(busybox, ['sync'], () => execFile(busybox, ['poweroff', '-f'], () => {}));
    return;
  }
  if (guest && req.url === '/identity' && req.method === 'POST') {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk: string) => {
      if (body.length < 64 * 1024) body += chunk; // a name and an address: anything longer is not JSON we want
    });
    req.on('end', () => {
      let identity: GuestIdentity;
      try {
        identity = JSON.parse(body) as GuestIdentity;
      } catch {
        res.writeHead(400).end();
        return;
      }
      // Commands started from now on see the new id (the managers spread this object at each spawn).
      if (typeof identity.sandboxId === 'string') baseEnv.VOIDRUN_SANDBOX_ID = identity.sandboxId;
      void applyGuestIdentity(identity, busybox).then(
        () => res.writeHead(204).end(),
        (err: Error) => res.writeHead(500).end(err.message),
      );
    });
    return;
  }
  void handleProcessStream(req, res, ctx.processes, ctx.shells)
    .then((handled) => handled || handleFileTransfer(req, res))
    .then((handled) => {
      if (!handled) res.writeHead(404).end();
    });
});
// The server closes its idle connections first (after 30 s), so it never sends on one closing here.
server.keepAliveTimeout = 65_000;
const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 * 1024 });
// An upgrade is a port tunnel (see shared/port-tunnel.ts) or the server's tRPC WebSocket.
server.on('upgrade', (req, socket, head: Buffer) => {
  if (handlePortConnect(req, socket, head)) return;
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
});
applyWSSHandler({ wss, router: agentRouter, createContext: () => ctx });

if (guest) {
  void guestReady.then(() =>
    listenWithToken(server, GUEST_AGENT_PORT, guest.token).once('listening', () => console.log(`agent: listening on port ${GUEST_AGENT_PORT} (guest ${guest.hostname})`)),
  );
} else if (listenFd !== null) {
  server.listen({ fd: listenFd }, () => console.log(`agent: listening on inherited fd ${listenFd} (pid ${process.pid})`));
} else {
  if (existsSync(socketPath!)) unlinkSync(socketPath!);
  server.listen(socketPath, () => console.log(`agent: listening on ${socketPath} (pid ${process.pid})`));
}

// A request the agent did not foresee fails that request, not the agent (and with it every
// session and process of the sandbox): log it, bounded, and go on.
let contained = 0;
const containFailure = (what: string) => (err: unknown) => {
  if (contained++ < 100) console.error(`agent: ${what} (contained): ${String((err as Error)?.stack ?? err).slice(0, 2000)}`);
};
process.on('uncaughtException', containFailure('uncaught exception'));
process.on('unhandledRejection', containFailure('unhandled rejection'));

const shutdown = () => {
  ctx.processes.killAll();
  ctx.ptys.killAll();
  ctx.shells.closeAll();
  void ctx.watches.closeAll();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}
