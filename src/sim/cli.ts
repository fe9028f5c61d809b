// `rubato simulate`: replay a recorded workload profile (from `rubato profile` or `rubato bench`)
// under any policy, link bandwidth and vCPU count, with the same scheduler code as the live
// engine. vCPU counts that were not measured are extrapolated (see extrapolate.ts) and marked.

import { readFileSync } from 'node:fs';
import { RubatoError, median, percentile, round } from '../util/index.ts';
import { fitPause, parsePolicy } from '../scheduler/index.ts';
import { simulate } from './simulate.ts';
import { BANDWIDTH_CLASSES, curveFor, workloadFor, type MeasuredCurve } from './extrapolate.ts';
import { loadTrace, traceWorkload, type ReplayOptions } from './trace.ts';
import type { SimResult } from './simulate.ts';

interface ProfileFile {
  workload: string;
  runs: Array<{
    cpus: number;
    curve: { a: number; b: number };
    points: Array<{ epochMs: number; dirtyPagesMedian: number; pauseMsMedian: number }>;
  }>;
}

export function loadProfile(path: string): { workload: string; measured: MeasuredCurve[] } {
  let p: ProfileFile;
  try {
    p = JSON.parse(readFileSync(path, 'utf8')) as ProfileFile;
  } catch (e) {
    throw new RubatoError(
      'RUBATO_CONFIG',
      `cannot read profile ${path}: ${(e as Error).message} (make one with: rubato profile)`,
    );
  }
  if (!Array.isArray(p.runs) || !p.runs.length)
    throw new RubatoError('RUBATO_CONFIG', `${path} is not a rubato profile (no runs)`);
  return {
    workload: p.workload,
    measured: p.runs.map((r) => {
      const pm = fitPause(
        r.points.map((x) => ({
          lengthMs: x.epochMs,
          dirtyPages: x.dirtyPagesMedian,
          pauseMs: x.pauseMsMedian,
          bytes: 0,
          transferMs: null,
          outputFrames: 0,
        })),
      );
      return { cpus: r.cpus, a: r.curve.a, b: r.curve.b, pauseFixedMs: pm.fixedMs, pausePerPageMs: pm.perPageMs };
    }),
  };
}

export interface SimulateCliResult {
  workload: string;
  policy: string;
  bandwidth: string;
  cpus: number;
  extrapolated: boolean;
  seconds: number;
  checkpointsPerSec: number;
  pausedFraction: number;
  epochMsMedian: number;
  dirtyPagesMedian: number;
  maxBacklog: number;
  outputLatencyMsP50: number | null;
  outputLatencyMsP99: number | null;
  reasons: Record<string, number>;
}

function bandwidthOf(bandwidth: string): number {
  const bw = BANDWIDTH_CLASSES[bandwidth];
  if (bw === undefined)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `--bandwidth must be one of ${Object.keys(BANDWIDTH_CLASSES).join(', ')} (got "${bandwidth}")`,
    );
  return bw;
}

function summarise(r: SimResult, seconds: number) {
  return {
    seconds: round(seconds, 2),
    checkpointsPerSec: round(r.checkpoints / seconds, 1),
    pausedFraction: round(r.pausedMs / r.durationMs, 4),
    epochMsMedian: round(median(r.epochs.map((e) => e.lengthMs)), 2),
    dirtyPagesMedian: median(r.epochs.map((e) => e.dirtyPages)),
    maxBacklog: r.maxBacklog,
    outputLatencyMsP50: r.outputLatencyMs.length ? round(median(r.outputLatencyMs), 2) : null,
    outputLatencyMsP99: r.outputLatencyMs.length ? round(percentile(r.outputLatencyMs, 99), 2) : null,
    reasons: r.reasons,
  };
}

export function simulateProfile(
  path: string,
  policy: string,
  bandwidth: string,
  cpus: number,
  seconds: number,
  outputEveryMs?: number,
): SimulateCliResult {
  const { workload, measured } = loadProfile(path);
  const w = workloadFor(curveFor(measured, cpus), bandwidthOf(bandwidth));
  if (outputEveryMs)
    w.output = (t, step) => (Math.floor((t + step) / outputEveryMs) > Math.floor(t / outputEveryMs) ? 1 : 0);
  const r = simulate(parsePolicy(policy), w, seconds * 1000);
  return {
    workload,
    policy,
    bandwidth,
    cpus,
    extrapolated: !measured.some((m) => m.cpus === cpus),
    ...summarise(r, seconds),
  };
}

/** Bandwidth by class name or as bytes per ms (the evaluation's measured link classes). */
export function simulateTrace(
  path: string,
  policy: string,
  bandwidth: string | number,
  o: Omit<ReplayOptions, 'rttMs'> = {},
): SimulateCliResult & {
  recordedPolicy: string;
  recordedCheckpointsPerSec: number;
  requestLatencyMsP50: number | null;
  requestsPerSec: number;
} {
  const t = loadTrace(path);
  const bw = typeof bandwidth === 'number' ? bandwidth : bandwidthOf(bandwidth);
  const n = o.cpus ?? t.cpus;
  const replay = traceWorkload(t, bw, { ...o, cpus: n });
  const r = simulate(parsePolicy(policy), replay.workload, replay.durationMs);
  const seconds = replay.durationMs / 1000;
  return {
    workload: t.workload,
    policy,
    bandwidth: String(bandwidth),
    cpus: n,
    extrapolated: n > t.cpus,
    ...summarise(r, seconds),
    recordedPolicy: t.policy,
    recordedCheckpointsPerSec: round(t.epochs.length / seconds, 1),
    requestLatencyMsP50: r.requestLatencyMs.length ? round(median(r.requestLatencyMs), 2) : null,
    requestsPerSec: r.requestLatencyMs.length / seconds,
  };
}
