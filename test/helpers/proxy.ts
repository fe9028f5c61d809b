// A TCP proxy whose link can be cut silently (packets black-holed, no FIN/RST), as a network
// partition looks to both ends: only heartbeat timeouts can tell.
import { createServer, connect, type Server, type Socket } from 'node:net';

export class CuttableProxy {
  private server: Server;
  private sockets: Socket[] = [];
  private cut = false;
  port = 0;
  constructor(public targetPort: number) {
    this.server = createServer((c) => {
      const u = connect({ host: '127.0.0.1', port: this.targetPort });
      this.sockets.push(c, u);
      c.on('data', (d) => { if (!this.cut) u.write(d); });
      u.on('data', (d) => { if (!this.cut) c.write(d); });
      const end = () => { if (!this.cut) { c.destroy(); u.destroy(); } };
      c.on('close', end); u.on('close', end);
      c.on('error', () => {}); u.on('error', () => {});
    });
  }
  async listen(): Promise<number> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as { port: number }).port;
    return this.port;
  }
  blackhole(): void { this.cut = true; }
  close(): void { this.server.close(); for (const s of this.sockets) s.destroy(); }
}
