// A TCP proxy whose link can be cut silently (packets black-holed, no FIN/RST), as a network
// partition looks to both ends: only heartbeat timeouts can tell. It can also flip one bit of the
// client→server stream (a corrupted frame) and show every byte it forwards to a watcher (a capture).
import { createServer, connect, type Server, type Socket } from 'node:net';
import { Worker } from 'node:worker_threads';

export class CuttableProxy {
  private server: Server;
  private sockets: Socket[] = [];
  private cut = false;
  private flipAt: number | null = null;
  /** Bytes forwarded client → server so far (over all connections). */
  forwarded = 0;
  /** Sees every chunk forwarded client → server. */
  onForward: ((chunk: Buffer) => void) | null = null;
  port = 0;
  constructor(public targetPort: number) {
    this.server = createServer((c) => {
      if (this.cut) {
        c.on('error', () => {});
        this.sockets.push(c);
        return;
      } // a black hole accepts and says nothing
      const u = connect({ host: '127.0.0.1', port: this.targetPort });
      this.sockets.push(c, u);
      c.on('data', (d: Buffer) => {
        if (this.cut) return;
        if (this.flipAt !== null && this.flipAt < this.forwarded + d.length) {
          d = Buffer.from(d);
          const i = this.flipAt - this.forwarded;
          d[i] = d[i]! ^ 0x10;
          this.flipAt = null;
        }
        this.forwarded += d.length;
        this.onForward?.(d);
        u.write(d);
      });
      u.on('data', (d) => {
        if (!this.cut) c.write(d);
      });
      const end = () => {
        this.sockets = this.sockets.filter((x) => x !== c && x !== u);
        if (!this.cut) {
          c.destroy();
          u.destroy();
        }
      };
      c.on('close', end);
      u.on('close', end);
      c.on('error', () => {});
      u.on('error', () => {});
    });
  }
  async listen(): Promise<number> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as { port: number }).port;
    return this.port;
  }
  blackhole(): void {
    this.cut = true;
  }
  /** Ends a cut: the connections that lived through it are reset (their bytes were lost), new ones pass. */
  heal(): void {
    if (!this.cut) return;
    for (const s of this.sockets.splice(0)) s.destroy();
    this.cut = false;
  }
  /** Flips one bit of the client → server stream `afterBytes` from now. */
  flipBit(afterBytes: number): void {
    this.flipAt = this.forwarded + afterBytes;
  }
  close(): void {
    this.server.close();
    for (const s of this.sockets) s.destroy();
  }
}

/** The same proxy run in a worker thread (its forwarding never waits for the caller's event loop). */
export class ThreadedProxy {
  private worker: Worker | null = null;
  port = 0;
  constructor(readonly targetPort: number) {}

  async listen(): Promise<number> {
    const tsx = import.meta.resolve('tsx/esm/api');
    const entry = new URL('./fault-proxy-worker.ts', import.meta.url).href;
    const w = new Worker(
      `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`,
      { eval: true, workerData: { targetPort: this.targetPort } },
    );
    this.worker = w;
    w.unref();
    this.port = await new Promise<number>((resolve, reject) => {
      w.once('message', (m: { port: number }) => resolve(m.port));
      w.once('error', reject);
    });
    return this.port;
  }
  blackhole(): void {
    this.worker?.postMessage({ op: 'blackhole' });
  }
  heal(): void {
    this.worker?.postMessage({ op: 'heal' });
  }
  flipBit(afterBytes: number): void {
    this.worker?.postMessage({ op: 'flip', n: afterBytes });
  }
  close(): void {
    const w = this.worker;
    this.worker = null;
    if (!w) return;
    w.postMessage({ op: 'close' });
    setTimeout(() => {
      void w.terminate();
    }, 200).unref();
  }
}
