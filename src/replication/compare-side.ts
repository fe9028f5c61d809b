// The primary's half of compare mode (COLO's idea): the guest's input is mirrored to the standby's
// secondary VM, the secondary's output comes back, and a held frame leaves as soon as the secondary
// sent the same one — else with its checkpoint's acknowledgement, as in buffer mode. With --mode
// auto it also judges how output left and tells the scheduler whether to plan as compare mode.
// Output commit (commit/) keeps the frames and asserts every release; this module only pairs them.

import { readFileSync } from 'node:fs';
import { errorMessage, logger } from '../util/index.ts';
import { FrameComparator, ModeChooser, type OutputCommit } from '../commit/index.ts';
import type { GuestNet } from '../io/index.ts';
import type { Link } from './link.ts';
import { FrameType } from './protocol/frame.ts';
import { splitNetFrames } from './protocol/messages.ts';

const log = logger('primary');

/** How long a held frame may wait for the secondary's copy before the scheduler counts it as waiting output. */
export const DEFAULT_COMPARE_LAG_MS = 100;
/**
 * The guest kept sending output this long with no frame from the secondary meanwhile: the secondary is taken as
 * silent (its standby turned compare mode off, or it hangs) and checkpoints are planned as in buffer mode until it
 * sends again. Counted from the guest's first frame after the secondary's last one, so that a quiet spell of both
 * (or the synchronisation before the secondary exists) is no silence of the secondary.
 */
export const SECONDARY_SILENT_MS = 1000;
/** Mirrored input is sent once this much waits (else at the end of the event-loop turn). */
const MIRROR_BATCH_BYTES = 1 << 20;
/**
 * Input between Rubato and the guest that a checkpoint may not hold beside what Rubato still has
 * queued: the unix socket's buffer in the kernel (at most its send buffer: the host's default, 208
 * KiB unless tuned) and the one buffer (68 KiB) QEMU reads into before it waits for the stopped guest.
 */
export const IN_FLIGHT_SLACK_BYTES = Math.max(512 << 10, 2 * socketSendBufferDefault() + (128 << 10));

function socketSendBufferDefault(): number {
  try {
    return Number(readFileSync('/proc/sys/net/core/wmem_default', 'utf8').trim()) || 212_992;
  } catch {
    return 212_992;
  }
}
/** The epoch's last input kept for cut(): the relay holds at most 4 MiB for the guest, then drops. */
const TAIL_MAX_BYTES = (4 << 20) + IN_FLIGHT_SLACK_BYTES;

export interface CompareSideOptions {
  mode: 'compare' | 'auto';
  commit: OutputCommit;
  relay: GuestNet;
  lagMs?: number;
  /** The link of the session under way (null between sessions). */
  link: () => Link | null;
  /** Whether a standby protects the guest now (frames are compared only then). */
  protecting: () => boolean;
  /** A mismatch: the open epoch's output now waits for a checkpoint (the decision loop looks again). */
  onMismatch: () => void;
  /** The clock (performance.now() unless a test sets it). */
  now?: () => number;
  /** --mode auto changed how checkpoints are planned. */
  onPlanning: (ch: { to: 'compare' | 'buffer'; comparedShare: number | null; reason: string }) => void;
}

export class CompareSide {
  private readonly comparator = new FrameComparator();
  /** --mode auto: whether the scheduler plans as compare or as buffer mode (null: compare always). */
  private readonly chooser: ModeChooser | null;
  /** Inbound frames waiting to be mirrored to the secondary, and the epoch they arrived in. */
  private mirrored: { epoch: number; frames: Buffer[]; bytes: number } | null = null;
  /** The open epoch's last mirrored frames, as they came (at most TAIL_MAX_BYTES; `from`: the first one kept). */
  private tail: { epoch: number; frames: Buffer[]; from: number; bytes: number } = {
    epoch: -1,
    frames: [],
    from: 0,
    bytes: 0,
  };
  /** Bytes of input mirrored a second time, for the next epoch, at checkpoints (see cut()). */
  resentBytes = 0;
  /** Bytes of input mirrored to the secondary (not counting those sent again). */
  private mirroredBytes = 0;
  /** Frames that reached the guest from outside (--mode auto judges the service's progress by them). */
  private inbound = 0;
  /** When the secondary last sent a frame, and the guest last sent one (performance.now()). */
  private readonly now: () => number;
  private secondaryAtMs: number;
  private heldAtMs = 0;
  /** The guest's first frame since the secondary's last one (null: none since). */
  private unansweredSinceMs: number | null = null;
  private silent = false;
  private mismatchLoggedMs = Number.NEGATIVE_INFINITY;

  constructor(private readonly o: CompareSideOptions) {
    this.chooser = o.mode === 'auto' ? new ModeChooser() : null;
    this.now = o.now ?? (() => performance.now());
    this.secondaryAtMs = this.now();
    o.commit.compareGraceMs = this.lagMs;
    o.relay.onOutsideFrame = (f) => {
      this.inbound++;
      // Planned as buffer mode (--mode auto), the secondary gets no input: it idles, costing no CPU.
      if (this.planning) this.mirror(f);
    };
  }

  private get lagMs(): number {
    return this.o.lagMs ?? DEFAULT_COMPARE_LAG_MS;
  }

  /** Compare is the plan (--mode auto: chosen): the guest's input is mirrored to the secondary. */
  get planning(): boolean {
    return (this.chooser?.planning ?? 'compare') === 'compare';
  }

  /**
   * The scheduler plans as compare mode: matched output calls for no checkpoint. Not while the
   * secondary is silent (its input is still mirrored, so that it can answer again).
   */
  get plansCompare(): boolean {
    return this.planning && !this.silent;
  }

  /** --mode auto: judge how output left, and plan as the better mode. */
  choose(nowMs: number): void {
    const since = this.unansweredSinceMs;
    const silent = this.o.protecting() && since !== null && this.heldAtMs - since > SECONDARY_SILENT_MS;
    if (silent !== this.silent) {
      this.silent = silent;
      if (silent)
        log.warn(
          `the secondary sent nothing for ${Math.round(nowMs - this.secondaryAtMs)} ms, ${Math.round(this.heldAtMs - since!)} ms of it while the guest sent output: checkpoints planned as in buffer mode until it answers again`,
        );
      else log.info('the secondary answers again: checkpoints planned as in compare mode');
    }
    this.o.commit.compareGraceMs = this.plansCompare ? this.lagMs : 0;
    if (!this.chooser) return;
    const ch = this.chooser.observe(nowMs, { ...this.o.commit.releaseCounts, inbound: this.inbound });
    this.o.commit.compareGraceMs = this.plansCompare ? this.lagMs : 0;
    if (!ch) return;
    log.info(`checkpoints now planned as in ${ch.to} mode: ${ch.reason}`);
    // Back to compare: the secondary got no input while buffer was planned, so it can match nothing
    // until a checkpoint brings it to the primary's state. That checkpoint is taken now, not after
    // the first frame waited out its grace.
    if (ch.to === 'compare' && this.o.protecting()) {
      this.o.commit.mismatch();
      this.o.onMismatch();
    }
    this.o.onPlanning(ch);
  }

  /** The guest sent frame `f`, held as `seq` in the open epoch. */
  held(seq: number, f: Buffer): void {
    if (!this.o.protecting()) return;
    this.heldAtMs = this.now();
    this.unansweredSinceMs ??= this.heldAtMs;
    this.compared(this.comparator.primary(seq, this.o.commit.openEpoch, f));
  }

  /** The secondary's output of `epoch` (a SEC_OUT payload); a malformed one throws (the session ends). */
  secondarySent(epoch: number, payload: Buffer): void {
    if (!this.o.protecting()) return;
    this.secondaryAtMs = this.now();
    this.unansweredSinceMs = null;
    for (const fr of splitNetFrames(payload)) this.compared(this.comparator.secondary(epoch, fr));
  }

  /** Checkpoint `epoch` was acknowledged: what it released needs no comparison any more. */
  acknowledged(epoch: number): void {
    this.compared(this.comparator.acknowledged(epoch));
  }

  /** A new session or a lost one: nothing pairs across it. */
  reset(): void {
    this.secondaryAtMs = this.now(); // (a new session: its secondary starts afresh)
    this.heldAtMs = 0;
    this.unansweredSinceMs = null;
    this.comparator.reset();
    this.chooser?.reset();
  }

  snapshot(): Record<string, unknown> {
    return {
      compare: { ...this.comparator.counts },
      input: { mirroredBytes: this.mirroredBytes, resentBytes: this.resentBytes },
      planning: this.plansCompare ? 'compare' : 'buffer',
      secondarySilent: this.silent,
      ...(this.chooser
        ? {
            comparedShare: this.chooser.lastShare,
            planningSwitches: this.chooser.switches,
            trialInboundPerSec: { ...this.chooser.trialRate },
          }
        : {}),
    };
  }

  /** What the comparator decided: matched frames leave now; a mismatch makes the open epoch's output wait like any. */
  private compared(r: { release: { seq: number; epoch: number }[]; mismatch: boolean }): void {
    for (const e of r.release) {
      const f = this.o.commit.releaseCompared(e.seq, e.epoch, performance.now());
      if (f) this.o.relay.sendOutside(f);
    }
    if (r.mismatch) {
      // (at debug, at most one a second: what differed, for whoever looks for its cause)
      const now = this.now();
      if (now - this.mismatchLoggedMs >= 1000) {
        this.mismatchLoggedMs = now;
        log.debug(`compare: ${this.comparator.counts.lastMismatch ?? 'a difference'}`);
      }
      this.o.commit.mismatch();
      this.o.onMismatch();
    }
  }

  /**
   * A frame the guest receives goes to the secondary too, tagged with the epoch it arrived in. `again`: a frame of
   * the epoch before, mirrored again at its checkpoint (see cut()); it is not kept for the next cut, since the
   * guest takes it early in this epoch (before, every cut sent the last 0.5 MB of input again, epoch after epoch:
   * under redis thousands of stale frames per checkpoint, and the secondary matched almost nothing).
   */
  private mirror(f: Buffer, epoch = this.o.commit.openEpoch, again = false): void {
    const link = this.o.link();
    if (!link || link.closed || !this.o.commit.holding) return;
    if (this.mirrored && this.mirrored.epoch !== epoch) this.flushMirror();
    if (!this.mirrored) {
      this.mirrored = { epoch, frames: [], bytes: 0 };
      setImmediate(() => this.flushMirror());
    }
    // (its acknowledgement in the secondary's numbers, on a connection the two VMs opened apart)
    this.mirrored.frames.push(this.comparator.toSecondary(epoch, f));
    this.mirrored.bytes += f.length;
    if (!again) {
      this.keepTail(epoch, f);
      this.mirroredBytes += f.length;
    }
    if (this.mirrored.bytes > MIRROR_BATCH_BYTES) this.flushMirror();
  }

  private keepTail(epoch: number, f: Buffer): void {
    const t = this.tail;
    if (t.epoch !== epoch) this.tail = { epoch, frames: [f], from: 0, bytes: f.length };
    else {
      t.frames.push(f);
      t.bytes += f.length;
      while (t.bytes - t.frames[t.from]!.length >= TAIL_MAX_BYTES) t.bytes -= t.frames[t.from++]!.length;
      if (t.from > 1024 && t.from * 2 > t.frames.length) {
        t.frames = t.frames.slice(t.from);
        t.from = 0;
      }
    }
  }

  /**
   * Checkpoint `epoch` is being taken (the guest stopped; input arriving now is the next epoch's).
   * The secondary will load that checkpoint and then get epoch + 1's input. A frame mirrored as
   * `epoch`'s input that had not reached the guest when it stopped — still queued in Rubato, in the
   * socket, or in QEMU's read buffer — is not in the checkpoint: the last such bytes of `epoch`'s
   * input are mirrored again as epoch + 1's, first (the secondary's TCP drops the ones it already
   * has). Only those: giving the secondary its whole epoch again after every load doubled its work
   * on bulk input.
   */
  cut(epoch: number): void {
    const t = this.tail;
    this.tail = { epoch: -1, frames: [], from: 0, bytes: 0 };
    if (t.epoch !== epoch || !this.o.protecting()) return;
    const keep = this.o.relay.guestBacklogBytes + IN_FLIGHT_SLACK_BYTES;
    let i = t.frames.length;
    let bytes = 0;
    while (i > t.from && bytes + t.frames[i - 1]!.length <= keep) bytes += t.frames[--i]!.length;
    if (i === t.frames.length) return;
    for (let k = i; k < t.frames.length; k++) this.mirror(t.frames[k]!, epoch + 1, true);
    this.resentBytes += bytes;
  }

  private flushMirror(): void {
    const m = this.mirrored;
    this.mirrored = null;
    const link = this.o.link();
    if (!m?.frames.length || !link || link.closed) return;
    link
      .send(FrameType.NET_IN, m.epoch, Buffer.concat(m.frames, m.bytes))
      .catch((e: unknown) => log.debug(`mirroring input to the secondary: ${errorMessage(e)}`));
  }
}
