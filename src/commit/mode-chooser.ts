// `--mode auto`, pure: whether the primary plans as compare mode does (its input mirrored to the
// secondary; matched output calls for no checkpoint) or as buffer mode does (no input mirrored, so
// the secondary idles and costs no CPU; every held frame waits for a checkpoint), chosen by trying
// both and keeping the one under which the service goes faster.
//
// Neither the share of output matched nor the mismatch rate tells which mode serves a workload
// better. Measured (`npm run bench -- services --quick --modes buffer,compare,auto`): under compare
// nginx matched only about half of its output yet ran 2.6 times as fast as under buffer, and
// pgbench matched four fifths of its output yet ran at 0.6 times buffer's speed (the secondary's
// vCPU takes the cores checkpoints need). What both modes have in common is the clients' progress:
// a closed-loop client sends its next request (and acknowledges replies) only once it got the last
// reply, so the guest's inbound frames per second follow the service's throughput. So: a trial of
// each plan (the current one first, so a steady state costs no switch), then the plan that carried
// more inbound frames per second is kept (compare unless buffer wins by `margin`), for `holdMs`, or
// until the inbound rate moves by `shift` times (the workload changed), then trials again.

export interface ModeChooserOptions {
  /** Length of one judged trial window, ms. */
  windowMs: number;
  /** After a change of plan, this long is not judged (output held under the other plan still leaving), ms. */
  settleMs: number;
  /** A window with fewer inbound frames than this says nothing (an idle guest): compare is kept. */
  minInbound: number;
  /** Buffer is chosen only when it carried this share more inbound frames than compare. */
  margin: number;
  /** A choice stands this long before the trials run again, ms. */
  holdMs: number;
  /** While a choice stands, a window whose inbound rate differs from the chosen trial's by this factor starts trials. */
  shift: number;
}

export const DEFAULT_MODE_CHOOSER: ModeChooserOptions = {
  windowMs: 1000,
  settleMs: 400,
  minInbound: 50,
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
  /** Frames that reached the guest from outside (cumulative). */
  inbound: number;
}

type Phase =
  | { kind: 'trial'; first: boolean; firstRate: number | null }
  | { kind: 'hold'; rate: number | null; since: number };

const other = (p: Planning): Planning => (p === 'compare' ? 'buffer' : 'compare');

export class ModeChooser {
  private plan: Planning = 'compare';
  private phase: Phase = { kind: 'trial', first: true, firstRate: null };
  /** Start of the current window (null: none yet), and the counts then. */
  private windowStart: number | null = null;
  private base: ChooserCounts = { compared: 0, released: 0, inbound: 0 };
  /** Until when the current window is not judged (a change of plan settling). */
  private settleUntil = 0;
  /** The latest share of output released by comparison (status shows it). */
  lastShare: number | null = null;
  /** Inbound frames/s measured in the latest trial of each plan. */
  readonly trialRate: Record<Planning, number | null> = { compare: null, buffer: null };
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
      counts.inbound < this.base.inbound
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
    const inbound = counts.inbound - this.base.inbound;
    this.restart(nowMs, counts);
    if (out > 0) this.lastShare = compared / out;
    const rate = inbound >= this.o.minInbound ? (inbound * 1000) / spanMs : null;
    const ph = this.phase;
    if (ph.kind === 'hold') {
      if (rate === null) return null; // idle: nothing to learn
      const moved = ph.rate === null || rate > ph.rate * this.o.shift || rate * this.o.shift < ph.rate;
      if (!moved && nowMs - ph.since < this.o.holdMs) return null;
      // Trials again, the current plan first (its window just measured counts as its trial).
      this.trialRate[this.plan] = rate;
      return this.switchTo(
        nowMs,
        other(this.plan),
        { kind: 'trial', first: false, firstRate: rate },
        rateWhy(this.plan, rate, moved ? 'the load changed' : 'time to check'),
      );
    }
    if (rate === null) {
      // An idle trial tells nothing: stay on (or go back to) compare and hold until traffic comes.
      this.phase = { kind: 'hold', rate: null, since: nowMs };
      return this.plan === 'compare'
        ? null
        : this.switchTo(nowMs, 'compare', this.phase, 'too little traffic to tell: compare');
    }
    this.trialRate[this.plan] = rate;
    if (ph.first) {
      return this.switchTo(
        nowMs,
        other(this.plan),
        { kind: 'trial', first: false, firstRate: rate },
        rateWhy(this.plan, rate, 'first trial'),
      );
    }
    // Both trials done: keep the better (compare unless buffer wins by the margin).
    const c = this.trialRate.compare ?? 0;
    const b = this.trialRate.buffer ?? 0;
    const best: Planning = b > c * (1 + this.o.margin) ? 'buffer' : 'compare';
    const hold: Phase = { kind: 'hold', rate: this.trialRate[best], since: nowMs };
    const why = `inbound frames/s: compare ${Math.round(c)}, buffer ${Math.round(b)}`;
    if (best === this.plan) {
      this.phase = hold;
      return null;
    }
    return this.switchTo(nowMs, best, hold, why);
  }

  /** Protection restarts: judge afresh, from compare. */
  reset(): void {
    this.plan = 'compare';
    this.phase = { kind: 'trial', first: true, firstRate: null };
    this.windowStart = null;
    this.settleUntil = 0;
    this.trialRate.compare = null;
    this.trialRate.buffer = null;
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

function rateWhy(plan: Planning, rate: number, what: string): string {
  return `${what}: ${Math.round(rate)} inbound frames/s under ${plan}, trying the other`;
}
