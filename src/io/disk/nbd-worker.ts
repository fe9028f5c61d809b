// The NBD engine's thread. It serves the disk with synchronous file I/O, publishes its counters in
// shared memory, and hands over an epoch's dirty pages when the controller collects them.
// The controller ends an epoch by marking a cut in shared memory (CTL.marked), with the guest paused
// and its I/O drained: no request is under way then. This thread applies the cut as the next
// request begins (the writes so far are that cut's), or when the cut is collected, whichever comes
// first; so the guest's pause never waits for this thread. A synchronous cut (tests, tools) is asked
// on `cutPort` while the controller blocks (Atomics.wait) until the pages are posted there.

import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { errorMessage } from '../../util/index.ts';
import { NbdEngine, type DiskEpoch } from './nbd-engine.ts';
import {
  CTL,
  PAGE_BYTES_NBD,
  STAT,
  emptyCutReply,
  type CutReply,
  type CutRequest,
  type WorkerData,
} from './nbd-shared.ts';

const d = workerData as WorkerData;
const port = parentPort!;
const cutPort: MessagePort = d.cutPort;
const stats = new BigInt64Array(d.stats);
const ctl = new Int32Array(d.ctl);
const engine = new NbdEngine(d.imagePath, d.socketPath, d.exportName, d.readOnly, d.overlay);

/** The last cut this thread applied. */
let applied = 0;

/** The counters, published once per turn of this thread's event loop (and at every cut). */
let publishPending = false;
function publish(): void {
  publishPending = false;
  const s = engine.epochStats;
  Atomics.store(stats, STAT.writes, BigInt(s.writes));
  Atomics.store(stats, STAT.writeBytes, BigInt(s.writeBytes));
  Atomics.store(stats, STAT.flushes, BigInt(s.flushes));
  Atomics.store(stats, STAT.reads, BigInt(s.reads));
  Atomics.store(stats, STAT.errors, BigInt(s.errors));
  Atomics.store(stats, STAT.dirtyPages, BigInt(engine.dirtyPages));
  Atomics.store(stats, STAT.cut, BigInt(applied));
}

/** Cuts applied and not collected yet: cut number → its epoch. */
const uncollected = new Map<number, DiskEpoch>();

/**
 * Applies the cuts the controller marked since the last one applied: the writes so far are the
 * first of them's (no request ran in between the others: they are empty).
 */
function catchUp(): void {
  const marked = Atomics.load(ctl, CTL.marked);
  if (marked === applied) return;
  uncollected.set(applied + 1, engine.cutEpoch());
  applied = marked;
  publish(); // the new epoch's counters are zero before the controller reads them again
}
engine.beforeRequest = catchUp;

/**
 * Cut `seq`'s writes, as one transferable buffer. Uncollected cuts before it are dropped: the
 * checkpoint that would have carried them failed, and protection starts again from a full copy.
 */
function take(seq: number, discard: boolean): CutReply {
  catchUp();
  const e = uncollected.get(seq);
  for (const k of uncollected.keys()) if (k <= seq) uncollected.delete(k);
  if (!e) return emptyCutReply();
  if (discard) e.pages.clear(); // (what the image holds is all that counts: nothing to copy)
  const buf = new ArrayBuffer(e.pages.size * PAGE_BYTES_NBD);
  const view = Buffer.from(buf);
  const offsets: number[] = [];
  let i = 0;
  for (const [offset, data] of e.pages) {
    data.copy(view, i * PAGE_BYTES_NBD);
    offsets.push(offset);
    i++;
  }
  return {
    offsets,
    pages: buf,
    writes: e.writes,
    writeBytes: e.writeBytes,
    flushes: e.flushes,
    reads: e.reads,
    errors: e.errors,
  };
}
engine.onChange = () => {
  if (publishPending) return;
  publishPending = true;
  setImmediate(publish);
};
engine.onFlush = () => port.postMessage({ ev: 'flush' });
engine.onPressure = () => port.postMessage({ ev: 'pressure' });
// Per-operation events only while the controller asks for them (a trace is being recorded).
engine.onIo = (kind) => {
  if (Atomics.load(ctl, CTL.ioEvents) === 1) port.postMessage({ ev: 'io', kind });
};

cutPort.on('message', (m: CutRequest) => {
  if ('overlay' in m) {
    try {
      if (m.overlay === 'discard') engine.discardOverlay();
      const pages = m.overlay === 'commit' ? engine.commitOverlay() : 0;
      port.postMessage({ ev: 'overlay', pages });
    } catch (e) {
      port.postMessage({ ev: 'overlay', error: errorMessage(e) });
    }
  } else if ('cut' in m) {
    const reply = take(m.cut, m.discard);
    cutPort.postMessage(reply, [reply.pages]);
    Atomics.store(ctl, CTL.replied, 1);
    Atomics.notify(ctl, CTL.replied);
  } else if ('collect' in m) {
    const reply = take(m.collect, m.discard);
    port.postMessage({ ev: 'cut', seq: m.collect, reply }, [reply.pages]);
  } else if ('close' in m) {
    void engine.close().then(() => {
      port.postMessage({ ev: 'closed' });
      cutPort.close();
    });
  }
});

engine.start().then(
  () => port.postMessage({ ev: 'ready', size: engine.sizeBytes }),
  (e: unknown) =>
    port.postMessage({ ev: 'error', message: errorMessage(e), code: (e as { code?: string }).code ?? null }),
);
