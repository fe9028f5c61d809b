// The guest's serial console for an operator (`rubato console VM`): a Unix socket in the
// controller's state folder (console.sock, 0600 in a 0700 folder) that joins the QEMU serial
// stream the controller already reads. A client first names the VM it wants (`attach NAME\n`,
// bounded); the answer is one line, `ok` or `error: why`, then raw bytes both ways: the last few
// KiB the guest wrote, then everything live. One operator at a time; the guest may change under
// the same socket (a standby that took over serves the guest it now runs).

import { createServer, type Server, type Socket } from 'node:net';
import { chmodSync, rmSync } from 'node:fs';
import { logger } from '../util/index.ts';
import type { QemuVm } from './vm.ts';

const log = logger('console');
const MAX_HELLO_BYTES = 128;

export class ConsoleServer {
  private server: Server | null = null;
  private attached: Socket | null = null;

  constructor(
    readonly path: string,
    /** The guest this controller runs now (null: none, e.g. a standby before a failover). */
    private readonly currentVm: () => QemuVm | null,
  ) {}

  async start(): Promise<void> {
    rmSync(this.path, { force: true });
    this.server = createServer((s) => this.accept(s));
    await new Promise<void>((resolve) => this.server!.listen(this.path, () => resolve()));
    chmodSync(this.path, 0o600);
  }

  private accept(s: Socket): void {
    s.on('error', (e) => log.debug(`console client went away: ${e.message}`));
    let hello = Buffer.alloc(0);
    const onHello = (d: Buffer) => {
      hello = Buffer.concat([hello, d]);
      const nl = hello.indexOf(10);
      if (nl < 0) {
        if (hello.length > MAX_HELLO_BYTES) s.end('error: bad request\n');
        return;
      }
      s.off('data', onHello);
      const m = /^attach ([A-Za-z0-9_.-]{1,64})$/.exec(hello.subarray(0, nl).toString('utf8').trim());
      if (!m) {
        s.end('error: bad request\n');
        return;
      }
      this.attach(s, m[1]!, hello.subarray(nl + 1));
    };
    s.on('data', onHello);
  }

  private attach(s: Socket, name: string, typed: Buffer): void {
    const vm = this.currentVm();
    if (!vm || vm.exited) {
      s.end('error: no guest runs under this controller\n');
      return;
    }
    if (vm.spec.name !== name) {
      s.end(`error: this controller runs VM ${vm.spec.name}, not ${name}\n`);
      return;
    }
    if (this.attached && !this.attached.destroyed) {
      s.end(`error: the console of VM ${name} is in use by another operator\n`);
      return;
    }
    this.attached = s;
    log.info(`operator attached to the console of VM ${name}`);
    s.write('ok\n');
    s.write(vm.consoleHistory());
    const out = (d: Buffer) => s.write(d);
    const gone = () => {
      if (!s.destroyed) s.end('\r\n[rubato: the guest stopped on this host]\r\n');
    };
    vm.on('serial-data', out);
    vm.once('exit', gone);
    if (typed.length) vm.writeConsole(typed);
    s.on('data', (d: Buffer) => vm.writeConsole(d));
    s.on('close', () => {
      vm.off('serial-data', out);
      vm.off('exit', gone);
      if (this.attached === s) this.attached = null;
      log.info(`operator detached from the console of VM ${name}`);
    });
  }

  close(): void {
    this.attached?.destroy();
    this.server?.close();
    rmSync(this.path, { force: true });
  }
}
