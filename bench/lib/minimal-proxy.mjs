// The floor of bench:dataplane: the least a Node HTTP server on this machine can do to put a
// sandbox's agent behind HTTP. No auth, no store, no schema checks, no logging, no limits:
//   POST /exec           reads the body, sends the agent one tRPC WebSocket message over its unix
//                        socket (`process.run` with the JSON in the BENCH_EXEC_SPEC variable, as the
//                        bench's agent-alone baseline sends it) and answers the reply's data as JSON.
//   GET  /files?path=P   pipes the agent's GET /files/content?path=P to the response, one pipe.
//   PUT  /files?path=P   pipes the request body into the agent's PUT /files/content?path=P and
//                        answers the agent's answer.
// Run with plain node: `node minimal-proxy.mjs AGENT_SOCKET`; prints its port on stdout.
import { createServer, request } from 'node:http';
import { connect } from 'node:net';
import WebSocket from 'ws';

const socketPath = process.argv[2];
const spec = JSON.parse(process.env.BENCH_EXEC_SPEC ?? '{"command":"true"}');

const ws = new WebSocket('ws://agent/', { createConnection: () => connect(socketPath), perMessageDeflate: false });
await new Promise((resolve, reject) => {
  ws.once('open', resolve);
  ws.once('error', reject);
});
const waiting = new Map();
let nextId = 1;
ws.on('message', (raw) => {
  const msg = JSON.parse(raw.toString());
  const res = waiting.get(msg.id);
  waiting.delete(msg.id);
  if (!res) return;
  const body = JSON.stringify(msg.error ? { error: msg.error } : msg.result?.data ?? null);
  res.writeHead(msg.error ? 500 : 200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});

const agentFile = (method, path) => request({ socketPath, method, path: `/files/content?path=${encodeURIComponent(path)}`, headers: { host: 'agent' } });

const server = createServer((req, res) => {
  const url = new URL(req.url, 'http://proxy');
  if (url.pathname === '/exec') {
    req.resume();
    req.on('end', () => {
      const id = nextId++;
      waiting.set(id, res);
      ws.send(JSON.stringify({ id, method: 'mutation', params: { path: 'process.run', input: spec } }));
    });
    return;
  }
  const path = url.searchParams.get('path') ?? '';
  if (req.method === 'GET') {
    const up = agentFile('GET', path);
    up.on('response', (a) => {
      res.writeHead(a.statusCode, { 'content-type': 'application/octet-stream', ...(a.headers['content-length'] ? { 'content-length': a.headers['content-length'] } : {}) });
      a.pipe(res);
    });
    up.on('error', () => res.destroy());
    up.end();
    return;
  }
  const up = agentFile('PUT', path);
  if (req.headers['content-length']) up.setHeader('content-length', req.headers['content-length']);
  up.on('response', (a) => {
    res.writeHead(a.statusCode, { 'content-type': 'application/json' });
    a.pipe(res);
  });
  up.on('error', () => res.destroy());
  req.pipe(up);
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
