import { connect, type Socket } from 'node:net';

/**
 * A QEMU Machine Protocol client on the instance's `qmp.sock`: one connection per call sequence,
 * newline-delimited JSON, `qmp_capabilities` first. Events are skipped; errors become Errors with
 * QEMU's description.
 */
export class QmpSession {
  #buffer = '';
  #waiters: ((msg: Record<string, unknown>) => void)[] = [];

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.#buffer += chunk;
      let nl: number;
      while ((nl = this.#buffer.indexOf('\n')) >= 0) {
        const line = this.#buffer.slice(0, nl).trim();
        this.#buffer = this.#buffer.slice(nl + 1);
        if (!line) continue;
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line) as Record<string, unknown>;
        } catch {
          continue; // not QMP; never worth crashing the server over
        }
        if ('event' in msg) continue;
        this.#waiters.shift()?.(msg);
      }
    });
  }

  static async open(socketPath: string, timeoutMs = 5000): Promise<QmpSession> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = connect(socketPath);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error('QEMU did not answer on its QMP socket'));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
    const session = new QmpSession(socket);
    socket.on('error', () => {});
    try {
      await session.#next(timeoutMs); // the greeting
      await session.execute('qmp_capabilities');
    } catch (err) {
      // QEMU serves one monitor client at a time: a connection left open would lock out every later one.
      socket.destroy();
      throw err;
    }
    return session;
  }

  #next(timeoutMs: number): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const waiter = (msg: Record<string, unknown>) => {
        clearTimeout(timer);
        this.socket.off('close', onClose);
        resolve(msg);
      };
      // A late reply must not be taken for the next command's: a timed-out session is closed.
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        this.socket.destroy();
        reject(new Error('QEMU did not answer a QMP command in time'));
      }, timeoutMs);
      const onClose = () => reject(new Error('QEMU closed its QMP socket'));
      this.socket.once('close', onClose);
      this.#waiters.push(waiter);
    });
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    const reply = this.#next(timeoutMs);
    this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const msg = await reply;
    if (msg.error) throw new Error(`QEMU ${command}: ${(msg.error as { desc?: string }).desc ?? JSON.stringify(msg.error)}`);
    return msg.return as T;
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Runs `fn` with a fresh session, always closing it. */
export async function withQmp<T>(socketPath: string, fn: (qmp: QmpSession) => Promise<T>): Promise<T> {
  const qmp = await QmpSession.open(socketPath);
  try {
    return await fn(qmp);
  } finally {
    qmp.close();
  }
}
