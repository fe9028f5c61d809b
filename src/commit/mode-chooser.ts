// `--mode auto`, pure: whether the scheduler plans as compare mode does (matched output calls for no
// checkpoint) or as buffer mode does (every held frame waits for one), from how output actually
// left. The secondary runs and compares in both cases — a frame it matched still leaves at once —
// so the choice only moves the checkpoints.
//
// Compare pays where replies match: most output leaves by comparison and checkpoints are rare. Where
// replies differ (nondeterministic services) or the secondary cannot keep up, most output still
// waits for an acknowledgement, and under compare's planning it waits longer (a grace, then a
// checkpoint). So: each window, if too little of the output left by comparison, plan as buffer mode;
// from there, try compare again after a back-off that doubles while tries fail.

export interface ModeChooserOptions {
  /** Length of one judgement window, ms. */
  windowMs: number;
  /** Below this share of output released by comparison, compare loses. */
  minComparedShare: number;
  /** Windows with fewer released frames than this are not judged (too little output to tell). */
  minFrames: number;
  /** The first wait before compare is tried again, ms; doubles up to maxBackoffMs. */
  backoffMs: number;
  maxBackoffMs: number;
}

export const DEFAULT_MODE_CHOOSER: ModeChooserOptions = {
  windowMs: 2000,
  minComparedShare: 0.5,
  minFrames: 50,
  backoffMs: 5000,
  maxBackoffMs: 60_000,
};

export type Planning = 'compare' | 'buffer';

export interface ModeChange {
  to: Planning;
  /** Output released by comparison in the window that decided it, as a share (null: not judged). */
  comparedShare: number | null;
  reason: string;
}

export class ModeChooser {
  private plan: Planning = 'compare';
  private windowStart: number | null = null;
  private base = { compared: 0, released: 0 };
  private backoff: number;
  /**
   * Windows not judged: one after a change, two after a start (output held under the other plan is
   * still leaving by acknowledgement; a secondary just started catches up with input queued
   * meanwhile).
   * Judged right away, compare lost every try (measured under the services benchmark: 2–11 % of
   * output compared in the window right after a switch, where the compare cells of the same run
   * released 1000–1700 redis frames/s by comparison).
   */
  private settling = 2;
  private retryAt = Number.POSITIVE_INFINITY;
  /** The latest judged share of output released by comparison (status shows it). */
  lastShare: number | null = null;
  switches = 0;

  constructor(private readonly o: ModeChooserOptions = DEFAULT_MODE_CHOOSER) {
    this.backoff = o.backoffMs;
  }

  get planning(): Planning {
    return this.plan;
  }

  /**
   * Output commit's cumulative counts (frames released by acknowledgement and by comparison) at
   * `nowMs`. Returns the change of planning this brings, or null.
   */
  observe(nowMs: number, counts: { compared: number; released: number }): ModeChange | null {
    if (this.windowStart === null || counts.compared < this.base.compared || counts.released < this.base.released) {
      this.restart(nowMs, counts);
      return null;
    }
    if (this.plan === 'buffer') {
      if (nowMs < this.retryAt) return null;
      this.plan = 'compare';
      this.switches++;
      this.settling = 1;
      this.restart(nowMs, counts);
      return { to: 'compare', comparedShare: null, reason: 'trying compare again' };
    }
    if (nowMs - this.windowStart < this.o.windowMs) return null;
    const compared = counts.compared - this.base.compared;
    const total = compared + counts.released - this.base.released;
    this.restart(nowMs, counts);
    if (this.settling > 0) {
      this.settling--;
      return null;
    }
    if (total < this.o.minFrames) return null;
    const share = compared / total;
    this.lastShare = share;
    if (share >= this.o.minComparedShare) {
      this.backoff = this.o.backoffMs; // compare holds: a later failure backs off from the start
      return null;
    }
    this.plan = 'buffer';
    this.switches++;
    this.retryAt = nowMs + this.backoff;
    this.backoff = Math.min(this.backoff * 2, this.o.maxBackoffMs);
    return {
      to: 'buffer',
      comparedShare: share,
      reason: `${Math.round(share * 100)} % of ${total} frames left by comparison`,
    };
  }

  /** Protection restarts: judge afresh, from compare. */
  reset(): void {
    this.plan = 'compare';
    this.settling = 2;
    this.windowStart = null;
    this.backoff = this.o.backoffMs;
    this.retryAt = Number.POSITIVE_INFINITY;
  }

  private restart(nowMs: number, counts: { compared: number; released: number }): void {
    this.windowStart = nowMs;
    this.base = { compared: counts.compared, released: counts.released };
  }
}
