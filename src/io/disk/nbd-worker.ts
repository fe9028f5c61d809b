// The NBD engine's thread. It serves the disk with synchronous file I/O, publishes its counters in
// shared memory, and hands over the epoch's dirty pages when the controller cuts the epoch: the
// controller asks on `cutPort` and blocks (Atomics.wait) until the pages are posted there.

import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { errorMessage } from '../../util/index.ts';
import { NbdEngine } from './nbd-engine.ts';
import { PAGE_BYTES_NBD, STAT, type CutReply, type WorkerData } from './nbd-shared.ts';

const d = workerData as WorkerData;
const port = parentPort!;
const cutPort: MessagePort = d.cutPort;
const stats = new BigInt64Array(d.stats);
const ctl = new Int32Array(d.ctl);
const engine = new NbdEngine(d.imagePath, d.socketPath, d.exportName, d.readOnly, d.overlay);

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
  if (Atomics.load(ctl, 1) === 1) port.postMessage({ ev: 'io', kind });
};

cutPort.on('message', (m: { cut?: true; discard?: boolean; close?: true; overlay?: 'discard' | 'commit' }) => {
  if (m.overlay) {
    try {
      if (m.overlay === 'discard') engine.discardOverlay();
      const pages = m.overlay === 'commit' ? engine.commitOverlay() : 0;
      port.postMessage({ ev: 'overlay', pages });
    } catch (e) {
      port.postMessage({ ev: 'overlay', error: errorMessage(e) });
    }
  } else if (m.cut) {
    const e = engine.cutEpoch();
    publish(); // the new epoch's counters are zero before the controller reads them again
    if (m.discard) e.pages.clear(); // (what the image holds is all that counts: nothing to copy)
    const buf = new ArrayBuffer(e.pages.size * PAGE_BYTES_NBD);
    const view = Buffer.from(buf);
    const offsets: number[] = [];
    let i = 0;
    for (const [offset, data] of e.pages) {
      data.copy(view, i * PAGE_BYTES_NBD);
      offsets.push(offset);
      i++;
    }
    const reply: CutReply = {
      offsets,
      pages: buf,
      writes: e.writes,
      writeBytes: e.writeBytes,
      flushes: e.flushes,
      reads: e.reads,
      errors: e.errors,
    };
    cutPort.postMessage(reply, [buf]);
    Atomics.store(ctl, 0, 1);
    Atomics.notify(ctl, 0);
  } else if (m.close) {
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
