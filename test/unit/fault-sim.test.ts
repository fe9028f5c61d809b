// The deterministic fault simulator: 10,000 seeds of random fault schedules with no violation of
// the invariants, every named defect reproduced with its old rule and gone with today's, and
// determinism (a seed replays exactly).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runSeeds, REGRESSIONS, runScenario } from '../../src/sim/fault-runs.ts';
import { runFaultSim } from '../../src/sim/faults.ts';
import { LeaseClock } from '../../src/coord/lease.ts';
import { ReleaseGate } from '../../src/commit/release-gate.ts';
import { guardDecision } from '../../src/coord/guard.ts';

/**
 * Open: in these seeds a checkpoint's capture, deferred by a stalled primary, never completes in
 * the simulator and its guest is reported paused (liveness, not safety; see the closing note of
 * issue 24). Listed so that any other seed failing is a new finding.
 */
const KNOWN_OPEN_LIVENESS = new Set([4674]);

test('fault simulator: 10,000 seeds of crashes, partitions, stalls, etcd outages, disk failures and manual failovers break no safety invariant', () => {
  const r = runSeeds(1, 10_000);
  const unexpected = r.failing.filter((f) => !(KNOWN_OPEN_LIVENESS.has(f.seed) && Array.isArray(f.violations) && f.violations.every((v) => v.kind === 'guest-stays-paused')));
  assert.deepEqual(unexpected, []);
  assert.equal(r.byKind['acked-output-lost'] ?? 0, 0);
  assert.equal(r.byKind['two-releasers'] ?? 0, 0);
  assert.equal(r.byKind['live-older-than-acked'] ?? 0, 0);
  assert.equal(r.byKind.exception ?? 0, 0);
  assert.ok(r.failovers > 1000, `failovers happened (${r.failovers})`);
  assert.ok(r.ms < 60_000, `${r.ms} ms`);
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
    assert.ok(old.violations.length > 0, `with the old rule the simulator finds the defect (faults ${old.faults.join(',')})`);
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

test('release gate: refuses and counts frames when the check says no; the guard stops a stale or unprotected holder', () => {
  let ok = true;
  const g = new ReleaseGate(() => (ok ? null : 'lease lost'));
  assert.equal(g.allow(1), true);
  ok = false;
  assert.equal(g.allow(2), false);
  assert.deepEqual(g.blocked, { frames: 1, why: 'lease lost' });
  assert.equal(guardDecision({ why: 'x', stale: false }, true), 'run-on');
  assert.equal(guardDecision({ why: 'x', stale: false }, false), 'stop');
  assert.equal(guardDecision({ why: 'x', stale: true }, true), 'stop', 'stalled past the TTL: another host may hold it');
});
