// Rubato's NBD server for the guest's disk, as the controller sees it: the serving engine
// (nbd-engine.ts) runs in its own worker thread with synchronous file I/O, so neither a slow disk
// nor a busy guest ever stalls the controller's event loop (checkpoints, acks, output release).
// An epoch ends in two steps: `cut` marks it in shared memory at the pause (no wait: the guest's
// pause never waits for the worker), and the cut's dirty pages are collected once the guest runs
// again. `cutEpoch` does both while the controller waits (tests, tools).

import { Worker, MessageChannel, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { RubatoError, logger, sleep, withTimeout } from '../../util/index.ts';
import { MAX_DIRTY_BYTES_PER_EPOCH, type DiskEpoch, type DiskEpochStats } from './nbd-engine.ts';
import {
  CTL,
  CTL_SLOTS,
  PAGE_BYTES_NBD,
  STAT,
  STAT_SLOTS,
  emptyCutReply,
  type CutReply,
  type CutRequest,
  type WorkerData,
} from './nbd-shared.ts';

const log = logger('nbd');
const CUT_TIMEOUT_MS = 10_000;

/** An epoch ended at a pause, its writes still with the worker. */
export interface PendingDiskEpoch {
  /** The epoch's writes (asks the worker; call once, in the order the cuts were made). */
  collect(): Promise<DiskEpoch>;
}

/** The worker's entry, loaded through tsx like the rest of Rubato (no build step). */
function workerSource(): string {
  const tsx = import.meta.resolve('tsx/esm/api');
  const entry = new URL('./nbd-worker.ts', import.meta.url).href;
  return `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`;
}

export class NbdServer {
  private worker: Worker | null = null;
  private cutPort: MessagePort | null = null;
  private readonly stats = new BigInt64Array(new SharedArrayBuffer(8 * STAT_SLOTS));
  private readonly ctl = new Int32Array(new SharedArrayBuffer(4 * CTL_SLOTS));
  /** The last cut marked. */
  private marked = 0;
  /** Collections asked and not answered yet, by cut. */
  private readonly collecting = new Map<number, { resolve: (e: DiskEpoch) => void; reject: (e: Error) => void }>();
  private size = 0;
  private ioHandler: ((kind: 'write' | 'flush') => void) | null = null;
  /** Called when the epoch's dirty set passes its bound (the engine should checkpoint now). */
  onPressure: (() => void) | null = null;
  /** Called on every flush (the scheduler treats flushes like waiting output). */
  onFlush: (() => void) | null = null;

  constructor(
    readonly imagePath: string,
    readonly socketPath: string,
    readonly exportName = 'disk',
    private readonly readOnly = false,
    /** Writes go to an overlay in memory (a compare-mode secondary's disk): see discardOverlay, commitOverlay. */
    private readonly overlay = false,
  ) {}

  /** Overlay mode: the secondary's own writes are forgotten (it was brought back to a checkpoint). */
  discardOverlay(): Promise<void> {
    return this.overlayOp('discard').then(() => {});
  }

  /** Overlay mode ends: its writes go into the image; later writes too. Returns the pages written. */
  commitOverlay(): Promise<number> {
    return this.overlayOp('commit');
  }

  private overlayOp(op: 'discard' | 'commit'): Promise<number> {
    const w = this.worker;
    const port = this.cutPort;
    if (!w || !port) return Promise.reject(new RubatoError('RUBATO_SETUP_FAILED', 'the NBD server is not running'));
    return new Promise<number>((resolve, reject) => {
      const onMsg = (m: { ev: string; pages?: number; error?: string }) => {
        if (m.ev !== 'overlay') return;
        w.off('message', onMsg);
        if (m.error) reject(new RubatoError('RUBATO_SECONDARY', `the secondary's disk overlay: ${m.error}`));
        else resolve(m.pages ?? 0);
      };
      w.on('message', onMsg);
      port.postMessage({ overlay: op });
    });
  }

  /** Called on every write and flush (traces record disk times); costs a message per operation. */
  get onIo(): ((kind: 'write' | 'flush') => void) | null {
    return this.ioHandler;
  }
  set onIo(f: ((kind: 'write' | 'flush') => void) | null) {
    this.ioHandler = f;
    Atomics.store(this.ctl, CTL.ioEvents, f ? 1 : 0);
  }

  get sizeBytes(): number {
    return this.size;
  }
  /** The published counters are the running epoch's (else the worker has not applied the last cut: no I/O since). */
  private get countersCurrent(): boolean {
    return Number(Atomics.load(this.stats, STAT.cut)) === this.marked;
  }
  get underPressure(): boolean {
    if (!this.countersCurrent) return false;
    return Number(Atomics.load(this.stats, STAT.dirtyPages)) * PAGE_BYTES_NBD > MAX_DIRTY_BYTES_PER_EPOCH;
  }
  get epochStats(): DiskEpochStats {
    const current = this.countersCurrent;
    const v = (i: number) => (current ? Number(Atomics.load(this.stats, i)) : 0);
    return {
      writes: v(STAT.writes),
      writeBytes: v(STAT.writeBytes),
      flushes: v(STAT.flushes),
      reads: v(STAT.reads),
      errors: v(STAT.errors),
    };
  }

  async start(): Promise<void> {
    const { port1, port2 } = new MessageChannel();
    const data: WorkerData = {
      imagePath: this.imagePath,
      socketPath: this.socketPath,
      exportName: this.exportName,
      readOnly: this.readOnly,
      overlay: this.overlay,
      stats: this.stats.buffer as SharedArrayBuffer,
      ctl: this.ctl.buffer as SharedArrayBuffer,
      cutPort: port2,
    };
    const w = new Worker(workerSource(), { eval: true, workerData: data, transferList: [port2] });
    this.worker = w;
    this.cutPort = port1;
    w.on('message', (m: { ev: string; kind?: 'write' | 'flush'; seq?: number; reply?: CutReply }) => {
      if (m.ev === 'cut') this.collected(m.seq!, m.reply!);
      else if (m.ev === 'flush') this.onFlush?.();
      else if (m.ev === 'pressure') this.onPressure?.();
      else if (m.ev === 'io' && m.kind) this.ioHandler?.(m.kind);
    });
    w.on('error', (e) => log.error(`NBD worker failed: ${e.message}`));
    w.on('exit', () => this.abandonCollections('the NBD worker exited'));
    await new Promise<void>((resolve, reject) => {
      const onMsg = (m: { ev: string; size?: number; message?: string; code?: string | null }) => {
        if (m.ev === 'ready') {
          w.off('message', onMsg);
          this.size = m.size ?? 0;
          resolve();
        } else if (m.ev === 'error') {
          w.off('message', onMsg);
          void w.terminate();
          reject(
            new RubatoError(
              m.code === 'RUBATO_CONFIG' ? 'RUBATO_CONFIG' : 'RUBATO_SETUP_FAILED',
              m.message ?? 'the NBD server did not start',
            ),
          );
        }
      };
      w.on('message', onMsg);
      w.once('exit', (code) =>
        reject(new RubatoError('RUBATO_SETUP_FAILED', `the NBD worker exited (code ${code}) before it served`)),
      );
    });
  }

  private post(m: CutRequest): void {
    const port = this.cutPort;
    if (!port) throw new RubatoError('RUBATO_SETUP_FAILED', 'the NBD server is not running');
    port.postMessage(m);
  }

  /**
   * Ends the epoch now, with the guest paused and its I/O drained: every request begun from here
   * on is the next epoch's. Returns at once; the worker applies the cut as its next request begins,
   * and hands the writes over when they are collected. `discard`: they are dropped instead (a full
   * copy of the image follows, or nothing is protected).
   */
  cut(discard = false): PendingDiskEpoch {
    const seq = this.mark();
    if (discard) {
      this.post({ collect: seq, discard: true });
      return { collect: () => Promise.resolve(epochOf(emptyCutReply())) };
    }
    return {
      collect: async () => {
        const answered = new Promise<DiskEpoch>((resolve, reject) => this.collecting.set(seq, { resolve, reject }));
        this.post({ collect: seq, discard: false });
        return await withTimeout(
          answered,
          CUT_TIMEOUT_MS,
          "the NBD server did not hand over the epoch's disk writes",
          'RUBATO_CAPTURE_FAILED',
        ).finally(() => this.collecting.delete(seq));
      },
    };
  }

  /** Marks the next cut in shared memory: requests begun from here on are the next epoch's. */
  private mark(): number {
    if (!this.cutPort) throw new RubatoError('RUBATO_SETUP_FAILED', 'the NBD server is not running');
    const seq = ++this.marked;
    Atomics.store(this.ctl, CTL.marked, seq);
    return seq;
  }

  private abandonCollections(why: string): void {
    for (const c of this.collecting.values()) c.reject(new RubatoError('RUBATO_CAPTURE_FAILED', why));
    this.collecting.clear();
  }

  private collected(seq: number, reply: CutReply): void {
    const c = this.collecting.get(seq);
    if (!c) return; // (a discarded cut)
    this.collecting.delete(seq);
    c.resolve(epochOf(reply));
  }

  /** Ends the epoch and takes its writes while the caller waits (tests, tools; the primary uses cut()). */
  cutEpoch(discard = false): DiskEpoch {
    const seq = this.mark();
    const port = this.cutPort!;
    Atomics.store(this.ctl, CTL.replied, 0);
    this.post({ cut: seq, discard });
    if (
      Atomics.wait(this.ctl, CTL.replied, 0, CUT_TIMEOUT_MS) === 'timed-out' &&
      Atomics.load(this.ctl, CTL.replied) === 0
    ) {
      throw new RubatoError(
        'RUBATO_CAPTURE_FAILED',
        `the NBD server did not hand over the epoch's disk writes within ${CUT_TIMEOUT_MS} ms`,
      );
    }
    const msg = receiveMessageOnPort(port);
    if (!msg) throw new RubatoError('RUBATO_CAPTURE_FAILED', 'the NBD server signalled the epoch but posted nothing');
    return epochOf(msg.message as CutReply);
  }

  async close(): Promise<void> {
    const w = this.worker;
    if (!w) return;
    this.worker = null;
    this.abandonCollections('the NBD server closed');
    const exited = new Promise<void>((r) => w.once('exit', () => r()));
    const gaveUp = new AbortController();
    const closed = new Promise<void>((r) =>
      w.on('message', (m: { ev: string }) => {
        if (m.ev === 'closed') r();
      }),
    );
    this.cutPort?.postMessage({ close: true });
    await Promise.race([closed.then(() => gaveUp.abort()), sleep(2000, gaveUp.signal)]);
    await w.terminate();
    await exited;
    this.cutPort?.close();
    this.cutPort = null;
  }
}

/** A cut's reply as the epoch it carries (its pages are views into the one transferred buffer). */
function epochOf(r: CutReply): DiskEpoch {
  const all = Buffer.from(r.pages);
  const pages = new Map<number, Buffer>();
  for (const [i, off] of r.offsets.entries())
    pages.set(off, all.subarray(i * PAGE_BYTES_NBD, (i + 1) * PAGE_BYTES_NBD));
  return { pages, writes: r.writes, writeBytes: r.writeBytes, flushes: r.flushes, reads: r.reads, errors: r.errors };
}
