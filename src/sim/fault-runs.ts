// Many seeds of the fault simulator (faults.ts), and the named regression scenarios: each is a
// scripted schedule that reproduced one defect. With the defect's old rule switched back on
// (`legacy`) it must show a violation; with today's rules none.

import { runFaultSim, type FaultSimOptions, type FaultSimResult, type Legacy, type ViolationKind } from './faults.ts';

export interface SeedsSummary {
  seeds: number; violations: number; firstSeed: number; ms: number; events: number; failovers: number;
  byKind: Partial<Record<ViolationKind | 'exception', number>>;
  /** The first failing seeds (at most 10), each with the command that replays it. */
  failing: Array<{ seed: number; replay: string; violations: FaultSimResult['violations'] | string }>;
}

export function runSeeds(first: number, count: number, base: Omit<FaultSimOptions, 'seed'> = {}): SeedsSummary {
  const t0 = performance.now();
  const out: SeedsSummary = { seeds: count, violations: 0, firstSeed: first, ms: 0, events: 0, failovers: 0, byKind: {}, failing: [] };
  for (let seed = first; seed < first + count; seed++) {
    let r: FaultSimResult | null = null;
    let error: string | null = null;
    try { r = runFaultSim({ ...base, seed }); } catch (e) { error = e instanceof Error ? e.message : String(e); }
    if (r) { out.events += r.events; out.failovers += r.failovers; }
    const bad = error !== null || (r?.violations.length ?? 0) > 0;
    if (!bad) continue;
    out.violations++;
    if (error !== null) out.byKind.exception = (out.byKind.exception ?? 0) + 1;
    for (const v of r?.violations ?? []) out.byKind[v.kind] = (out.byKind[v.kind] ?? 0) + 1;
    if (out.failing.length < 10) out.failing.push({ seed, replay: `npm run -s simulate-faults -- --seed ${seed}`, violations: error ?? r!.violations });
  }
  out.ms = Math.round(performance.now() - t0);
  return out;
}

export interface Scenario {
  name: string;
  /** The defect, as found. */
  defect: string;
  legacy: Partial<Legacy>;
  options: Omit<FaultSimOptions, 'seed' | 'legacy'>;
  seed: number;
}

/** One scenario per defect of issue 24 that the simulator can express. */
export const REGRESSIONS: readonly Scenario[] = [
  {
    name: 'no-release-gate', defect: 'no release checked the lease: a primary stalled past its TTL released held output after the standby went live',
    legacy: { noReleaseGate: true, staleRunsOn: true }, seed: 3,
    options: { script: [{ atMs: 1500, kind: 'pause-primary', forMs: 3000 }] },
  },
  {
    name: 'stale-runs-on', defect: 'a primary stalled past its TTL ran on as "protected" while the standby had gone live',
    legacy: { staleRunsOn: true, noReleaseGate: true }, seed: 11,
    options: { script: [{ atMs: 1500, kind: 'pause-primary', forMs: 2600 }] },
  },
  {
    name: 'loss-before-guard', defect: 'ownership lost before the guard existed was dropped: the guest ran on with no lease',
    legacy: { lossBeforeGuardDropped: true, noReleaseGate: true }, seed: 5,
    options: { prepareMs: 2500, script: [{ atMs: 300, kind: 'etcd-cut-primary', forMs: 3000 }, { atMs: 1200, kind: 'crash-standby', forMs: 100 }] },
  },
  {
    name: 'fence-on-close', defect: 'a link that dropped mid-fence counted as a fence; the primary resumed its guest and the standby ran a second copy',
    legacy: { fenceOnClose: true }, seed: 13,
    options: { fencing: 'none', script: [{ atMs: 2000, kind: 'switchover' }, { atMs: 2000.5, kind: 'link-dup' }] },
  },
  {
    name: 'discard-on-write-failure', defect: 'under memory durability a failed write discarded the merged batch: a failover ran older than acknowledged',
    legacy: { discardOnWriteFailure: true }, seed: 17,
    options: { script: [{ atMs: 1500, kind: 'disk-fail', forMs: 6000 }, { atMs: 2500, kind: 'crash-primary', forMs: 9000 }] },
  },
  {
    name: 'stale-disk-restart', defect: 'a host whose VM failed over started a copy from its stale disk when it came back',
    legacy: { noGenerationCheck: true, noReleaseGate: true }, seed: 19,
    options: { script: [{ atMs: 1500, kind: 'crash-primary', forMs: 2500 }, { atMs: 3200, kind: 'crash-primary', forMs: 300 }] },
  },
];

export function runScenario(s: Scenario, withDefect: boolean): FaultSimResult {
  return runFaultSim({ ...s.options, seed: s.seed, ...(withDefect ? { legacy: s.legacy } : {}) });
}
