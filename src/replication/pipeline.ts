// The epoch pipeline of one protected VM: the one place where an epoch's life is decided. Pure and
// clock-free: inputs (a decision is due, the guest paused, a checkpoint captured, sent, acked, the
// link lost, a fence asked for, the hold timer expired) come in with the time they happened, and
// commands (capture, send, release, wait, resync, go unprotected) go out. The live primary
// controller and the simulator both drive it; it never touches a socket, a timer or QEMU.
//
// Invariants asserted here (left on in production): acks arrive in order and only for checkpoints
// sent; within one replica generation epochs increase by one; one capture at a time; output is
// released only up to the acknowledged epoch (OutputCommit asserts it again per frame).

import { assert } from '../util/index.ts';
import type { OutputCommit, Sized, ClosedEpoch } from '../commit/index.ts';
import { lastPassAfterMs, presendEveryMs, type EpochRecord, type Policy, type Telemetry } from '../scheduler/index.ts';

export type PipelinePhase =
  /** No standby protects the guest (before the first sync, or after the link was lost). */
  | 'unprotected'
  /** A new replica generation: the full image is being captured and shipped (epoch 0). */
  | 'syncing'
  /** Checkpoints flow; output leaves as they are acknowledged. */
  | 'protecting'
  /** The standby asked to take over: a last checkpoint with the guest stopped, then its ack. */
  | 'fencing'
  /** The last checkpoint is acknowledged; the guest must stop here for good. */
  | 'fenced'
  /** Protection ended by choice. */
  | 'stopped';

/** What the adapters measure now, besides what the pipeline knows itself. */
export interface Observed {
  /** `pressure`: the disk's per-epoch dirty set reached its bound (the epoch must end now). */
  disk: { writes: number; flushes: number; pressure?: boolean };
  link: { bytesPerSec: number | null; rttMs: number | null };
  /** The host's idle cores lately (null or absent: unknown). */
  hostIdleCores?: number | null;
  /** The capture can pre-send dirty RAM while the guest runs (a patched QEMU in COLO). Absent: it cannot. */
  canPresend?: boolean;
}

export type Command<F extends Sized = Buffer> =
  /** Pause the guest and take checkpoint `epoch` (call paused() during the pause, captured() after). */
  | { cmd: 'capture'; epoch: number; reason: string }
  /** Nothing to do before `untilMs` unless an input arrives. */
  | { cmd: 'wait'; untilMs: number; reason: string }
  /** A checkpoint is due but the backlog is full: wait for an acknowledgement. */
  | { cmd: 'wait-ack' }
  /**
   * Pre-send the dirty RAM of the coming checkpoint `epoch` while the guest runs (then call presented()):
   * `interval` during a long epoch, `last-pass` right before the checkpoint the next decision takes.
   */
  | { cmd: 'presend'; epoch: number; reason: 'interval' | 'last-pass' }
  /** Ship checkpoint `epoch` to the standby (then call sent()). */
  | { cmd: 'send'; epoch: number }
  /**
   * The standby acknowledged `epoch`: these frames may leave now (`timeline`: when each step of its checkpoint
   * happened).
   */
  | {
      cmd: 'release';
      epoch: number;
      frames: Array<{ frame: F; atMs: number }>;
      transferMs: number;
      timeline: EpochTimeline;
    }
  /** The full image is acknowledged: the guest is protected. */
  | { cmd: 'protected'; generation: number }
  /** The standby is gone: say so (once per loss), keep holding output, reconnect and resync. */
  | { cmd: 'unprotected'; reason: string; first: boolean }
  /** No standby took over protection in time: held output leaves without an acknowledgement. */
  | { cmd: 'release-unprotected'; reason: string; frames: F[] }
  /** Take the last checkpoint `epoch` with the guest stopped (a fence). */
  | { cmd: 'fence'; epoch: number }
  /** The fence checkpoint is acknowledged: stop the guest, tell the standby. */
  | { cmd: 'stop-guest' };

/** What the standby measured of one checkpoint (its ack carries it): durations, its own clock. */
export interface StandbyTimings {
  /** From the checkpoint's arrival to the start of its commit (waiting behind earlier ones). */
  queuedMs: number;
  /** Its commit: decode, verify, the commit point; up to the ack being sent. */
  commitMs: number;
  /** From its first byte to its last received and decrypted (overlaps the primary's sending). */
  receiveMs: number;
}

/**
 * When each step of one checkpoint's life happened, on the primary's clock (ms), with the
 * standby's own durations: the segments an output frame of this epoch waits through.
 */
export interface EpochTimeline {
  epoch: number;
  /** The checkpoint was decided (the trigger sent to QEMU); the guest paused at pauseBeganMs. */
  decidedMs: number;
  pauseBeganMs: number;
  resumedMs: number;
  encodedMs: number;
  sentMs: number;
  ackedMs: number;
  standby: StandbyTimings | null;
}

const PAGE_BYTES = 4096;
const DEFAULT_MAX_CHECKPOINT_BYTES = 32 << 20;
const DEFAULT_MAX_INFLIGHT_BYTES = 64 << 20;
const FIRST_EPOCH_MAX_MS = 100;
/** An epoch up to this factor over the checkpoint bound is not cut (a saturated working set)… */
const OVER_BOUND_KEPT = 1.5;
/** … and the next may be this much longer. */
const GROWTH_NEAR_BOUND = 2;
const YOUNG_EPOCHS = 16;

interface Inflight {
  epoch: number;
  sentAtMs: number | null;
  record: EpochRecord | null;
  decidedMs: number;
  pauseBeganMs: number;
  resumedMs: number;
  encodedMs: number;
}

export interface PipelineOptions<F extends Sized> {
  policy: Policy;
  commit: OutputCommit<F>;
  /** Checkpoints shipped and not yet acknowledged, at most. */
  maxInflight: number;
  /** Past epochs the scheduler sees (bounded). */
  historyKept?: number;
  /**
   * Bound on one checkpoint's dirty memory, bytes: an epoch ends before its dirty set, estimated
   * from the last epoch's dirty rate, passes it (the record, its copies and the standby's staging
   * stay within the controllers' memory). Default 32 MiB.
   */
  maxCheckpointBytes?: number;
  /** Bound on the bytes of checkpoints shipped and not yet acknowledged (a larger one goes alone). Default 64 MiB. */
  maxInflightBytes?: number;
}

export interface PipelineStats {
  phase: PipelinePhase;
  generation: number;
  /** The last checkpoint captured, sent and acknowledged in this generation (-1: none). */
  capturedEpoch: number;
  sentEpoch: number;
  ackedEpoch: number;
  inflight: number;
  waitsForLink: number;
  reasons: Record<string, number>;
}

export class EpochPipeline<F extends Sized = Buffer> {
  private ph: PipelinePhase = 'unprotected';
  private gen = 0;
  private captured = -1;
  private sentUpTo = -1;
  private acked = -1;
  private capturing: number | null = null;
  private decidedMs: number | null = null;
  private epochStartMs = 0;
  private pauseBeganMs: number | null = null;
  private closed: ClosedEpoch | null = null;
  private fenceAsked = false;
  /** Pre-sends in the running epoch: pages sent while the guest ran, and when the last one was. */
  private present = { pages: 0, lastMs: null as number | null };
  /** A pre-send pass of this coming checkpoint is under way (null: none). */
  private presending: number | null = null;
  /** A checkpoint decided for this reason waits for the last pass before its pause (null: none). */
  private afterLastPass: string | null = null;
  private lossReported = false;
  /** Why the guest is not protected (null once protection starts). */
  private loss: string | null = 'not yet synchronised with a standby';
  private inflight: Inflight[] = [];
  private readonly hist: EpochRecord[] = [];
  private waits = 0;
  private readonly reasonCounts: Record<string, number> = {};
  private readonly keep: number;

  constructor(private readonly o: PipelineOptions<F>) {
    assert(o.maxInflight >= 1, 'pipeline: maxInflight must be at least 1');
    this.keep = o.historyKept ?? 256;
  }

  get phase(): PipelinePhase {
    return this.ph;
  }
  /** Why the guest is not protected now: the last loss, or that no standby was synchronised yet (null: protected). */
  get lossReason(): string | null {
    return this.loss;
  }
  get generation(): number {
    return this.gen;
  }
  get history(): readonly EpochRecord[] {
    return this.hist;
  }
  get ackedEpoch(): number {
    return this.acked;
  }
  get capturedEpoch(): number {
    return this.captured;
  }
  /** When the running epoch began (the guest resumed after the last checkpoint). */
  get epochStartedMs(): number {
    return this.epochStartMs;
  }
  get inflightCount(): number {
    return this.inflight.length;
  }
  get policy(): Policy {
    return this.o.policy;
  }
  /** Send time of the oldest unacknowledged checkpoint (the replica's lag starts there). */
  get oldestInflightSentMs(): number | null {
    return this.inflight[0]?.sentAtMs ?? null;
  }

  stats(): PipelineStats {
    return {
      phase: this.ph,
      generation: this.gen,
      capturedEpoch: this.captured,
      sentEpoch: this.sentUpTo,
      ackedEpoch: this.acked,
      inflight: this.inflight.length,
      waitsForLink: this.waits,
      reasons: { ...this.reasonCounts },
    };
  }

  // ---- a new replica generation: the full image (epoch 0) ------------------------------------

  /** A standby answered: start a new generation with a full image. */
  startSync(): Command<F>[] {
    assert(this.ph === 'unprotected', `pipeline: sync started while ${this.ph}`);
    this.ph = 'syncing';
    this.gen++;
    this.captured = -1;
    this.sentUpTo = -1;
    this.acked = -1;
    this.capturing = 0;
    this.inflight = [];
    this.fenceAsked = false;
    this.presending = null;
    this.afterLastPass = null;
    return [{ cmd: 'capture', epoch: 0, reason: 'sync' }];
  }

  // ---- one checkpoint -----------------------------------------------------------------------

  /**
   * A decision is due (timer, output, flush, ack, a pre-send's end): checkpoint now, pre-send, or
   * when to ask again.
   */
  decide(nowMs: number, seen: Observed): Command<F> {
    assert(this.ph === 'protecting', `pipeline: decision asked while ${this.ph}`);
    assert(this.capturing === null, 'pipeline: decision asked during a capture');
    assert(this.presending === null, 'pipeline: decision asked during a pre-send');
    if (this.fenceAsked) {
      this.ph = 'fencing';
      this.afterLastPass = null;
      return this.beginCapture('fence', nowMs) as Command<F>;
    }
    // The checkpoint decided before its last pass goes now (once the backlog has room: no second pass).
    if (this.afterLastPass !== null) {
      if (this.backlogFull()) return this.waitForAck();
      const reason = this.afterLastPass;
      this.afterLastPass = null;
      return this.beginCapture(reason, nowMs);
    }
    // Rails above every policy: a bounded disk log at its bound, and an epoch whose estimated
    // dirty memory reached the checkpoint bound, end now; no policy waits past the latter.
    const sizeDueMs = this.sizeBoundAtMs();
    const d = seen.disk.pressure
      ? { checkpoint: true as const, reason: 'disk-pressure' }
      : nowMs >= sizeDueMs
        ? { checkpoint: true as const, reason: 'size-bound' }
        : this.o.policy.decide(this.telemetry(nowMs, seen));
    this.reasonCounts[d.reason] = (this.reasonCounts[d.reason] ?? 0) + 1;
    const every = seen.canPresend ? this.presendIntervalMs(seen.hostIdleCores ?? null) : 0;
    if (!d.checkpoint) {
      const untilMs = Math.min(d.wakeAtMs, sizeDueMs);
      const reason = d.wakeAtMs > sizeDueMs ? 'size-bound' : d.reason;
      // A long wait with pre-sends on: the dirty RAM goes out every interval while the guest runs.
      if (every > 0 && untilMs - nowMs > 1.5 * every && this.mayPresend()) {
        const dueMs = Math.max(this.epochStartMs, this.present.lastMs ?? 0) + every;
        return nowMs >= dueMs ? this.beginPresend('interval') : { cmd: 'wait', untilMs: dueMs, reason };
      }
      return { cmd: 'wait', untilMs, reason };
    }
    if (this.backlogFull()) return this.waitForAck();
    // With pre-sends on, a long epoch gets a last pass right before its pause: the pause then
    // carries only what is written during that pass. (Not when output waits: it would wait longer.)
    if (
      every > 0 &&
      nowMs - this.epochStartMs > lastPassAfterMs(every) &&
      this.o.commit.openStats(nowMs).frames === 0 &&
      this.mayPresend()
    ) {
      this.afterLastPass = d.reason;
      return this.beginPresend('last-pass');
    }
    return this.beginCapture(d.reason, nowMs);
  }

  /** No room for another checkpoint in flight (pre-sent bytes count too; with nothing in flight one goes alone). */
  private backlogFull(): boolean {
    return (
      this.inflight.length >= this.o.maxInflight ||
      (this.inflight.length > 0 && this.unackedBytes() >= this.maxInflightBytes)
    );
  }

  private waitForAck(): Command<F> {
    this.waits++;
    return { cmd: 'wait-ack' };
  }

  /**
   * How often the running epoch's dirty RAM is pre-sent (the policy's presend setting; presend=auto
   * from the dirty curve, the pause fit and the host's idle cores): 0 none, Infinity only a last
   * pass before each pause.
   */
  presendIntervalMs(hostIdleCores: number | null): number {
    return presendEveryMs(this.o.policy, this.hist, hostIdleCores) ?? 0;
  }

  private beginPresend(reason: 'interval' | 'last-pass'): Command<F> {
    this.presending = this.captured + 1;
    return { cmd: 'presend', epoch: this.presending, reason };
  }

  /**
   * When the running epoch's dirty memory would pass the checkpoint bound. A dirty set grows at
   * most linearly with time (a working set saturates), so from the last epoch the bound is reached
   * at length × bound / pages. Near the bound (a working set about its size may have saturated) an
   * epoch may still double, so a saturated set never pins the length; one well over it is cut to
   * size. A checkpoint's dirty memory so stays within about twice the bound (with pre-sends: the
   * part its pause carries).
   */
  private sizeBoundAtMs(): number {
    // The first epoch after a full image: nothing is known yet of this generation's dirty rate (a
    // guest may be booting), so it is kept short; its checkpoint gives the estimate.
    if (this.captured === 0) return this.epochStartMs + FIRST_EPOCH_MAX_MS;
    const last = this.hist.at(-1);
    if (!last || last.lengthMs <= 0 || last.dirtyPages === 0) return Number.POSITIVE_INFINITY;
    const boundBytes = this.o.maxCheckpointBytes ?? DEFAULT_MAX_CHECKPOINT_BYTES;
    // Pre-sent epochs: the pause and the record carry only what the last pass left, which does not
    // grow with the epoch's length; while that stays well under the bound it sets no length (the
    // data at risk is the policies' rail, the standby's staging is bounded by the RAM).
    if (last.pausePages !== undefined && last.pausePages * PAGE_BYTES * OVER_BOUND_KEPT < boundBytes)
      return Number.POSITIVE_INFINITY;
    const ratio = boundBytes / PAGE_BYTES / last.dirtyPages;
    let due =
      this.epochStartMs + last.lengthMs * (ratio < 1 / OVER_BOUND_KEPT ? ratio : Math.max(GROWTH_NEAR_BOUND, ratio));
    // In a young generation (a guest booting: its rate climbs), after an epoch that dirtied a good
    // part of the bound the next may at most double its length: the estimate keeps up.
    if (this.captured < YOUNG_EPOCHS && last.dirtyPages * PAGE_BYTES >= boundBytes / 8) {
      due = Math.min(due, this.epochStartMs + Math.max(FIRST_EPOCH_MAX_MS, 2 * last.lengthMs));
    }
    return due;
  }

  /** The scheduler's view, built in one place for the live engine and the simulator. */
  telemetry(nowMs: number, seen: Observed): Telemetry {
    return {
      nowMs,
      epochStartMs: this.epochStartMs,
      history: this.hist,
      output: this.o.commit.openStats(nowMs),
      disk: { writes: seen.disk.writes, flushes: seen.disk.flushes },
      link: { bytesPerSec: seen.link.bytesPerSec, rttMs: seen.link.rttMs },
      backlog: this.inflight.length,
      ...(seen.hostIdleCores !== undefined && seen.hostIdleCores !== null ? { hostIdleCores: seen.hostIdleCores } : {}),
      ...(this.present.lastMs !== null ? { presend: { ...this.present } } : {}),
    };
  }

  private beginCapture(reason: string, nowMs: number): Command<F> {
    const epoch = this.captured + 1;
    this.capturing = epoch;
    this.decidedMs = nowMs;
    return reason === 'fence' ? { cmd: 'fence', epoch } : { cmd: 'capture', epoch, reason };
  }

  /**
   * The guest is paused for checkpoint `epoch` and its I/O drained: output and disk writes so far
   * belong to it (their epoch closes here). `pauseBeganMs`: when the guest was told to stop.
   */
  paused(epoch: number, pauseBeganMs: number): ClosedEpoch {
    assert(this.capturing === epoch, `pipeline: paused for checkpoint ${epoch}, capturing ${this.capturing}`);
    this.pauseBeganMs = pauseBeganMs;
    this.closed = epoch === 0 && this.ph === 'syncing' ? this.o.commit.hold(0) : this.o.commit.closeEpoch(epoch);
    return this.closed;
  }

  /** Pages pre-sent in the running epoch (they are not in its checkpoint's record). */
  get presentedPages(): number {
    return this.present.pages;
  }

  private get maxInflightBytes(): number {
    return this.o.maxInflightBytes ?? DEFAULT_MAX_INFLIGHT_BYTES;
  }

  /**
   * Bytes shipped and not yet acknowledged: the checkpoints in flight and what was pre-sent for the
   * coming one (the standby stages it until that checkpoint commits).
   */
  unackedBytes(): number {
    return this.inflight.reduce((s, x) => s + (x.record?.bytes ?? 0), 0) + this.present.pages * PAGE_BYTES;
  }

  /**
   * Whether a pre-send pass may go out now: only while protecting and with room under the in-flight
   * bound, so a slow standby slows the pre-sends (it acknowledges later), never the primary's memory.
   */
  private mayPresend(): boolean {
    return this.ph === 'protecting' && this.closed === null && this.unackedBytes() < this.maxInflightBytes;
  }

  /**
   * A pre-send of `pages` dirty pages finished at `nowMs` (the guest ran meanwhile); they join the
   * next checkpoint — also when it is the last pass right before that checkpoint's pause.
   */
  presented(pages: number, nowMs: number): void {
    assert(
      this.ph === 'protecting' && this.closed === null,
      `pipeline: a pre-send while ${this.ph}${this.closed ? ', paused' : ''}`,
    );
    assert(this.presending === this.captured + 1, `pipeline: a pre-send ended that was not asked for`);
    this.presending = null;
    this.present = { pages: this.present.pages + pages, lastMs: nowMs };
  }

  /**
   * Checkpoint `epoch` is local and the guest runs again (since `resumedMs`); its record was ready at `encodedMs`
   * (default: resumedMs).
   */
  capturedCheckpoint(
    epoch: number,
    c: {
      dirtyPages: number;
      pauseMs: number;
      bytes: number;
      resumedMs: number;
      encodedMs?: number;
      pausePages?: number;
    },
  ): Command<F>[] {
    assert(this.capturing === epoch, `pipeline: captured ${epoch}, capturing ${this.capturing}`);
    assert(epoch === this.captured + 1, `pipeline: epoch ${epoch} after ${this.captured} in generation ${this.gen}`);
    assert(this.closed?.epoch === epoch, `pipeline: checkpoint ${epoch} captured without its pause`);
    this.capturing = null;
    this.captured = epoch;
    let record: EpochRecord | null = null;
    if (epoch > 0) {
      record = {
        lengthMs: (this.pauseBeganMs ?? c.resumedMs) - this.epochStartMs,
        dirtyPages: c.dirtyPages,
        pauseMs: c.pauseMs,
        ...(c.pausePages !== undefined && c.pausePages !== c.dirtyPages ? { pausePages: c.pausePages } : {}),
        bytes: c.bytes,
        transferMs: null,
        outputFrames: this.closed.frames,
      };
      this.hist.push(record);
      if (this.hist.length > this.keep) this.hist.shift();
    }
    const pauseBeganMs = this.pauseBeganMs ?? c.resumedMs;
    const decidedMs = Math.min(this.decidedMs ?? pauseBeganMs, pauseBeganMs);
    this.decidedMs = null;
    this.epochStartMs = c.resumedMs;
    this.present = { pages: 0, lastMs: null };
    this.closed = null;
    this.pauseBeganMs = null;
    this.inflight.push({
      epoch,
      sentAtMs: null,
      record,
      decidedMs,
      pauseBeganMs,
      resumedMs: c.resumedMs,
      encodedMs: c.encodedMs ?? c.resumedMs,
    });
    return [{ cmd: 'send', epoch }];
  }

  /** Checkpoint `epoch` was handed to the link. */
  sent(epoch: number, nowMs: number): void {
    const f = this.inflight.find((x) => x.epoch === epoch);
    assert(f !== undefined && f.sentAtMs === null, `pipeline: sent ${epoch}, which is not waiting to be sent`);
    assert(epoch === this.sentUpTo + 1, `pipeline: sent ${epoch} after ${this.sentUpTo}`);
    f.sentAtMs = nowMs;
    this.sentUpTo = epoch;
  }

  /** The standby acknowledged checkpoint `epoch` (with what it measured of it, when it says). */
  ack(epoch: number, nowMs: number, standby: StandbyTimings | null = null): Command<F>[] {
    const head = this.inflight[0];
    assert(head !== undefined && head.epoch === epoch, `pipeline: ack for ${epoch}, expected ${head?.epoch ?? 'none'}`);
    assert(
      epoch <= this.sentUpTo && head.sentAtMs !== null,
      `pipeline: ack for ${epoch} before it was sent (sent up to ${this.sentUpTo})`,
    );
    this.inflight.shift();
    this.acked = epoch;
    const transferMs = nowMs - head.sentAtMs;
    if (head.record) head.record.transferMs = transferMs;
    const timeline: EpochTimeline = {
      epoch,
      decidedMs: head.decidedMs,
      pauseBeganMs: head.pauseBeganMs,
      resumedMs: head.resumedMs,
      encodedMs: head.encodedMs,
      sentMs: head.sentAtMs,
      ackedMs: nowMs,
      standby,
    };
    const frames = this.o.commit.acknowledged(epoch, nowMs);
    // Two records of the acknowledgements, kept apart: the pipeline's and output commit's.
    assert(
      this.o.commit.ackedEpoch === this.acked,
      `pipeline: acked ${this.acked}, output commit ${this.o.commit.ackedEpoch}`,
    );
    const out: Command<F>[] = [{ cmd: 'release', epoch, frames, transferMs, timeline }];
    if (this.ph === 'syncing' && epoch === 0) {
      this.ph = 'protecting';
      this.lossReported = false;
      this.loss = null;
      out.push({ cmd: 'protected', generation: this.gen });
    } else if (
      this.ph === 'fencing' &&
      this.inflight.length === 0 &&
      this.capturing === null &&
      this.captured === epoch
    ) {
      this.ph = 'fenced';
      out.push({ cmd: 'stop-guest' });
    }
    return out;
  }

  /** Is `epoch` the acknowledgement the pipeline waits for next? (Peer input is checked before ack().) */
  expectsAck(epoch: number): boolean {
    const head = this.inflight[0];
    return head !== undefined && head.epoch === epoch && head.sentAtMs !== null;
  }

  /** The standby asked to take over (manual failover): fence at the next decision. */
  fenceRequested(): void {
    if (this.ph === 'protecting' || this.ph === 'syncing') this.fenceAsked = true;
  }

  // ---- loss, give-up, stop -----------------------------------------------------------------

  /** The link to the standby is gone (or the capture failed): output stays held, a resync follows. */
  linkLost(reason: string): Command<F>[] {
    if (this.ph === 'stopped' || this.ph === 'fenced') return [];
    this.ph = 'unprotected';
    this.inflight = [];
    this.capturing = null;
    this.presending = null;
    this.afterLastPass = null;
    this.decidedMs = null;
    this.closed = null;
    const first = !this.lossReported;
    this.lossReported = true;
    this.loss = reason;
    return [{ cmd: 'unprotected', reason, first }];
  }

  /**
   * The hold timer expired: if no standby protects the guest yet, held output leaves unprotected.
   * Not while a standby is being synchronised: its full image covers what is held (and the sync's
   * ack releases it); letting it go then would leave the sync's ack nothing held to release.
   */
  holdExpired(reason: string): Command<F>[] {
    if (this.ph === 'protecting' || this.ph === 'fencing' || this.ph === 'syncing' || !this.o.commit.holding) return [];
    return [{ cmd: 'release-unprotected', reason, frames: this.o.commit.releaseUnprotected(reason) }];
  }

  /** Protection ends by choice: held output leaves, later output passes through. */
  stop(): F[] {
    this.ph = 'stopped';
    this.inflight = [];
    return this.o.commit.holding ? this.o.commit.end() : [];
  }
}
