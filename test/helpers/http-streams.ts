import WebSocket from 'ws';

/** One Server-Sent Event: its `event:` name and its `data:` lines joined with "\n". */
export interface SseMessage {
  event: string;
  data: string;
  id?: string;
}

/** Parses a whole `text/event-stream` body into its events (comments and retry lines are skipped). */
export function parseSse(text: string): SseMessage[] {
  const out: SseMessage[] = [];
  for (const block of text.split(/\r?\n\r?\n/)) {
    let event = 'message';
    let id: string | undefined;
    const data: string[] = [];
    for (const line of block.split(/\r?\n/)) {
      const colon = line.indexOf(':');
      if (colon <= 0) continue;
      const field = line.slice(0, colon);
      const value = line.slice(colon + 1).replace(/^ /, '');
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
      else if (field === 'id') id = value;
    }
    if (data.length) out.push({ event, data: data.join('\n'), ...(id ? { id } : {}) });
  }
  return out;
}

/** An open WebSocket and everything it has received so far, as text. */
export interface OpenSocket {
  ws: WebSocket;
  received: string[];
  /** Resolves with all text received once it matches `pattern`; rejects if the socket closes first. */
  until(pattern: RegExp): Promise<string>;
  close(): Promise<void>;
}

/**
 * Opens a WebSocket with the given headers. Resolves with the handshake's HTTP status: 101 and the
 * socket when it upgrades, the refusal's status (and its body) otherwise.
 */
export function openSocket(url: string, headers: Record<string, string>): Promise<{ status: 101; socket: OpenSocket } | { status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers });
    const received: string[] = [];
    const waiters = new Set<() => void>();
    let closed = false;
    ws.on('message', (m) => {
      received.push(m.toString());
      for (const w of waiters) w();
    });
    ws.on('close', () => {
      closed = true;
      for (const w of waiters) w();
    });
    ws.once('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    ws.once('error', (err) => {
      if (ws.readyState !== WebSocket.OPEN) reject(err);
    });
    ws.once('open', () =>
      resolve({
        status: 101,
        socket: {
          ws,
          received,
          until(pattern) {
            return new Promise((done, fail) => {
              const check = () => {
                const text = received.join('');
                if (pattern.test(text)) {
                  waiters.delete(check);
                  done(text);
                } else if (closed) {
                  waiters.delete(check);
                  fail(new Error(`the socket closed before ${pattern}; got ${JSON.stringify(text.slice(-300))}`));
                }
              };
              waiters.add(check);
              check();
            });
          },
          close() {
            if (closed) return Promise.resolve();
            return new Promise<void>((done) => {
              ws.once('close', () => done());
              ws.close();
            });
          },
        },
      }),
    );
  });
}
