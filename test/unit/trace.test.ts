import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import {
  TraceRecorder,
  traceWorkload,
  writeTrace,
  decodePages,
  encodePages,
  pauseBusyMsOf,
  type Trace,
} from '../../src/sim/trace.ts';
import { simulateTrace } from '../../src/sim/cli.ts';
import { simulate } from '../../src/sim/simulate.ts';
import { parsePolicy } from '../../src/scheduler/index.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';

/** A recorded run at 10 ms epochs (~1 ms pause): epochs write 40 or 20 pages of a 400-page working set. */
function recorded(seconds: number, outputEveryMs?: number): Trace {
  const r = new TraceRecorder(
    { workload: 'test', policy: 'fixed:10ms', link: 'unlimited', cpus: 1, accel: 'tcg' },
    1000,
  );
  let cursor = 0;
  let n = 0;
  for (let t = 1000; t < 1000 + seconds * 1000; t += 11) {
    const k = n++ % 2 ? 20 : 40;
    const ids = new Uint32Array(k);
    for (let i = 0; i < k; i++) {
      ids[i] = cursor;
      cursor = (cursor + 1) % 400;
    }
    r.epoch(t, t + 10, 0.5 + 0.0125 * k, k * 4096 + 30_000, ids);
    if (outputEveryMs) for (let o = t; o < t + 11; o++) if ((o - 1000) % outputEveryMs === 0) r.output(o, 100);
  }
  return r.finish(1000 + seconds * 1000);
}

test('trace: page sets round-trip and a replay at the recorded epochs sees the recorded pages', () => {
  const ids = Uint32Array.from([0, 1, 2 ** 24 + 5, 2 ** 32 - 1]);
  assert.deepEqual([...decodePages(encodePages(ids))], [...ids]);
  const t = recorded(2);
  const replay = traceWorkload(t, 125_000);
  assert.ok(
    Math.abs(replay.pause.fixedMs - 0.5) < 0.05 && Math.abs(replay.pause.perPageMs - 0.0125) < 0.001,
    `pause model ${JSON.stringify(replay.pause)}`,
  );
  assert.equal(replay.overheadBytes, 30_000);
  assert.equal(replay.workload.dirtyPages(11, 0), 40, 'one recorded epoch (its run time and pause)');
  // Pages rewritten within a longer epoch count once: 10 recorded epochs cover the 400-page set.
  assert.equal(replay.workload.dirtyPages(10, 11), 20, 'the next recorded epoch, from the end of the pause before it');
  assert.equal(replay.workload.dirtyPages(220, 0), 400);
  assert.equal(replay.workload.dirtyPages(440, 0), 400, 'the working set bounds a long epoch');
  const half = replay.workload.dirtyPages(5, 0);
  assert.ok(half > 10 && half < 30, `half an epoch dirties about half its pages (${half})`);
  // Replayed on more vCPUs: disjoint copies of each set.
  assert.equal(traceWorkload(t, 125_000, { cpus: 4 }).workload.dirtyPages(220, 0), 1600);
});

test('trace: replay under other policies uses the same scheduler code and the recorded output', (tc) => {
  const dir = makeTempDir();
  tc.after(() => removeTempDir(dir));
  const f = join(dir, 'trace.json');
  writeTrace(f, recorded(5, 50));
  const same = simulateTrace(f, 'fixed:10ms', '10GbE');
  assert.ok(
    Math.abs(same.checkpointsPerSec - 1000 / 10.9) < 8,
    `replayed at the recorded period: ${same.checkpointsPerSec}/s vs ${same.recordedCheckpointsPerSec}/s recorded`,
  );
  assert.ok(
    same.dirtyPagesMedian >= 20 && same.dirtyPagesMedian <= 40,
    `same pages per epoch (${same.dirtyPagesMedian})`,
  );
  const slow = simulateTrace(f, 'fixed:250ms', '10GbE');
  assert.ok(
    slow.checkpointsPerSec < 4.5 && slow.dirtyPagesMedian === 400,
    `${slow.checkpointsPerSec}/s, ${slow.dirtyPagesMedian} pages`,
  );
  assert.ok(
    slow.pausedFraction < same.pausedFraction / 3,
    'fewer, larger checkpoints pause less in total (the working set saturates)',
  );
  assert.ok(
    slow.outputLatencyMsP50 !== null &&
      same.outputLatencyMsP50 !== null &&
      slow.outputLatencyMsP50 > same.outputLatencyMsP50 * 5,
    'output waits for its checkpoint',
  );
  const eight = simulateTrace(f, 'fixed:10ms', '10GbE', { cpus: 8 });
  assert.equal(eight.extrapolated, true);
  assert.ok(eight.dirtyPagesMedian >= 160, `8 vCPUs dirty ~8× (${eight.dirtyPagesMedian})`);
  assert.throws(
    () => simulateTrace(join(dir, 'nope.json'), 'model', '1GbE'),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG'),
  );
  // The direct API agrees with the CLI path.
  const r = simulate(parsePolicy('fixed:10ms'), traceWorkload(recorded(1), 1_250_000).workload, 900);
  assert.ok(r.checkpoints >= 75 && r.checkpoints <= 90, `${r.checkpoints} checkpoints in 0.9 s`);
});

test("trace: QEMU's own flushes while a checkpoint pauses the guest are not workload events", () => {
  const r = new TraceRecorder({ workload: 'disk', policy: 'fixed:25ms', link: 'unlimited', cpus: 1, accel: 'tcg' }, 0);
  for (let i = 0; i < 4; i++) r.epoch(i * 30, i * 30 + 25, 3, 50_000, new Uint32Array([i]));
  r.disk('flush', 26); // inside the first pause [25, 28]
  r.disk('flush', 40); // the guest's own, mid-epoch
  r.disk('flush', 86.5); // inside the third pause [85, 88]
  r.disk('write', 26);
  const t = r.finish(120);
  assert.deepEqual(t.diskFlushesMs, [40]);
  assert.deepEqual(t.diskWritesMs, [26]);
  const late = r.finish(120, 50);
  assert.equal(late.epochs.length, 2);
  assert.equal(late.epochs[0]!.startMs, 10);
  assert.deepEqual(late.diskFlushesMs, []);
});

test('simulate: closed-loop clients wait for their answers to be released', () => {
  const quiet = {
    dirtyPages: () => 50,
    output: () => 0,
    bandwidthBytesPerMs: () => 125_000,
    rttMs: 0.2,
    pauseMs: () => 1,
  };
  // 4 clients, 2 ms service, one commit per request, 25 ms epochs: a request waits for the epoch
  // it landed in to end, then the checkpoint's pause and transfer — about one epoch.
  const one = simulate(
    parsePolicy('fixed:25ms'),
    { ...quiet, clients: { count: 4, serviceMs: 2, commitsPerRequest: 1 } },
    5000,
  );
  const p50 = [...one.requestLatencyMs].sort((a, b) => a - b)[one.requestLatencyMs.length >> 1]!;
  assert.ok(p50 > 20 && p50 < 35, `closed loop at 25 ms epochs: p50 ${p50} ms`);
  assert.ok(
    one.requestLatencyMs.length > (4 * 5000) / 40 && one.requestLatencyMs.length < (4 * 5000) / 20,
    `${one.requestLatencyMs.length} requests`,
  );
  // Three commits per request (a handshake, a response in windows): three epochs each.
  const three = simulate(
    parsePolicy('fixed:25ms'),
    { ...quiet, clients: { count: 4, serviceMs: 2, commitsPerRequest: 3 } },
    5000,
  );
  const p50b = [...three.requestLatencyMs].sort((a, b) => a - b)[three.requestLatencyMs.length >> 1]!;
  assert.ok(p50b > 2.5 * p50 && p50b < 3.5 * p50, `three commits: p50 ${p50b} vs ${p50}`);
  // A policy that checkpoints on output answers far sooner.
  const eager = simulate(
    parsePolicy('net-io'),
    { ...quiet, clients: { count: 4, serviceMs: 2, commitsPerRequest: 1 } },
    5000,
  );
  const p50e = [...eager.requestLatencyMs].sort((a, b) => a - b)[eager.requestLatencyMs.length >> 1]!;
  assert.ok(p50e < p50 / 2, `net-io p50 ${p50e} vs fixed ${p50}`);
});

test('trace: a page written in every recorded epoch is in every part of one; a page written once is in one part', () => {
  // Epochs of 10 ms each write page 7 (hot: every epoch) and one page of a 400-page sweep.
  const r = new TraceRecorder({ workload: 'hot', policy: 'fixed:10ms', link: 'unlimited', cpus: 1, accel: 'tcg' }, 0);
  for (let i = 0; i < 200; i++) r.epoch(i * 11, i * 11 + 10, 1, 10_000, Uint32Array.from([7, 1000 + (i % 400)]));
  const w = traceWorkload(r.finish(200 * 11), 125_000).workload;
  let hot = 0;
  let swept = 0;
  for (let i = 0; i < 100; i++) {
    // the two halves of recorded epoch i
    const a = w.dirtyPages(5, i * 11);
    const b = w.dirtyPages(6, i * 11 + 5);
    hot += Number(a >= 1 && b >= 1);
    swept += a + b - 2; // beyond the hot page in each half
  }
  // written ~6 times an epoch (present in all 200 recorded, rate capped at f = 1 − 0.5/200): both halves ~90%
  assert.ok(hot >= 82, `hot page in both halves of ${hot}/100 epochs`);
  assert.ok(swept >= 90 && swept <= 110, `each swept page lands in one half only: ${swept} for 100 epochs`);
});

test('simulate: clients answer in frames spread over a stage, wake the policy, and are slowed by checkpoints', () => {
  const quiet = {
    dirtyPages: () => 50,
    output: () => 0,
    bandwidthBytesPerMs: () => 125_000,
    rttMs: 0.2,
    pauseMs: () => 1,
  };
  const p50 = (r: ReturnType<typeof simulate>) =>
    [...r.requestLatencyMs].sort((a, b) => a - b)[r.requestLatencyMs.length >> 1]!;
  // A stage ends when all its frames are released: 5 frames per answer, 10 per request.
  const spread = simulate(
    parsePolicy('fixed:25ms'),
    { ...quiet, clients: { count: 2, serviceMs: 8, commitsPerRequest: 2, framesPerAnswer: 5 } },
    5000,
  );
  assert.equal(
    spread.outputLatencyMs.length - (spread.outputLatencyMs.length % 5),
    spread.outputLatencyMs.length,
    'whole answers released',
  );
  assert.ok(
    Math.abs(spread.outputLatencyMs.length / spread.requestLatencyMs.length - 10) < 1,
    `${spread.outputLatencyMs.length} frames for ${spread.requestLatencyMs.length} requests`,
  );
  // Client frames wake a waiting policy: adaptive checkpoints on them, not at its quiet timer.
  const adaptive = simulate(
    parsePolicy('adaptive'),
    { ...quiet, clients: { count: 4, serviceMs: 2, commitsPerRequest: 1 } },
    5000,
  );
  assert.ok(p50(adaptive) < 12, `adaptive answers within a few ms of the answer: p50 ${p50(adaptive)} ms`);
  // Each checkpoint costs the guest time beyond its pause: answers in progress wait for it.
  const stalled = simulate(
    parsePolicy('fixed:10ms'),
    { ...quiet, guestStallMs: 8, clients: { count: 1, serviceMs: 15, commitsPerRequest: 1 } },
    5000,
  );
  const free = simulate(
    parsePolicy('fixed:10ms'),
    { ...quiet, clients: { count: 1, serviceMs: 15, commitsPerRequest: 1 } },
    5000,
  );
  assert.ok(p50(stalled) > p50(free) + 3, `stalled p50 ${p50(stalled)} vs ${p50(free)} ms`);
  // Released output reaches clients only once the primary's loop is done with the checkpoint.
  const eager = (stall: number) =>
    simulate(
      parsePolicy('net-io'),
      { ...quiet, guestStallMs: stall, clients: { count: 1, serviceMs: 1, commitsPerRequest: 1 } },
      3000,
    );
  assert.ok(p50(eager(10)) >= p50(eager(0)) + 5, `relay behind a busy loop: ${p50(eager(10))} vs ${p50(eager(0))} ms`);
});

test('simulate: the standby works on a checkpoint as its bytes arrive — its per-byte work overlaps the link', () => {
  // 1 MB checkpoints over a 1 Gbit/s-class link (8.4 ms) to a standby doing 8 ms/MB and 1 ms at the end.
  const w = {
    dirtyPages: () => 250,
    output: () => 0,
    bandwidthBytesPerMs: () => 125_000,
    rttMs: 0.2,
    pauseMs: () => 1,
    standby: { fixedMs: 1, perByteMs: 8 / 1e6 },
  };
  const r = simulate(parsePolicy('fixed:100ms'), w, 2000);
  const acks = r.epochs.filter((e) => e.transferMs !== null).map((e) => e.transferMs!);
  const link = (250 * 4096 + 32_000) / 125_000;
  assert.ok(
    acks.length > 10 && acks.every((a) => Math.abs(a - (link + 1 + 0.2)) < 0.6),
    `send → ack ${acks[0]} ms: the slower of link (${link.toFixed(1)} ms) and standby, plus its commit — not their sum`,
  );
  // A standby slower than the link sets the pace instead.
  const slow = simulate(parsePolicy('fixed:100ms'), { ...w, standby: { fixedMs: 1, perByteMs: 20 / 1e6 } }, 2000);
  const t = slow.epochs.find((e) => e.transferMs !== null)!.transferMs!;
  assert.ok(Math.abs(t - ((20 * (250 * 4096 + 32_000)) / 1e6 + 1 + 0.2)) < 0.6, `slow standby: ${t} ms`);
});

test('trace: pauses taken while the standby is still busy are measured longer, and replayed so', () => {
  // Every third checkpoint's predecessor is acknowledged late (after this pause began): those pauses take 1 ms more.
  const r = new TraceRecorder({ workload: 'busy', policy: 'fixed:10ms', link: 'unlimited', cpus: 1, accel: 'tcg' }, 0);
  const handles: number[] = [];
  for (let i = 0; i < 60; i++)
    handles.push(r.epoch(i * 12, i * 12 + 10, i > 0 && i % 3 === 0 ? 2 : 1, 50_000, Uint32Array.from([i])));
  for (let i = 0; i < 60; i++) r.acked(handles[i]!, (i + 1) % 3 === 0 ? 15 : 3);
  const t = r.finish(60 * 12);
  assert.ok(Math.abs(pauseBusyMsOf([t], 0) - 1) < 1e-6, `busy pauses +${pauseBusyMsOf([t], 0)} ms`);
  assert.equal(pauseBusyMsOf([t], 0, 100), 0, 'too few of either: no claim');
  // Replayed with it: the fit takes it off the busy pauses, the simulator adds it back when busy.
  const w = traceWorkload(t, 1_250_000, { pauseBusyMs: 1 });
  assert.ok(Math.abs(w.pause.fixedMs - 1) < 1e-6, `idle pause fitted at ${w.pause.fixedMs} ms`);
  const slow = simulate(parsePolicy('fixed:10ms'), { ...w.workload, standby: { fixedMs: 15, perByteMs: 0 } }, 600);
  assert.ok(
    slow.epochs.slice(2).every((e) => Math.abs(e.pauseMs - 2) < 1e-6),
    'a standby always behind: every pause is a busy one',
  );
});
