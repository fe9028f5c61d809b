// From measured per-vCPU profiles to any vCPU count: D_c(T) = a(c)·T^b, with a(c) fitted linearly
// in c over the measured counts and b their mean. This is an extrapolation, stated as such in
// every report that uses it: parallel workloads whose threads dirty disjoint memory scale about
// linearly; shared working sets scale less.

import { syntheticWorkload, type SimWorkload } from './simulate.ts';

export interface MeasuredCurve {
  cpus: number;
  a: number;
  b: number;
  pauseFixedMs: number;
  pausePerPageMs: number;
}

export function curveFor(
  measured: readonly MeasuredCurve[],
  cpus: number,
): { a: number; b: number; pauseFixedMs: number; pausePerPageMs: number } {
  const exact = measured.find((m) => m.cpus === cpus);
  if (exact) return exact;
  const n = measured.length;
  const mx = measured.reduce((s, m) => s + m.cpus, 0) / n;
  const my = measured.reduce((s, m) => s + m.a, 0) / n;
  const sxx = measured.reduce((s, m) => s + (m.cpus - mx) ** 2, 0);
  const slope = sxx > 0 ? measured.reduce((s, m) => s + (m.cpus - mx) * (m.a - my), 0) / sxx : my / Math.max(1, mx);
  return {
    a: Math.max(0, my + slope * (cpus - mx)),
    b: measured.reduce((s, m) => s + m.b, 0) / n,
    pauseFixedMs: measured.reduce((s, m) => s + m.pauseFixedMs, 0) / n,
    pausePerPageMs: measured.reduce((s, m) => s + m.pausePerPageMs, 0) / n,
  };
}

export function workloadFor(
  c: { a: number; b: number; pauseFixedMs: number; pausePerPageMs: number },
  bandwidthBytesPerMs: number,
  rttMs = 0.2,
): SimWorkload {
  const w = syntheticWorkload({
    pagesPerMs: c.a,
    exponent: c.b,
    bandwidthBytesPerMs: () => bandwidthBytesPerMs,
    rttMs,
  });
  return { ...w, pauseMs: (p) => c.pauseFixedMs + c.pausePerPageMs * p };
}

export const BANDWIDTH_CLASSES: Record<string, number> = { '1GbE': 125_000, '10GbE': 1_250_000, 'IB-32G': 4_000_000 };
