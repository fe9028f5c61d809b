// Validation of the simulator by trace replay: each workload's trace recorded live under
// fixed:25ms on the first link class, replayed under every policy and link class measured live,
// set beside that live cell. Pure over the cells of one evaluation run (evaluation.json holds them),
// so a run's validation can be recomputed from its files.

import { readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { median, round, RubatoError } from '../util/index.ts';
import { simulateTrace, loadTrace, pauseBusyMsOf, type SimClients, type MeasuredCurve } from '../sim/index.ts';
import type { SchedulerCell } from './scheduler.ts';
import { served } from './workloads.ts';

export interface ValidationInput {
  cells: Array<SchedulerCell & { link: string }>;
  classes: readonly string[];
  measured: readonly MeasuredCurve[];
  workloads: readonly string[];
  /** Measured TCP goodput per link class, MB/s (else the class's nominal rate). */
  goodputMBps?: Record<string, number>;
  /** The host's cores (the vCPU extrapolation assumes a core per vCPU). */
  hostCores?: number;
}

export function validateByReplay({
  cells,
  classes,
  measured,
  workloads,
  goodputMBps = {},
  hostCores = availableParallelism(),
}: ValidationInput) {
  // Validation by trace replay. Each workload's trace recorded live under fixed:25ms on the first
  // link class is replayed under every policy and link class measured live, and the prediction is
  // set beside that live cell: checkpoints/s, paused fraction, added latency (services), and the
  // throughput overhead.
  const nominal: Record<string, number> = { unlimited: 1_000_000, '10gbit': 1_250_000, '1gbit': 125_000 };
  const bwOf = (link: string) => {
    const bw = nominal[link] ?? 1_000_000;
    const g = goodputMBps[link];
    return g ? Math.min(bw, g * 1000) : bw;
  };
  const SOURCE_POLICY = 'fixed:25ms';
  const source = (wl: string) =>
    cells.find((x) => x.workload === wl && x.link === classes[0] && x.policy === SOURCE_POLICY && x.trace);
  // The pause's per-page slope from the profile (checkpoints from 10 ms to 1 s wide); each trace
  // gives its own fixed part.
  const perPage = measured.find((m) => m.cpus === 1)?.pausePerPageMs;
  // Pauses taken while the standby still works on an earlier checkpoint run longer (the host's 2
  // cores are shared): by how much is measured in the recorded traces that have enough of both.
  const recorded = workloads.flatMap((wl) => {
    const t = source(wl)?.trace;
    return t ? [loadTrace(t)] : [];
  });
  const pauseBusyMs = round(pauseBusyMsOf(recorded, perPage ?? 0), 3);
  const base = { ...(perPage !== undefined ? { pausePerPageMs: perPage } : {}), pauseBusyMs };
  // The standby's commit time is fitted from the recorded acks, whose noise biases a line through
  // them. Where the recorded run was paced by its pipeline (fewer checkpoints than its policy
  // asked for: the standby could not keep up), the fit is scaled so that the recorded run's own
  // replay keeps the recorded pace; a run its policy paced says nothing of it and keeps scale 1.
  const commitScaleOf: Record<string, number> = {};
  for (const wl of workloads) {
    const src = source(wl);
    if (!src?.trace) continue;
    const at = (scale: number) =>
      simulateTrace(src.trace!, SOURCE_POLICY, bwOf(src.link), { ...base, commitScale: scale }).checkpointsPerSec;
    const live = src.checkpointsPerSec;
    let scale = 1;
    // Paced by the standby: well below the pace a fast standby would allow.
    if (live < 0.8 * at(0.25) && Math.abs(at(1) - live) > 0.05 * live) {
      let lo = Math.log(0.25);
      let hi = Math.log(8);
      if (at(Math.exp(hi)) > live) {
        commitScaleOf[wl] = 1;
        continue;
      }
      for (let i = 0; i < 12; i++) {
        const mid = (lo + hi) / 2;
        if (at(Math.exp(mid)) > live) lo = mid;
        else hi = mid;
      }
      scale = Math.exp((lo + hi) / 2);
    }
    commitScaleOf[wl] = round(scale, 3);
  }
  const optsOf = (wl: string) => ({ ...base, commitScale: commitScaleOf[wl] ?? 1 });
  // The guest loses more than its pauses: each checkpoint re-arms dirty tracking under TCG, and
  // capture, shipping and commit compete for the 2 host cores. Calibrated on the recorded cells of
  // the workloads that only compute (their progress is the measure):
  //   live overhead − paused fraction = c0·(checkpoints/ms) + c1·(pages/ms), least squares, ≥ 0.
  const calib = workloads
    .filter((wl) => !served(wl) && wl !== 'disk')
    .flatMap((wl) => {
      const src = source(wl);
      if (!src?.trace) return [];
      const sim = simulateTrace(src.trace, SOURCE_POLICY, bwOf(src.link), optsOf(wl));
      return [{ c: src, sim, pagesPerMs: (sim.dirtyPagesMedian * sim.checkpointsPerSec) / 1000 }];
    });
  let c0 = 0;
  let c1 = 0;
  {
    let a11 = 0,
      a12 = 0,
      a22 = 0,
      b1 = 0,
      b2 = 0;
    for (const r of calib) {
      const x1 = r.sim.checkpointsPerSec / 1000,
        x2 = r.pagesPerMs,
        y = 1 - r.c.throughputRatio - r.sim.pausedFraction;
      a11 += x1 * x1;
      a12 += x1 * x2;
      a22 += x2 * x2;
      b1 += x1 * y;
      b2 += x2 * y;
    }
    const det = a11 * a22 - a12 * a12;
    if (calib.length >= 2 && Math.abs(det) > 1e-18) {
      c0 = (b1 * a22 - b2 * a12) / det;
      c1 = (a11 * b2 - a12 * b1) / det;
    }
    if (calib.length < 2 || c0 < 0 || c1 < 0) {
      c0 = Math.max(0, a11 > 0 ? b1 / a11 : 0);
      c1 = 0;
    }
  }
  // A service's answers are delayed by the same guest time each checkpoint costs.
  const serviceOpts = (wl: string) => ({ ...optsOf(wl), guestStallMs: c0 });
  // Services are closed loops (4 clients, each waiting for its answer): replayed with simulated
  // clients, not the recorded output times. A request may need several output commits in turn (a
  // TCP handshake, a response in several congestion windows): that count is calibrated per
  // workload on its recorded cell, and the unreplicated latency is the service time.
  const clientsOf: Record<string, SimClients> = {};
  for (const wl of workloads.filter(served)) {
    const src = source(wl);
    if (!src?.trace || src.kvLatencyMsP50 === undefined || src.kvAddedLatencyMsP50 === undefined) continue;
    const serviceMs = Math.max(0.1, src.kvLatencyMsP50 - src.kvAddedLatencyMsP50);
    // Frames per stage: the recorded output rate over the simulated stages' rate.
    const rec = loadTrace(src.trace);
    const framesPerSec = (rec.outputMs.length / rec.durationMs) * 1000;
    const run = (cl: SimClients) =>
      simulateTrace(src.trace!, SOURCE_POLICY, bwOf(src.link), { ...serviceOpts(wl), clients: cl });
    let best: { cl: SimClients; err: number } | undefined;
    for (let k = 1; k <= 8; k++) {
      const one = run({ count: 4, serviceMs, commitsPerRequest: k });
      const stagesPerSec = one.requestsPerSec * k;
      const cl = {
        count: 4,
        serviceMs: round(serviceMs, 2),
        commitsPerRequest: k,
        framesPerAnswer: Math.max(1, Math.round(framesPerSec / Math.max(stagesPerSec, 1e-9))),
      };
      const r = run(cl);
      const err = Math.abs((r.requestLatencyMsP50 ?? Number.POSITIVE_INFINITY) - serviceMs - src.kvAddedLatencyMsP50);
      if (!best || err < best.err) best = { cl, err };
    }
    if (best) clientsOf[wl] = best.cl;
  }
  const replays = cells.flatMap((c) => {
    const src = source(c.workload);
    if (!src?.trace) return [];
    const clients = clientsOf[c.workload];
    const sim = simulateTrace(src.trace, c.policy, bwOf(c.link), {
      ...(clients ? { ...serviceOpts(c.workload), clients } : optsOf(c.workload)),
    });
    const out: Array<{ c: typeof c; sim: typeof sim; role: string; counted: boolean; pagesPerMs: number }> = [
      {
        c,
        sim,
        role: c === src ? 'recorded' : 'predicted',
        counted: c !== src,
        pagesPerMs: (sim.dirtyPagesMedian * sim.checkpointsPerSec) / 1000,
      },
    ];
    // The vCPU extrapolation checked where it can be: the 1-vCPU trace replayed on n vCPUs.
    const n = Number(c.workload.match(/^dirtier-10x(\d+)$/)?.[1] ?? 0);
    const one = source('dirtier-10')?.trace;
    if (n > 1 && one) {
      const ext = simulateTrace(one, c.policy, bwOf(c.link), { cpus: n, ...optsOf('dirtier-10') });
      const counted = n <= hostCores;
      out.push({
        c,
        sim: ext,
        role: counted
          ? 'extrapolated from 1 vCPU'
          : `extrapolated from 1 vCPU (${n} vCPUs on ${hostCores} cores: not counted)`,
        counted,
        pagesPerMs: (ext.dirtyPagesMedian * ext.checkpointsPerSec) / 1000,
      });
    }
    return out;
  });
  const rel = (sim: number, live: number) =>
    live !== 0 ? Math.abs(sim - live) / Math.abs(live) : sim === 0 ? 0 : Number.POSITIVE_INFINITY;
  const validation = replays.map(({ c, sim, role, counted, pagesPerMs }) => {
    const metrics: Array<{
      metric: string;
      live: number;
      simulated: number;
      relativeError: number;
      within: boolean;
      tolerance: string;
      counted: boolean;
    }> = [];
    const add = (
      metric: string,
      live: number,
      simulated: number,
      absTol: number,
      tolerance: string,
      counted = true,
    ) => {
      const e = rel(simulated, live);
      metrics.push({
        metric,
        live: round(live, 4),
        simulated: round(simulated, 4),
        relativeError: round(e, 3),
        within: e <= 0.15 || Math.abs(simulated - live) <= absTol,
        tolerance,
        counted,
      });
    };
    add('checkpoints/s', c.checkpointsPerSec, sim.checkpointsPerSec, 0, '±15%');
    add('paused fraction', c.pausedFraction, sim.pausedFraction, 0.002, '±15% or 0.2 points');
    if (served(c.workload)) {
      const cl = clientsOf[c.workload];
      if (cl && c.kvAddedLatencyMsP50 !== undefined && sim.requestLatencyMsP50 !== null)
        add('added latency p50 (ms)', c.kvAddedLatencyMsP50, sim.requestLatencyMsP50 - cl.serviceMs, 1, '±15% or 1 ms');
    } else {
      const predicted = sim.pausedFraction + c0 * (sim.checkpointsPerSec / 1000) + c1 * pagesPerMs;
      // Shown, not counted: live progress is measured to about the unreplicated phases' spread.
      add(
        'throughput overhead',
        1 - c.throughputRatio,
        predicted,
        c.noise,
        `not counted (live spread ${round(c.noise * 100, 1)}%)`,
        false,
      );
    }
    return { workload: c.workload, policy: c.policy, link: c.link, role, counted, metrics };
  });
  const calibration = {
    perCheckpointMs: round(c0, 3),
    perPageUs: round(c1 * 1000, 3),
    cells: calib.map((r) => `${r.c.workload}/${r.c.policy}/${r.c.link}`),
    clients: clientsOf,
    commitScale: commitScaleOf,
    pauseBusyMs,
  };
  // How well the live runs agree with themselves: the unlimited and 10gbit classes carry far more
  // than any workload here ships (see goodput), so the same workload and policy measured on both
  // is the same configuration measured twice.
  const twins = ['unlimited', '10gbit'].filter((c) => classes.includes(c));
  const repeat: Array<{
    workload: string;
    policy: string;
    metric: string;
    a: number;
    b: number;
    relativeDifference: number;
  }> = [];
  if (twins.length === 2) {
    for (const v of validation.filter((x) => x.link === twins[0] && !x.role.startsWith('extrapolated'))) {
      const w = validation.find(
        (x) =>
          x.link === twins[1] &&
          x.workload === v.workload &&
          x.policy === v.policy &&
          !x.role.startsWith('extrapolated'),
      );
      for (const m of v.metrics.filter((x) => x.counted)) {
        const o = w?.metrics.find((x) => x.metric === m.metric);
        if (o)
          repeat.push({
            workload: v.workload,
            policy: v.policy,
            metric: m.metric,
            a: m.live,
            b: o.live,
            relativeDifference: round(rel(o.live, m.live), 3),
          });
      }
    }
  }
  const counted = validation.filter((v) => v.counted);
  const predicted = counted.flatMap((v) => v.metrics).filter((m) => m.counted);
  const repeatOf = (wl: string, policy: string, metric: string) =>
    repeat.find((r) => r.workload === wl && r.policy === policy && r.metric === metric)?.relativeDifference;
  const withinRepeat = counted.flatMap((v) =>
    v.metrics.filter(
      (m) => m.counted && (m.within || m.relativeError <= (repeatOf(v.workload, v.policy, m.metric) ?? 0)),
    ),
  ).length;
  const metricsOf = [...new Set(repeat.map((r) => r.metric))];
  const agreement = {
    predictedComparisons: predicted.length,
    within: predicted.filter((m) => m.within).length,
    /** Within ±15% or within the live runs' own difference for that workload, policy and metric. */
    withinLiveRepeatability: withinRepeat,
    liveRepeatability: {
      pairs: repeat.length,
      medianRelativeDifference: Object.fromEntries(
        metricsOf.map((m) => [
          m,
          round(median(repeat.filter((r) => r.metric === m).map((r) => r.relativeDifference)), 3),
        ]),
      ),
    },
  };
  return { validation, calibration, agreement, repeatability: repeat, sourcePolicy: SOURCE_POLICY };
}

/** Recomputes a finished evaluation's validation from its evaluation.json and traces (no guest runs). */
export function revalidate(evaluationJson: string): {
  file: string;
  agreement: ReturnType<typeof validateByReplay>['agreement'];
  calibration: unknown;
} {
  let d: {
    summary?: { linkClasses?: string[]; linkGoodputMBps?: Record<string, number> };
    cells?: ValidationInput['cells'];
    measured?: MeasuredCurve[];
  };
  try {
    d = JSON.parse(readFileSync(evaluationJson, 'utf8')) as typeof d;
  } catch (e) {
    throw new RubatoError(
      'RUBATO_CONFIG',
      `cannot read ${evaluationJson}: ${(e as Error).message} (written by: rubato bench)`,
    );
  }
  if (!d.cells?.length || !d.measured || !d.summary?.linkClasses)
    throw new RubatoError('RUBATO_CONFIG', `${evaluationJson} is not a rubato bench evaluation`);
  const r = validateByReplay({
    cells: d.cells,
    classes: d.summary.linkClasses,
    measured: d.measured,
    workloads: [...new Set(d.cells.map((c) => c.workload))],
    ...(d.summary.linkGoodputMBps ? { goodputMBps: d.summary.linkGoodputMBps } : {}),
  });
  const file = join(dirname(evaluationJson), 'validation.json');
  writeFileSync(file, JSON.stringify(r, null, 2));
  return { file, agreement: r.agreement, calibration: r.calibration };
}
