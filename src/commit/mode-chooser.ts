// `--mode auto`, pure: whether the primary plans as compare mode does (its input mirrored to the
// secondary; matched output calls for no checkpoint) or as buffer mode does (no input mirrored, so
// the secondary idles and costs no CPU; every held frame waits for a checkpoint), chosen by trying
// both and keeping the one under which the guest's output waits less.
//
// Neither the share of output matched nor the mismatch rate tells which mode serves a workload
// better. Measured (`npm run bench -- services --quick --modes buffer,compare,auto`): under compare
// nginx matched only about half of its output yet ran 2.6 times as fast as under buffer, and
// pgbench matched four fifths of its output yet ran at 0.6 times buffer's speed (the secondary lags
// behind, so what it matches comes late, and the checkpoints cost more). What decides a
// request-response service's speed is how long each reply is held: a closed-loop client sends its
// next request only once it got the last reply. So the score of a plan is the mean time its output
// frames were held (by comparison or by acknowledgement), over a window. A first version judged by
// the service's inbound frames/s instead; that follows the clients' load as much as the plan, and a
// load that changed between the two trials chose the wrong plan (buffer for redis at 0.5 times
// compare's speed). A frame's hold time hardly depends on the load.
//
// So: a trial of each plan (the current one first, so a steady state costs no switch), then the
// plan whose output waited less is kept (compare unless buffer wins by `margin`), for `holdMs`, or
// until the output rate or the kept plan's wait moves by `shift` times (the workload changed), then
// trials again.

export interface ModeChooserOptions {
  /** Length of one judged trial window, ms. */
  windowMs: number;
  /** After a change of plan, this long is not judged (output held under the other plan still leaving), ms. */
  settleMs: number;
  /** A window with fewer output frames than this says nothing (an idle guest): compare is kept. */
  minFrames: number;
  /** Buffer is chosen only when its output waited this share less than compare's. */
  margin: number;
  /** A choice stands this long before the trials run again, ms. */
  holdMs: number;
  /** While a choice stands, a window whose output rate or wait differs from its trial's by this factor starts trials. */
  shift: number;
}

export const DEFAULT_MODE_CHOOSER: ModeChooserOptions = {
  windowMs: 1000,
  settleMs: 400,
  minFrames: 30,
  margin: 0.1,
  holdMs: 30_000,
  shift: 2,
};

export type Planning = 'compare' | 'buffer';

export interface ModeChange {
  to: Planning;
  /** Output released by comparison in the last window, as a share (null: not known). */
  comparedShare: number | null;
  reason: string;
}

export interface ChooserCounts {
  /** Frames released by comparison (cumulative). */
  compared: number;
  /** Frames released by acknowledgement (cumulative). */
  released: number;
  /** How long the frames of both counts were held, summed (cumulative), ms. */
  waitMsSum: number;
}

/** One judged window of a plan: its output frames per second and their mean hold time. */
export interface Trial {
  framesPerSec: number;
  waitMs: number;
}

type Phase = { kind: 'trial'; first: boolean } | { kind: 'hold'; trial: Trial | null; since: number };

const other = (p: Planning): Planning => (p === 'compare' ? 'buffer' : 'compare');

export class ModeChooser {
  private plan: Planning = 'compare';
  private phase: Phase = { kind: 'trial', first: true };
  /** Start of the current window (null: none yet), and the counts then. */
  private windowStart: number | null = null;
  private base: ChooserCounts = { compared: 0, released: 0, waitMsSum: 0 };
  /** Until when the current window is not judged (a change of plan settling). */
  private settleUntil = 0;
  /** The latest share of output released by comparison (status shows it). */
  lastShare: number | null = null;
  /** The latest trial of each plan. */
  readonly trials: Record<Planning, Trial | null> = { compare: null, buffer: null };
  switches = 0;

  constructor(private readonly o: ModeChooserOptions = DEFAULT_MODE_CHOOSER) {}

  get planning(): Planning {
    return this.plan;
  }

  /** Cumulative counts at `nowMs`. Returns the change of planning this brings, or null. */
  observe(nowMs: number, counts: ChooserCounts): ModeChange | null {
    if (
      this.windowStart === null ||
      counts.compared < this.base.compared ||
      counts.released < this.base.released ||
      counts.waitMsSum < this.base.waitMsSum
    ) {
      this.restart(nowMs, counts);
      return null;
    }
    if (nowMs < this.settleUntil || this.windowStart < this.settleUntil) {
      this.restart(nowMs, counts); // the settling part is not measured
      return null;
    }
    const spanMs = nowMs - this.windowStart;
    if (spanMs < this.o.windowMs) return null;
    const compared = counts.compared - this.base.compared;
    const out = compared + counts.released - this.base.released;
    const waitSum = counts.waitMsSum - this.base.waitMsSum;
    this.restart(nowMs, counts);
    if (out > 0) this.lastShare = compared / out;
    const w: Trial | null =
      out >= this.o.minFrames ? { framesPerSec: (out * 1000) / spanMs, waitMs: waitSum / out } : null;
    const ph = this.phase;
    if (ph.kind === 'hold') {
      if (w === null) return null; // idle: nothing to learn
      const t = ph.trial;
      const s = this.o.shift;
      const moved =
        t === null ||
        w.framesPerSec > t.framesPerSec * s ||
        w.framesPerSec * s < t.framesPerSec ||
        w.waitMs > Math.max(t.waitMs, 1) * s;
      if (!moved && nowMs - ph.since < this.o.holdMs) return null;
      // Trials again, the current plan first (its window just measured counts as its trial).
      this.trials[this.plan] = w;
      return this.switchTo(
        nowMs,
        other(this.plan),
        { kind: 'trial', first: false },
        trialWhy(this.plan, w, moved ? 'the load changed' : 'time to check'),
      );
    }
    if (w === null) {
      // An idle trial tells nothing: stay on (or go back to) compare and hold until traffic comes.
      this.phase = { kind: 'hold', trial: null, since: nowMs };
      return this.plan === 'compare'
        ? null
        : this.switchTo(nowMs, 'compare', this.phase, 'too little traffic to tell: compare');
    }
    this.trials[this.plan] = w;
    if (ph.first)
      return this.switchTo(
        nowMs,
        other(this.plan),
        { kind: 'trial', first: false },
        trialWhy(this.plan, w, 'first trial'),
      );
    // Both trials done: keep the one whose output waited less (compare unless buffer wins by the margin).
    const c = this.trials.compare!;
    const b = this.trials.buffer!;
    const best: Planning = b.waitMs * (1 + this.o.margin) < c.waitMs ? 'buffer' : 'compare';
    const hold: Phase = { kind: 'hold', trial: this.trials[best], since: nowMs };
    const why = `output held ${ms(c.waitMs)} under compare, ${ms(b.waitMs)} under buffer`;
    if (best === this.plan) {
      this.phase = hold;
      return null;
    }
    return this.switchTo(nowMs, best, hold, why);
  }

  /** Protection restarts: judge afresh, from compare. */
  reset(): void {
    this.plan = 'compare';
    this.phase = { kind: 'trial', first: true };
    this.windowStart = null;
    this.settleUntil = 0;
    this.trials.compare = null;
    this.trials.buffer = null;
  }

  private switchTo(nowMs: number, to: Planning, phase: Phase, reason: string): ModeChange {
    this.plan = to;
    this.phase = phase;
    this.switches++;
    this.settleUntil = nowMs + this.o.settleMs;
    return { to, comparedShare: this.lastShare, reason };
  }

  private restart(nowMs: number, counts: ChooserCounts): void {
    this.windowStart = nowMs;
    this.base = { ...counts };
  }
}

const ms = (x: number) => `${x.toFixed(1)} ms`;

function trialWhy(plan: Planning, w: Trial, what: string): string {
  return `${what}: output held ${ms(w.waitMs)} on average under ${plan} (${Math.round(w.framesPerSec)} frames/s), trying the other`;
}
