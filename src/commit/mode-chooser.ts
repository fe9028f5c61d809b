// `--mode auto`, pure: whether the primary plans as compare mode does (its input mirrored to the
// secondary; matched output calls for no checkpoint) or as buffer mode does (no input mirrored, so
// the secondary idles and costs no CPU; every held frame waits for a checkpoint), chosen by trying
// both and keeping the one under which the service goes faster.
//
// Neither the share of output matched nor the mismatch rate tells which mode serves a workload
// better. Measured (`npm run bench -- services --quick --modes buffer,compare,auto`): under compare
// nginx matched only about half of its output yet ran 2.6 times as fast as under buffer, and
// pgbench matched four fifths of its output yet ran at 0.6 times buffer's speed (the secondary's
// vCPU takes the cores the guest and the checkpoints need). How long output was held does not tell
// either: tried, it chose buffer for nginx (compare's mean was pulled up by the few frames that
// waited for a compare-mode checkpoint) while compare served it faster. What both modes have in
// common is the clients' progress: a closed-loop client sends its next request (and acknowledges
// replies) only once it got the last reply, so the guest's inbound frames per second follow the
// service's throughput.
//
// The load moves too, and a trial of each plan in turn mistook a load that grew or fell between
// them for the plans' difference (buffer chosen for redis at half compare's speed). So a trial is
// three windows, the current plan, the other, the current plan again: a load that moves steadily
// moves both of the current plan's windows alike, and the other plan is judged against their mean.
// The plan kept is compare unless buffer wins by `margin`.
//
// A trial costs: its buffer window runs at buffer's speed, and back on compare the secondary, which
// got no input meanwhile, must catch up. Trials that ran whenever traffic started after an idle
// spell, or the load moved, took most of each five-second run of `bench services --quick` and
// kept auto well below compare (run 13: redis 0.29 against 0.40, pgbench 0.13 against 0.23). So
// compare, the usual winner for request-response services, is trusted while it does its job: on
// compare, trials start only when a window's output was mostly released by checkpoints rather than
// by comparison (share matched below `doubtShare`: the replies differ, or the secondary lags), or
// when the hold ends (`holdMs`: a CPU-bound guest whose secondary costs more than it saves shows
// nothing else). Buffer, once chosen, is tried against compare again when the hold ends, when the
// inbound rate moves by `shift` times in two windows running (the workload changed; one window
// off is a burst), or when traffic starts after an idle spell. The window in which traffic starts
// after an idle spell is not judged: it holds the load's ramp, not its rate.

export interface ModeChooserOptions {
  /** Shortest judged window, ms: it closes once it also counted `frames` inbound frames, or at `maxWindowMs`. */
  windowMs: number;
  /** Inbound frames a window should count (fewer: a noisy rate) before it closes. */
  frames: number;
  /** Longest judged window, ms (a slow service's rate, counted over fewer frames). */
  maxWindowMs: number;
  /** After a change of plan, this long is not judged (output held under the other plan still leaving), ms. */
  settleMs: number;
  /**
   * Back on compare, the secondary first catches up (it got no input under buffer): the window
   * starts once a frame was matched again, or at the latest this long after the settling, ms.
   */
  syncMs: number;
  /** A window with fewer inbound frames than this says nothing (an idle guest): compare is kept. */
  minInbound: number;
  /** Buffer is chosen only when it carried this share more inbound frames than compare. */
  margin: number;
  /** A choice stands this long before the trials run again, ms. */
  holdMs: number;
  /** While buffer stands, a window whose inbound rate differs from the chosen trial's by this factor starts trials. */
  shift: number;
  /** While compare stands, a window in which less than this share of the output was matched starts trials. */
  doubtShare: number;
}

export const DEFAULT_MODE_CHOOSER: ModeChooserOptions = {
  windowMs: 2000,
  frames: 200,
  maxWindowMs: 4000,
  settleMs: 400,
  syncMs: 2000,
  minInbound: 20,
  margin: 0.1,
  holdMs: 120_000,
  shift: 2,
  doubtShare: 0.5,
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

/** A trial's windows so far: inbound frames/s, in the order the plans ran (current, other, current). */
type Phase =
  | { kind: 'trial'; rates: number[] }
  /**
   * `rate`: the held plan's inbound frames/s, smoothed (null: idle so far); `since`: when the hold
   * began (null: at the first traffic); `moved`: windows off the rate in a row; `judged`: a trial
   * under this load chose the plan.
   */
  | { kind: 'hold'; rate: number | null; since: number | null; moved: number; judged?: boolean };

const other = (p: Planning): Planning => (p === 'compare' ? 'buffer' : 'compare');

export class ModeChooser {
  private plan: Planning = 'compare';
  /** At the start the guest's load is not known: judged like traffic after an idle spell. */
  private phase: Phase = { kind: 'hold', rate: null, since: null, moved: 0 };
  /** Start of the current window (null: none yet), and the counts then. */
  private windowStart: number | null = null;
  private base: ChooserCounts = { compared: 0, released: 0, inbound: 0 };
  /** Until when the current window is not judged (a change of plan settling). */
  private settleUntil = 0;
  /** Back on compare and no frame matched since: the secondary is catching up (not judged). */
  private syncing = false;
  /** The latest share of output released by comparison (status shows it). */
  lastShare: number | null = null;
  /** Inbound frames/s of each plan in the latest trial (the plan tried twice: the mean of its windows). */
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
    if (nowMs < this.settleUntil || this.windowStart < this.settleUntil || this.syncing) {
      // The settling part is not measured, nor the secondary's catching up after it.
      if (
        this.syncing &&
        nowMs >= this.settleUntil &&
        (counts.compared > this.base.compared || nowMs >= this.settleUntil + this.o.syncMs)
      )
        this.syncing = false;
      this.restart(nowMs, counts);
      return null;
    }
    const spanMs = nowMs - this.windowStart;
    const inbound = counts.inbound - this.base.inbound;
    if (spanMs < this.o.windowMs || (inbound < this.o.frames && spanMs < this.o.maxWindowMs)) return null;
    const compared = counts.compared - this.base.compared;
    const out = compared + counts.released - this.base.released;
    this.restart(nowMs, counts);
    const share = out > 0 ? compared / out : null;
    if (share !== null) this.lastShare = share;
    const rate = inbound >= this.o.minInbound ? (inbound * 1000) / spanMs : null;
    const ph = this.phase;
    if (ph.kind === 'hold') {
      if (rate === null) return null; // idle: nothing to learn
      if (ph.rate === null) {
        // Traffic after an idle spell: this window holds its ramp. Buffer: the trials start with the
        // next; compare: the hold counts from here.
        if (this.plan === 'buffer') this.phase = { kind: 'trial', rates: [] };
        else {
          ph.rate = rate;
          ph.since ??= nowMs;
        }
        return null;
      }
      const moved = rate > ph.rate * this.o.shift || rate * this.o.shift < ph.rate;
      ph.moved = moved ? ph.moved + 1 : 0;
      if (!moved) ph.rate = 0.75 * ph.rate + 0.25 * rate; // a load that drifts slowly moves the reference
      const changed = moved && ph.moved >= 2; // (one window off: a burst, not a new load)
      const ended = !moved && nowMs - (ph.since ?? nowMs) >= this.o.holdMs;
      // Compare is doubted when it released little by comparison: unless a trial under this very
      // load chose it all the same (a service whose replies differ often can still gain from it).
      const doubt = this.plan === 'compare' && share !== null && share < this.o.doubtShare && (!ph.judged || changed);
      if (this.plan === 'compare' && changed && !doubt) {
        ph.rate = rate; // a new load that compare serves well: its rate is the reference now
        ph.moved = 0;
        ph.judged = false;
      }
      if (this.plan === 'compare' ? !doubt && !ended : !changed && !ended) return null;
      // Trials again, the current plan first (its window just measured counts as its first).
      return this.switchTo(
        nowMs,
        other(this.plan),
        { kind: 'trial', rates: [rate] },
        doubt
          ? `only ${Math.round((share ?? 0) * 100)} % of the output matched: ${Math.round(rate)} inbound frames/s under compare, trying buffer`
          : rateWhy(this.plan, rate, changed ? 'the load changed' : 'time to check'),
      );
    }
    if (rate === null) {
      // An idle trial tells nothing: stay on (or go back to) compare and hold until traffic comes.
      this.phase = { kind: 'hold', rate: null, since: nowMs, moved: 0 };
      return this.plan === 'compare'
        ? null
        : this.switchTo(nowMs, 'compare', this.phase, 'too little traffic to tell: compare');
    }
    const rates = [...ph.rates, rate];
    if (rates.length < 3) {
      // first window: the current plan's; second: the other's; then back for the third
      return this.switchTo(
        nowMs,
        other(this.plan),
        { kind: 'trial', rates },
        rateWhy(this.plan, rate, rates.length === 1 ? 'first trial' : 'trial'),
      );
    }
    // Both plans tried: the one that ran twice (now current) is judged by its mean.
    const [a1, b, a2] = rates as [number, number, number];
    this.trialRate[this.plan] = (a1 + a2) / 2;
    this.trialRate[other(this.plan)] = b;
    const c = this.trialRate.compare!;
    const bu = this.trialRate.buffer!;
    const best: Planning = bu > c * (1 + this.o.margin) ? 'buffer' : 'compare';
    const hold: Phase = { kind: 'hold', rate: best === this.plan ? a2 : b, since: nowMs, moved: 0, judged: true };
    const why = `inbound frames/s: compare ${Math.round(c)}, buffer ${Math.round(bu)}`;
    if (best === this.plan) {
      this.phase = hold;
      return null;
    }
    return this.switchTo(nowMs, best, hold, why);
  }

  /** Protection restarts: judge afresh, from compare. */
  reset(): void {
    this.plan = 'compare';
    this.phase = { kind: 'hold', rate: null, since: null, moved: 0 };
    this.windowStart = null;
    this.settleUntil = 0;
    this.syncing = false;
    this.trialRate.compare = null;
    this.trialRate.buffer = null;
  }

  private switchTo(nowMs: number, to: Planning, phase: Phase, reason: string): ModeChange {
    this.plan = to;
    this.phase = phase;
    this.switches++;
    this.settleUntil = nowMs + this.o.settleMs;
    this.syncing = to === 'compare';
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
