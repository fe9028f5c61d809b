// The latency breakdown: a released frame's time split into its checkpoint's segments.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LatencyBreakdown, SEGMENTS, formatBreakdown, segmentsOf } from '../../src/replication/latency.ts';
import { EpochPipeline, type Command } from '../../src/replication/pipeline.ts';
import { OutputCommit } from '../../src/commit/output-commit.ts';
import { netIo, DEFAULT_RAILS } from '../../src/scheduler/policies.ts';
import { decodeAckTimings, encodeAckTimings } from '../../src/replication/protocol/messages.ts';
import { isRubatoError } from '../../src/util/errors.ts';

const timeline = {
  epoch: 1,
  decidedMs: 10,
  pauseBeganMs: 11,
  resumedMs: 13,
  encodedMs: 13.5,
  sentMs: 14,
  ackedMs: 17,
  standby: { queuedMs: 0.5, commitMs: 1, receiveMs: 0.7 },
};

test("segments add up to the frame's time from sent to released", () => {
  const s = segmentsOf(timeline, 4, 17.25);
  assert.deepEqual(s, {
    wait: 6,
    trigger: 1,
    pause: 2,
    encode: 0.5,
    send: 0.5,
    link: 1.5,
    standbyQueue: 0.5,
    standbyCommit: 1,
    release: 0.25,
  });
  assert.equal(
    SEGMENTS.reduce((a, k) => a + s[k], 0),
    17.25 - 4,
  );
  // A frame sent after the decision (before the pause) waits from its own send.
  const late = segmentsOf(timeline, 10.5, 17.25);
  assert.equal(late.wait, 0);
  assert.equal(late.trigger, 0.5);
  assert.equal(
    SEGMENTS.reduce((a, k) => a + late[k], 0),
    17.25 - 10.5,
  );
});

test('the breakdown summarises per segment; reset starts a window', () => {
  const b = new LatencyBreakdown();
  b.add(timeline, [4, 6, 8], 17.25);
  const s = b.summary();
  assert.equal(s.frames, 3);
  assert.equal(s.wait.p50, 4);
  assert.equal(s.total.mean, (13.25 + 11.25 + 9.25) / 3);
  assert.equal(s.pause.p99, 2);
  assert.match(formatBreakdown(s), /wait 4\.00 \+ trigger 1\.00 \+ pause 2\.00/);
  b.reset();
  assert.equal(b.summary().frames, 0);
});

test('the pipeline hands each release the timeline of its checkpoint', () => {
  const commit = new OutputCommit(1 << 20);
  const p = new EpochPipeline({ policy: netIo(DEFAULT_RAILS), commit, maxInflight: 4 });
  p.startSync();
  p.paused(0, 0);
  p.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 0, bytes: 0, resumedMs: 0 });
  p.sent(0, 0);
  p.ack(0, 1);
  commit.push(Buffer.from('reply'), 5);
  const c = p.decide(6, { disk: { writes: 0, flushes: 0 }, link: { bytesPerSec: null, rttMs: 0.1 } });
  assert.equal(c.cmd, 'capture');
  p.paused(1, 7);
  p.capturedCheckpoint(1, { dirtyPages: 3, pauseMs: 2, bytes: 100, resumedMs: 9, encodedMs: 9.5 });
  p.sent(1, 10);
  const rel = p
    .ack(1, 12, { queuedMs: 0, commitMs: 0.5, receiveMs: 0.2 })
    .find((x): x is Extract<Command, { cmd: 'release' }> => x.cmd === 'release')!;
  assert.deepEqual(rel.timeline, {
    epoch: 1,
    decidedMs: 6,
    pauseBeganMs: 7,
    resumedMs: 9,
    encodedMs: 9.5,
    sentMs: 10,
    ackedMs: 12,
    standby: { queuedMs: 0, commitMs: 0.5, receiveMs: 0.2 },
  });
  assert.deepEqual(
    rel.frames.map((f) => f.atMs),
    [5],
  );
});

test('ack timings: round trip, empty from an older standby, any other length a protocol error', () => {
  assert.deepEqual(decodeAckTimings(encodeAckTimings({ queuedMs: 1.5, commitMs: 0.25, receiveMs: 2 })), {
    queuedMs: 1.5,
    commitMs: 0.25,
    receiveMs: 2,
  });
  assert.equal(decodeAckTimings(Buffer.alloc(0)), null);
  assert.throws(
    () => decodeAckTimings(Buffer.alloc(8)),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
  // Negative or absurd durations are clamped, never wrapped.
  assert.deepEqual(decodeAckTimings(encodeAckTimings({ queuedMs: -3, commitMs: 1e12, receiveMs: 0 })), {
    queuedMs: 0,
    commitMs: 0xffffffff / 1000,
    receiveMs: 0,
  });
});
