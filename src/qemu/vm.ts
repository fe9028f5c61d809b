// One running QEMU: its tracked process, QMP client and serial console. Starts paused so that
// no console line is lost, and is always ended by PID (stop(), or our exit hook).

import { connect, type Socket } from 'node:net';
import { EventEmitter } from 'node:events';
import { join } from 'node:path';
import { closeSync, constants as fsc, openSync, rmSync, writeSync } from 'node:fs';
import { StringDecoder } from 'node:string_decoder';
import { spawnTracked, runCommand, type TrackedProcess, RubatoError, LineSplitter, logger } from '../util/index.ts';
import { QmpClient } from './qmp.ts';
import { qemuArgs, type VmSpec } from './spec.ts';

const log = logger('qemu');
/** How long an orderly stop waits for the guest's own shutdown (ACPI) before powering it off. */
export const DEFAULT_STOP_TIMEOUT_MS = 30_000;
const SERIAL_LINES_KEPT = 2000;
const CONSOLE_TAIL_BYTES = 8192;
/** RUBATO_TRIGGER=qmp: checkpoints always through QMP (to measure the two ways side by side). */
const QMP_TRIGGER_ONLY = process.env['RUBATO_TRIGGER'] === 'qmp';
/**
 * The COLO stream's send buffer in the guest's QEMU (qemu-patches/0007; the kernel doubles it):
 * QEMU resumes the guest once a checkpoint is all in the socket, so the default (about 200 KiB)
 * made the pause wait for this process to read the rest. Measured on redis SET under buffer mode,
 * pause median 4.7 ms -> 3.4 ms (docs/evaluation.md, stop 42).
 */
const COLO_SEND_BUFFER_BYTES = 4 << 20;

/**
 * After VMSTATE_SEND, QEMU's COLO thread gives its CPU up once (qemu-patches/0009): the kernel
 * queues this process on that thread's CPU, and without the hand-off it saw VMSTATE_SEND 0.8 ms
 * late on the test guest (docs/evaluation.md, stop 45). An operator may set RUBATO_COLO_HANDOFF=off.
 */
const COLO_HANDOFF = process.env['RUBATO_COLO_HANDOFF'] ?? 'yield';
// (qemu-patches/0010: a checkpoint's stop drains the disks but does not flush them, a round trip to
// the NBD server inside each pause; QEMU reads RUBATO_COLO_STOP_FLUSH=on from this process's
// environment to keep the flush, for measurement.)

export interface QemuBinary {
  path: string;
  firmwareDirs: readonly string[];
  /** Built with Rubato's COLO pre-send (qemu-patches/0003): dirty RAM can go out while the guest runs. */
  presend?: boolean;
  /** Reads checkpoint and pre-send requests from a FIFO (qemu-patches/0004): no QMP round trip. */
  trigger?: boolean;
}

export interface StartOptions {
  binary: QemuBinary;
  /** Folder for the sockets (must exist). */
  runDir: string;
  /** Leave the guest paused after start (default: run it). */
  paused?: boolean;
  incoming?: boolean;
  tag?: string;
  netSocket?: string;
  /** One per NIC, in the guest's order (netSocket: a one-NIC VM's). */
  netSockets?: readonly string[];
  nbdSocket?: string;
  /** One per disk, in the guest's order (nbdSocket: a one-disk VM's). */
  nbdSockets?: readonly string[];
}

export class QemuVm extends EventEmitter {
  readonly serialLines: string[] = [];
  private serialSocket: Socket | null = null;
  private exitedFlag = false;
  /** How QEMU ended (a signal's name, or its exit code), once it did. */
  exitedHow: string | null = null;
  stderrTail = '';

  /** This QEMU can pre-send dirty RAM during an epoch (ColoCapture.presend). */
  canPresend = false;
  /** Its trigger FIFO (qemu-patches/0004), when it has one; the writing end, once opened. */
  private triggerPath: string | null = null;
  private triggerFd: number | null = null;

  private constructor(
    readonly spec: VmSpec,
    readonly proc: TrackedProcess,
    readonly qmp: QmpClient,
    readonly paths: { qmp: string; serial: string },
  ) {
    super();
    void proc.exited.then((r) => {
      this.exitedFlag = true;
      this.closeTrigger();
      this.exitedHow = r.signal ?? `exit ${r.code}`;
      this.emit('exit', r);
    });
  }

  get pid(): number {
    return this.proc.pid;
  }
  get exited(): boolean {
    return this.exitedFlag;
  }

  static async start(spec: VmSpec, opts: StartOptions): Promise<QemuVm> {
    const tag = opts.tag ?? spec.name;
    const paths = { qmp: join(opts.runDir, `${tag}.qmp`), serial: join(opts.runDir, `${tag}.serial`) };
    const args = qemuArgs(
      spec,
      {
        qmpSocket: paths.qmp,
        serialSocket: paths.serial,
        firmwareDirs: opts.binary.firmwareDirs,
        netSockets: opts.netSockets?.length ? opts.netSockets : opts.netSocket ? [opts.netSocket] : [],
        nbdSockets: opts.nbdSockets?.length ? opts.nbdSockets : opts.nbdSocket ? [opts.nbdSocket] : [],
      },
      { paused: true, incoming: opts.incoming ?? false },
    );
    log.debug('starting', { vm: spec.name, argv: [opts.binary.path, ...args].join(' ') });
    const trigger = opts.binary.trigger ? await makeTriggerFifo(join(opts.runDir, `${tag}.trigger`)) : null;
    const proc = spawnTracked(`qemu:${tag}`, opts.binary.path, args, {
      env: {
        ...process.env,
        RUBATO_COLO_SNDBUF: String(COLO_SEND_BUFFER_BYTES),
        RUBATO_COLO_HANDOFF: COLO_HANDOFF,
        ...(trigger ? { RUBATO_COLO_TRIGGER: trigger } : {}),
      },
    });
    let stderr = '';
    proc.child.stderr?.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-8192);
    });
    const qmp = new QmpClient(paths.qmp, spec.name);
    const vm = new QemuVm(spec, proc, qmp, paths);
    vm.canPresend = opts.binary.presend === true;
    vm.triggerPath = trigger;
    proc.child.stderr?.on('data', () => {
      vm.stderrTail = stderr;
    });
    try {
      await Promise.race([
        qmp.connect(15_000),
        proc.exited.then(({ code, signal }) => {
          throw new RubatoError(
            'RUBATO_QEMU_START',
            `QEMU for VM ${spec.name} exited during start-up (code ${code}, signal ${signal}): ${stderr.trim().split('\n').slice(-3).join(' | ')}`,
            { vm: spec.name },
          );
        }),
      ]);
      await vm.attachSerial();
      if (!opts.paused && !opts.incoming) await qmp.execute('cont');
    } catch (e) {
      // QEMU that dies at start-up resets the QMP socket first: report its own words instead.
      const exited = await Promise.race([
        proc.exited.then(() => true),
        new Promise<boolean>((r) => setTimeout(() => r(false), 500)),
      ]);
      await vm.stop();
      if (exited && stderr.trim()) {
        throw new RubatoError(
          'RUBATO_QEMU_START',
          `QEMU for VM ${spec.name} failed to start: ${stderr.trim().split('\n').slice(-2).join(' | ')}`,
          { vm: spec.name },
          { cause: e },
        );
      }
      throw e;
    }
    return vm;
  }

  /**
   * Asks QEMU's COLO thread for a checkpoint (`C`) or a pre-send (`P`) through its trigger FIFO, as
   * x-checkpoint-delay does through QMP but without the round trip (about 1.4 ms under TCG here).
   * False when this QEMU has no FIFO or the byte could not be written: the caller uses QMP.
   */
  triggerColo(what: 'checkpoint' | 'presend'): boolean {
    if (!this.triggerPath || this.exitedFlag || QMP_TRIGGER_ONLY) return false;
    try {
      // Non-blocking: QEMU holds the FIFO open from its start, so this never waits for a reader.
      this.triggerFd ??= openSync(this.triggerPath, fsc.O_WRONLY | fsc.O_NONBLOCK);
      return writeSync(this.triggerFd, what === 'presend' ? 'P' : 'C') === 1;
    } catch (e) {
      log.debug(`trigger FIFO of VM ${this.spec.name}: ${(e as Error).message}; using QMP`);
      this.closeTrigger();
      return false;
    }
  }

  private closeTrigger(): void {
    if (this.triggerFd !== null) closeSync(this.triggerFd);
    this.triggerFd = null;
    if (this.exitedFlag && this.triggerPath) {
      rmSync(this.triggerPath, { force: true });
      this.triggerPath = null;
    }
  }

  private attachSerial(): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = connect(this.paths.serial);
      s.once('error', reject);
      s.once('connect', () => {
        s.off('error', reject);
        s.on('error', () => {
          /* QEMU gone: exit handler reports it */
        });
        this.serialSocket = s;
        resolve();
      });
      const text = new StringDecoder('utf8');
      const lines = new LineSplitter((line) => {
        this.serialLines.push(line);
        if (this.serialLines.length > SERIAL_LINES_KEPT) this.serialLines.shift();
        this.emit('serial', line);
      });
      s.on('data', (chunk: Buffer) => {
        this.keepConsoleTail(chunk);
        this.emit('serial-data', chunk);
        lines.push(text.write(chunk));
      });
    });
  }

  private consoleTail: Buffer[] = [];
  private consoleTailBytes = 0;

  private keepConsoleTail(chunk: Buffer): void {
    this.consoleTail.push(chunk);
    this.consoleTailBytes += chunk.length;
    while (this.consoleTailBytes - (this.consoleTail[0]?.length ?? 0) >= CONSOLE_TAIL_BYTES) {
      this.consoleTailBytes -= this.consoleTail.shift()!.length;
    }
  }

  /** The last bytes the guest wrote to its serial console (for an operator attaching). */
  consoleHistory(): Buffer {
    return Buffer.concat(this.consoleTail);
  }

  /** Types into the guest's serial console (an operator's keystrokes). */
  writeConsole(data: Buffer): void {
    if (!this.exitedFlag) this.serialSocket?.write(data);
  }

  /** Resolves with the first console line (already seen or future) that matches. */
  waitSerial(re: RegExp, timeoutMs: number, opts: { fromNow?: boolean } = {}): Promise<RegExpMatchArray> {
    if (!opts.fromNow) {
      for (const l of this.serialLines) {
        const m = l.match(re);
        if (m) return Promise.resolve(m);
      }
    }
    return new Promise((resolve, reject) => {
      const onLine = (l: string) => {
        const m = l.match(re);
        if (m) {
          cleanup();
          resolve(m);
        }
      };
      const onExit = () => {
        cleanup();
        reject(
          new RubatoError(
            'RUBATO_QEMU_EXITED',
            `VM ${this.spec.name} exited while waiting for ${re}: ${this.stderrTail.trim().split('\n').slice(-2).join(' | ')}`,
            { vm: this.spec.name },
          ),
        );
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new RubatoError(
            'RUBATO_QEMU_EXITED',
            `VM ${this.spec.name}: no console line matching ${re} within ${timeoutMs} ms (last: ${this.serialLines.at(-1) ?? 'none'})`,
            { vm: this.spec.name },
          ),
        );
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('serial', onLine);
        this.off('exit', onExit);
      };
      this.on('serial', onLine);
      this.on('exit', onExit);
    });
  }

  async status(): Promise<string> {
    const r = await this.qmp.execute<{ status: string }>('query-status');
    return r.status;
  }

  /**
   * Shuts the guest down as a host does: the ACPI power button, then (if QEMU has not exited within
   * `timeoutMs`: a guest that ignores ACPI, or hangs) a power-off. Never throws.
   */
  async shutdown(timeoutMs: number = DEFAULT_STOP_TIMEOUT_MS): Promise<'guest' | 'powered-off'> {
    if (this.exitedFlag) return 'guest';
    log.info(`VM ${this.spec.name}: shutting the guest down (ACPI; powered off after ${timeoutMs / 1000} s)`);
    const how = await this.powerdown(timeoutMs);
    log.info(`VM ${this.spec.name}: ${how === 'guest' ? 'the guest shut down' : 'powered off'}`);
    return how;
  }

  private async powerdown(timeoutMs: number): Promise<'guest' | 'powered-off'> {
    try {
      await this.qmp.execute('system_powerdown', undefined, 2000);
      const ended = await Promise.race([
        this.proc.exited.then(() => true),
        new Promise<boolean>((r) => setTimeout(() => r(false), timeoutMs).unref()),
      ]);
      if (ended) {
        await this.stop();
        return 'guest';
      }
      log.warn(`VM ${this.spec.name}: the guest did not shut down within ${timeoutMs / 1000} s; powering it off`);
    } catch {
      /* QMP gone: power off */
    }
    await this.stop();
    return 'powered-off';
  }

  /** Ends the VM: quit over QMP, then SIGKILL by PID if it lingers. Never throws. */
  async stop(graceMs = 1500): Promise<void> {
    if (!this.exitedFlag && !this.qmp.isClosed) {
      try {
        await this.qmp.execute('quit', undefined, 1000);
      } catch {
        /* fall through to kill */
      }
    }
    this.qmp.close();
    this.serialSocket?.destroy();
    await Promise.race([this.proc.exited, new Promise((r) => setTimeout(r, graceMs))]);
    this.proc.kill('SIGKILL');
    await this.proc.exited;
  }

  /** Simulates a host failure: SIGKILL by PID, no goodbye. */
  async kill(): Promise<void> {
    this.proc.kill('SIGKILL');
    this.qmp.close();
    this.serialSocket?.destroy();
    await this.proc.exited;
  }
}

/** A private FIFO for QEMU's trigger thread (mkfifo: node has no call for it). Null when it cannot be made. */
async function makeTriggerFifo(path: string): Promise<string | null> {
  rmSync(path, { force: true });
  const r = await runCommand('mkfifo', ['-m', '0600', path]);
  if (r.code === 0) return path;
  log.warn(`no trigger FIFO at ${path} (${r.stderr.trim()}); checkpoints are triggered through QMP`);
  return null;
}
