// The pages the standby already holds: a bounded copy of the last content sent for recently dirtied
// RAM pages, so a page dirtied again with the same bytes is left out of what goes on the link. Pure
// (no I/O). It must never leave out a page whose bytes differ from the standby's copy: one session only.
//
// Why: under the KV service 41 % of the pages QEMU reports dirty at a pause carry the bytes they had
// at the last checkpoint (TCG marks a page dirty on any write, a value written again included). The
// standby applies a session's pre-sends and checkpoints in the order they were sent, a later copy of a
// page replacing an earlier one; so a copy equal to the last one sent changes nothing there, and is
// left out. The memory is per link session: a new session begins with a full synchronisation, and
// whatever a broken one sent and the standby never applied is forgotten with it.

import { assert } from '../util/index.ts';
import { PAGE_SIZE, type DirtyPage } from '../capture/index.ts';

/** The copies kept by default: 16 MiB (the KV service's pages dirtied again fit in about 2 MiB). */
export const SENT_PAGES_DEFAULT_BYTES = 16 << 20;

/** What a filter did to one batch of pages. */
export interface SentPagesCounts {
  /** Pages left out: the standby holds these bytes already. */
  skipped: number;
  /** Pages kept for the link. */
  kept: number;
}

/**
 * The last bytes sent of up to `capacityBytes / 4096` RAM pages. When full, a page sent once and not
 * since is forgotten before one sent again (CLOCK: a bit per slot, set when its page is sent again).
 * `filter` takes pages in the order they go on the link and returns those that must go.
 */
export class SentPages {
  private readonly slots: Buffer[];
  private readonly free: number[];
  /** Page key → slot. */
  private readonly bySlot = new Map<number, number>();
  /** Slot → its page's key (-1: free). */
  private readonly keyOf: Float64Array;
  /** Slot → sent again since the hand last passed it. */
  private readonly again: Uint8Array;
  private hand = 0;
  private readonly blockIndex: Map<string, number>;
  private skippedTotal = 0;
  private keptTotal = 0;

  /**
   * `ramBlocks`: the blocks whose pages it may leave out (the guest's RAM; a disk's pages always go).
   * `capacityBytes` 0 keeps nothing: every page goes.
   */
  constructor(ramBlocks: readonly string[], capacityBytes = SENT_PAGES_DEFAULT_BYTES) {
    assert(ramBlocks.length < 256, `${ramBlocks.length} RAM blocks`);
    const n = Math.max(0, Math.floor(capacityBytes / PAGE_SIZE));
    const slab = n ? Buffer.allocUnsafeSlow(n * PAGE_SIZE) : Buffer.alloc(0);
    this.slots = Array.from({ length: n }, (_, i) => slab.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
    this.free = Array.from({ length: n }, (_, i) => n - 1 - i);
    this.keyOf = new Float64Array(n).fill(-1);
    this.again = new Uint8Array(n);
    this.blockIndex = new Map(ramBlocks.map((b, i) => [b, i]));
  }

  /** Pages left out and kept over this session. */
  get totals(): SentPagesCounts {
    return { skipped: this.skippedTotal, kept: this.keptTotal };
  }

  /**
   * The pages of `pages` that must go on the link, in order; each one kept is remembered as the
   * standby's copy from now on. Call it exactly once per batch, in link order, and send all it returns.
   */
  filter(pages: readonly DirtyPage[]): { pages: DirtyPage[]; counts: SentPagesCounts } {
    const out: DirtyPage[] = [];
    let skipped = 0;
    for (const p of pages) {
      const bi = this.blockIndex.get(p.block);
      if (bi === undefined || !this.slots.length) {
        out.push(p);
        continue;
      }
      const key = bi * 2 ** 40 + p.offset / PAGE_SIZE;
      const slot = this.bySlot.get(key);
      if (!p.data) {
        // A fill page: the standby writes the fill. Forgotten here: its next data copy goes whole.
        if (slot !== undefined) {
          this.bySlot.delete(key);
          this.keyOf[slot] = -1;
          this.free.push(slot);
        }
        out.push(p);
        continue;
      }
      assert(p.data.length === PAGE_SIZE, `a page of ${p.data.length} bytes`);
      if (slot !== undefined) {
        this.again[slot] = 1;
        const copy = this.slots[slot]!;
        if (copy.equals(p.data)) {
          skipped++;
          continue;
        }
        p.data.copy(copy);
      } else {
        const s = this.take();
        p.data.copy(this.slots[s]!);
        this.bySlot.set(key, s);
        this.keyOf[s] = key;
        this.again[s] = 0;
      }
      out.push(p);
    }
    this.skippedTotal += skipped;
    this.keptTotal += out.length;
    return { pages: out, counts: { skipped, kept: out.length } };
  }

  /** A free slot, or the first past the hand whose page was not sent again since the hand last passed. */
  private take(): number {
    const free = this.free.pop();
    if (free !== undefined) return free;
    const n = this.slots.length;
    while (this.again[this.hand]) {
      this.again[this.hand] = 0;
      this.hand = (this.hand + 1) % n;
    }
    const s = this.hand;
    this.hand = (s + 1) % n;
    const key = this.keyOf[s]!;
    assert(key >= 0, 'a full cache has no free slot');
    this.bySlot.delete(key);
    return s;
  }
}
