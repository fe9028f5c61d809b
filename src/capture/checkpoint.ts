// The Checkpoint value both capture routes produce and every consumer (replica store, wire
// protocol, verifier) takes: the pages dirtied in one epoch, the device state, counts and timings.

export interface RamBlockInfo {
  id: string;
  lengthBytes: number;
}

export interface DirtyPage {
  block: string;
  /** Byte offset in the block, a multiple of the page size. */
  offset: number;
  /** Page contents; null for a zero page (QEMU's RAM_SAVE_FLAG_ZERO: the page is all `fill`). */
  data: Buffer | null;
  fill?: number;
}

export interface CheckpointTimings {
  /** Request received from QEMU (or stop issued, route B) → the whole checkpoint is local. */
  captureMs: number;
  /** Guest paused from our side's view: reply/stop sent → resume sent. */
  pauseMsLocal: number;
  /** Time the guest was held after capture for verification (0 in normal operation). */
  heldMs: number;
}

export interface Checkpoint {
  /** 1, 2, 3, ... per capture session; 0 is the initial full image. */
  epoch: number;
  route: 'a' | 'b';
  pages: DirtyPage[];
  /** QEMU device sections + EOF byte, as emitted: loadable after a header and configuration. */
  deviceState: Buffer;
  ramBytes: number;
  zeroPages: number;
  /** Of `pages`, those sent before the pause by pre-sends (route A with QEMU patch 0003); the rest came in it. */
  presentPages?: number;
  timings: CheckpointTimings;
  /** Wall-clock time (ms since epoch) when the guest was paused for this checkpoint. */
  pausedAtMs: number;
}

export const PAGE_SIZE = 4096;
/** The largest device state Rubato accepts from QEMU or a peer. */
export const MAX_DEVICE_STATE_BYTES = 256 << 20;

/** A full RAM image: the starting point a replica is built from (checkpoint 0). */
export interface BaseImage {
  machine: string;
  blocks: RamBlockInfo[];
  /** The blocks' contents, when collected in memory (empty when the pages were streamed elsewhere). */
  ram: Map<string, Buffer>;
  deviceState: Buffer;
}

/** Pages keyed by block and offset, the latest copy of each (a checkpoint's merged set, staged pages). */
export class PageSet {
  private readonly byBlock = new Map<string, Map<number, DirtyPage>>();
  private n = 0;
  /** Adds `p`, replacing an earlier copy of its page; true when the page is new to the set. */
  set(p: DirtyPage): boolean {
    let m = this.byBlock.get(p.block);
    if (!m) this.byBlock.set(p.block, (m = new Map()));
    const fresh = !m.has(p.offset);
    if (fresh) this.n++;
    m.set(p.offset, p);
    return fresh;
  }
  has(block: string, offset: number): boolean {
    return this.byBlock.get(block)?.has(offset) ?? false;
  }
  get size(): number {
    return this.n;
  }
  values(): DirtyPage[] {
    const out: DirtyPage[] = [];
    for (const m of this.byBlock.values()) for (const p of m.values()) out.push(p);
    return out;
  }
}
