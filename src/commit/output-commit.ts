// Output commit, keyed by epoch: the one place that decides when a guest's output may become
// visible. Pure: no clocks (times are passed in), no sockets (released frames go to a sink).
//
// Epoch numbers are the checkpoints': output produced after checkpoint N-1 is covered by
// checkpoint N, so it carries epoch N and may leave only once the standby acknowledged N. Closing
// epoch N (during checkpoint N's pause) closes the network epoch and cuts the disk epoch together.
// Invariant (asserted on every acknowledgement, left on in production): no frame leaves with an
// epoch above the acknowledged one — except in the explicit, counted `unprotected` state, entered
// with a reason. The acknowledgements are recorded here, apart from the pipeline's own count (which
// must agree): an ack of an epoch not yet closed, or one that goes backwards, fails.

import { assert } from '../util/index.ts';

/** Anything with a byte length: a Buffer live, a simulated frame in the simulator. */
export interface Sized {
  readonly length: number;
}

/** One epoch's disk writes, per disk (their pages travel with the checkpoint). */
export interface DiskEpochWrites {
  disks: Array<{ block: string; pages: Map<number, Buffer> }>;
  writes: number;
  flushes: number;
}

/**
 * One epoch's disk writes as the disk servers cut them at the pause: the cut is made at once, and
 * the writes are collected afterwards (once the guest runs again: the pause does not wait for them).
 */
export interface DiskEpochCut {
  collect(): Promise<DiskEpochWrites>;
}

/** The guest's disks, seen from output commit: writes are logged per epoch and cut at the pause. */
export interface DiskEpochSource {
  cutEpoch(): DiskEpochCut;
}

export type CommitState =
  /** No protection yet (or after an orderly stop): output passes straight through. */
  | { kind: 'pass-through' }
  /** Protected: output is held until its epoch is acknowledged. */
  | { kind: 'holding' }
  /** Protection was lost and held output was let go without an acknowledgement. */
  | { kind: 'unprotected'; reason: string };

export interface OutputStats {
  frames: number;
  bytes: number;
  oldestMs: number | null;
  /** Every frame the guest sent, by the way it went (each frame counts in exactly one): */
  counts: OutputCounts;
  /** How many times held output was let go without an acknowledgement. */
  unprotectedReleases: number;
  /** Median time a held frame waited, of the latest ones, by how it left (null: none yet). */
  waitMsP50: { acknowledged: number | null; compared: number | null };
}

/** The latest `n` samples, for a median. */
class Recent {
  private readonly xs: number[] = [];
  private i = 0;
  constructor(private readonly n = 512) {}
  add(x: number): void {
    if (this.xs.length < this.n) this.xs.push(x);
    else this.xs[this.i++ % this.n] = x;
  }
  median(): number | null {
    if (!this.xs.length) return null;
    const s = [...this.xs].sort((a, b) => a - b);
    return Math.round(s[s.length >> 1]! * 10) / 10;
  }
}

export interface OutputCounts {
  /** Held, then released after the standby acknowledged the checkpoint that covers it. */
  released: number;
  /** Never held: sent while nothing protected the guest (before protection, unprotected, after an orderly end). */
  passedThrough: number;
  /** Held, then let go without an acknowledgement (protection given up, or ended by choice). */
  releasedUnprotected: number;
  /** Refused at the bound on held bytes (as a congested link would: TCP retransmits). */
  dropped: number;
  /** Held, then released before its acknowledgement because the compared secondary sent the same frame (compare mode). */
  compared: number;
}

interface Held<F> {
  epoch: number;
  frame: F;
  atMs: number;
  /** Its place in the order of held frames (compare mode names frames by it). */
  seq: number;
  /** Released already (compare mode), before the acknowledgement that covers it. */
  gone: boolean;
}

export interface ClosedEpoch {
  epoch: number;
  frames: number;
  bytes: number;
  disk: DiskEpochCut | null;
}

export class OutputCommit<F extends Sized = Buffer> {
  private st: CommitState = { kind: 'pass-through' };
  /** The epoch new output belongs to (the next checkpoint's number). */
  private open = 0;
  private acked = -1;
  private queue: Held<F>[] = [];
  private head = 0;
  private bytes = 0;
  private openFrames = 0;
  private openBytes = 0;
  private openOldestMs: number | null = null;
  private readonly counts: OutputCounts = {
    released: 0,
    passedThrough: 0,
    releasedUnprotected: 0,
    dropped: 0,
    compared: 0,
  };
  private nextSeq = 0;
  /** Held frames not yet released (compare mode releases some out of the queue's order). */
  private heldCount = 0;
  /**
   * Compare mode: a held frame younger than this is not reported as waiting (the secondary's copy
   * is on its way; the scheduler need not checkpoint for it), unless `urgent` (a mismatch).
   */
  compareGraceMs = 0;
  private urgent = false;
  /**
   * When the checkpoint before the open epoch was acknowledged (compare mode): the secondary runs
   * the open epoch only after it loaded that checkpoint, so its copies cannot come before. Null:
   * not yet acknowledged.
   */
  private openBaseAckedMs: number | null = null;
  /** The latest time the scheduler looked (compare mode counts an epoch's waiting output as of then). */
  private lastSeenMs = Number.NEGATIVE_INFINITY;
  private unprotectedReleases = 0;
  private readonly waits = { acknowledged: new Recent(), compared: new Recent() };
  /** Called when the open epoch gets its first held frame (the scheduler may want to act). */
  onFirstHeld: (() => void) | null = null;
  /** Called for every frame held (traces record output times and sizes). */
  onHeld: ((frame: F, atMs: number) => void) | null = null;

  constructor(
    private readonly maxHeldBytes: number,
    private readonly disk: DiskEpochSource | null = null,
  ) {
    assert(maxHeldBytes > 0, 'output commit needs a positive bound');
  }

  get state(): CommitState {
    return this.st;
  }
  get holding(): boolean {
    return this.st.kind === 'holding';
  }
  get openEpoch(): number {
    return this.open;
  }
  get ackedEpoch(): number {
    return this.acked;
  }

  /**
   * Protection (re)starts with checkpoint `baseEpoch` (the full image, taken now with the guest
   * paused): everything the guest sent so far is in it; output from now on is held.
   */
  hold(baseEpoch: number): ClosedEpoch {
    if (this.st.kind === 'holding') {
      // A resynchronisation: output still held from the lost session is covered by the new image.
      for (let i = this.head; i < this.queue.length; i++) this.queue[i]!.epoch = baseEpoch;
      this.openFrames = this.heldCount;
      this.openBytes = this.bytes;
    }
    this.st = { kind: 'holding' };
    this.open = baseEpoch;
    this.acked = baseEpoch - 1;
    return this.closeEpoch(baseEpoch);
  }

  /** Output produced in the open epoch: what the scheduler sees waiting. */
  openStats(nowMs: number): { frames: number; bytes: number; oldestMs: number | null } {
    this.lastSeenMs = Math.max(this.lastSeenMs, nowMs);
    if (this.compareGraceMs > 0 && !this.urgent) {
      // Only frames that waited past the grace count (their secondary copy is late), the grace
      // counted from when the secondary could run their epoch at the earliest: after the ack of
      // the checkpoint before it. Without that, the lag of every checkpoint would call for the
      // next one and the secondary would never catch up.
      let frames = 0;
      let bytes = 0;
      let oldest: number | null = null;
      const base = this.openBaseAckedMs;
      if (base === null) return { frames: 0, bytes: 0, oldestMs: null };
      for (let i = this.queue.length - 1; i >= this.head; i--) {
        const h = this.queue[i]!;
        if (h.epoch !== this.open) break;
        if (h.gone || nowMs - Math.max(h.atMs, base) < this.compareGraceMs) continue;
        frames++;
        bytes += h.frame.length;
        oldest = h.atMs;
      }
      return { frames, bytes, oldestMs: oldest === null ? null : nowMs - oldest };
    }
    return {
      frames: this.openFrames,
      bytes: this.openBytes,
      oldestMs: this.openOldestMs === null ? null : nowMs - this.openOldestMs,
    };
  }

  /**
   * Compare mode: when the earliest held frame of the open epoch turns late (its copy did not come
   * within the grace), so that the scheduler looks again then; Infinity when none will (nothing
   * held, or the checkpoint before the epoch not yet acknowledged — its ack wakes the scheduler).
   */
  nextLateAtMs(): number {
    const base = this.openBaseAckedMs;
    if (this.compareGraceMs <= 0 || base === null) return Number.POSITIVE_INFINITY;
    let at = Number.POSITIVE_INFINITY;
    for (let i = this.queue.length - 1; i >= this.head; i--) {
      const h = this.queue[i]!;
      if (h.epoch !== this.open) break;
      if (!h.gone) at = Math.min(at, Math.max(h.atMs, base) + this.compareGraceMs);
    }
    return at;
  }

  /** A frame from the guest: returns it when it may leave now, else holds it (or drops it at the bound). */
  push(frame: F, nowMs: number): F | null {
    if (this.st.kind !== 'holding') {
      this.counts.passedThrough++;
      return frame;
    }
    if (this.bytes + frame.length > this.maxHeldBytes) {
      this.counts.dropped++;
      return null;
    }
    this.queue.push({ epoch: this.open, frame, atMs: nowMs, seq: this.nextSeq++, gone: false });
    this.heldCount++;
    this.bytes += frame.length;
    this.openFrames++;
    this.openBytes += frame.length;
    this.onHeld?.(frame, nowMs);
    if (this.openOldestMs === null) {
      this.openOldestMs = nowMs;
      this.onFirstHeld?.();
    }
    return null;
  }

  /**
   * Checkpoint `epoch` is being taken with the guest paused: the output and disk writes seen so
   * far belong to it. Frames produced before the pause but read after it get the next epoch
   * (held longer, never shorter).
   */
  closeEpoch(epoch: number, nowMs = this.lastSeenMs): ClosedEpoch {
    assert(this.st.kind === 'holding', `output commit: epoch ${epoch} closed while not holding`);
    assert(epoch === this.open, `output commit: closing epoch ${epoch} while epoch ${this.open} is open`);
    // Compare mode: the epoch's output the scheduler must plan for is what did not match in time.
    const late = this.compareGraceMs > 0 ? this.openStats(Math.max(nowMs, this.lastSeenMs)) : null;
    const closed: ClosedEpoch = {
      epoch,
      frames: late ? late.frames : this.openFrames,
      bytes: late ? late.bytes : this.openBytes,
      disk: this.disk?.cutEpoch() ?? null,
    };
    this.open = epoch + 1;
    this.openFrames = 0;
    this.openBytes = 0;
    this.openOldestMs = null;
    this.urgent = false;
    this.openBaseAckedMs = null;
    return closed;
  }

  /**
   * The standby acknowledged checkpoint `epoch`: recorded here, and the frames it covers (every
   * held frame of an epoch up to it) may leave now, oldest first. An ack of an epoch that is still
   * open (no checkpoint covers its output yet), or not above the last one, is a defect upstream.
   */
  acknowledged(epoch: number, nowMs = this.lastSeenMs): Array<{ frame: F; atMs: number }> {
    assert(this.st.kind === 'holding', `output commit: ack of epoch ${epoch} while not holding`);
    assert(epoch < this.open, `output commit: ack of epoch ${epoch}, which is still open (no checkpoint covers it)`);
    assert(epoch > this.acked, `output commit: acknowledgements went backwards (${epoch} after ${this.acked})`);
    this.acked = epoch;
    if (epoch === this.open - 1) this.openBaseAckedMs = nowMs;
    const out: Array<{ frame: F; atMs: number }> = [];
    while (this.head < this.queue.length && this.queue[this.head]!.epoch <= this.acked) {
      const h = this.queue[this.head++]!;
      if (h.gone) continue;
      this.heldCount--;
      this.bytes -= h.frame.length;
      out.push({ frame: h.frame, atMs: h.atMs });
      if (Number.isFinite(nowMs)) this.waits.acknowledged.add(nowMs - h.atMs);
    }
    this.compact();
    this.counts.released += out.length;
    return out;
  }

  /** Frames released so far by acknowledgement and by comparison (cheap: no copy). */
  get releaseCounts(): { readonly compared: number; readonly released: number } {
    return this.counts;
  }

  /** The number the next held frame gets (compare mode pairs it with its secondary copy). */
  get nextHeldSeq(): number {
    return this.nextSeq;
  }

  /**
   * Compare mode: held frame `seq` of epoch `epoch` leaves before its acknowledgement, because the
   * secondary — running from the last checkpoint on the same input — sent the same frame (the
   * comparator decided; it keeps each connection's order). Returns the frame, or null when it
   * already left (acknowledged meanwhile). A frame of another epoch than the comparator thinks, or
   * a release while not holding, is a defect upstream.
   */
  releaseCompared(seq: number, epoch: number, nowMs?: number): F | null {
    assert(this.st.kind === 'holding', `output commit: compared release of frame ${seq} while not holding`);
    assert(seq < this.nextSeq, `output commit: compared release of frame ${seq}, which is not held`);
    const first = this.queue[this.head];
    if (!first || seq < first.seq) return null; // acknowledged meanwhile
    const h = this.queue[this.head + (seq - first.seq)];
    assert(h !== undefined && h.seq === seq, `output commit: compared release of frame ${seq}, which is not held`);
    assert(h.epoch === epoch, `output commit: frame ${seq} is of epoch ${h.epoch}, compared as ${epoch}`);
    if (h.gone) return null;
    h.gone = true;
    this.heldCount--;
    this.bytes -= h.frame.length;
    if (h.epoch === this.open) {
      this.openFrames--;
      this.openBytes -= h.frame.length;
    }
    this.counts.compared++;
    if (nowMs !== undefined) this.waits.compared.add(nowMs - h.atMs);
    return h.frame;
  }

  /** Compare mode: the secondary sent something else; the open epoch's output now waits like any (checkpoint soon). */
  mismatch(): void {
    this.urgent = true;
  }

  /**
   * Protection is given up (no standby for too long): everything held leaves now, unacknowledged,
   * and later output passes through until `hold()` starts protection again. Counted, with a reason.
   */
  releaseUnprotected(reason: string): F[] {
    const out = this.drain();
    this.st = { kind: 'unprotected', reason };
    this.unprotectedReleases++;
    this.counts.releasedUnprotected += out.length;
    return out;
  }

  /**
   * Protection ends by choice (orderly stop; the standby was told and will not take over on its
   * own): held output leaves unacknowledged — counted as such — and later output passes through.
   */
  end(): F[] {
    const out = this.drain();
    if (out.length) this.unprotectedReleases++;
    this.counts.releasedUnprotected += out.length;
    this.st = { kind: 'pass-through' };
    return out;
  }

  stats(nowMs: number): OutputStats {
    let oldest = this.queue[this.head];
    for (let i = this.head; oldest?.gone && i < this.queue.length; i++) oldest = this.queue[i];
    if (oldest?.gone) oldest = undefined;
    return {
      frames: this.heldCount,
      bytes: this.bytes,
      oldestMs: oldest ? nowMs - oldest.atMs : null,
      counts: { ...this.counts },
      unprotectedReleases: this.unprotectedReleases,
      waitMsP50: { acknowledged: this.waits.acknowledged.median(), compared: this.waits.compared.median() },
    };
  }

  private drain(): F[] {
    const out = this.queue
      .slice(this.head)
      .filter((h) => !h.gone)
      .map((h) => h.frame);
    this.queue = [];
    this.head = 0;
    this.heldCount = 0;
    this.bytes = 0;
    this.openFrames = 0;
    this.openBytes = 0;
    this.openOldestMs = null;
    return out;
  }

  private compact(): void {
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
  }
}
