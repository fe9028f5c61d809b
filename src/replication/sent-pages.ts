// The pages both sides of a session hold: a bounded copy of the last bytes sent of recently dirtied
// RAM pages, kept in step on the primary (SentPages) and the standby (PageMirror). A page dirtied again
// goes as a reference to that copy: SAME when its bytes did not change, DELTA (the changed runs) when
// few did. Pure (no I/O). It must never let the standby write bytes other than the primary's: a
// reference to a page the standby keeps no copy of, or a DELTA whose result fails its CRC-32, refuses the frame.
//
// Why: under the KV service 35-41 % of the pages QEMU reports dirty carry the bytes they had when last
// sent (TCG marks a page dirty on any write, the same value written again included), and about half of
// the rest differ in at most 256 bytes. The standby applies a session's pre-sends and checkpoints in the
// order they were sent, a later copy of a page replacing an earlier one; both sides see the same pages
// in that order and make the same choices (which page to keep a copy of, which to forget), so their
// copies are equal. Per link session: a new one begins with a full synchronisation and empty copies.

import { crc32 } from 'node:zlib';
import { assert, RubatoError } from '../util/index.ts';
import { PAGE_SIZE, type DirtyPage, type RamBlockInfo } from '../capture/index.ts';
import { isDiskBlockId } from '../io/index.ts';
import { applyDelta, type PageRef, type WirePage } from './protocol/record.ts';

/**
 * The copies each side keeps: 16 MiB (the KV service's pages dirtied again fit in about 2 MiB). Part of the
 * protocol: both sides must keep as many to stay in step.
 */
export const SENT_PAGES_BYTES = 16 << 20;
/** A page whose changed runs take more than this goes whole. */
const DELTA_MAX_BYTES = PAGE_SIZE / 2;
const WORDS = PAGE_SIZE / 4;

/** What a filter did to one batch of pages. */
export interface SentPagesCounts {
  /** Pages sent as SAME: the standby holds these bytes already. */
  same: number;
  /** Pages sent as DELTA. */
  delta: number;
  /** Pages sent whole (data or fill). */
  whole: number;
  /** Bytes of page data the references saved on the link. */
  savedBytes: number;
}

/**
 * Copies of up to `capacityBytes / 4096` pages of the cached blocks, keyed by layout block index and page.
 * When full, a page sent once and not since is forgotten before one sent again (CLOCK: a bit per slot,
 * set when its page comes again). Both sides drive one each, with the same pages in the same order.
 */
class PageCopies {
  readonly slab: Buffer;
  readonly words: Int32Array;
  private readonly n: number;
  private readonly free: number[];
  private readonly slotOf = new Map<number, number>();
  private readonly keyOf: Float64Array;
  private readonly again: Uint8Array;
  private hand = 0;
  private readonly cachedIndex: Uint8Array;

  constructor(blocks: readonly RamBlockInfo[], capacityBytes: number) {
    assert(blocks.length <= 256, `${blocks.length} blocks`);
    this.n = Math.max(0, Math.floor(capacityBytes / PAGE_SIZE));
    this.slab = this.n ? Buffer.allocUnsafeSlow(this.n * PAGE_SIZE) : Buffer.alloc(0);
    this.words = new Int32Array(this.slab.buffer, this.slab.byteOffset, this.n * WORDS);
    this.free = Array.from({ length: this.n }, (_, i) => this.n - 1 - i);
    this.keyOf = new Float64Array(this.n).fill(-1);
    this.again = new Uint8Array(this.n);
    // Disk blocks are not kept: a stream of disk writes would push the guest's hot pages out.
    this.cachedIndex = Uint8Array.from(blocks, (b) => (isDiskBlockId(b.id) ? 0 : 1));
  }

  /** The page's key, or -1 when its block is not kept (or nothing is). */
  key(blockIndex: number, offset: number): number {
    return this.n && this.cachedIndex[blockIndex] ? blockIndex * 2 ** 40 + offset / PAGE_SIZE : -1;
  }

  slot(key: number): number | undefined {
    return this.slotOf.get(key);
  }

  /** Whether `data` holds the copy's bytes (compared in place: no view per page). */
  equals(slot: number, data: Buffer): boolean {
    return data.compare(this.slab, slot * PAGE_SIZE, (slot + 1) * PAGE_SIZE) === 0;
  }

  /** The copy's bytes into `dest`. */
  copyTo(slot: number, dest: Buffer): void {
    this.slab.copy(dest, 0, slot * PAGE_SIZE, (slot + 1) * PAGE_SIZE);
  }

  /** A DELTA's runs written into the copy, in place. */
  patch(slot: number, payload: Buffer): void {
    applyDelta(payload, this.slab, slot * PAGE_SIZE);
  }

  /** `data` becomes the copy's bytes. */
  set(slot: number, data: Buffer): void {
    data.copy(this.slab, slot * PAGE_SIZE);
  }

  /** The page came again. */
  touch(slot: number): void {
    this.again[slot] = 1;
  }

  /** A whole page sent: kept as its copy from now on (in a slot of its own, or its slot, touched). */
  keep(key: number, data: Buffer): void {
    const slot = this.slotOf.get(key);
    if (slot === undefined) this.set(this.insert(key), data);
    else {
      this.touch(slot);
      this.set(slot, data);
    }
  }

  /** A slot for a page not kept yet: a free one, or the first past the hand whose page did not come again. */
  private insert(key: number): number {
    let s = this.free.pop();
    if (s === undefined) {
      while (this.again[this.hand]) {
        this.again[this.hand] = 0;
        this.hand = (this.hand + 1) % this.n;
      }
      s = this.hand;
      this.hand = (s + 1) % this.n;
      const old = this.keyOf[s]!;
      assert(old >= 0, 'a full cache has no free slot');
      this.slotOf.delete(old);
    }
    this.slotOf.set(key, s);
    this.keyOf[s] = key;
    this.again[s] = 0;
    return s;
  }

  forget(key: number): void {
    const s = this.slotOf.get(key);
    if (s === undefined) return;
    this.slotOf.delete(key);
    this.keyOf[s] = -1;
    this.free.push(s);
  }
}

/** The primary's side: turns the pages going on the link into whole pages and references. */
export class SentPages {
  private readonly copies: PageCopies;
  private readonly index: Map<string, number>;
  /** A page off the socket, copied here so it can be read as aligned words. */
  private readonly scratch = Buffer.allocUnsafeSlow(PAGE_SIZE);
  private readonly scratchWords = new Int32Array(this.scratch.buffer, this.scratch.byteOffset, WORDS);
  private readonly runs = new Uint16Array(WORDS * 2);

  /** `blocks`: the session's layout (a record's block indexes). `capacityBytes` 0: every page goes whole. */
  constructor(blocks: readonly RamBlockInfo[], capacityBytes = SENT_PAGES_BYTES) {
    this.copies = new PageCopies(blocks, capacityBytes);
    this.index = new Map(blocks.map((b, i) => [b.id, i]));
  }

  /**
   * `pages` as they must go on the link, in order; the copies now hold what the standby will once it applied
   * them. Call it exactly once per batch, in link order, and send all it returns.
   */
  filter(pages: readonly DirtyPage[]): { pages: WirePage[]; counts: SentPagesCounts } {
    const counts: SentPagesCounts = { same: 0, delta: 0, whole: 0, savedBytes: 0 };
    const out: WirePage[] = [];
    for (const p of pages) {
      const bi = this.index.get(p.block);
      assert(bi !== undefined, `block ${p.block} is in the layout`);
      const key = this.copies.key(bi, p.offset);
      if (key < 0 || !p.data) {
        if (key >= 0) this.copies.forget(key); // a fill: its next data copy goes whole
        counts.whole++;
        out.push(p);
        continue;
      }
      assert(p.data.length === PAGE_SIZE, `a page of ${p.data.length} bytes`);
      const slot = this.copies.slot(key);
      if (slot === undefined) {
        this.copies.keep(key, p.data);
        counts.whole++;
        out.push(p);
        continue;
      }
      this.copies.touch(slot);
      if (this.copies.equals(slot, p.data)) {
        out.push({ block: p.block, offset: p.offset, data: p.data, ref: SAME });
        counts.same++;
        counts.savedBytes += PAGE_SIZE;
        continue;
      }
      const payload = this.delta(slot, p.data);
      this.copies.set(slot, p.data);
      if (payload) {
        out.push({ block: p.block, offset: p.offset, data: p.data, ref: { kind: 'delta', payload } });
        counts.delta++;
        counts.savedBytes += PAGE_SIZE - payload.length;
      } else {
        counts.whole++;
        out.push(p);
      }
    }
    return { pages: out, counts };
  }

  /**
   * The changed runs of `data` against the copy in `slot`, as a DELTA payload (record.ts): be32 CRC-32 of
   * `data`, be16 runs, then each run as be16 offset, be16 length and its bytes. Null when it would take
   * more than half a page. Runs are whole words; a single equal word between two changed ones joins them.
   */
  private delta(slot: number, data: Buffer): Buffer | null {
    data.copy(this.scratch);
    const a = this.copies.words;
    const b = this.scratchWords;
    const base = slot * WORDS;
    // A page rewritten all over (most of 16 words spread over it differ) goes whole without a scan.
    let differ = 0;
    for (let k = 0; k < WORDS; k += WORDS / 16) if (a[base + k] !== b[k]) differ++;
    if (differ > 8) return null;
    let n = 0;
    let bytes = 6;
    let i = 0;
    while (i < WORDS) {
      // four equal words at a time (WORDS is a multiple of 4, and i stays one while the words are equal)
      if (
        (i & 3) === 0 &&
        ((a[base + i]! ^ b[i]!) |
          (a[base + i + 1]! ^ b[i + 1]!) |
          (a[base + i + 2]! ^ b[i + 2]!) |
          (a[base + i + 3]! ^ b[i + 3]!)) ===
          0
      ) {
        i += 4;
        continue;
      }
      if (a[base + i] === b[i]) {
        i++;
        continue;
      }
      let j = i + 1;
      while (j < WORDS && (a[base + j] !== b[j] || (j + 1 < WORDS && a[base + j + 1] !== b[j + 1]))) j++;
      bytes += 4 + (j - i) * 4;
      if (bytes > DELTA_MAX_BYTES) return null;
      this.runs[n++] = i;
      this.runs[n++] = j;
      i = j;
    }
    const out = Buffer.allocUnsafe(bytes);
    out.writeUInt32BE(crc32(data), 0);
    out.writeUInt16BE(n / 2, 4);
    let o = 6;
    for (let k = 0; k < n; k += 2) {
      const from = this.runs[k]! * 4;
      const to = this.runs[k + 1]! * 4;
      out.writeUInt16BE(from, o);
      out.writeUInt16BE(to - from, o + 2);
      this.scratch.copy(out, o + 4, from, to);
      o += 4 + to - from;
    }
    return out;
  }
}

/** The standby's side: resolves references against its copies, which it keeps as the primary keeps its own. */
export class PageMirror {
  private readonly copies: PageCopies;
  private readonly index: Map<string, number>;

  constructor(blocks: readonly RamBlockInfo[], capacityBytes = SENT_PAGES_BYTES) {
    this.copies = new PageCopies(blocks, capacityBytes);
    this.index = new Map(blocks.map((b, i) => [b.id, i]));
  }

  /**
   * The pages to apply, in order: references resolved to whole pages (a DELTA) or left out (a SAME: the
   * replica holds those bytes). Throws RUBATO_REPLICA_CORRUPT when a reference names a page not kept or
   * its result fails its CRC: the copies are out of step, and nothing of the batch may be applied.
   */
  resolve(pages: readonly WirePage[], what: string): DirtyPage[] {
    const out: DirtyPage[] = [];
    // The pages DELTAs resolve to, side by side in one buffer (one allocation per batch, not per page).
    let deltas = 0;
    for (const p of pages) if (p.ref?.kind === 'delta') deltas++;
    const resolved = deltas ? Buffer.allocUnsafe(deltas * PAGE_SIZE) : null;
    let at = 0;
    for (const p of pages) {
      const bi = this.index.get(p.block)!;
      const key = this.copies.key(bi, p.offset);
      if (!p.ref) {
        if (key >= 0) {
          if (p.data) this.copies.keep(key, p.data);
          else this.copies.forget(key);
        }
        out.push(p);
        continue;
      }
      const slot = key >= 0 ? this.copies.slot(key) : undefined;
      if (slot === undefined) throw stale(what, p, 'names a page this side keeps no copy of');
      this.copies.touch(slot);
      if (p.ref.kind === 'same') continue;
      // (patched in place, then copied out once; a CRC that fails ends the session, and its copies with it)
      this.copies.patch(slot, p.ref.payload);
      const page = resolved!.subarray(at, at + PAGE_SIZE);
      at += PAGE_SIZE;
      this.copies.copyTo(slot, page);
      if (crc32(page) !== p.ref.payload.readUInt32BE(0)) throw stale(what, p, 'gives bytes that fail their CRC');
      out.push({ block: p.block, offset: p.offset, data: page });
    }
    return out;
  }
}

/** A SAME reference has no payload: what checks it is that the standby keeps the page (and every DELTA's CRC). */
const SAME: PageRef = { kind: 'same', payload: Buffer.alloc(0) };

const stale = (what: string, p: DirtyPage, why: string) =>
  new RubatoError(
    'RUBATO_REPLICA_CORRUPT',
    `${what}: the reference to page ${p.offset} of block ${p.block} ${why}; the copies of the two sides differ`,
  );
