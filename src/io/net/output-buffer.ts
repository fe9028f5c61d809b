// Output commit, the pure part: frames the guest sends are tagged with the open epoch and held
// until the standby has committed a checkpoint that includes the state that produced them.
// No clocks, no sockets. The invariant (asserted on every release): a released frame's tag is
// never above the committed epoch — unless protection was given up explicitly (passThrough).

import { assert } from '../../util/errors.ts';

export interface HeldFrame { tag: number; frame: Buffer; atMs: number }

export interface OutputStats { frames: number; bytes: number; oldestMs: number | null; dropped: number; released: number }

export class OutputBuffer {
  private open = 1;
  private committed = 0;
  private queue: HeldFrame[] = [];
  private head = 0;
  private bytes = 0;
  private dropped = 0;
  private released = 0;
  private passThrough = true;
  private openFrames = 0;
  private openBytes = 0;
  private openOldestMs: number | null = null;
  /** Called when the open epoch gets its first held frame (the scheduler may want to act). */
  onFirstHeld: (() => void) | null = null;
  /** Called for every frame held (traces record output times). */
  onHeld: (() => void) | null = null;

  constructor(private readonly maxBytes: number) {}

  /** The tag new frames get now. */
  get openTag(): number { return this.open; }
  get committedTag(): number { return this.committed; }
  get holding(): boolean { return !this.passThrough; }

  /** Starts holding output (protection begins). */
  hold(): void { this.passThrough = false; }

  /**
   * A checkpoint is being taken: frames seen so far belong to it. Returns the closed tag, which
   * is committed when that checkpoint is acknowledged.
   */
  advance(): number {
    this.openFrames = 0;
    this.openBytes = 0;
    this.openOldestMs = null;
    return this.open++;
  }

  /** Output produced in the open epoch: what the scheduler sees waiting. */
  openStats(nowMs: number): { frames: number; bytes: number; oldestMs: number | null } {
    return { frames: this.openFrames, bytes: this.openBytes, oldestMs: this.openOldestMs === null ? null : nowMs - this.openOldestMs };
  }

  /** A frame from the guest: returns it when it may leave now, else holds it (or drops it at the bound). */
  push(frame: Buffer, nowMs: number): Buffer | null {
    if (this.passThrough) { this.released++; return frame; }
    if (this.bytes + frame.length > this.maxBytes) { this.dropped++; return null; } // as a congested link would: TCP retransmits
    this.queue.push({ tag: this.open, frame, atMs: nowMs });
    this.bytes += frame.length;
    this.openFrames++;
    this.openBytes += frame.length;
    this.onHeld?.();
    if (this.openOldestMs === null) { this.openOldestMs = nowMs; this.onFirstHeld?.(); }
    return null;
  }

  /** The standby committed everything up to `tag` (duplicates and stale acks are harmless). */
  commit(tag: number): Buffer[] {
    assert(tag < this.open, `commit of tag ${tag} that is still open (${this.open})`);
    if (tag <= this.committed) return [];
    this.committed = tag;
    const out: Buffer[] = [];
    while (this.head < this.queue.length && this.queue[this.head]!.tag <= this.committed) {
      const h = this.queue[this.head++]!;
      assert(h.tag <= this.committed, 'output commit: a frame leaves only after its checkpoint committed');
      this.bytes -= h.frame.length;
      out.push(h.frame);
    }
    this.compact();
    this.released += out.length;
    return out;
  }

  /** Protection is given up: everything held leaves now, and later frames pass straight through. */
  giveUp(): Buffer[] {
    const out = this.queue.slice(this.head).map((h) => h.frame);
    this.queue = [];
    this.head = 0;
    this.bytes = 0;
    this.passThrough = true;
    this.released += out.length;
    return out;
  }

  stats(nowMs: number): OutputStats {
    const oldest = this.queue[this.head];
    return { frames: this.queue.length - this.head, bytes: this.bytes, oldestMs: oldest ? nowMs - oldest.atMs : null, dropped: this.dropped, released: this.released };
  }

  private compact(): void {
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
  }
}
