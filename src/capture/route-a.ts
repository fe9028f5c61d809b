// Route A: Rubato acts as the secondary of QEMU's COLO checkpointing. The primary QEMU migrates
// to a unix socket Rubato listens on; Rubato parses the full precopy, then one checkpoint per
// trigger, and lets the guest resume the moment a checkpoint is local (speculative execution).
// It must never leave the guest paused: any failure ends COLO on the primary and resumes the guest.

import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { rmSync } from 'node:fs';
import { RubatoError, assert, errorMessage, logger, withTimeout, ByteReader, sleep } from '../util/index.ts';
import {
  type QemuVm,
  type QmpEvent,
  COLO_MSG,
  COLO_MSG_NAMES,
  COLO_PRESEND_DELAY_MAGIC,
  COLO_PRESEND_MARK,
  VM,
  coloMessage,
} from '../qemu/index.ts';
import { newRamState, readFooter, readPrecopy, readRamRecords, type PageSink, type RamState } from './stream/parser.ts';
import { MAX_DEVICE_STATE_BYTES, PageSet, type BaseImage, type Checkpoint, type DirtyPage } from './checkpoint.ts';

const log = logger('capture-a');

/** Migration sockets listening right now (leak checks in tests). */
const listening = new Set<string>();
export function liveMigrationSockets(): string[] {
  return [...listening];
}

/** Longest wait for QEMU's RESUME after a checkpoint before the next trigger is sent anyway. */
const RESUME_WAIT_MS = 50;

/** With this delay QEMU never checkpoints on its own: the scheduler owns the tempo. */
const NEVER_MS = 2 ** 31 - 1;

export interface ColoCaptureOptions {
  runDir: string;
  /** Precopy progress (bytes received so far). */
  onProgress?: (bytes: number) => void;
  /** Per-phase timeouts. */
  precopyTimeoutMs?: number;
  checkpointTimeoutMs?: number;
  /** Runs with the guest still paused after the full image, before it resumes (may extend the image). */
  beforeReady?: (base: BaseImage) => Promise<void> | void;
  /**
   * Where the full image's pages go as they arrive (e.g. straight onto the link to the standby).
   * Without one they are collected in memory into `base.ram` (tools and tests with small guests).
   */
  baseSink?: PageSink;
}

/** Unread migration stream buffered before the socket stops reading (QEMU then waits). */
const STREAM_HIGH_WATER = 32 << 20;
const STREAM_LOW_WATER = 8 << 20;

export interface CheckpointOptions {
  /** Runs when QEMU asks for the checkpoint (CHECKPOINT_REQUEST), before it is answered: QEMU then stops the guest. */
  onRequest?: () => void;
  /**
   * Runs as soon as QEMU says the guest is stopped (VMSTATE_SEND: its vm_stop drained the guest's I/O), before the
   * rest of the stream is read: the epoch's output and disk writes close here.
   */
  onStopped?: () => void;
  /** Runs once the checkpoint is local (may add pages, e.g. the disk's); without `hold`, the guest may run again. */
  onLocal?: (cp: Checkpoint) => Promise<void> | void;
  /** Called while the guest is still paused with the checkpoint complete; the guest resumes after. */
  hold?: (cp: Checkpoint) => Promise<void>;
}

export class ColoCapture {
  private epoch = 0;
  private busy = false;
  private failed: Error | null = null;
  private readonly st: RamState = newRamState();

  /**
   * Set once the last checkpoint's VMSTATE_LOADED is written, until QEMU reports the guest running
   * again (RESUME). QEMU re-arms its checkpoint trigger (qemu_event_reset, after our
   * VMSTATE_RECEIVED) before it resumes the guest: a trigger sent earlier would be swallowed by
   * that reset and the checkpoint wait for the 250 ms re-trigger.
   */
  private resumePending: { done: Promise<void>; resolve: () => void } | null = null;
  private readonly onQmpEvent = (e: QmpEvent) => {
    if (e.event === 'RESUME') this.resumed();
  };

  private constructor(
    private readonly vm: QemuVm,
    private readonly server: Server,
    private readonly sock: Socket,
    private readonly reader: ByteReader,
    private readonly sockPath: string,
    private readonly opts: ColoCaptureOptions,
  ) {
    vm.qmp.on('event', this.onQmpEvent);
  }

  /** The guest is about to be resumed by QEMU: the next trigger waits for its RESUME (bounded). */
  private expectResume(): void {
    let resolve!: () => void;
    const done = new Promise<void>((r) => {
      resolve = r;
    });
    this.resumePending = { done, resolve };
  }

  private resumed(): void {
    const p = this.resumePending;
    this.resumePending = null;
    p?.resolve();
  }

  /** Starts COLO on the VM and reads the full precopy into a base image. The guest runs afterwards. */
  static async start(vm: QemuVm, opts: ColoCaptureOptions): Promise<{ capture: ColoCapture; base: BaseImage }> {
    const sockPath = join(opts.runDir, `${vm.spec.name}.mig`);
    rmSync(sockPath, { force: true });
    const server = createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(sockPath, () => resolve());
    });
    listening.add(sockPath);
    const reader = new ByteReader(`COLO stream of VM ${vm.spec.name}`);
    const accepted = new Promise<Socket>((resolve) => {
      server.once('connection', (s: Socket) => {
        server.on('connection', (extra: Socket) => extra.destroy()); // one primary per capture
        s.setNoDelay(true);
        reader.setFlowControl(
          STREAM_HIGH_WATER,
          STREAM_LOW_WATER,
          () => s.pause(),
          () => s.resume(),
        );
        s.on('data', (d: Buffer) => {
          reader.push(d);
        });
        s.on('error', (e) =>
          reader.end(new RubatoError('RUBATO_STREAM_TRUNCATED', `COLO stream of VM ${vm.spec.name}: ${e.message}`)),
        );
        s.on('close', () => reader.end());
        resolve(s);
      });
    });
    try {
      await awaitMigrationSettled(vm);
      await vm.qmp.execute('migrate-set-capabilities', {
        capabilities: [
          { capability: 'x-colo', state: true },
          { capability: 'events', state: true },
          { capability: 'x-ignore-shared', state: false },
        ],
      });
      await vm.qmp.execute('migrate-set-parameters', {
        'max-bandwidth': 2 ** 40,
        'x-checkpoint-delay': NEVER_MS,
        'downtime-limit': 300,
      });
      await vm.qmp.execute('migrate', { uri: `unix:${sockPath}` });
    } catch (e) {
      stopListening(server, sockPath);
      throw e;
    }
    let sock: Socket;
    try {
      sock = await withTimeout(accepted, 10_000, `VM ${vm.spec.name} did not connect to the migration socket`);
    } catch (e) {
      // A connection that arrives after we gave up must find nothing listening.
      stopListening(server, sockPath);
      void accepted.then((late) => late.destroy());
      await ensureGuestRunning(vm);
      throw e;
    }
    const capture = new ColoCapture(vm, server, sock, reader, sockPath, opts);
    try {
      const base = await withTimeout(
        capture.readBase(),
        opts.precopyTimeoutMs ?? 300_000,
        `precopy of VM ${vm.spec.name} did not finish`,
      );
      await opts.beforeReady?.(base);
      // QEMU enters its COLO loop and resumes the guest once it reads this: the first trigger waits
      // for that RESUME (a request before it would be dropped, and stock QEMU 7.2 can even abort on
      // one that races COLO's start).
      capture.expectResume();
      sock.write(coloMessage(COLO_MSG.CHECKPOINT_READY));
      return { capture, base };
    } catch (e) {
      await capture.abort(e as Error);
      throw e;
    }
  }

  private async readBase(): Promise<BaseImage> {
    const ram = new Map<string, Buffer>();
    const sink = this.opts.baseSink ?? memorySink(ram, this.st);
    let lastReport = 0;
    const report = this.opts.onProgress;
    const counted: PageSink = report
      ? {
          ...sink,
          page: (id, off, data) => {
            sink.page(id, off, data);
            if (this.reader.consumed - lastReport > 8 << 20) {
              lastReport = this.reader.consumed;
              report(lastReport);
            }
          },
        }
      : sink;
    const pre = await readPrecopy(this.reader, this.st, counted);
    if (!pre.colo)
      throw new RubatoError('RUBATO_STREAM_FORMAT', `VM ${this.vm.spec.name}: the stream did not enable COLO`);
    if (!this.opts.baseSink)
      for (const id of this.st.blockOrder) if (!ram.has(id)) ram.set(id, Buffer.alloc(this.st.blocks.get(id)!));
    report?.(this.reader.consumed);
    return {
      machine: pre.config.machine,
      blocks: this.st.blockOrder.map((id) => ({ id, lengthBytes: this.st.blocks.get(id)! })),
      ram,
      deviceState: pre.deviceState,
    };
  }

  get lastEpoch(): number {
    return this.epoch;
  }

  /** Pages pre-sent during the running epoch (the latest copy of each); they join its checkpoint. */
  private present = new PageSet();
  /** This QEMU can pre-send (Rubato's patched QEMU). */
  get canPresend(): boolean {
    return this.vm.canPresend;
  }

  /**
   * Pre-send (QEMU patch 0003): with the guest running, QEMU sends the RAM dirtied since the last
   * checkpoint or pre-send; the pages are kept here and join the next checkpoint, whose pause then
   * carries only what was written after this — or, with `handOver`, go to the caller at once (the
   * primary streams them to the standby's staging) and the checkpoint carries only its pause's. A
   * page written again later is sent again (QEMU's dirty log restarts at the sync) and the later
   * copy wins. On any failure the capture fails as a checkpoint's would (the guest runs on
   * unprotected).
   */
  async presend(handOver?: (pages: DirtyPage[]) => void): Promise<{ pages: number; ms: number }> {
    if (!this.vm.canPresend)
      throw new RubatoError(
        'RUBATO_CAPTURE_FAILED',
        `the QEMU of VM ${this.vm.spec.name} cannot pre-send dirty RAM (Rubato's patched QEMU can)`,
      );
    if (this.failed)
      throw new RubatoError(
        'RUBATO_CAPTURE_FAILED',
        `capture of VM ${this.vm.spec.name} has failed: ${this.failed.message}`,
      );
    assert(!this.busy, 'one checkpoint or pre-send at a time');
    this.busy = true;
    const t0 = performance.now();
    try {
      await this.awaitRearmed();
      await this.trigger('presend');
      const timeoutMs = this.opts.checkpointTimeoutMs ?? 10_000;
      const read = async () => {
        const mark = await this.reader.readBe32();
        if (mark !== COLO_PRESEND_MARK)
          throw new RubatoError(
            'RUBATO_STREAM_FORMAT',
            `COLO stream of VM ${this.vm.spec.name}: expected a pre-send, got ${COLO_MSG_NAMES[mark] ?? `0x${mark.toString(16)}`}`,
          );
        const t = await this.reader.readU8();
        const sid = await this.reader.readBe32();
        if (t !== VM.SECTION_PART || sid !== this.st.ramSectionId) {
          throw new RubatoError(
            'RUBATO_STREAM_FORMAT',
            `COLO stream of VM ${this.vm.spec.name}: a pre-send must be a RAM section part, got type 0x${t.toString(16)} section ${sid}`,
          );
        }
        // (not copied: a page is a slice of the socket's chunk or a buffer of its own, never reused;
        // the chunks it pins are mostly its fellow pages)
        const got: DirtyPage[] = [];
        await readRamRecords(this.reader, this.st, {
          page: (block, offset, data) => {
            got.push({ block, offset, data });
          },
          zero: (block, offset, fill) => {
            got.push({ block, offset, data: null, fill });
          },
        });
        await readFooter(this.reader, sid);
        return got;
      };
      const pages = await withTimeout(read(), timeoutMs, `pre-send of VM ${this.vm.spec.name} did not arrive`);
      if (handOver) handOver(pages);
      else for (const p of pages) this.present.set(p);
      return { pages: pages.length, ms: performance.now() - t0 };
    } catch (e) {
      await this.abort(e as Error);
      throw e;
    } finally {
      this.busy = false;
    }
  }

  /** QEMU re-arms its trigger before it resumes the guest after a checkpoint: wait for that (bounded). */
  private async awaitRearmed(): Promise<void> {
    const pending = this.resumePending;
    if (pending) await Promise.race([pending.done, new Promise((r) => setTimeout(r, RESUME_WAIT_MS))]);
    this.resumePending = null;
  }
  get isFailed(): boolean {
    return this.failed !== null;
  }

  private async expectMsg(want: number): Promise<void> {
    const got = await this.reader.readBe32();
    if (got !== want) {
      throw new RubatoError(
        'RUBATO_STREAM_FORMAT',
        `COLO stream of VM ${this.vm.spec.name}: expected ${COLO_MSG_NAMES[want]}, got ${COLO_MSG_NAMES[got] ?? `message ${got}`}`,
      );
    }
  }

  /** How checkpoints and pre-sends were asked for: QEMU's trigger FIFO, or QMP (a QEMU without it). */
  readonly triggers = { fifo: 0, qmp: 0 };

  private async trigger(what: 'checkpoint' | 'presend' = 'checkpoint'): Promise<void> {
    if (this.vm.triggerColo(what)) {
      this.triggers.fifo++;
      return;
    }
    this.triggers.qmp++;
    const delay = what === 'presend' ? COLO_PRESEND_DELAY_MAGIC : NEVER_MS;
    await this.vm.qmp.execute('migrate-set-parameters', { 'x-checkpoint-delay': delay });
  }

  /**
   * Takes one checkpoint: triggers it, answers QEMU, reads the dirty pages and device state, and
   * resumes the guest. On any failure the guest is resumed unprotected and the capture is failed.
   */
  async checkpoint(opts: CheckpointOptions = {}): Promise<Checkpoint> {
    if (this.failed)
      throw new RubatoError(
        'RUBATO_CAPTURE_FAILED',
        `capture of VM ${this.vm.spec.name} has failed: ${this.failed.message}`,
      );
    assert(!this.busy, 'one checkpoint at a time');
    this.busy = true;
    try {
      return await this.checkpointInner(opts);
    } catch (e) {
      await this.abort(e as Error);
      throw e;
    } finally {
      this.busy = false;
    }
  }

  private async checkpointInner(opts: CheckpointOptions): Promise<Checkpoint> {
    const timeoutMs = this.opts.checkpointTimeoutMs ?? 10_000;
    // QEMU must have re-armed its trigger (it resumes the guest right after): bounded, a lost RESUME
    // event costs at most this wait and then the re-trigger below.
    await this.awaitRearmed();
    const tTrigger = performance.now();
    await this.trigger();
    // A trigger that lands while QEMU finishes the previous checkpoint is lost: re-trigger.
    let retrigger: NodeJS.Timeout | null = setInterval(() => {
      // a failed re-trigger is retried on the next tick; the checkpoint timeout bounds the whole wait
      this.trigger().catch((e: unknown) => log.debug(`re-trigger of checkpoint ${this.epoch + 1}: ${errorMessage(e)}`));
    }, 250);
    try {
      await withTimeout(
        this.expectMsg(COLO_MSG.CHECKPOINT_REQUEST),
        timeoutMs,
        `VM ${this.vm.spec.name} did not start checkpoint ${this.epoch + 1}`,
      );
    } finally {
      clearInterval(retrigger);
      retrigger = null;
    }
    const tRequest = performance.now();
    const pausedAtMs = Date.now();
    opts.onRequest?.();
    // (answered only now, though the reply carries nothing: answered with the trigger, QEMU stopped the guest at once,
    // but this process then woke for the request during the stop, on QEMU's CPU, and the test guest's pause grew:
    // docs/evaluation.md, stop 52)
    this.sock.write(coloMessage(COLO_MSG.CHECKPOINT_REPLY));
    const pages: DirtyPage[] = [];
    let ramBytes = 0;
    const sink: PageSink = {
      page: (block, offset, data) => {
        pages.push({ block, offset, data });
        ramBytes += data.length;
      },
      zero: (block, offset, fill) => {
        pages.push({ block, offset, data: null, fill });
      },
    };
    let resumedAt: number | null = null;
    const read = async () => {
      await this.expectMsg(COLO_MSG.VMSTATE_SEND);
      // The guest is stopped. Without a hold, QEMU learns at once that the checkpoint was received and
      // loaded: it reads both once it has written the stream out (all of it is then in the socket, ours to
      // read), and resumes the guest with no round trip through this process. The stream read below after
      // that is the checkpoint all the same; a broken one fails the capture (its output stays held).
      opts.onStopped?.();
      if (!opts.hold) {
        this.expectResume();
        this.sock.write(Buffer.concat([coloMessage(COLO_MSG.VMSTATE_RECEIVED), coloMessage(COLO_MSG.VMSTATE_LOADED)]));
        resumedAt = performance.now();
      }
      const t = await this.reader.readU8();
      const sid = await this.reader.readBe32();
      if (t !== VM.SECTION_END || sid !== this.st.ramSectionId) {
        throw new RubatoError(
          'RUBATO_STREAM_FORMAT',
          `COLO stream of VM ${this.vm.spec.name}: expected the RAM section end, got type 0x${t.toString(16)} section ${sid}`,
        );
      }
      const counts = await readRamRecords(this.reader, this.st, sink);
      await readFooter(this.reader, sid);
      const eof = await this.reader.readU8();
      if (eof !== VM.EOF)
        throw new RubatoError('RUBATO_STREAM_FORMAT', `COLO stream: expected EOF after RAM, got 0x${eof.toString(16)}`);
      await this.expectMsg(COLO_MSG.VMSTATE_SIZE);
      const size = await this.reader.readBe64();
      if (size > MAX_DEVICE_STATE_BYTES)
        throw new RubatoError('RUBATO_STREAM_FORMAT', `COLO stream: device state of ${size} bytes`);
      const deviceState = Buffer.from(await this.reader.readBytes(size));
      return { counts, deviceState };
    };
    const { counts, deviceState } = await withTimeout(
      read(),
      timeoutMs,
      `checkpoint ${this.epoch + 1} of VM ${this.vm.spec.name} did not arrive`,
    );
    const tLocal = performance.now();
    this.epoch++;
    const cp: Checkpoint = {
      epoch: this.epoch,
      route: 'a',
      pages,
      deviceState,
      ramBytes,
      zeroPages: counts.zeros,
      pausedAtMs,
      timings: { captureMs: tLocal - tRequest, pauseMsLocal: 0, heldMs: 0 },
    };
    // The epoch's pre-sent pages join it: before the hooks when one must see the whole checkpoint
    // paused (verification), else once the guest runs again (bookkeeping is no reason to pause).
    if (opts.hold) this.joinPresent(cp);
    await opts.onLocal?.(cp);
    if (resumedAt === null) {
      this.sock.write(coloMessage(COLO_MSG.VMSTATE_RECEIVED));
      if (opts.hold) {
        await opts.hold(cp);
        cp.timings.heldMs = performance.now() - tLocal;
      }
      this.expectResume();
      this.sock.write(coloMessage(COLO_MSG.VMSTATE_LOADED));
      resumedAt = performance.now();
    }
    // (told early, QEMU resumes the guest once it has written the stream: by the time it is all read here)
    cp.timings.pauseMsLocal = Math.max(resumedAt, tLocal) - tRequest;
    this.joinPresent(cp);
    log.debug('checkpoint', {
      vm: this.vm.spec.name,
      epoch: cp.epoch,
      pages: pages.length,
      triggerMs: (tRequest - tTrigger).toFixed(2),
      captureMs: cp.timings.captureMs.toFixed(2),
    });
    return cp;
  }

  /** Puts the pre-sent pages first in `cp`, each left out where the pause (or the disk) sent a later copy. */
  private joinPresent(cp: Checkpoint): void {
    if (!this.present.size) return;
    const later = new PageSet();
    for (const p of cp.pages) later.set(p);
    const early = this.present.values().filter((p) => !later.has(p.block, p.offset));
    this.present = new PageSet();
    cp.presentPages = early.length;
    cp.pages = early.concat(cp.pages);
  }

  /** Ends COLO on the primary and makes sure the guest runs (unprotected). Never throws. */
  private async abort(cause: Error): Promise<void> {
    if (!this.failed) {
      this.failed = cause;
      const said = this.vm.stderrTail.trim().split('\n').slice(-2).join(' | ');
      log.warn(
        `capture of VM ${this.vm.spec.name} failed, resuming the guest unprotected: ${errorMessage(cause)}${said ? ` (QEMU said: ${said})` : ''}`,
      );
    }
    this.sock.destroy();
    stopListening(this.server, this.sockPath);
    this.vm.qmp.off('event', this.onQmpEvent);
    this.resumed();
    await ensureGuestRunning(this.vm);
  }

  /** Stops protection cleanly: the guest keeps running without checkpoints. Idempotent. */
  async close(): Promise<void> {
    this.failed ??= new RubatoError('RUBATO_CAPTURE_FAILED', 'capture closed');
    this.sock.destroy();
    stopListening(this.server, this.sockPath);
    this.vm.qmp.off('event', this.onQmpEvent);
    this.resumed();
    await ensureGuestRunning(this.vm);
  }
}

/** Collects the full image in memory (small guests: tools and tests). */
function memorySink(ram: Map<string, Buffer>, st: RamState): PageSink {
  const block = (id: string) => {
    let b = ram.get(id);
    if (!b) {
      const len = st.blocks.get(id);
      assert(len !== undefined, `block ${id} announced`);
      b = Buffer.alloc(len);
      ram.set(id, b);
    }
    return b;
  };
  return {
    page: (id, off, data) => {
      data.copy(block(id), off);
    },
    zero: (id, off, fill) => {
      block(id).fill(fill, off, off + 4096);
    },
  };
}

/** Stops accepting at once (the server's 'close' event would also wait for open connections). */
function stopListening(server: Server, sockPath: string): void {
  server.close();
  listening.delete(sockPath);
  rmSync(sockPath, { force: true });
}

/** QEMU states in which a migration still holds its stream (QAPI MigrationStatus). */
const MIGRATION_BUSY = new Set(['setup', 'active', 'cancelling', 'device', 'pre-switchover', 'colo', 'wait-unplug']);
const SETTLE_TIMEOUT_MS = 5000;

/**
 * Waits until a previous migration of this VM (a failed capture) has ended in QEMU: `migrate` refuses
 * while one runs. Bounded; one query when none does.
 */
async function awaitMigrationSettled(vm: QemuVm): Promise<void> {
  const until = Date.now() + SETTLE_TIMEOUT_MS;
  let status = (await vm.qmp.execute<{ status?: string }>('query-migrate')).status;
  if (status === undefined) return; // never migrated
  while (MIGRATION_BUSY.has(status ?? '') && Date.now() < until) {
    await sleep(50);
    status = (await vm.qmp.execute<{ status?: string }>('query-migrate')).status;
  }
}

/** After COLO ends abnormally QEMU waits for x-colo-lost-heartbeat while paused: resume the guest. */
export async function ensureGuestRunning(vm: QemuVm): Promise<void> {
  if (vm.exited || vm.qmp.isClosed) return;
  try {
    const mig = await vm.qmp.execute<{ status?: string }>('query-migrate', undefined, 2000);
    if (mig.status === 'colo') {
      // COLO may end on its own between the query and this command: the status check below decides
      await vm.qmp
        .execute('x-colo-lost-heartbeat', undefined, 2000)
        .catch((e: unknown) => log.debug(`x-colo-lost-heartbeat: ${errorMessage(e)}`));
    }
    const until = Date.now() + 3000;
    while (Date.now() < until) {
      const st = await vm.status();
      if (st === 'running') return;
      await new Promise((r) => setTimeout(r, 50));
    }
    await vm.qmp.execute('cont', undefined, 2000);
  } catch (e) {
    log.warn(`could not confirm VM ${vm.spec.name} is running: ${errorMessage(e)}`);
  }
}
