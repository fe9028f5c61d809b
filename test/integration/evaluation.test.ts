// The evaluation harness on its quick settings: files produced, numbers present and sane
// (not performance thresholds — those are the benchmarks' business).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { runEvaluation } from '../../src/bench/evaluate.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { liveNamespaces } from '../../src/io/net/netns.ts';
import { liveProcesses } from '../../src/util/procs.ts';
import { testPlatform, type TestPlatform } from '../helpers/platform.ts';

let p: TestPlatform;
before(async () => {
  p = await testPlatform();
});

test('rubato bench --quick: report, figures and sane numbers', { timeout: 600_000 }, async () => {
  const out = makeTempDir('rubato-eval-');
  try {
    const r = (await runEvaluation({ ...p, quick: true, outDir: out })) as {
      report: string;
      figures: string[];
      throughputRatio: Record<string, number>;
      validation: Array<{ role: string; metrics: Array<{ metric: string; live: number; simulated: number }> }>;
    };
    const md = readFileSync(r.report, 'utf8');
    for (const h of [
      '## Workload characterisation',
      '## Throughput and latency',
      '## Which policy wins',
      '## Overhead as vCPUs grow',
      '## Simulator validation',
    ])
      assert.ok(md.includes(h), `report has ${h}`);
    assert.ok(r.figures.length >= 8);
    for (const f of r.figures) assert.ok(existsSync(f) && statSync(f).size > 500, `figure ${f}`);
    // Sane, not thresholds: the quick windows are 3 s on a noisy 2-core machine.
    for (const w of ['dirtier-10', 'dirtier-10x2', 'kv', 'web', 'disk']) {
      const x = r.throughputRatio[w];
      assert.ok(x !== undefined && x > 0 && x < 2, `${w} throughput ratio ${x}`);
    }
    assert.ok(existsSync(join(dirname(r.report), 'traces')), 'event traces written for rubato simulate --trace');
    // Every live cell of the traced workloads has a replayed prediction beside it, with finite numbers.
    assert.ok(r.validation.filter((v) => v.role !== 'recorded').length >= 2, 'predictions for the cells not recorded');
    for (const v of r.validation) {
      assert.ok(v.metrics.some((m) => m.metric === 'checkpoints/s'));
      for (const m of v.metrics)
        assert.ok(Number.isFinite(m.live) && Number.isFinite(m.simulated), `${m.metric}: ${m.live} vs ${m.simulated}`);
    }
    // A trace replayed under the policy and link it was recorded with reproduces its own rate of
    // checkpoints to within a factor of two (a replay that drifts from its recording cannot predict).
    for (const v of r.validation.filter((x) => x.role === 'recorded')) {
      const c = v.metrics.find((m) => m.metric === 'checkpoints/s')!;
      const ratio = c.simulated / c.live;
      assert.ok(ratio > 0.5 && ratio < 2, `recorded cell replayed at ${c.simulated} checkpoints/s, live ${c.live}`);
    }
    // No sentence about data the run does not have.
    assert.doesNotMatch(md, /Over 0 such pairs|difference is \./);
  } finally {
    removeTempDir(out);
  }
});

after(() => {
  assert.deepEqual(liveNamespaces(), [], 'no namespace left behind');
  assert.deepEqual(liveProcesses(), [], 'no process left running');
});
