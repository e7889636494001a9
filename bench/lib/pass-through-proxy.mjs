// The floor of bench:fleet: the least a Node HTTP process on this machine can do to stand between
// a client and a fleet host. No auth, no store, no routing, no logging: every request is passed,
// headers and body as they are, to TARGET (the host's internal listener) over kept-alive sockets,
// and the answer piped back. Run with plain node: `node pass-through-proxy.mjs http://HOST:PORT`;
// prints its port on stdout.
import { Agent, createServer, request } from 'node:http';

const target = new URL(process.argv[2]);
const agent = new Agent({ keepAlive: true, maxFreeSockets: 64 });

const server = createServer((req, res) => {
  const headers = { ...req.headers };
  delete headers.connection;
  const up = request({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers, agent }, (answer) => {
    res.writeHead(answer.statusCode, answer.headers);
    answer.pipe(res);
  });
  up.on('error', () => res.destroy());
  req.pipe(up);
});
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
