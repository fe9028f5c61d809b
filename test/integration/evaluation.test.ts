// The evaluation harness on its quick settings: files produced, numbers present and sane
// (not performance thresholds — those are the benchmarks' business).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { runEvaluation } from '../../src/bench/evaluate.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { liveNamespaces } from '../../src/io/net/netns.ts';
import { liveProcesses } from '../../src/util/procs.ts';
import { testPlatform, type TestPlatform } from '../helpers/platform.ts';

let p: TestPlatform;
before(async () => { p = await testPlatform(); });

test('rubato bench --quick: report, figures and sane numbers', { timeout: 600_000 }, async () => {
  const out = makeTempDir('rubato-eval-');
  try {
    const r = await runEvaluation({ ...p, quick: true, outDir: out }) as { report: string; figures: string[]; throughputRatio: Record<string, number>; validation: Array<{ liveOverhead: number; simulatedOverhead: number }> };
    const md = readFileSync(r.report, 'utf8');
    for (const h of ['## Workload characterisation', '## Throughput and latency', '## Which policy wins', '## Overhead as vCPUs grow', '## Simulator validation']) assert.ok(md.includes(h), `report has ${h}`);
    assert.ok(r.figures.length >= 8);
    for (const f of r.figures) assert.ok(existsSync(f) && statSync(f).size > 500, `figure ${f}`);
    for (const w of ['dirtier-10', 'kv']) {
      const x = r.throughputRatio[w];
      assert.ok(x !== undefined && x > 0 && x < 1.3, `${w} throughput ratio ${x}`);
    }
    assert.ok(r.validation.length >= 2 && r.validation.every((v) => Number.isFinite(v.liveOverhead) && Number.isFinite(v.simulatedOverhead)));
  } finally {
    removeTempDir(out);
  }
});

after(() => {
  assert.deepEqual(liveNamespaces(), [], 'no namespace left behind');
  assert.deepEqual(liveProcesses(), [], 'no process left running');
});
