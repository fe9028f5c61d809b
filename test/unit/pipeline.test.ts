// The epoch pipeline, driven by hand and by a seeded random schedule: its invariants hold under
// any order of acks, link losses, give-ups and fences, and it says what to do at each step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EpochPipeline, type Command, type Observed } from '../../src/replication/pipeline.ts';
import { OutputCommit } from '../../src/commit/output-commit.ts';
import { fixed } from '../../src/scheduler/index.ts';

const seen: Observed = { disk: { writes: 0, flushes: 0 }, link: { bytesPerSec: null, rttMs: 0.1 } };

function protectedPipeline(maxInflight = 4, maxInflightBytes?: number, policy = fixed(10)) {
  const commit = new OutputCommit(1 << 20);
  const p = new EpochPipeline({
    policy,
    commit,
    maxInflight,
    ...(maxInflightBytes ? { maxInflightBytes } : {}),
  });
  assert.deepEqual(p.startSync(), [{ cmd: 'capture', epoch: 0, reason: 'sync' }]);
  p.paused(0, 0);
  assert.deepEqual(p.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 0, bytes: 0, resumedMs: 0 }), [
    { cmd: 'send', epoch: 0 },
  ]);
  p.sent(0, 0);
  const cmds = p.ack(0, 1);
  assert.equal(p.phase, 'protecting');
  assert.ok(cmds.some((c) => c.cmd === 'protected'));
  return { p, commit };
}

/** Takes checkpoint `epoch` of `bytes` at time t (decision, capture, send). */
function checkpoint(p: EpochPipeline, epoch: number, t: number, decided = false, bytes = 40_000) {
  if (!decided) {
    const c = p.decide(t, seen);
    assert.equal(c.cmd, 'capture');
    assert.equal((c as { epoch: number }).epoch, epoch);
  }
  p.paused(epoch, t);
  p.capturedCheckpoint(epoch, { dirtyPages: Math.round(bytes / 4096), pauseMs: 1, bytes, resumedMs: t + 1 });
  p.sent(epoch, t + 1);
}

test('a checkpoint when the policy says so, output released only at its ack', () => {
  const { p, commit } = protectedPipeline();
  const w = p.decide(5, seen);
  assert.equal(w.cmd, 'wait');
  assert.equal((w as { untilMs: number }).untilMs, 10);
  commit.push(Buffer.from('hello'), 6);
  const c = p.decide(11, seen);
  assert.equal(c.cmd, 'capture');
  assert.equal((c as { epoch: number }).epoch, 1);
  checkpoint(p, 1, 11, true);
  assert.equal(p.history.at(-1)!.outputFrames, 1);
  const out = p.ack(1, 20);
  const rel = out.find((x): x is Extract<Command, { cmd: 'release' }> => x.cmd === 'release')!;
  assert.deepEqual(
    rel.frames.map((f) => String(f.frame)),
    ['hello'],
  );
  assert.equal(rel.transferMs, 8);
  assert.equal(p.history.at(-1)!.transferMs, 8);
});

test('a full backlog waits for an ack instead of capturing', () => {
  const { p } = protectedPipeline(2);
  checkpoint(p, (p.decide(11, seen) as { epoch: number }).epoch, 11, true);
  checkpoint(p, (p.decide(30, seen) as { epoch: number }).epoch, 30, true);
  assert.deepEqual(p.decide(50, seen), { cmd: 'wait-ack' });
  assert.equal(p.stats().waitsForLink, 1);
  p.ack(1, 51);
  assert.equal(p.decide(52, seen).cmd, 'capture');
});

test('acks out of order, for unsent checkpoints or twice are invariant violations', () => {
  const { p } = protectedPipeline();
  checkpoint(p, 1, 11);
  checkpoint(p, 2, 30);
  assert.equal(p.expectsAck(2), false);
  assert.throws(() => p.ack(2, 40), /invariant violated: pipeline: ack for 2, expected 1/);
  p.ack(1, 41);
  p.ack(2, 42);
  assert.throws(() => p.ack(2, 43), /invariant/);
  // captured but not yet handed to the link: no ack can be for it
  p.decide(60, seen);
  p.paused(3, 60);
  p.capturedCheckpoint(3, { dirtyPages: 1, pauseMs: 1, bytes: 1, resumedMs: 61 });
  assert.equal(p.expectsAck(3), false);
  assert.throws(() => p.ack(3, 62), /before it was sent/);
});

test('epochs increase by one within a generation; a capture out of turn is caught', () => {
  const { p } = protectedPipeline();
  p.decide(11, seen);
  assert.throws(() => p.paused(2, 11), /paused for checkpoint 2, capturing 1/);
});

test('link loss: says so once, keeps output held, a resync starts a new generation that covers it', () => {
  const { p, commit } = protectedPipeline();
  commit.push(Buffer.from('x'), 2);
  checkpoint(p, 1, 11);
  const lost = p.linkLost('standby gone');
  assert.deepEqual(lost, [{ cmd: 'unprotected', reason: 'standby gone', first: true }]);
  assert.deepEqual(p.linkLost('still gone'), [{ cmd: 'unprotected', reason: 'still gone', first: false }]);
  assert.equal(p.lossReason, 'still gone', 'status says why');
  assert.equal(commit.stats(20).frames, 1, 'held output stays held');
  p.startSync();
  assert.equal(p.generation, 2);
  p.paused(0, 30);
  p.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 0, bytes: 0, resumedMs: 30 });
  p.sent(0, 30);
  const out = p.ack(0, 31);
  assert.deepEqual(
    out.flatMap((c) => (c.cmd === 'release' ? c.frames.map((f) => String(f.frame)) : [])),
    ['x'],
  );
  assert.equal(p.phase, 'protecting');
  assert.equal(p.lossReason, null);
  // protected again: the next loss is reported again
  assert.equal((p.linkLost('again')[0] as { first: boolean }).first, true);
});

test('the hold timer releases held output unprotected, counted, only while unprotected', () => {
  const { p, commit } = protectedPipeline();
  commit.push(Buffer.from('y'), 2);
  assert.deepEqual(p.holdExpired('no standby'), [], 'a protected guest keeps holding');
  p.linkLost('gone');
  const r = p.holdExpired('no standby for 2000 ms');
  assert.equal(r.length, 1);
  assert.equal(r[0]!.cmd, 'release-unprotected');
  assert.deepEqual(commit.state, { kind: 'unprotected', reason: 'no standby for 2000 ms' });
  assert.equal(commit.stats(0).counts.releasedUnprotected, 1);
  assert.equal(String(commit.push(Buffer.from('z'), 3)), 'z', 'later output passes through');
});

test('a fence takes the last checkpoint with its real epoch and stops the guest after its ack', () => {
  const { p, commit } = protectedPipeline();
  checkpoint(p, 1, 11);
  commit.push(Buffer.from('last'), 12);
  p.fenceRequested();
  assert.deepEqual(p.decide(13, seen), { cmd: 'fence', epoch: 2 });
  checkpoint(p, 2, 13, true);
  assert.equal(
    p.ack(1, 15).some((c) => c.cmd === 'stop-guest'),
    false,
  );
  const out = p.ack(2, 16);
  assert.deepEqual(
    out.flatMap((c) => (c.cmd === 'release' ? c.frames.map((f) => String(f.frame)) : [])),
    ['last'],
  );
  assert.ok(out.some((c) => c.cmd === 'stop-guest'));
  assert.equal(p.phase, 'fenced');
});

test('property: under random acks, losses and give-ups, no frame leaves above the acknowledged epoch', () => {
  let seed = 11;
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  let releasedTotal = 0;
  let acksTotal = 0;
  for (let run = 0; run < 100; run++) {
    const commit = new OutputCommit(1 << 30);
    const p = new EpochPipeline({ policy: fixed(5), commit, maxInflight: 3 });
    const epochOf = new Map<string, { gen: number; epoch: number }>();
    let t = 0;
    let id = 0;
    let unprotected = true;
    const check = (cmds: Command[]) => {
      for (const c of cmds) {
        if (c.cmd !== 'release') continue;
        for (const f of c.frames) {
          const e = epochOf.get(String(f.frame))!;
          // a frame from an earlier generation is covered by this generation's full image (epoch 0)
          const epoch = e.gen === p.generation ? e.epoch : 0;
          assert.ok(
            epoch <= c.epoch && c.epoch <= p.ackedEpoch,
            `frame of epoch ${epoch} released at ${c.epoch} with ${p.ackedEpoch} acked`,
          );
          epochOf.delete(String(f.frame));
          releasedTotal++;
        }
      }
    };
    for (let step = 0; step < 400; step++) {
      t += 1 + rnd(4);
      const op = rnd(12);
      if (p.phase === 'unprotected') {
        if (op < 3) {
          p.startSync();
          p.paused(0, t);
          p.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 0, bytes: 0, resumedMs: t });
          p.sent(0, t);
        } else if (op < 4) {
          const r = p.holdExpired('give up');
          if (r.length) unprotected = true;
        }
      } else if (op < 4) {
        const name = `f${id++}`;
        if (commit.push(Buffer.from(name), t) === null)
          epochOf.set(name, { gen: p.generation, epoch: commit.openEpoch });
        else assert.ok(!commit.holding, 'a frame passed through while holding');
      } else if (op < 7 && p.phase === 'protecting') {
        const c = p.decide(t, seen);
        if (c.cmd === 'capture') checkpoint(p, c.epoch, t, true);
      } else if (op < 10) {
        const head = p.stats().inflight > 0 ? p.stats().ackedEpoch + 1 : null;
        if (head !== null && p.expectsAck(head)) {
          const cmds = p.ack(head, t);
          acksTotal++;
          if (cmds.some((c) => c.cmd === 'protected')) unprotected = false;
          check(cmds);
        }
      } else if (op < 11) {
        p.linkLost('cut');
      }
      if (!unprotected) assert.ok(commit.holding || p.phase !== 'protecting');
    }
  }
  // the schedule really exercised the pipeline
  assert.ok(acksTotal > 1000 && releasedTotal > 1000, `${acksTotal} acks, ${releasedTotal} frames released`);
});

test('the disk log at its bound ends the epoch whatever the policy says', () => {
  const { p } = protectedPipeline();
  assert.equal(p.decide(2, seen).cmd, 'wait', 'fixed:10 waits at 2 ms');
  const c = p.decide(2, { ...seen, disk: { writes: 1, flushes: 0, pressure: true } });
  assert.deepEqual(c, { cmd: 'capture', epoch: 1, reason: 'disk-pressure' });
});

test('memory rails: no policy lets an epoch run past the estimated checkpoint bound; a large checkpoint in flight goes alone', () => {
  const commit = new OutputCommit(1 << 20);
  // A policy that would wait a minute; 4 MiB bound (1024 pages), 8 MiB in flight.
  const p = new EpochPipeline({
    policy: fixed(60_000),
    commit,
    maxInflight: 4,
    maxCheckpointBytes: 4 << 20,
    maxInflightBytes: 8 << 20,
  });
  p.startSync();
  p.paused(0, 0);
  p.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 0, bytes: 0, resumedMs: 0 });
  p.sent(0, 0);
  p.ack(0, 1);
  // The first epoch of a generation is short: nothing is known of the guest's dirty rate yet.
  const first = p.decide(1, seen) as { cmd: string; untilMs: number; reason: string };
  assert.equal(first.cmd, 'wait');
  assert.equal(first.untilMs, 100);
  assert.equal((p.decide(100, seen) as { reason: string }).reason, 'size-bound');
  p.paused(1, 100);
  // 100 pages in 100 ms: the bound (1024 pages) is reached at 1024 ms, if the set keeps growing linearly.
  p.capturedCheckpoint(1, { dirtyPages: 100, pauseMs: 1, bytes: 400_000, resumedMs: 101 });
  p.sent(1, 101);
  p.ack(1, 102);
  const w = p.decide(102, seen) as { cmd: string; untilMs: number };
  assert.equal(w.cmd, 'wait');
  assert.equal(w.untilMs, 101 + 1024);
  assert.equal((p.decide(1125, seen) as { reason: string }).reason, 'size-bound');
  p.paused(2, 1125);
  p.capturedCheckpoint(2, { dirtyPages: 2300, pauseMs: 5, bytes: 9 << 20, resumedMs: 1130 });
  p.sent(2, 1130);
  // 2300 pages in 1024 ms, well over the bound: the next epoch is cut to size (1024 × 1024/2300 ms).
  const cut = p.decide(1131, seen) as { cmd: string; untilMs: number };
  assert.equal(cut.cmd, 'wait');
  assert.ok(Math.abs(cut.untilMs - (1130 + (1024 * 1024) / 2300)) < 1e-6);
  // Due, but a checkpoint of 9 MiB is in flight (bound 8 MiB): it waits for its acknowledgement.
  assert.deepEqual(p.decide(1600, seen), { cmd: 'wait-ack' });
  p.ack(2, 1601);
  assert.equal((p.decide(1602, seen) as { reason: string }).reason, 'size-bound');
  p.paused(3, 1602);
  // A working set a little over the bound (1200 pages in 472 ms) may have saturated: the next epoch may double.
  p.capturedCheckpoint(3, { dirtyPages: 1200, pauseMs: 3, bytes: 5 << 20, resumedMs: 1605 });
  p.sent(3, 1605);
  p.ack(3, 1606);
  const kept = p.decide(1606, seen) as { cmd: string; untilMs: number };
  assert.equal(kept.untilMs, 1605 + 2 * 472);
  // Pre-sent: 5000 pages in all but 300 left for the pause: the bound no longer sets the epoch's length …
  assert.equal(p.decide(2549, seen).cmd, 'capture');
  p.paused(4, 2549);
  p.capturedCheckpoint(4, { dirtyPages: 5000, pausePages: 300, pauseMs: 1, bytes: 2 << 20, resumedMs: 2550 });
  p.sent(4, 2550);
  p.ack(4, 2551);
  assert.equal((p.decide(2551, seen) as { untilMs: number }).untilMs, 2550 + 60_000);
  // … unless the pause itself carried about the bound (the passes did not keep up).
  assert.equal(p.decide(62_550, seen).cmd, 'capture');
  p.paused(5, 62_550);
  p.capturedCheckpoint(5, { dirtyPages: 5000, pausePages: 900, pauseMs: 9, bytes: 4 << 20, resumedMs: 62_560 });
  p.sent(5, 62_560);
  p.ack(5, 62_561);
  assert.ok((p.decide(62_561, seen) as { untilMs: number }).untilMs < 62_560 + 60_000);
});

function presendPipeline(policy: ReturnType<typeof fixed>, maxInflightBytes?: number) {
  return protectedPipeline(4, maxInflightBytes, policy).p;
}
const canPresend: Observed = { ...seen, canPresend: true };

test("pipeline: the pre-send plan is the pipeline's: a pass every interval of a long epoch, a last pass before the pause, none while output waits", () => {
  const p = presendPipeline(fixed(80, 20));
  // Without a capture that can pre-send, nothing is planned.
  assert.deepEqual(p.decide(5, seen), { cmd: 'wait', untilMs: 80, reason: 'min-epoch' });
  // With one: wait for the first interval, then a pass of the coming checkpoint 1.
  assert.deepEqual(p.decide(5, canPresend), { cmd: 'wait', untilMs: 20, reason: 'min-epoch' });
  assert.deepEqual(p.decide(20, canPresend), { cmd: 'presend', epoch: 1, reason: 'interval' });
  assert.throws(() => p.decide(21, canPresend), /during a pre-send/, 'one thing at a time');
  p.presented(100, 22);
  assert.deepEqual(p.decide(22, canPresend), { cmd: 'wait', untilMs: 42, reason: 'min-epoch' });
  assert.equal(p.decide(42, canPresend).cmd, 'presend');
  p.presented(50, 43);
  // Past 1.5 intervals before the checkpoint no pass is started mid-epoch …
  assert.deepEqual(p.decide(50, canPresend), { cmd: 'wait', untilMs: 80, reason: 'min-epoch' });
  // … and the due checkpoint gets its last pass first, then goes without asking the policy again.
  assert.deepEqual(p.decide(80, canPresend), { cmd: 'presend', epoch: 1, reason: 'last-pass' });
  p.presented(10, 81);
  assert.deepEqual(p.decide(81, canPresend), { cmd: 'capture', epoch: 1, reason: 'max-epoch' });
  p.paused(1, 81);
  p.capturedCheckpoint(1, { dirtyPages: 170, pausePages: 10, pauseMs: 1, bytes: 40_960, resumedMs: 82 });
  p.sent(1, 82);
  // Output waiting: the due checkpoint goes without a last pass (its reply would wait longer).
  const q = protectedPipeline(4, undefined, fixed(80, 20));
  q.commit.push(Buffer.alloc(60), 50);
  assert.deepEqual(q.p.decide(80, canPresend), { cmd: 'capture', epoch: 1, reason: 'max-epoch' });
});

test('pipeline: a lost link or a fence ends a pre-send plan; a pass ending that was not asked for fails', () => {
  const p = presendPipeline(fixed(100, 20));
  assert.throws(() => p.presented(1, 3), /not asked for/);
  assert.equal(p.decide(20, canPresend).cmd, 'presend');
  p.linkLost('reset');
  assert.throws(() => p.presented(1, 21), /while unprotected/);
  const f = presendPipeline(fixed(80, 20));
  assert.equal(f.decide(80, canPresend).cmd, 'presend'); // the last pass before checkpoint 1
  f.presented(5, 81);
  f.fenceRequested();
  assert.deepEqual(f.decide(81, canPresend), { cmd: 'fence', epoch: 1 }, 'a fence goes before the deferred checkpoint');
});

test('pipeline: pre-sent bytes count toward the in-flight bound; no pre-send past it, and a due checkpoint waits for an ack', () => {
  const p = presendPipeline(fixed(10, 2), 8 << 20);
  checkpoint(p, 1, 11, false, 6 << 20); // in flight, not acknowledged
  assert.equal(p.unackedBytes(), 6 << 20);
  assert.deepEqual(p.decide(14, canPresend), { cmd: 'presend', epoch: 2, reason: 'interval' }, 'room for a pass');
  // 512 pages pre-sent (2 MiB): the bound is reached; no further pass.
  p.presented(512, 15);
  assert.equal(p.unackedBytes(), 8 << 20);
  assert.deepEqual(p.decide(17, canPresend), { cmd: 'wait', untilMs: 22, reason: 'min-epoch' });
  // Checkpoint 2 is due but waits for checkpoint 1's acknowledgement (no last pass either).
  assert.deepEqual(p.decide(30, canPresend), { cmd: 'wait-ack' });
  p.ack(1, 31);
  assert.equal(p.unackedBytes(), 2 << 20, "only the coming checkpoint's pre-sent pages");
  assert.deepEqual(p.decide(32, canPresend), { cmd: 'presend', epoch: 2, reason: 'last-pass' });
});

test('pipeline: a checkpoint deferred behind its last pass keeps waiting for room, with no second pass', () => {
  const p = presendPipeline(fixed(10, 2), 8 << 20);
  checkpoint(p, 1, 11, false, 4 << 20);
  assert.deepEqual(p.decide(22, canPresend), { cmd: 'presend', epoch: 2, reason: 'last-pass' });
  p.presented(1024, 23); // 4 MiB more: the 8 MiB bound is reached
  assert.deepEqual(p.decide(24, canPresend), { cmd: 'wait-ack' });
  p.ack(1, 25);
  assert.deepEqual(p.decide(26, canPresend), { cmd: 'capture', epoch: 2, reason: 'max-epoch' });
});

test('pipeline: with nothing in flight a checkpoint goes however much was pre-sent (no wait for an ack that cannot come)', () => {
  const p = presendPipeline(fixed(10, 2), 1 << 20);
  assert.equal(p.decide(2, canPresend).cmd, 'presend');
  p.presented(1024, 5); // 4 MiB, over the 1 MiB bound, in one pass
  assert.deepEqual(
    p.decide(11, canPresend),
    { cmd: 'capture', epoch: 1, reason: 'max-epoch' },
    'no last pass past the bound',
  );
});
