// A guest's disks as output commit and the primary see them: one NBD server per disk (block ids
// disk0, disk1, …), their epochs cut together at the pause, their callbacks and counters joined.
// A write to any disk is a write of the guest; any disk near its bound is pressure.

import type { NbdServer } from './nbd-server.ts';

/** The replica block that holds disk `i` (disk0 is the first: what a one-disk VM always had). */
export const diskBlockId = (i: number): string => `disk${i}`;
/** Whether a replica block is a disk's (named by diskBlockId), not the guest's RAM. */
export const isDiskBlockId = (id: string): boolean => /^disk\d+$/.test(id);

/** One epoch's writes on every disk. */
export interface DiskSetCut {
  disks: Array<{ block: string; pages: Map<number, Buffer> }>;
  writes: number;
  flushes: number;
}

/** One epoch's writes on every disk, cut at the pause and collected later. */
export interface PendingDiskSetCut {
  collect(): Promise<DiskSetCut>;
}

export class DiskSet {
  constructor(readonly servers: readonly NbdServer[]) {}

  get size(): number {
    return this.servers.length;
  }

  /** Each disk's block id, image and size, in the guest's order. */
  get blocks(): Array<{ id: string; server: NbdServer }> {
    return this.servers.map((server, i) => ({ id: diskBlockId(i), server }));
  }

  set onFlush(f: (() => void) | null) {
    for (const s of this.servers) s.onFlush = f;
  }
  set onPressure(f: (() => void) | null) {
    for (const s of this.servers) s.onPressure = f;
  }
  set onIo(f: ((kind: 'write' | 'flush') => void) | null) {
    for (const s of this.servers) s.onIo = f;
  }

  get underPressure(): boolean {
    return this.servers.some((s) => s.underPressure);
  }

  get epochStats(): { writes: number; flushes: number } {
    let writes = 0;
    let flushes = 0;
    for (const s of this.servers) {
      const e = s.epochStats;
      writes += e.writes;
      flushes += e.flushes;
    }
    return { writes, flushes };
  }

  /**
   * Ends the epoch on every disk at once (the guest is paused: no write lands between two cuts);
   * the writes are collected later, once the guest runs again. `discard`: the writes logged so far
   * are dropped, not handed over (a full copy of the image follows, or nothing is protected): no
   * copy of what may be hundreds of MB logged since boot.
   */
  cutEpoch(discard = false): PendingDiskSetCut {
    const cuts = this.servers.map((s) => s.cut(discard));
    return {
      collect: async () => {
        const epochs = await Promise.all(cuts.map((c) => c.collect()));
        const cut: DiskSetCut = { disks: [], writes: 0, flushes: 0 };
        for (const [i, e] of epochs.entries()) {
          cut.disks.push({ block: diskBlockId(i), pages: e.pages });
          cut.writes += e.writes;
          cut.flushes += e.flushes;
        }
        return cut;
      },
    };
  }
}
