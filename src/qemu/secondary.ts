// The secondary of compare mode: a QEMU in COLO incoming mode (QEMU 7.2's own secondary) that runs
// the guest from the replica beside the primary, fed the same inbound frames, so that its replies
// can be compared with the primary's. Rubato plays the COLO primary's part of the protocol towards
// it: a precopy stream built from the replica (header, ENABLE_COLO, every RAM page, the devices),
// then, per committed checkpoint, CHECKPOINT_REQUEST → its pages into QEMU's COLO RAM cache and
// the device state → VMSTATE_LOADED: the secondary then runs on from exactly the primary's state
// at that checkpoint. `promote()` ends COLO (x-colo-lost-heartbeat): the secondary runs on as an
// ordinary VM.

import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { readFileSync, readdirSync, rmSync } from 'node:fs';
import { ByteReader, RubatoError, errorMessage, logger, procStatFields, withTimeout } from '../util/index.ts';
import {
  COLO_MSG,
  COLO_MSG_NAMES,
  MIG_CMD,
  TARGET_PAGE_SIZE,
  VM,
  coloMessage,
  coloMessageValue,
  encodeCommand,
  encodeConfiguration,
  encodeEos,
  encodeFooter,
  encodeHeader,
  encodeRamRecords,
  encodeRamSectionStart,
  encodeSectionHeader,
  type StreamPage,
} from './stream-format.ts';
import { QemuVm, type QemuBinary } from './vm.ts';
import type { VmSpec } from './spec.ts';

const log = logger('secondary');

/** The RAM section's id in streams Rubato writes (far from QEMU's device section ids). */
const RAM_SECTION_ID = 0x7f000001;
/** Pages read from the replica per piece of the initial stream. */
const RUN_BYTES = 4 << 20;

export interface SecondaryImage {
  machine: string;
  blocks: readonly { id: string; lengthBytes: number }[];
  /** `length` bytes of block `id` from `offset`, as the replica holds them. */
  read(id: string, offset: number, length: number): Promise<Buffer>;
  deviceState: Buffer;
}

export interface SecondaryOptions {
  binary: QemuBinary;
  runDir: string;
  tag: string;
  netSocket?: string;
  /** Its disk's NBD server (unix socket), when the VM has a disk. */
  nbdSocket?: string;
  /** Longest wait for one step of the protocol. */
  timeoutMs?: number;
}

export class ColoSecondary {
  private busy = false;
  private closed = false;
  /** Stopped by `pause()` (no input to answer): the next checkpoint's load runs it again, as does `resume()`. */
  private paused = false;

  private constructor(
    readonly vm: QemuVm,
    private readonly sock: Socket,
    private readonly reader: ByteReader,
    private readonly timeoutMs: number,
  ) {}

  /** Starts the secondary from `image` (the replica at one checkpoint); resolves once it runs in COLO mode. */
  static async start(spec: VmSpec, image: SecondaryImage, o: SecondaryOptions): Promise<ColoSecondary> {
    const { ramFile: _ignored, ...own } = spec; // its RAM is its own (plus QEMU's COLO cache)
    const vm = await QemuVm.start(
      { ...own, name: spec.name },
      {
        binary: o.binary,
        runDir: o.runDir,
        incoming: true,
        tag: o.tag,
        ...(o.netSocket ? { netSocket: o.netSocket } : {}),
        ...(o.nbdSocket ? { nbdSocket: o.nbdSocket } : {}),
      },
    );
    const timeoutMs = o.timeoutMs ?? 30_000;
    const sockPath = join(o.runDir, `${o.tag}.in`);
    try {
      await vm.qmp.execute('migrate-set-capabilities', {
        capabilities: [
          { capability: 'x-colo', state: true },
          { capability: 'events', state: true },
        ],
      });
      rmSync(sockPath, { force: true });
      await vm.qmp.execute('migrate-incoming', { uri: `unix:${sockPath}` });
      const sock = await new Promise<Socket>((resolve, reject) => {
        const s = connect(sockPath, () => resolve(s));
        s.once('error', reject);
      });
      sock.setNoDelay(true);
      const reader = new ByteReader(`COLO stream to the secondary of VM ${spec.name}`);
      sock.on('data', (d: Buffer) => reader.push(d));
      sock.on('error', (e) =>
        reader.end(new RubatoError('RUBATO_PEER_LOST', `secondary of ${spec.name}: ${e.message}`)),
      );
      sock.on('close', () => reader.end());
      const s = new ColoSecondary(vm, sock, reader, timeoutMs);
      s.watchColoExit();
      await s.sendImage(image);
      await withTimeout(
        s.expect(COLO_MSG.CHECKPOINT_READY),
        timeoutMs,
        `the secondary of VM ${spec.name} did not load its image`,
      );
      return s;
    } catch (e) {
      const tail = vm.stderrTail.trim().split('\n').slice(-6).join(' | ');
      await vm.stop();
      throw new RubatoError(
        'RUBATO_SECONDARY',
        `the secondary of VM ${spec.name} did not start: ${errorMessage(e)}${tail ? ` (QEMU: ${tail})` : ''}`,
        {},
        { cause: e },
      );
    } finally {
      rmSync(sockPath, { force: true });
    }
  }

  /**
   * QEMU's COLO thread ends on an error of its own (a device state it could not load, say): it
   * reports it on stderr, sends COLO_EXIT and then waits, the VM stopped, for a failover that
   * never comes. The wait for its next message fails at once with QEMU's reason instead of
   * timing out on a secondary that will never answer.
   */
  private watchColoExit(): void {
    const onEvent = (e: { event: string; data?: Record<string, unknown> }) => {
      if (e.event !== 'COLO_EXIT' || this.closed) return;
      // (QEMU writes its reason to stderr before the event: give the pipe a moment to catch up)
      setTimeout(() => this.lost(`left COLO (${String(e.data?.['reason'] ?? 'no reason given')})`), 50);
    };
    this.vm.qmp.on('event', onEvent);
    // QEMU gone (killed, crashed): whatever waits on it fails now, not at the step's timeout.
    this.vm.once('exit', () => {
      if (this.closed) return;
      this.lost(`exited (${this.vm.exitedHow})`);
      this.sock.destroy();
    });
  }

  /** What waits on the secondary fails with `what` happened to its QEMU, and what QEMU said last. */
  private lost(what: string): void {
    const why = this.qemuSays();
    this.reader.end(
      new RubatoError(
        'RUBATO_SECONDARY',
        `QEMU of the secondary of VM ${this.vm.spec.name} ${what}${why ? `: ${why}` : ''}`,
      ),
    );
  }

  private streamClosed(): RubatoError {
    return new RubatoError('RUBATO_PEER_LOST', `the secondary of VM ${this.vm.spec.name} closed its stream`);
  }

  /** The last lines QEMU wrote to stderr, on one line. */
  private qemuSays(): string {
    return this.vm.stderrTail.trim().split('\n').slice(-4).join(' | ');
  }

  private async write(b: Buffer | Buffer[]): Promise<void> {
    if (this.sock.destroyed) throw this.streamClosed();
    const list = Array.isArray(b) ? b : [b];
    let ok = true;
    for (const x of list) ok = this.sock.write(x) && ok;
    if (!ok)
      await new Promise<void>((resolve, reject) => {
        const onErr = (e: Error) => done(e);
        const onClose = () => done(this.streamClosed());
        const onDrain = () => done(null);
        const done = (e: Error | null) => {
          this.sock.off('error', onErr);
          this.sock.off('close', onClose);
          this.sock.off('drain', onDrain);
          if (e) reject(e);
          else resolve();
        };
        this.sock.once('error', onErr);
        this.sock.once('close', onClose);
        this.sock.once('drain', onDrain);
      });
  }

  /** The precopy: every page of every block (an all-zero page as a zero record), then the devices. */
  private async sendImage(image: SecondaryImage): Promise<void> {
    await this.write([
      encodeHeader(),
      encodeConfiguration(image.machine, []),
      encodeCommand(MIG_CMD.ENABLE_COLO),
      encodeRamSectionStart(RAM_SECTION_ID, image.blocks),
    ]);
    const last = { block: null as string | null };
    for (const b of image.blocks) {
      for (let off = 0; off < b.lengthBytes; off += RUN_BYTES) {
        const len = Math.min(RUN_BYTES, b.lengthBytes - off);
        const run = await image.read(b.id, off, len);
        const pages: StreamPage[] = [];
        for (let p = 0; p < len; p += TARGET_PAGE_SIZE) {
          const data = run.subarray(p, p + TARGET_PAGE_SIZE);
          pages.push(
            isZero(data)
              ? { block: b.id, offset: off + p, data: null, fill: 0 }
              : { block: b.id, offset: off + p, data },
          );
        }
        await this.write([
          encodeSectionHeader(VM.SECTION_PART, RAM_SECTION_ID),
          ...encodeRamRecords(pages, last),
          encodeEos(),
          encodeFooter(RAM_SECTION_ID),
        ]);
      }
    }
    // The devices, then an empty VM description (QEMU reads one after the EOF).
    const desc = Buffer.from([VM.VMDESCRIPTION, 0, 0, 0, 0]);
    await this.write([
      encodeSectionHeader(VM.SECTION_END, RAM_SECTION_ID),
      encodeEos(),
      encodeFooter(RAM_SECTION_ID),
      image.deviceState,
      desc,
    ]);
  }

  private async expect(want: number): Promise<void> {
    const got = await this.reader.readBe32();
    if (got !== want)
      throw new RubatoError(
        'RUBATO_STREAM_FORMAT',
        `the secondary of VM ${this.vm.spec.name} sent ${COLO_MSG_NAMES[got] ?? `message ${got}`}, expected ${COLO_MSG_NAMES[want]}`,
      );
  }

  /**
   * Brings the secondary to a committed checkpoint: it stops, takes `pages` (every page the
   * checkpoint changed) and the device state, and runs on from there. Its own changes since the
   * last checkpoint are undone by QEMU (the COLO cache). Resolves once it runs again.
   */
  async checkpoint(
    pages: readonly StreamPage[],
    deviceState: Buffer,
    whileStopped?: () => Promise<void>,
  ): Promise<{ pausedMs: number }> {
    if (this.closed) throw new RubatoError('RUBATO_SECONDARY', `the secondary of VM ${this.vm.spec.name} is gone`);
    if (this.busy) throw new RubatoError('RUBATO_SECONDARY', 'one secondary checkpoint at a time');
    this.busy = true;
    // (where a load that never ends stopped: the timeout names it)
    let step = 'its CHECKPOINT_REPLY (QEMU stopping the VM: vCPUs, then the disk drained)';
    try {
      const run = async () => {
        await this.write(coloMessage(COLO_MSG.CHECKPOINT_REQUEST));
        await this.expect(COLO_MSG.CHECKPOINT_REPLY);
        const t0 = performance.now();
        step = "its disk overlay's discard";
        await whileStopped?.(); // (its disk goes back to the checkpoint's here)
        step = 'the checkpoint written to it';
        await this.write([
          coloMessage(COLO_MSG.VMSTATE_SEND),
          encodeSectionHeader(VM.SECTION_END, RAM_SECTION_ID),
          ...encodeRamRecords(pages, { block: null }),
          encodeEos(),
          encodeFooter(RAM_SECTION_ID),
          Buffer.from([VM.EOF]),
          coloMessageValue(COLO_MSG.VMSTATE_SIZE, deviceState.length),
          deviceState,
        ]);
        step = 'its VMSTATE_RECEIVED';
        await this.expect(COLO_MSG.VMSTATE_RECEIVED);
        step = 'its VMSTATE_LOADED (QEMU loading the device state)';
        await this.expect(COLO_MSG.VMSTATE_LOADED);
        this.paused = false; // COLO starts the VM after each load
        return { pausedMs: performance.now() - t0 };
      };
      return await withTimeout(
        run(),
        this.timeoutMs,
        () => `the secondary of VM ${this.vm.spec.name} did not load a checkpoint (waiting for ${step})`,
      );
    } finally {
      this.busy = false;
    }
  }

  /**
   * Stops the secondary's vCPUs while it has nothing to answer (QMP `stop`), so an idle secondary
   * costs no CPU: a TCG guest whose connections the clients never acknowledged to it spins on
   * retransmissions. COLO's next checkpoint starts it again (QEMU stops a VM for the load and
   * starts it after), as `resume()` does.
   */
  async pause(): Promise<void> {
    if (this.closed || this.busy || this.paused) return;
    this.paused = true;
    await this.vm.qmp.execute('stop');
  }

  async resume(): Promise<void> {
    if (this.closed || !this.paused) return;
    this.paused = false;
    await this.vm.qmp.execute('cont');
  }

  /** What QEMU says of itself (a load that never ended: is its main loop alive, in which state). */
  async diagnose(): Promise<string> {
    const ask = (cmd: string) =>
      withTimeout(this.vm.qmp.execute(cmd), 1000, `an answer to ${cmd}`).then(
        (r) => JSON.stringify(r).slice(0, 300),
        (e: unknown) => errorMessage(e),
      );
    const said = this.qemuSays();
    return `QEMU ${this.vm.exited ? `exited (${this.vm.exitedHow})` : `runs; query-status: ${await ask('query-status')}; query-migrate: ${await ask('query-migrate')}; threads (state, kernel wait): ${threadWaits(this.vm.pid)}`}${said ? `; its stderr: ${said}` : ''}`;
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /** COLO ends here: the secondary runs on as an ordinary VM (failover). */
  async promote(): Promise<QemuVm> {
    await this.resume(); // (stopped while idle: it runs from its checkpoint, as COLO left it)
    this.closed = true;
    await this.vm.qmp.execute('x-colo-lost-heartbeat');
    const until = Date.now() + this.timeoutMs;
    for (;;) {
      const s = await this.vm.qmp.execute<{ status: string }>('query-status');
      if (s.status === 'running') break;
      if (Date.now() > until)
        throw new RubatoError(
          'RUBATO_SECONDARY',
          `the secondary of VM ${this.vm.spec.name} is ${s.status} after failover`,
        );
      await new Promise((r) => setTimeout(r, 5));
    }
    this.sock.destroy();
    log.info(`secondary of VM ${this.vm.spec.name} promoted: it runs on as the guest`);
    return this.vm;
  }

  /** The secondary is not needed any more (a new image, an orderly end, a restore instead). */
  async stop(): Promise<void> {
    this.closed = true;
    this.sock.destroy();
    await this.vm.stop();
  }
}

/** Each thread of process `pid`: its name, state and where in the kernel it waits (/proc). */
function threadWaits(pid: number): string {
  const read = (p: string) => {
    try {
      return readFileSync(p, 'utf8').trim();
    } catch {
      return '?';
    }
  };
  try {
    return readdirSync(`/proc/${pid}/task`)
      .map((tid) => {
        const state = procStatFields(`/proc/${pid}/task/${tid}/stat`)?.[0] ?? '?';
        return `${read(`/proc/${pid}/task/${tid}/comm`)} ${state} ${read(`/proc/${pid}/task/${tid}/wchan`) || '-'}`;
      })
      .join(', ');
  } catch (e) {
    return errorMessage(e);
  }
}

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);
const isZero = (b: Buffer): boolean => b.equals(ZERO_PAGE);
