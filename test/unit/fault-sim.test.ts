// The deterministic fault simulator: 10,000 seeds of random fault schedules with no violation of
// the invariants, every named defect reproduced with its old rule and gone with today's, and
// determinism (a seed replays exactly).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runSeeds, REGRESSIONS, runScenario } from '../../src/sim/fault-runs.ts';
import { runFaultSim } from '../../src/sim/faults.ts';
import { LeaseClock } from '../../src/coord/lease.ts';
import { ReleaseGate } from '../../src/commit/release-gate.ts';
import { afterReclaim } from '../../src/coord/guard.ts';

test('fault simulator: 10,000 seeds of crashes, partitions, stalls, etcd outages, disk failures and manual failovers break no safety invariant', () => {
  const r = runSeeds(1, 10_000);
  assert.deepEqual(r.failing, []);
  assert.equal(r.byKind['acked-output-lost'] ?? 0, 0);
  assert.equal(r.byKind['two-releasers'] ?? 0, 0);
  assert.equal(r.byKind['live-older-than-acked'] ?? 0, 0);
  assert.equal(r.byKind.exception ?? 0, 0);
  assert.ok(r.failovers > 1000, `failovers happened (${r.failovers})`);
  assert.ok(r.ms < 60_000, `${r.ms} ms`);
});

test('fault simulator: 2,000 seeds whose primaries pre-send as their pipelines plan it (passes cut by crashes, losses and fences) break no invariant', () => {
  const r = runSeeds(20_001, 2000, { presendMs: 10 });
  assert.deepEqual(r.failing, []);
  assert.ok(r.presends > 10_000, `pre-sends happened (${r.presends})`);
});

test('fault simulator: a seed replays exactly', () => {
  const a = runFaultSim({ seed: 4242 });
  const b = runFaultSim({ seed: 4242 });
  assert.deepEqual(a, b);
  assert.ok(a.events > 100 && a.releasedAcked > 0);
});

for (const s of REGRESSIONS) {
  test(`fault simulator regression ${s.name}: ${s.defect}`, () => {
    const old = runScenario(s, true);
    assert.ok(
      old.violations.length > 0,
      `with the old rule the simulator finds the defect (faults ${old.faults.join(',')})`,
    );
    const now = runScenario(s, false);
    assert.deepEqual(now.violations, [], 'fixed');
  });
}

test('lease clock: valid for 2/3 of the TTL from the *send* time of the last confirmed request; a late answer does not extend it', () => {
  const c = new LeaseClock(1000);
  assert.equal(c.valid(0), false, 'nothing confirmed yet');
  c.confirmed(100); // asked at 100, answered whenever
  assert.equal(c.valid(700), true);
  assert.equal(c.valid(767), false, 'past 100 + 667');
  c.confirmed(50); // an older request answered late
  assert.equal(c.validUntilMs(), 100 + 1000 * (2 / 3));
  assert.equal(c.mayHaveExpired(1099), false);
  assert.equal(c.mayHaveExpired(1100), true, 'the whole TTL since the send: etcd may have expired it');
  c.expired();
  assert.equal(c.valid(101), false);
});

test('release gate: refuses and counts frames when the check says no; a fenced holder stops only once another copy took over', () => {
  let ok = true;
  const g = new ReleaseGate(() => (ok ? null : 'lease lost'));
  assert.equal(g.allow(1), true);
  ok = false;
  assert.equal(g.allow(2), false);
  assert.deepEqual(g.blocked, { frames: 1, why: 'lease lost' });
  assert.equal(afterReclaim(7), 'holds', 'claimed again as the same copy: output flows again');
  assert.equal(afterReclaim(null), 'retry', 'no answer: still fenced, ask again');
  assert.equal(afterReclaim('superseded'), 'stop', 'another copy claimed the VM since: this guest is stale');
});
