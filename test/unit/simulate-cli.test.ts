import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { simulateProfile } from '../../src/sim/cli.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';

const profile = {
  workload: 'dirtier:10',
  runs: [1, 2].map((cpus) => ({
    cpus,
    curve: { a: 20 * cpus, b: 0.85 },
    points: [10, 50, 250].map((L) => ({
      epochMs: L,
      dirtyPagesMedian: 20 * cpus * L ** 0.85,
      pauseMsMedian: 0.3 + 0.003 * 20 * cpus * L ** 0.85,
    })),
  })),
};

test('simulate replays a profile: policies, bandwidth classes and extrapolated vCPU counts', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const f = join(dir, 'p.json');
  writeFileSync(f, JSON.stringify(profile));
  const fixed = simulateProfile(f, 'fixed:25ms', '10GbE', 1, 10);
  assert.equal(fixed.extrapolated, false);
  assert.ok(Math.abs(fixed.checkpointsPerSec - 40) < 3, `fixed ${fixed.checkpointsPerSec}/s`);
  const m = simulateProfile(f, 'model', '10GbE', 1, 10);
  assert.ok(m.checkpointsPerSec < fixed.checkpointsPerSec / 10, 'model stretches a quiet workload');
  const eight = simulateProfile(f, 'fixed:25ms', '10GbE', 8, 10);
  assert.equal(eight.extrapolated, true);
  assert.ok(eight.dirtyPagesMedian > fixed.dirtyPagesMedian * 4, 'more vCPUs dirty more');
  const slow = simulateProfile(f, 'fixed:25ms', '1GbE', 8, 10);
  assert.ok(slow.checkpointsPerSec < eight.checkpointsPerSec, 'a slower link throttles checkpoints (back-pressure)');
  const interactive = simulateProfile(f, 'model', '10GbE', 1, 10, 20);
  assert.ok(
    interactive.outputLatencyMsP50 !== null && interactive.outputLatencyMsP50 < 15,
    `output p50 ${interactive.outputLatencyMsP50}`,
  );
  assert.throws(
    () => simulateProfile(f, 'model', '56k', 1, 1),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG'),
  );
  assert.throws(
    () => simulateProfile(join(dir, 'missing.json'), 'model', '1GbE', 1, 1),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG'),
  );
});
