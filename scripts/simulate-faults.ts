// `npm run simulate-faults -- --seeds N [--from S] [--presend-ms MS] [--json]`: the fault simulator over N seeds
// (with --presend-ms the primaries pre-send their dirty RAM as their pipelines plan it);
// `--seed S` replays one (its violations and fault schedule); `--scenarios` runs the named
// regression scenarios with and without their defect. Exit 1 on any violation.
import { runSeeds, REGRESSIONS, runScenario } from '../src/sim/fault-runs.ts';
import { runFaultSim } from '../src/sim/faults.ts';

const args = process.argv.slice(2);
const opt = (name: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const json = args.includes('--json');
const num = (v: string | undefined, d: number) => {
  if (v === undefined) return d;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`simulate-faults: expected a whole number, got "${v}"\n`);
    process.exit(2);
  }
  return n;
};

const presendMs = opt('--presend-ms') === undefined ? undefined : num(opt('--presend-ms'), 0);
const base = presendMs ? { presendMs } : {};

if (opt('--seed') !== undefined) {
  const r = runFaultSim({ ...base, seed: num(opt('--seed'), 1) });
  process.stdout.write(`${JSON.stringify(r, null, json ? 0 : 2)}\n`);
  process.exitCode = r.violations.length ? 1 : 0;
} else if (args.includes('--scenarios')) {
  const rows = REGRESSIONS.map((s) => ({
    name: s.name,
    withDefect: runScenario(s, true).violations.length,
    fixed: runScenario(s, false).violations.length,
  }));
  if (json) process.stdout.write(`${JSON.stringify(rows)}\n`);
  else
    for (const r of rows)
      process.stdout.write(`${r.name.padEnd(26)} with the defect: ${r.withDefect} violations, fixed: ${r.fixed}\n`);
  process.exitCode = rows.every((r) => r.withDefect > 0 && r.fixed === 0) ? 0 : 1;
} else {
  const seeds = num(opt('--seeds'), 1000);
  const from = num(opt('--from'), 1);
  const step = 1000;
  const total = {
    seeds: 0,
    violations: 0,
    ms: 0,
    events: 0,
    failovers: 0,
    presends: 0,
    byKind: {} as Record<string, number>,
    failing: [] as unknown[],
  };
  for (let s = from; s < from + seeds; s += step) {
    const r = runSeeds(s, Math.min(step, from + seeds - s), base);
    total.seeds += r.seeds;
    total.violations += r.violations;
    total.ms += r.ms;
    total.events += r.events;
    total.failovers += r.failovers;
    total.presends += r.presends;
    for (const [k, v] of Object.entries(r.byKind)) total.byKind[k] = (total.byKind[k] ?? 0) + v;
    if (total.failing.length < 10) total.failing.push(...r.failing.slice(0, 10 - total.failing.length));
    if (!json) process.stderr.write(`\r${total.seeds}/${seeds} seeds, ${total.violations} with violations`);
  }
  if (!json) process.stderr.write('\n');
  process.stdout.write(`${JSON.stringify(total)}\n`);
  process.exitCode = total.violations ? 1 : 0;
}
