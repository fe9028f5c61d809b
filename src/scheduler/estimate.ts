// Online estimates from past epochs: the dirty curve D(T) (pages dirtied by an epoch of length T,
// sub-linear because pages are rewritten), the pause cost per page, and the link's bandwidth.
// Pure functions of the history; cheap enough to run at every decision.

import { fitLine } from '../util/index.ts';
import { PAGE_BYTES, type EpochRecord, type Policy, type Telemetry } from './types.ts';

export interface DirtyCurve {
  a: number;
  b: number;
  pages(tMs: number): number;
}

/**
 * `f` of a history, computed once per state of that history. A record is fixed once it is in the
 * history (only its transferMs is filled in later, which these estimates do not read), and the
 * history only grows at its end (dropping its oldest), so its length and last record name its
 * state. The scheduler decides on every output frame, flush and ack (hundreds a second under a
 * request-response service) and the history changes once per checkpoint: the fits were most of
 * the decision's cost.
 */
function perHistory<R>(f: (h: readonly EpochRecord[]) => R): (h: readonly EpochRecord[]) => R {
  const memo = new WeakMap<readonly EpochRecord[], { length: number; last: EpochRecord | undefined; r: R }>();
  return (h) => {
    const m = memo.get(h);
    const last = h[h.length - 1];
    if (m && m.length === h.length && m.last === last) return m.r;
    const r = f(h);
    memo.set(h, { length: h.length, last, r });
    return r;
  };
}

/** Fits D(T) = a·T^b by least squares on log-log over recent epochs; b clamped to [0.3, 1]. */
export const fitDirtyCurve = perHistory(fitDirtyCurveOf);
function fitDirtyCurveOf(history: readonly EpochRecord[]): DirtyCurve {
  const pts = history.slice(-64).filter((e) => e.lengthMs > 0.5 && e.dirtyPages > 0);
  if (pts.length === 0) return curve(0, 1);
  const xs = pts.map((e) => Math.log(e.lengthMs));
  const ys = pts.map((e) => Math.log(e.dirtyPages));
  let b = fitLine(xs, ys)?.slope ?? 0.8; // one epoch length only: assume mild sub-linearity
  b = Math.min(1, Math.max(0.3, b));
  const a = Math.exp(mean(ys) - b * mean(xs));
  return curve(a, b);
}

function curve(a: number, b: number): DirtyCurve {
  return { a, b, pages: (t) => (t <= 0 ? 0 : a * t ** b) };
}

export interface PauseModel {
  fixedMs: number;
  perPageMs: number;
  pauseMs(pages: number): number;
}

/** pause ≈ fixed + perPage·pages, least squares over recent epochs (defaults from DESIGN.md). */
export const fitPause = perHistory(fitPauseOf);
function fitPauseOf(history: readonly EpochRecord[]): PauseModel {
  const pts = history.slice(-64).filter((e) => e.pauseMs > 0);
  let fixedMs = 1.1;
  let perPageMs = 0.0025;
  if (pts.length >= 2) {
    // The pause is paid for the pages it carries (pre-sent ones went out while the guest ran).
    const xs = pts.map((e) => e.pausePages ?? e.dirtyPages);
    const ys = pts.map((e) => e.pauseMs);
    const line = fitLine(xs, ys);
    if (line) perPageMs = Math.max(0, line.slope);
    fixedMs = Math.max(0.05, mean(ys) - perPageMs * mean(xs));
  } else if (pts.length === 1) {
    fixedMs = Math.max(0.05, pts[0]!.pauseMs - perPageMs * (pts[0]!.pausePages ?? pts[0]!.dirtyPages));
  }
  return { fixedMs, perPageMs, pauseMs: (p) => fixedMs + perPageMs * p };
}

/** Link bandwidth in bytes/ms: measured if known, else from past transfers, else 1 GB/s. */
export function linkBytesPerMs(t: Telemetry): number {
  if (t.link.bytesPerSec && t.link.bytesPerSec > 0) return t.link.bytesPerSec / 1000;
  const done = t.history.slice(-32).filter((e) => e.transferMs !== null && e.transferMs > 0 && e.bytes > 0);
  if (done.length) return done.reduce((s, e) => s + e.bytes, 0) / done.reduce((s, e) => s + e.transferMs!, 0);
  return 1e6;
}

export function transferMs(pages: number, bytesPerMs: number): number {
  return (pages * PAGE_BYTES) / bytesPerMs;
}

/** Output frames per ms of guest time over recent epochs (how interactive the workload is). */
export const outputRatePerMs = perHistory(outputRatePerMsOf);
function outputRatePerMsOf(history: readonly EpochRecord[]): number {
  const h = history.slice(-32);
  const len = h.reduce((s, e) => s + e.lengthMs, 0);
  return len > 0 ? h.reduce((s, e) => s + e.outputFrames, 0) / len : 0;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

/**
 * With pre-sends: the pages a checkpoint's pause still carries. Passes every `everyMs` (Infinity:
 * only the last one) leave about an interval's dirty pages, `D(min(T, every))` (the last mid-epoch
 * pass comes 0.5 to 1.5 intervals before the checkpoint); a last pass right before the pause (taken
 * when no output waits) sends those while the guest runs, and the pause carries what is dirtied
 * meanwhile: `D(pass time)`, the pass costing the pause's per-page time. Without pre-sends, all of
 * `D(T)`.
 */
export function pausePagesWithPresend(
  d: (tMs: number) => number,
  perPageMs: number,
  epochMs: number,
  everyMs: number | undefined,
  lastPass: boolean,
  /** d(epochMs), when the caller has it already. */
  atEpoch?: number,
): number {
  if (!everyMs) return atEpoch ?? d(epochMs);
  const interval = everyMs >= epochMs && atEpoch !== undefined ? atEpoch : d(Math.min(epochMs, everyMs));
  if (!lastPass || epochMs < lastPassAfterMs(everyMs)) return interval;
  return Math.min(interval, d(Math.max(0.1, perPageMs * interval)));
}

/** An epoch gets a last pass before its pause once it is this old (younger ones carry little). */
export function lastPassAfterMs(everyMs: number): number {
  return Number.isFinite(everyMs) ? 1.5 * everyMs : LAST_PASS_AFTER_MS;
}
const LAST_PASS_AFTER_MS = 20;

/** Pre-send passes closer than this are not planned (each costs a dirty-log sync in QEMU). */
export const MIN_PRESEND_MS = 5;

/**
 * presend=auto: the longest pass interval whose last pass leaves a pause within `targetPauseMs`
 * (by the dirty curve and the pause fit); Infinity when one pass before each pause is enough,
 * MIN_PRESEND_MS when nothing is (the passes cannot keep up with the guest: the shortest).
 */
export function presendIntervalFor(
  d: (tMs: number) => number,
  pause: PauseModel,
  targetPauseMs: number,
  maxEpochMs: number,
): number {
  const ok = (every: number) =>
    pause.pauseMs(pausePagesWithPresend(d, pause.perPageMs, maxEpochMs, every, true)) <= targetPauseMs;
  if (ok(Number.POSITIVE_INFINITY)) return Number.POSITIVE_INFINITY;
  let lo = MIN_PRESEND_MS;
  let hi = Math.max(lo, maxEpochMs / 1.5);
  if (!ok(lo)) return lo;
  for (let i = 0; i < 30; i++) {
    const mid = (lo + hi) / 2;
    if (ok(mid)) lo = mid;
    else hi = mid;
  }
  return lo;
}

/** presend=auto pre-sends only when, without it, the guest would be paused at least this share of the time. */
export const AUTO_PRESEND_MIN_PAUSED = 0.02;

/**
 * The share of the time recent epochs would have been paused without pre-sends: each epoch's whole
 * dirty set at the fitted pause cost (an upper bound where passes re-sent pages), over their length.
 */
export function pausedFractionWithout(history: readonly EpochRecord[], pause: PauseModel = fitPause(history)): number {
  const h = history.slice(-16);
  const len = h.reduce((a, e) => a + e.lengthMs, 0);
  if (len <= 0) return 0;
  return h.reduce((a, e) => a + pause.pauseMs(e.dirtyPages), 0) / len;
}

/** presend=auto plans passes during the epoch only for guests sending fewer output frames than this (10 per second). */
export const AUTO_PRESEND_MAX_OUTPUT_PER_MS = 0.01;
/** presend=auto plans passes during the epoch only with at least this many idle host cores. */
export const AUTO_PRESEND_MIN_IDLE_CORES = 0.3;

/**
 * The pre-send interval in force for `p` now: its own, or (presend=auto) planned from the history;
 * undefined: none. presend=auto pre-sends only where pauses would take ≥ 2 % of the guest's time,
 * and takes only the last pass (Infinity) on a host without idle cores (`idleCores`, when known: a
 * pass during the epoch copies memory beside the guest, and on a saturated host that CPU is the
 * guest's) and for a guest that sends output (its epochs end on output, which a pass under way
 * would hold up).
 */
export function presendEveryMs(
  p: Pick<Policy, 'presendMs' | 'presendTargetPauseMs' | 'maxEpochMs'>,
  history: readonly EpochRecord[],
  idleCores: number | null = null,
): number | undefined {
  if (p.presendTargetPauseMs === undefined) return p.presendMs;
  // Pauses that would take little of the guest's time are left alone: a pass is not free either
  // (each re-arms the dirty log, which slows the guest's writes).
  if (pausedFractionOf(history) < AUTO_PRESEND_MIN_PAUSED) return undefined;
  if (idleCores !== null && idleCores < AUTO_PRESEND_MIN_IDLE_CORES) return Number.POSITIVE_INFINITY;
  // A guest that talks: its epochs end on output, and a pass under way would hold up that checkpoint.
  if (outputRatePerMs(history) > AUTO_PRESEND_MAX_OUTPUT_PER_MS) return Number.POSITIVE_INFINITY;
  const plans = plannedIntervals(history);
  const key = `${p.presendTargetPauseMs}/${p.maxEpochMs}`;
  let every = plans.get(key);
  if (every === undefined) {
    every = presendIntervalFor(fitDirtyCurve(history).pages, fitPause(history), p.presendTargetPauseMs, p.maxEpochMs);
    plans.set(key, every);
  }
  return every;
}
const pausedFractionOf = perHistory((h) => pausedFractionWithout(h, fitPause(h)));
/** presend=auto's intervals planned for one state of a history, per pause target and maximum epoch. */
const plannedIntervals = perHistory(() => new Map<string, number>());
