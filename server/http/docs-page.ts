import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import type { ServerResponse } from 'node:http';
import { sendAsset } from './static-asset.js';

const require = createRequire(import.meta.url);
const swaggerDir = dirname(require.resolve('swagger-ui-dist/package.json'));

/** The only swagger-ui files served, so no other path under the package can be read. */
const assets: Record<string, string> = {
  'swagger-ui.css': 'text/css; charset=utf-8',
  'swagger-ui-bundle.js': 'text/javascript; charset=utf-8',
  'swagger-ui-standalone-preset.js': 'text/javascript; charset=utf-8',
  'favicon-32x32.png': 'image/png',
};

const page = `<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>VoidRun API</title>
  <link rel="stylesheet" href="/api/docs/assets/swagger-ui.css">
  <link rel="icon" href="/api/docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="docs"></div>
  <script src="/api/docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({ url: '/api/openapi.json', dom_id: '#docs', deepLinking: true });
  </script>
</body>
</html>`;

/** Serves the API docs page at `/api/docs`, rendered by swagger-ui from the npm package (no CDN). */
export async function serveDocs(res: ServerResponse, subpath: string): Promise<boolean> {
  if (subpath === '' || subpath === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'content-length': Buffer.byteLength(page) });
    res.end(page);
    return true;
  }
  const name = subpath.startsWith('/assets/') ? subpath.slice('/assets/'.length) : '';
  const type = assets[name];
  if (!type) return false;
  await sendAsset(res, join(swaggerDir, name), type);
  return true;
}
