import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import type { ServerResponse } from 'node:http';
import { sendAsset } from './static-asset.js';

const require = createRequire(import.meta.url);
const xtermDir = dirname(require.resolve('@xterm/xterm/package.json'));
const fitDir = dirname(require.resolve('@xterm/addon-fit/package.json'));

/** The only files served under /console/assets, from npm packages (no CDN). */
const assets: Record<string, { file: string; type: string }> = {
  'xterm.js': { file: join(xtermDir, 'lib', 'xterm.js'), type: 'text/javascript; charset=utf-8' },
  'xterm.css': { file: join(xtermDir, 'css', 'xterm.css'), type: 'text/css; charset=utf-8' },
  'addon-fit.js': { file: join(fitDir, 'lib', 'addon-fit.js'), type: 'text/javascript; charset=utf-8' },
};

const page = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>VoidRun console</title>
<link rel="stylesheet" href="/console/assets/xterm.css">
<style>
  body { font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; background: #111; color: #ddd; }
  aside { width: 300px; padding: 12px; box-sizing: border-box; border-right: 1px solid #333; overflow: auto; }
  main { flex: 1; padding: 8px; display: flex; flex-direction: column; }
  #terminal { flex: 1; }
  input, button { font: inherit; margin: 2px 0; width: 100%; box-sizing: border-box; }
  li { margin: 4px 0; list-style: none; }
  ul { padding: 0; }
  #status { font-size: 12px; color: #9a9; min-height: 1.2em; }
  h1 { font-size: 18px; margin: 0 0 8px; }
</style>
</head>
<body>
<aside>
  <h1>VoidRun</h1>
  <label>API key <input id="apiKey" type="password" placeholder="vr_…" autocomplete="off"></label>
  <button id="connect">Connect</button>
  <div id="status"></div>
  <h2 style="font-size:14px">Sandboxes</h2>
  <ul id="sandboxes"></ul>
  <input id="newName" placeholder="new-sandbox-name">
  <button id="create">Create sandbox</button>
</aside>
<main><div id="terminal"></div></main>
<script src="/console/assets/xterm.js"></script>
<script src="/console/assets/addon-fit.js"></script>
<script>
const $ = (id) => document.getElementById(id);
const status = (text) => ($('status').textContent = text);
$('apiKey').value = localStorage.getItem('voidrun.apiKey') || '';
async function api(method, path, body) {
  const res = await fetch('/api' + path, {
    method,
    headers: { 'X-API-Key': $('apiKey').value, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await res.json();
  if (!res.ok) throw new Error(json.error || res.statusText);
  return json;
}
async function refresh() {
  localStorage.setItem('voidrun.apiKey', $('apiKey').value);
  try {
    const { data } = await api('GET', '/sandboxes?limit=100');
    const list = $('sandboxes');
    list.textContent = '';
    for (const sb of data) {
      const li = document.createElement('li');
      const button = document.createElement('button');
      button.textContent = 'Terminal: ' + sb.name + ' (' + sb.status + ')';
      button.dataset.sandbox = sb.id;
      button.onclick = () => openTerminal(sb);
      li.appendChild(button);
      list.appendChild(li);
    }
    status(data.length + ' sandbox(es)');
  } catch (e) { status(e.message); }
}
let term, socket, fit;
function openTerminal(sb) {
  if (socket) socket.close();
  if (!term) {
    term = new Terminal({ cursorBlink: true, convertEol: false });
    fit = new FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open($('terminal'));
    term.onData((d) => socket && socket.readyState === 1 && socket.send(d));
    window.addEventListener('resize', () => fit.fit());
    term.onResize(({ cols, rows }) => socket && socket.readyState === 1 && socket.send(JSON.stringify({ type: 'resize', cols, rows })));
  }
  term.reset();
  fit.fit();
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  socket = new WebSocket(proto + '//' + location.host + '/api/sandboxes/' + sb.id + '/pty?apiKey=' + encodeURIComponent($('apiKey').value) + '&cols=' + term.cols + '&rows=' + term.rows);
  socket.onopen = () => { status('connected to ' + sb.name); term.focus(); };
  socket.onmessage = (e) => term.write(typeof e.data === 'string' ? e.data : new Uint8Array(e.data));
  socket.onclose = (e) => status('terminal closed' + (e.reason ? ': ' + e.reason : ''));
}
$('connect').onclick = refresh;
$('create').onclick = async () => {
  status('creating…');
  try {
    const { data } = await api('POST', '/sandboxes', { name: $('newName').value });
    await refresh();
    openTerminal(data);
  } catch (e) { status(e.message); }
};
if ($('apiKey').value) refresh();
</script>
</body>
</html>`;

/** The browser console at `/` and `/console`: paste an API key, see and create sandboxes, open a terminal. */
export async function serveConsole(res: ServerResponse, path: string): Promise<boolean> {
  if (path === '/' || path === '/console' || path === '/console/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'content-length': Buffer.byteLength(page) });
    res.end(page);
    return true;
  }
  const asset = path.startsWith('/console/assets/') ? assets[path.slice('/console/assets/'.length)] : undefined;
  if (!asset) return false;
  await sendAsset(res, asset.file, asset.type);
  return true;
}
