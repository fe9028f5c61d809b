// Many seeds of the fault simulator (faults.ts), and the named regression scenarios: each is a
// scripted schedule that reproduced one defect. With the defect's old rule switched back on
// (`legacy`) it must show a violation; with today's rules none.

import { runFaultSim, type FaultSimOptions, type FaultSimResult, type Legacy, type ViolationKind } from './faults.ts';

export interface SeedsSummary {
  seeds: number;
  violations: number;
  firstSeed: number;
  ms: number;
  events: number;
  failovers: number;
  /** Pre-send passes ended into their checkpoint (with presendMs). */
  presends: number;
  byKind: Partial<Record<ViolationKind | 'exception', number>>;
  /** The first failing seeds (at most 10), each with the command that replays it. */
  failing: Array<{ seed: number; replay: string; violations: FaultSimResult['violations'] | string }>;
}

export function runSeeds(first: number, count: number, base: Omit<FaultSimOptions, 'seed'> = {}): SeedsSummary {
  const t0 = performance.now();
  const out: SeedsSummary = {
    seeds: count,
    violations: 0,
    firstSeed: first,
    ms: 0,
    events: 0,
    failovers: 0,
    presends: 0,
    byKind: {},
    failing: [],
  };
  for (let seed = first; seed < first + count; seed++) {
    let r: FaultSimResult | null = null;
    let error: string | null = null;
    try {
      r = runFaultSim({ ...base, seed });
    } catch (e) {
      error = e instanceof Error ? e.message : String(e);
    }
    if (r) {
      out.events += r.events;
      out.failovers += r.failovers;
      out.presends += r.presends;
    }
    const bad = error !== null || (r?.violations.length ?? 0) > 0;
    if (!bad) continue;
    out.violations++;
    if (error !== null) out.byKind.exception = (out.byKind.exception ?? 0) + 1;
    for (const v of r?.violations ?? []) out.byKind[v.kind] = (out.byKind[v.kind] ?? 0) + 1;
    if (out.failing.length < 10)
      out.failing.push({
        seed,
        replay: `npm run -s simulate-faults -- --seed ${seed}${base.presendMs !== undefined ? ` --presend-ms ${base.presendMs}` : ''}`,
        violations: error ?? r!.violations,
      });
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

/**
 * One seed per defect of issue 24 the simulator can tell apart, found by
 * `npx tsx scripts/find-regression-seeds.ts` (its random schedule shows the defect with the old
 * rule and nothing with today's). Where the release gate alone would mask a defect, the old rule
 * is paired with the gate off (checked: the gate off alone shows nothing on that seed).
 */
export const REGRESSIONS: readonly Scenario[] = [
  {
    name: 'no-release-gate',
    defect: 'no release checked the lease: a holder whose lease was not known valid let output out',
    legacy: { noReleaseGate: true },
    seed: 38,
    options: {},
  },
  {
    name: 'lease-from-receive',
    defect: 'the lease was counted from when its answer returned, so it looked longer than etcd held it',
    legacy: { leaseFromReceive: true, noReleaseGate: true },
    seed: 687,
    options: {},
  },
  {
    name: 'fence-on-close',
    defect:
      'a link that dropped mid-fence counted as a fence: the primary resumed its guest and the standby ran a second copy',
    legacy: { fenceOnClose: true },
    seed: 118,
    options: { fencing: 'none' },
  },
  {
    name: 'discard-on-write-failure',
    defect: 'under memory durability a failed write discarded the merged batch: a failover ran older than acknowledged',
    legacy: { discardOnWriteFailure: true },
    seed: 9,
    options: {},
  },
  {
    name: 'stale-disk-restart',
    defect: 'a host whose VM failed over started a copy from its stale disk when it came back',
    legacy: { noGenerationCheck: true, noReleaseGate: true },
    seed: 8,
    options: {},
  },
  {
    name: 'reclaim-any-generation',
    defect:
      "a host that lost the witness and claimed the VM again whatever its generation would release a stale copy's output after another copy took over (the rule that lets a fenced guest run on instead of stopping for one slow renewal)",
    legacy: { reclaimAnyGeneration: true },
    seed: 57,
    options: {},
  },
  {
    name: 'recovered-goes-live',
    defect: 'a standby restarted under memory durability went live from a replica older than its acknowledgements',
    legacy: { recoveredGoesLive: true },
    seed: 10126,
    options: {},
  },
  {
    name: 'short-takeover-wait',
    defect:
      "a standby that claimed over its primary's unrenewed owner key after a third of the TTL (less than the holder may act on its last renewal) ran a copy while the old one still released output",
    legacy: { shortTakeoverWait: true },
    seed: 335,
    options: {},
  },
];

export function runScenario(s: Scenario, withDefect: boolean): FaultSimResult {
  return runFaultSim({ ...s.options, seed: s.seed, ...(withDefect ? { legacy: s.legacy } : {}) });
}
