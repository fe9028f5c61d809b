// Finds, per legacy rule, the first seed whose random schedule shows a violation with that rule
// back on and none with today's rules (used to name the regression seeds in src/sim/fault-runs.ts).
import { runFaultSim, type Legacy } from '../src/sim/faults.ts';
const only = process.argv.slice(2);
const flags = (
  [
    'noReleaseGate',
    'reclaimAnyGeneration',
    'lossBeforeGuardDropped',
    'fenceOnClose',
    'discardOnWriteFailure',
    'noGenerationCheck',
    'recoveredGoesLive',
    'leaseFromReceive',
    'shortTakeoverWait',
  ] as Array<keyof Legacy>
).filter((f) => !only.length || only.includes(f));
for (const f of flags) {
  let found: number | null = null;
  for (let seed = 1; seed <= 20000 && found === null; seed++) {
    for (const fencing of ['witness', 'none'] as const) {
      if (fencing === 'none' && f !== 'fenceOnClose') continue;
      const legacy =
        f === 'lossBeforeGuardDropped' || f === 'noGenerationCheck' || f === 'leaseFromReceive'
          ? { [f]: true, noReleaseGate: true }
          : { [f]: true };
      const old = runFaultSim({ seed, fencing, legacy }).violations.length;
      if (!old) continue;
      if (runFaultSim({ seed, fencing }).violations.length) continue;
      // Where the old rule needs the gate off to show, the gate off alone must not show it.
      if (
        'noReleaseGate' in legacy &&
        f !== 'noReleaseGate' &&
        runFaultSim({ seed, fencing, legacy: { noReleaseGate: true } }).violations.length
      )
        continue;
      found = seed;
      console.log(JSON.stringify({ flag: f, seed, fencing, legacy, violations: old }));
      break;
    }
  }
  if (found === null) console.log(JSON.stringify({ flag: f, seed: null }));
}
