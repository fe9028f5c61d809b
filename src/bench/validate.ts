// Validation of the simulator by trace replay: each workload's trace recorded live under
// fixed:25ms on the first link class, replayed under every policy and link class measured live,
// set beside that live cell. Pure over the cells of one evaluation run (evaluation.json holds them),
// so a run's validation can be recomputed from its files.

import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { round } from '../util/stats.ts';
import { RubatoError } from '../util/errors.ts';
import { simulateTrace } from '../sim/cli.ts';
import type { MeasuredCurve } from '../sim/extrapolate.ts';
import type { SchedulerCell } from './scheduler.ts';
import { served } from './workloads.ts';

export interface ValidationInput { cells: Array<SchedulerCell & { link: string }>; classes: readonly string[]; measured: readonly MeasuredCurve[]; workloads: readonly string[] }

export function validateByReplay({ cells, classes, measured, workloads }: ValidationInput) {
  // Validation by trace replay. Each workload's trace recorded live under fixed:25ms on the first
  // link class is replayed under every policy and link class measured live, and the prediction is
  // set beside that live cell: checkpoints/s, paused fraction, added latency (KV), and the
  // throughput overhead. The guest loses more than its pauses (each checkpoint re-arms dirty
  // tracking under TCG, capture and shipping compete for the 2 host cores), so the overhead
  // prediction adds a per-checkpoint and per-page cost calibrated on the recorded cells only.
  const linkBw: Record<string, number> = { unlimited: 1_000_000, '10gbit': 1_250_000, '1gbit': 125_000 };
  const SOURCE_POLICY = 'fixed:25ms';
  // The pause's per-page slope from the profile (checkpoints from 10 ms to 1 s wide); each trace
  // gives its own fixed part.
  const perPage = measured.find((m) => m.cpus === 1)?.pausePerPageMs;
  const source = (wl: string) => cells.find((x) => x.workload === wl && x.link === classes[0] && x.policy === SOURCE_POLICY && x.trace);
  // Services are closed loops (4 clients, each waiting for its answer): replayed with simulated
  // clients, not the recorded output times. A request may need several output commits in turn (a
  // TCP handshake, a response in several congestion windows): that count is calibrated per
  // workload on its recorded cell, and the unreplicated latency is the service time.
  const clientsOf: Record<string, { count: number; serviceMs: number; commitsPerRequest: number }> = {};
  for (const wl of workloads.filter(served)) {
    const src = source(wl);
    if (!src?.trace || src.kvLatencyMsP50 === undefined || src.kvAddedLatencyMsP50 === undefined) continue;
    const serviceMs = Math.max(0.1, src.kvLatencyMsP50 - src.kvAddedLatencyMsP50);
    let best = { k: 1, err: Number.POSITIVE_INFINITY };
    for (let k = 1; k <= 8; k++) {
      const r = simulateTrace(src.trace, SOURCE_POLICY, linkBw[src.link] ?? 1_000_000, { ...(perPage !== undefined ? { pausePerPageMs: perPage } : {}), clients: { count: 4, serviceMs, commitsPerRequest: k } });
      const err = Math.abs((r.requestLatencyMsP50 ?? Number.POSITIVE_INFINITY) - serviceMs - src.kvAddedLatencyMsP50);
      if (err < best.err) best = { k, err };
    }
    clientsOf[wl] = { count: 4, serviceMs: round(serviceMs, 2), commitsPerRequest: best.k };
  }
  const replays = cells.flatMap((c) => {
    const src = source(c.workload);
    if (!src?.trace) return [];
    const clients = clientsOf[c.workload];
    const sim = simulateTrace(src.trace, c.policy, linkBw[c.link] ?? 1_000_000, { ...(perPage !== undefined ? { pausePerPageMs: perPage } : {}), ...(clients ? { clients } : {}) });
    const out: Array<{ c: typeof c; sim: typeof sim; role: string; pagesPerMs: number }> = [{ c, sim, role: c === src ? 'recorded' : 'predicted', pagesPerMs: (sim.dirtyPagesMedian * sim.checkpointsPerSec) / 1000 }];
    // The vCPU extrapolation checked where it can be: the 1-vCPU trace replayed on n vCPUs.
    const n = Number(c.workload.match(/^dirtier-10x(\d+)$/)?.[1] ?? 0);
    const one = cells.find((x) => x.workload === 'dirtier-10' && x.link === classes[0] && x.policy === SOURCE_POLICY && x.trace);
    if (n > 1 && one?.trace) {
      const ext = simulateTrace(one.trace, c.policy, linkBw[c.link] ?? 1_000_000, { cpus: n, ...(perPage !== undefined ? { pausePerPageMs: perPage } : {}) });
      out.push({ c, sim: ext, role: `extrapolated from 1 vCPU`, pagesPerMs: (ext.dirtyPagesMedian * ext.checkpointsPerSec) / 1000 });
    }
    return out;
  });
  const calib = replays.filter((r) => r.role === 'recorded' && !served(r.c.workload) && r.c.workload !== 'disk');
  let c0 = 0;
  let c1 = 0;
  {
    // live overhead − paused fraction = c0·(checkpoints/ms) + c1·(pages/ms), least squares, non-negative
    let a11 = 0, a12 = 0, a22 = 0, b1 = 0, b2 = 0;
    for (const r of calib) {
      const x1 = r.sim.checkpointsPerSec / 1000, x2 = r.pagesPerMs, y = (1 - r.c.throughputRatio) - r.sim.pausedFraction;
      a11 += x1 * x1; a12 += x1 * x2; a22 += x2 * x2; b1 += x1 * y; b2 += x2 * y;
    }
    const det = a11 * a22 - a12 * a12;
    if (calib.length >= 2 && Math.abs(det) > 1e-18) { c0 = (b1 * a22 - b2 * a12) / det; c1 = (a11 * b2 - a12 * b1) / det; }
    if (calib.length < 2 || c0 < 0 || c1 < 0) { c0 = Math.max(0, a11 > 0 ? b1 / a11 : 0); c1 = 0; }
  }
  const rel = (sim: number, live: number) => (live !== 0 ? Math.abs(sim - live) / Math.abs(live) : sim === 0 ? 0 : Number.POSITIVE_INFINITY);
  const validation = replays.map(({ c, sim, role, pagesPerMs }) => {
    const metrics: Array<{ metric: string; live: number; simulated: number; relativeError: number; within: boolean; tolerance: string; counted: boolean }> = [];
    const add = (metric: string, live: number, simulated: number, absTol: number, tolerance: string, counted = true) => {
      const e = rel(simulated, live);
      metrics.push({ metric, live: round(live, 4), simulated: round(simulated, 4), relativeError: round(e, 3), within: e <= 0.15 || Math.abs(simulated - live) <= absTol, tolerance, counted });
    };
    add('checkpoints/s', c.checkpointsPerSec, sim.checkpointsPerSec, 0, '±15%');
    add('paused fraction', c.pausedFraction, sim.pausedFraction, 0.002, '±15% or 0.2 points');
    if (served(c.workload)) {
      const cl = clientsOf[c.workload];
      if (cl && c.kvAddedLatencyMsP50 !== undefined && sim.requestLatencyMsP50 !== null) add('added latency p50 (ms)', c.kvAddedLatencyMsP50, sim.requestLatencyMsP50 - cl.serviceMs, 1, '±15% or 1 ms');
    } else {
      const predicted = sim.pausedFraction + c0 * (sim.checkpointsPerSec / 1000) + c1 * pagesPerMs;
      // Shown, not counted: live progress is measured to about the unreplicated phases' spread.
      add('throughput overhead', 1 - c.throughputRatio, predicted, c.noise, `not counted (live spread ${round(c.noise * 100, 1)}%)`, false);
    }
    return { workload: c.workload, policy: c.policy, link: c.link, role, metrics };
  });
  const calibration = { perCheckpointMs: round(c0, 3), perPageUs: round(c1 * 1000, 3), cells: calib.map((r) => `${r.c.workload}/${r.c.policy}/${r.c.link}`), clients: clientsOf };
  const predicted = validation.filter((v) => v.role !== 'recorded').flatMap((v) => v.metrics).filter((m) => m.counted);
  const agreement = { predictedComparisons: predicted.length, within: predicted.filter((m) => m.within).length };
  return { validation, calibration, agreement, sourcePolicy: SOURCE_POLICY };
}

/** Recomputes a finished evaluation's validation from its evaluation.json and traces (no guest runs). */
export function revalidate(evaluationJson: string): { file: string; agreement: { predictedComparisons: number; within: number }; calibration: unknown } {
  let d: { summary?: { linkClasses?: string[] }; cells?: ValidationInput['cells']; measured?: MeasuredCurve[] };
  try { d = JSON.parse(readFileSync(evaluationJson, 'utf8')) as typeof d; } catch (e) {
    throw new RubatoError('RUBATO_CONFIG', `cannot read ${evaluationJson}: ${(e as Error).message} (written by: rubato bench)`);
  }
  if (!d.cells?.length || !d.measured || !d.summary?.linkClasses) throw new RubatoError('RUBATO_CONFIG', `${evaluationJson} is not a rubato bench evaluation`);
  const r = validateByReplay({ cells: d.cells, classes: d.summary.linkClasses, measured: d.measured, workloads: [...new Set(d.cells.map((c) => c.workload))] });
  const file = join(dirname(evaluationJson), 'validation.json');
  writeFileSync(file, JSON.stringify(r, null, 2));
  return { file, agreement: r.agreement, calibration: r.calibration };
}
