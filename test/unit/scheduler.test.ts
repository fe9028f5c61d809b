import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  comparing,
  parsePolicy,
  fitDirtyCurve,
  fitPause as fitPauseOf,
  pausePagesWithPresend,
  presendEveryMs,
  type Telemetry,
  type EpochRecord,
} from '../../src/scheduler/index.ts';
import { POLICY_NAMES, DEFAULT_RAILS, AUTO_PRESEND_PAUSE_MS } from '../../src/scheduler/policies.ts';
import { presendIntervalFor, MIN_PRESEND_MS } from '../../src/scheduler/estimate.ts';
import { simulate, syntheticWorkload } from '../../src/sim/simulate.ts';
import { median } from '../../src/util/stats.ts';

const ADAPTIVE = ['dirty-bandwidth', 'net-io', 'disk-io', 'adaptive', 'bounded-latency', 'model'];

test('a compute-only trace gets long epochs, near the maximum', () => {
  const w = syntheticWorkload({ pagesPerMs: 0.05, exponent: 0.5 });
  for (const name of ['net-io', 'adaptive', 'model', 'bounded-latency']) {
    const r = simulate(parsePolicy(`${name},max=500`), w, 10_000);
    const lens = r.epochs.map((e) => e.lengthMs);
    assert.ok(median(lens) >= 450, `${name}: median epoch ${median(lens)} ms`);
    const fixed = simulate(parsePolicy('fixed:25ms'), w, 10_000);
    assert.ok(
      r.checkpoints * 10 < fixed.checkpoints,
      `${name}: ${r.checkpoints} vs fixed ${fixed.checkpoints} checkpoints`,
    );
  }
});

test('an interactive trace gets a checkpoint within the minimum epoch after output appears', () => {
  const w = syntheticWorkload({ pagesPerMs: 2, outputEveryMs: 37 });
  for (const name of ['net-io', 'adaptive']) {
    const r = simulate(parsePolicy(`${name},min=2,max=500`), w, 5_000);
    const p99 = [...r.outputLatencyMs].sort((a, b) => a - b)[Math.floor(r.outputLatencyMs.length * 0.99)]!;
    // wait ≤ min epoch + pause + transfer + rtt
    assert.ok(p99 < 2 + 8, `${name}: output p99 ${p99.toFixed(2)} ms`);
  }
  const b = simulate(parsePolicy('bounded-latency:20ms'), w, 5_000);
  assert.ok(Math.max(...b.outputLatencyMs) < 20 + 2, `bounded-latency max ${Math.max(...b.outputLatencyMs)}`);
  const f100 = simulate(parsePolicy('fixed:100ms'), w, 5_000);
  const m = simulate(parsePolicy('model'), w, 5_000);
  assert.ok(
    median(m.outputLatencyMs) < median(f100.outputLatencyMs) / 2,
    `model p50 ${median(m.outputLatencyMs)} vs fixed:100 ${median(f100.outputLatencyMs)}`,
  );
});

test('a bandwidth drop lengthens epochs so the backlog stays bounded', () => {
  const drop = (t: number) => (t < 10_000 ? 125_000 : 2_500); // 1 Gbit/s, then 20 Mbit/s
  const w = syntheticWorkload({ pagesPerMs: 20, exponent: 0.7, outputEveryMs: 20, bandwidthBytesPerMs: drop });
  for (const name of ['dirty-bandwidth', 'adaptive', 'model', 'net-io', 'bounded-latency']) {
    const r = simulate(parsePolicy(`${name},max=1000`), w, 25_000);
    let at = 0;
    const starts = r.epochs.map((e) => {
      const s0 = at;
      at += e.lengthMs + e.pauseMs;
      return s0;
    });
    const before = median(r.epochs.filter((_, i) => starts[i]! > 3000 && starts[i]! < 10_000).map((e) => e.lengthMs));
    const after = median(r.epochs.slice(-5).map((e) => e.lengthMs));
    assert.ok(after > before * 3, `${name}: epochs ${before.toFixed(1)} → ${after.toFixed(1)} ms`);
    assert.ok(r.maxBacklog <= DEFAULT_RAILS.maxBacklog + 1, `${name}: backlog ${r.maxBacklog}`);
  }
});

test('a disk-flush burst is treated like waiting output', () => {
  const w = syntheticWorkload({ pagesPerMs: 0.1, flushEveryMs: 50 });
  for (const name of ['disk-io', 'adaptive', 'model']) {
    const r = simulate(parsePolicy(`${name},max=1000`), w, 5_000);
    assert.ok(
      median(r.epochs.map((e) => e.lengthMs)) < 60,
      `${name}: median epoch ${median(r.epochs.map((e) => e.lengthMs))}`,
    );
  }
});

test('property: no policy goes below the minimum or beyond the maximum epoch, for random telemetry', () => {
  let seed = 4242;
  const rnd = () => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed / 2 ** 32;
  };
  for (const name of [...POLICY_NAMES, ...ADAPTIVE.map((n) => `${n},min=3,max=300`)]) {
    const p = parsePolicy(name);
    for (let i = 0; i < 2000; i++) {
      const history: EpochRecord[] = Array.from({ length: Math.floor(rnd() * 20) }, () => ({
        lengthMs: rnd() * 500,
        dirtyPages: Math.floor(rnd() * 1e5),
        pauseMs: rnd() * 50,
        bytes: Math.floor(rnd() * 1e8),
        transferMs: rnd() < 0.5 ? null : rnd() * 300,
        outputFrames: Math.floor(rnd() * 100),
      }));
      const start = rnd() * 1e6;
      const age = rnd() * 1.5 * p.maxEpochMs;
      const t: Telemetry = {
        nowMs: start + age,
        epochStartMs: start,
        history,
        output:
          rnd() < 0.5
            ? { frames: 0, bytes: 0, oldestMs: null }
            : { frames: 1 + Math.floor(rnd() * 50), bytes: 1000, oldestMs: rnd() * age },
        disk: { writes: Math.floor(rnd() * 100), flushes: Math.floor(rnd() * 3) },
        link: { bytesPerSec: rnd() < 0.3 ? null : rnd() * 1e10, rttMs: rnd() * 5 },
        backlog: Math.floor(rnd() * 6),
      };
      const d = p.decide(t);
      if (d.checkpoint) assert.ok(age >= p.minEpochMs, `${name}: checkpoint at age ${age} < min ${p.minEpochMs}`);
      else {
        assert.ok(age < p.maxEpochMs, `${name}: waits at age ${age} ≥ max ${p.maxEpochMs} (${d.reason})`);
        assert.ok(
          d.wakeAtMs - start <= p.maxEpochMs + 1e-6,
          `${name}: wakes at epoch age ${d.wakeAtMs - start} > max (${d.reason})`,
        );
        assert.ok(
          d.wakeAtMs - start >= Math.min(p.minEpochMs, age) - 1e-6 || d.wakeAtMs >= t.nowMs,
          `${name}: wake before min`,
        );
      }
      assert.ok(d.reason.length > 0);
    }
  }
});

test('the dirty curve is learnt sub-linear from history', () => {
  const hist = [5, 10, 20, 40, 80].map((l) => ({
    lengthMs: l,
    dirtyPages: 30 * l ** 0.6,
    pauseMs: 1,
    bytes: 0,
    transferMs: null,
    outputFrames: 0,
  }));
  const c = fitDirtyCurve(hist);
  assert.ok(Math.abs(c.b - 0.6) < 0.01 && Math.abs(c.a - 30) < 0.5, `a=${c.a} b=${c.b}`);
});

test('policy specs are checked with clear errors', () => {
  assert.throws(() => parsePolicy('nosuch'), /unknown policy/);
  assert.throws(() => parsePolicy('fixed:-3'), /positive/);
  assert.throws(() => parsePolicy('adaptive,min=50,max=10'), /min epoch above max/);
  assert.equal(parsePolicy('fixed:25ms').name, 'fixed:25ms');
});

test("pre-sends: a policy setting; the simulator charges the pause only the last interval's pages; the pause fit uses the pages a pause carried", () => {
  const p = parsePolicy('model,presend=50');
  assert.equal(p.presendMs, 50);
  assert.match(p.name, /presend:50ms/);
  assert.equal(parsePolicy('model,presend=off').presendMs, undefined);
  assert.equal(parsePolicy('model,presend=off').presendTargetPauseMs, undefined);
  assert.equal(parsePolicy('model,presend=off').name, 'model+presend:off');
  // Rubato's default policy pre-sends as presend=auto (only where it pays; only with Rubato's QEMU).
  assert.equal(parsePolicy('model').presendTargetPauseMs, AUTO_PRESEND_PAUSE_MS);
  assert.equal(parsePolicy('model').name, 'model');
  const w = syntheticWorkload({ pagesPerMs: 10, exponent: 0.9 });
  const without = simulate(parsePolicy('model,presend=off'), w, 20_000);
  const withPresend = simulate(parsePolicy('model,presend=50'), w, 20_000);
  assert.ok(
    withPresend.pausedMs < without.pausedMs / 2,
    `paused ${withPresend.pausedMs} ms against ${without.pausedMs} ms`,
  );
  assert.ok(withPresend.epochs.some((e) => e.pausePages !== undefined && e.pausePages < e.dirtyPages));
  // Pauses of 2 ms for 100 pages carried and 10 ms for 500, whatever the epochs dirtied in all.
  const hist: EpochRecord[] = [100, 500, 100, 500].map((n, i) => ({
    lengthMs: 500,
    dirtyPages: 4000 + i,
    pausePages: n,
    pauseMs: n === 100 ? 2 : 10,
    bytes: 1,
    transferMs: 1,
    outputFrames: 0,
  }));
  const fit = fitPauseOf(hist);
  assert.ok(
    Math.abs(fit.perPageMs - 0.02) < 1e-9 && Math.abs(fit.fixedMs) < 1e-9 + 0.05,
    `per page ${fit.perPageMs}, fixed ${fit.fixedMs}`,
  );
});

test('presend=last and presend=auto: one shared estimate of what the pause carries; auto plans passes only as often as the pause target needs, and none during the epoch on a saturated host', () => {
  assert.equal(parsePolicy('model,presend=last').presendMs, Number.POSITIVE_INFINITY);
  assert.match(parsePolicy('model,presend=last').name, /presend:last/);
  const auto = parsePolicy('model,presend=auto');
  assert.equal(auto.presendTargetPauseMs, AUTO_PRESEND_PAUSE_MS);
  assert.throws(() => parsePolicy('fixed:50,presend=auto'), /not auto/);
  assert.equal(parsePolicy('fixed:200,presend=40').presendMs, 40);
  assert.throws(() => parsePolicy('fixed:20,max=5'), /takes no max/);
  // D(T) = 10·T pages, pause 1 ms + 2 µs per page.
  const d = (t: number) => 10 * t;
  const pause = { fixedMs: 1, perPageMs: 0.002, pauseMs: (p: number) => 1 + 0.002 * p };
  assert.equal(pausePagesWithPresend(d, 0.002, 1000, undefined, true), 10_000); // no pre-sends: all of it
  assert.equal(pausePagesWithPresend(d, 0.002, 1000, 100, false), 1000); // output waits: the last interval's
  assert.equal(pausePagesWithPresend(d, 0.002, 1000, 100, true), 20); // a last pass of 1000 pages (2 ms): 20 left
  // last pass only: 10 000 pages, 20 ms
  assert.equal(pausePagesWithPresend(d, 0.002, 1000, Number.POSITIVE_INFINITY, true), 200);
  assert.equal(pausePagesWithPresend(d, 0.002, 10, 100, true), 100); // a young epoch gets no pass
  // Target 2 ms = 500 pages: the last pass alone leaves 200 → no passes during the epoch.
  assert.equal(presendIntervalFor(d, pause, 2, 1000), Number.POSITIVE_INFINITY);
  // A guest 10× faster: the last pass alone leaves 20 000 pages; passes every I leave 100·(0.002·100·I) = 20·I ≤ 500 →
  // I = 25 ms.
  const fast = (t: number) => 100 * t;
  const every = presendIntervalFor(fast, pause, 2, 1000);
  assert.ok(Math.abs(every - 25) < 0.01, `every ${every} ms`);
  // One the passes cannot keep up with: the shortest interval, best effort.
  assert.equal(
    presendIntervalFor((t) => 1e5 * t, pause, 2, 1000),
    MIN_PRESEND_MS,
  );
  const hist: EpochRecord[] = [100, 200, 400].map((T) => ({
    lengthMs: T,
    dirtyPages: 100 * T,
    pauseMs: 1 + 0.2 * T,
    bytes: 1,
    transferMs: 1,
    outputFrames: 0,
  }));
  assert.ok(Math.abs(presendEveryMs(auto, hist, null)! - 25) < 1);
  assert.equal(presendEveryMs(auto, hist, 0.05), Number.POSITIVE_INFINITY, 'a saturated host: the last pass only');
  assert.ok(Math.abs(presendEveryMs(auto, hist, 1.5)! - 25) < 1);
  // Pauses that would take under 2 % of the time: no pre-sends at all (a pass is not free either).
  const light: EpochRecord[] = [500, 1000].map((T) => ({
    lengthMs: T,
    dirtyPages: T,
    pauseMs: 1 + 0.002 * T,
    bytes: 1,
    transferMs: 1,
    outputFrames: 0,
  }));
  assert.equal(presendEveryMs(auto, light, 1.5), undefined);
  const talking = hist.map((e) => ({ ...e, outputFrames: e.lengthMs / 10 })); // 100 frames/s
  assert.equal(presendEveryMs(auto, talking, 1.5), Number.POSITIVE_INFINITY, 'a guest that talks: the last pass only');
  assert.equal(presendEveryMs(parsePolicy('model,presend=40'), hist, 0), 40, "a fixed interval is the operator's");
  assert.equal(presendEveryMs(parsePolicy('model,presend=off'), hist), undefined);
  // The simulator at 16× the dirty rate: auto keeps the pauses short where the plain model cannot.
  const w = syntheticWorkload({ pagesPerMs: 160, exponent: 0.9 });
  const plain = simulate(parsePolicy('model,presend=off'), w, 10_000);
  const planned = simulate(auto, w, 10_000);
  assert.ok(planned.pausedMs < plain.pausedMs / 5, `paused ${planned.pausedMs} ms against ${plain.pausedMs} ms`);
});

test('compare mode: matched output calls for no checkpoint (epochs stretch to the rails); late output calls for one now, rails permitting', () => {
  const inner = parsePolicy('model');
  const p = comparing(inner);
  const history: EpochRecord[] = Array.from({ length: 20 }, () => ({
    lengthMs: 100,
    dirtyPages: 200,
    pauseMs: 3,
    bytes: 200 * 4096,
    transferMs: 5,
    outputFrames: 40,
  }));
  const t = (age: number, frames: number, backlog = 0, bytesPerSec = 1e9): Telemetry => ({
    nowMs: 10_000 + age,
    epochStartMs: 10_000,
    history,
    output: frames ? { frames, bytes: frames * 100, oldestMs: 5 } : { frames: 0, bytes: 0, oldestMs: null },
    disk: { writes: 0, flushes: 0 },
    link: { bytesPerSec, rttMs: 0.2 },
    backlog,
  });
  // Buffer mode plans for the output rate it saw; compare mode does not (that output was matched).
  const quietBuffer = inner.decide(t(150, 0));
  const quietCompare = p.decide(t(150, 0));
  assert.equal(quietBuffer.checkpoint, true, `buffer mode: ${quietBuffer.reason}`);
  assert.equal(quietCompare.checkpoint, false, `compare mode: ${quietCompare.reason}`);
  assert.ok(
    !quietCompare.checkpoint && quietCompare.wakeAtMs >= 10_000 + 900,
    'it stretches towards the maximum epoch',
  );
  // A late (or differing) frame: a checkpoint now.
  const late = p.decide(t(150, 1));
  assert.deepEqual(late, { checkpoint: true, reason: late.reason });
  // …but the rails still hold: the backlog bound, the minimum epoch.
  assert.equal(p.decide(t(150, 1, 5)).checkpoint, false, 'a full backlog waits');
  assert.equal(p.decide(t(0.5, 1)).checkpoint, false, 'the minimum epoch waits');
  // A link too slow for the dirty rate holds buffer mode's output to the maximum epoch, not compare's late frames.
  const slow = inner.decide(t(150, 1, 0, 1e5));
  assert.deepEqual([slow.checkpoint, slow.reason], [false, 'link-bound']);
  assert.equal(p.decide(t(150, 1, 0, 1e5)).checkpoint, true, 'late output is not held by the link bound');
  assert.equal(p.decide(t(150, 0, 0, 1e5)).checkpoint, false);
  assert.equal(p.decide(t(1500, 0)).checkpoint, true, 'the maximum epoch checkpoints');
  assert.equal(p.name, inner.name);
});
