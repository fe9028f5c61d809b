// Compare mode's pure parts: what two runs of one state must agree on (frameIdentity), the
// per-connection, per-epoch pairing (FrameComparator) and output commit's early release.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FrameComparator, frameIdentity, tcpChecksum } from '../../src/commit/compare.ts';
import { DEFAULT_MODE_CHOOSER, ModeChooser } from '../../src/commit/mode-chooser.ts';
import { OutputCommit } from '../../src/commit/output-commit.ts';
import {
  CompareSide,
  DEFAULT_COMPARE_LAG_MS,
  IN_FLIGHT_SLACK_BYTES,
  SECONDARY_SILENT_MS,
} from '../../src/replication/compare-side.ts';
import type { Link } from '../../src/replication/link.ts';
import { splitNetFrames } from '../../src/replication/protocol/messages.ts';
import type { GuestNet } from '../../src/io/index.ts';

/** A length-prefixed Ethernet/IPv4/TCP frame. */
function tcp(o: {
  sport?: number;
  dport?: number;
  seq: number;
  ack?: number;
  flags?: number;
  payload?: string;
  ipId?: number;
  window?: number;
  tsval?: number;
  /** IPv4 addresses (default 10.0.0.2 > 10.0.0.1: the guest's output). */
  src?: number;
  dst?: number;
}): Buffer {
  const payload = Buffer.from(o.payload ?? '');
  const opts = Buffer.alloc(12); // NOP NOP timestamps
  opts[0] = 1;
  opts[1] = 1;
  opts[2] = 8;
  opts[3] = 10;
  opts.writeUInt32BE(o.tsval ?? 1000, 4);
  const th = Buffer.alloc(20);
  th.writeUInt16BE(o.sport ?? 7000, 0);
  th.writeUInt16BE(o.dport ?? 40000, 2);
  th.writeUInt32BE(o.seq, 4);
  th.writeUInt32BE(o.ack ?? 1, 8);
  th[12] = ((20 + opts.length) / 4) << 4;
  th[13] = o.flags ?? 0x18;
  th.writeUInt16BE(o.window ?? 500, 14);
  th.writeUInt16BE(0xbeef, 16); // checksum: differs with the options
  const ip = Buffer.alloc(20);
  ip[0] = 0x45;
  ip.writeUInt16BE(20 + th.length + opts.length + payload.length, 2);
  ip.writeUInt16BE(o.ipId ?? 1, 4);
  ip[8] = 64;
  ip[9] = 6;
  ip.writeUInt16BE(o.ipId ?? 1, 10); // checksum stand-in: differs with the id
  ip.writeUInt32BE(o.src ?? 0x0a000002, 12);
  ip.writeUInt32BE(o.dst ?? 0x0a000001, 16);
  const eth = Buffer.alloc(14);
  eth.writeUInt16BE(0x0800, 12);
  const f = Buffer.concat([eth, ip, th, opts, payload]);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(f.length);
  return Buffer.concat([len, f]);
}

test('frameIdentity: a TCP segment is its connection, sequence, flags and payload (its ack apart) — not its IP id, window, options or checksums', () => {
  const a = frameIdentity(tcp({ seq: 5, payload: 'OK 1\n', ipId: 7, window: 500, tsval: 100 }));
  const b = frameIdentity(tcp({ seq: 5, payload: 'OK 1\n', ipId: 9, window: 300, tsval: 133 }));
  // (data is compared as a stream: the signature, then the payload)
  const same = (x: typeof a, y: typeof a) =>
    x.sig.equals(y.sig) && (x.data?.payload ?? Buffer.alloc(0)).equals(y.data?.payload ?? Buffer.alloc(0));
  assert.equal(a.flow, b.flow);
  assert.ok(same(a, b));
  for (const other of [
    tcp({ seq: 6, payload: 'OK 1\n' }),
    tcp({ seq: 5, flags: 0x11, payload: 'OK 1\n' }),
    tcp({ seq: 5, payload: 'OK 2\n' }),
    tcp({ seq: 5, payload: 'OK 1\n!' }),
  ])
    assert.ok(!same(frameIdentity(other), a));
  // a segment with data never signs like one without (a FIN alone at the same sequence)
  assert.ok(
    !frameIdentity(tcp({ seq: 5, flags: 0x11 })).sig.equals(
      frameIdentity(tcp({ seq: 5, flags: 0x11, payload: 'x' })).sig,
    ),
  );
  assert.notEqual(frameIdentity(tcp({ seq: 5, dport: 40001 })).flow, a.flow);
});

test('FrameComparator: a primary frame is released once the secondary of the same epoch sent the same one, in connection order', () => {
  const c = new FrameComparator();
  assert.deepEqual(c.primary(0, 1, tcp({ seq: 1, payload: 'a' })).release, []);
  assert.deepEqual(c.primary(1, 1, tcp({ seq: 2, payload: 'b' })).release, []);
  // the secondary's copy of the second frame alone releases nothing: the first has not matched
  const r0 = c.secondary(1, tcp({ seq: 1, payload: 'a', ipId: 99 }));
  assert.deepEqual(
    r0.release.map((e) => e.seq),
    [0],
  );
  const r1 = c.secondary(1, tcp({ seq: 2, payload: 'b' }));
  assert.deepEqual(
    r1.release.map((e) => e.seq),
    [1],
  );
  // secondary first, primary later
  c.secondary(1, tcp({ seq: 3, payload: 'c' }));
  assert.deepEqual(
    c.primary(2, 1, tcp({ seq: 3, payload: 'c' })).release.map((e) => e.seq),
    [2],
  );
  assert.equal(c.counts.matched, 3);
  assert.equal(c.counts.mismatches, 0);
});

test('FrameComparator: another epoch never matches, a different frame is a mismatch that blocks its connection until the ack', () => {
  const c = new FrameComparator();
  c.primary(0, 2, tcp({ seq: 1, payload: 'x' }));
  // the secondary's output of epoch 1 (it ran from checkpoint 0) is stale for epoch 2's frame
  assert.deepEqual(c.secondary(1, tcp({ seq: 1, payload: 'x' })).release, []);
  const m = c.secondary(2, tcp({ seq: 1, payload: 'y' }));
  assert.equal(m.mismatch, true);
  assert.deepEqual(m.release, []);
  c.primary(1, 2, tcp({ seq: 2, payload: 'z' }));
  assert.deepEqual(c.secondary(2, tcp({ seq: 2, payload: 'z' })).release, [], 'blocked behind the mismatch');
  // another connection is not blocked
  c.primary(2, 2, tcp({ seq: 1, dport: 1, payload: 'q' }));
  assert.deepEqual(
    c.secondary(2, tcp({ seq: 1, dport: 1, payload: 'q' })).release.map((e) => e.seq),
    [2],
  );
  // the ack of epoch 2 releases the blocked frames (output commit does); here they are forgotten
  const after = c.acknowledged(2);
  assert.deepEqual(after.release, []);
  c.primary(3, 3, tcp({ seq: 3, payload: 'w' }));
  assert.deepEqual(
    c.secondary(3, tcp({ seq: 3, payload: 'w' })).release.map((e) => e.seq),
    [3],
  );
  assert.equal(c.counts.mismatches, 1);
  // a secondary frame of an acknowledged epoch is dropped
  c.secondary(3, tcp({ seq: 9 }));
  c.acknowledged(3);
  c.secondary(2, tcp({ seq: 10 }));
  assert.ok(c.counts.stale >= 1);
});

test('OutputCommit.releaseCompared: a matched frame leaves before its ack, once, counted as compared; the ack skips it; misuse fails', () => {
  const oc = new OutputCommit<Buffer>(1 << 20);
  oc.hold(0);
  oc.compareGraceMs = 30;
  const f1 = Buffer.from('one');
  const f2 = Buffer.from('two');
  const s1 = oc.nextHeldSeq;
  assert.equal(oc.push(f1, 0), null);
  const s2 = oc.nextHeldSeq;
  assert.equal(oc.push(f2, 0), null);
  // the secondary runs epoch 1 only once checkpoint 0 is acknowledged: until then nothing is late
  assert.equal(oc.openStats(100).frames, 0, 'the epoch before is not acknowledged yet');
  oc.acknowledged(0, 20);
  // young frames wait for their secondary copy (the grace counts from that ack): the scheduler is not told
  assert.equal(oc.openStats(45).frames, 0);
  assert.equal(oc.openStats(50).frames, 2);
  assert.equal(oc.releaseCompared(s2, 1), f2);
  assert.equal(oc.releaseCompared(s2, 1), null, 'released once');
  assert.throws(() => oc.releaseCompared(s1, 2), /compared as 2/);
  assert.equal(oc.stats(0).frames, 1);
  oc.mismatch();
  assert.equal(oc.openStats(1).frames, 1, 'after a mismatch the open output waits like any');
  oc.closeEpoch(1);
  const out = oc.acknowledged(1);
  assert.deepEqual(
    out.map((o) => o.frame),
    [f1],
  );
  assert.equal(oc.releaseCompared(s1, 1), null, 'acknowledged meanwhile');
  assert.deepEqual(oc.stats(0).counts, {
    released: 1,
    passedThrough: 0,
    releasedUnprotected: 0,
    dropped: 0,
    compared: 1,
  });
  assert.throws(() => oc.releaseCompared(s1 + 50, 2), /not held/);
  oc.end();
  assert.throws(() => oc.releaseCompared(s1, 1), /while not holding/);
});

test('FrameComparator: acknowledgements leave only once the secondary acknowledged as much (the peer data they confirm is in the secondary)', () => {
  const c = new FrameComparator();
  // a bare ACK of the client's data up to 100
  assert.deepEqual(c.primary(0, 1, tcp({ seq: 1, ack: 100, flags: 0x10 })).release, []);
  assert.deepEqual(
    c.secondary(1, tcp({ seq: 1, ack: 60, flags: 0x10 })).release,
    [],
    'the secondary has not got it all',
  );
  assert.deepEqual(
    c.secondary(1, tcp({ seq: 1, ack: 100, flags: 0x10 })).release.map((e) => e.seq),
    [0],
  );
  // data with an ack past what the secondary confirmed waits, though its payload matches
  c.primary(1, 1, tcp({ seq: 1, ack: 150, payload: 'OK\n' }));
  assert.deepEqual(c.secondary(1, tcp({ seq: 1, ack: 120, payload: 'OK\n' })).release, []);
  assert.equal(c.counts.mismatches, 0);
  assert.deepEqual(
    c.secondary(1, tcp({ seq: 4, ack: 150, flags: 0x10 })).release.map((e) => e.seq),
    [1],
  );
  // sequence space wraps (another connection)
  assert.deepEqual(c.secondary(1, tcp({ seq: 4, dport: 2, ack: 0xfffffff0, flags: 0x10 })).release, []);
  assert.deepEqual(
    c.primary(2, 1, tcp({ seq: 4, dport: 2, ack: 5, flags: 0x10 })).release,
    [],
    '5 is after 0xfffffff0',
  );
  assert.deepEqual(
    c.secondary(1, tcp({ seq: 4, dport: 2, ack: 6, flags: 0x10 })).release.map((e) => e.seq),
    [2],
  );
});

/** A chooser's options for the tests: 1 s windows, no settling; each test changes what it looks at. */
const TEST_CHOOSER = {
  windowMs: 1000,
  frames: 0,
  maxWindowMs: 1000,
  settleMs: 0,
  syncMs: 0,
  minInbound: 20,
  margin: 0.1,
  holdMs: 10_000,
  shift: 2,
  doubtShare: 0.5,
};

test('ModeChooser (--mode auto): a trial is the current plan, the other, the current again; the other is judged against the mean of the two (compare unless buffer wins by the margin); trials again when compare matched little under a new load, or the hold ends; idle windows and the window traffic starts in say nothing', () => {
  const m = new ModeChooser({ ...TEST_CHOOSER, settleMs: 200 });
  const c = { compared: 0, released: 0, inbound: 0 };
  const at = (t: number) => m.observe(t, { ...c });
  assert.equal(at(0), null, 'the first window starts');
  c.inbound += 150;
  assert.equal(at(1000), null, 'the window the traffic starts in is not judged (its ramp)');
  // compare's first window: 400 inbound frames/s, a fifth of the output matched
  c.inbound += 400;
  c.compared += 100;
  c.released += 400;
  const t1 = at(2000);
  assert.equal(t1?.to, 'buffer', 'then buffer is tried');
  assert.match(t1?.reason ?? '', /only 20 % of the output matched/);
  assert.equal(m.lastShare, 0.2);
  // the settling part is not measured
  c.inbound += 1000;
  assert.equal(at(2100), null);
  assert.equal(at(2200), null);
  // buffer's window (2200 to 3200): 500/s, more than compare's first, but the load grows meanwhile
  c.inbound += 500;
  assert.equal(at(3200)?.to, 'compare', 'back to compare for its second window');
  assert.equal(at(3400), null, 'settling');
  // compare's second window: 700/s. Its mean (550) beats buffer's 500: compare kept, no switch
  c.inbound += 700;
  assert.equal(at(4400), null);
  assert.equal(m.planning, 'compare');
  assert.equal(m.trialRate.compare, 550);
  assert.equal(m.trialRate.buffer, 500);
  // held: steady windows change nothing, idle ones neither, nor one window off (a burst)
  for (let t = 5400; t <= 7400; t += 1000) {
    c.inbound += 650;
    assert.equal(at(t), null);
  }
  c.inbound += 5;
  assert.equal(at(8400), null, 'idle');
  c.inbound += 2100;
  assert.equal(at(9400), null, 'one window off');
  c.inbound += 650;
  assert.equal(at(10_400), null, 'back in line');
  // a new load (3x for two windows) that compare matches poorly: trials again, the second window
  // counting as compare's first
  c.inbound += 2100;
  c.released += 2000;
  assert.equal(at(11_400), null, 'off once');
  c.inbound += 2000;
  c.released += 2000;
  assert.equal(at(12_400)?.to, 'buffer', 'the load changed and little matched');
  assert.equal(at(12_600), null, 'settling');
  c.inbound += 3000; // buffer: 3000/s
  assert.equal(at(13_600)?.to, 'compare');
  assert.equal(at(13_800), null, 'settling');
  c.inbound += 2000; // compare: mean 2000/s; buffer carried 1.5x: buffer wins
  const t2 = at(14_800);
  assert.equal(t2?.to, 'buffer');
  assert.match(t2?.reason ?? '', /compare 2000, buffer 3000/);
  assert.equal(at(15_000), null, 'settling');
  // held on buffer; at the end of the hold, trials again (buffer first this time)
  for (let t = 16_000; t <= 24_000; t += 1000) {
    c.inbound += 2900;
    assert.equal(at(t), null);
  }
  c.inbound += 2900;
  assert.equal(at(25_000)?.to, 'compare', 'the hold ended');
  assert.equal(at(25_200), null, 'settling');
  c.inbound += 3000; // compare 3000/s against buffer's 2900 and then 3100: within the margin → compare
  assert.equal(at(26_200)?.to, 'buffer');
  assert.equal(at(26_400), null, 'settling');
  c.inbound += 3100;
  assert.equal(at(27_400)?.to, 'compare', 'buffer did not win by the margin');
  assert.equal(m.switches, 8);
  // counts that go back (protection restarted) start a new window; a reset plans compare and trials again
  assert.equal(m.observe(28_000, { compared: 0, released: 0, inbound: 0 }), null);
  m.reset();
  assert.equal(m.planning, 'compare');
  assert.equal(m.trialRate.buffer, null);
});

test('ModeChooser: an idle trial window keeps compare; traffic later starts the trials, from the window after its start', () => {
  const m = new ModeChooser(TEST_CHOOSER);
  const c = { compared: 0, released: 0, inbound: 0 };
  const at = (t: number) => m.observe(t, { ...c });
  at(0);
  c.inbound += 3;
  assert.equal(at(1000), null);
  assert.equal(m.planning, 'compare');
  c.inbound += 300;
  assert.equal(at(2000), null, 'traffic starts: its ramp is not judged');
  c.inbound += 300;
  c.released += 300;
  assert.equal(at(3000)?.to, 'buffer', 'nothing matched: the trials begin');
  c.inbound += 10;
  assert.equal(at(4000)?.to, 'compare', 'buffer idle: back to compare');
});

test('ModeChooser: compare that matches its output is kept without trials, whatever the load does, until the hold ends; a trial that chose compare despite few matches is not repeated under the same load', () => {
  /** A chooser fed windows of `inbound` frames, `share` of its output matched. */
  const chooser = () => {
    const m = new ModeChooser(TEST_CHOOSER);
    const c = { compared: 0, released: 0, inbound: 0 };
    m.observe(0, { ...c });
    const on = (t: number, inbound: number, share: number) => {
      c.inbound += inbound;
      c.compared += share * inbound;
      c.released += (1 - share) * inbound;
      return m.observe(t, { ...c });
    };
    return { m, on };
  };
  const { m, on } = chooser();
  assert.equal(on(1000, 300, 0.9), null, 'the ramp');
  // the load triples, falls, bursts, then holds: nine tenths of the output matched, no trial
  for (const [t, n] of [
    [2000, 300],
    [3000, 900],
    [4000, 900],
    [5000, 950],
    [6000, 100],
    [7000, 100],
    [8000, 2000],
    [9000, 2000],
    [10_000, 2000],
  ] as const)
    assert.equal(on(t, n, 0.9), null, `window to ${t}`);
  assert.equal(m.switches, 0);
  const t = on(11_000, 2000, 0.9); // the hold began with the traffic (at 1000)
  assert.equal(t?.to, 'buffer');
  assert.match(t?.reason ?? '', /time to check/);
  // a service whose replies mostly differ, yet compare wins the trial: kept, no new trial per window
  const n = chooser();
  n.on(1000, 500, 0.3);
  assert.equal(n.on(2000, 500, 0.3)?.to, 'buffer', 'little matched: trial');
  assert.equal(n.on(3000, 300, 0)?.to, 'compare');
  assert.equal(n.on(4000, 500, 0.3), null, 'compare (mean 500) beat buffer (300)');
  for (let tt = 5000; tt <= 9000; tt += 1000) assert.equal(n.on(tt, 500, 0.3), null, 'judged under this load');
  assert.equal(n.m.switches, 2);
});

test('ModeChooser: a window closes once it counted enough inbound frames, or at its longest (a slow service)', () => {
  const m = new ModeChooser({ ...TEST_CHOOSER, windowMs: 500, frames: 200, maxWindowMs: 2000 });
  const c = { compared: 0, released: 0, inbound: 0 };
  const at = (t: number) => m.observe(t, { ...c });
  at(0);
  c.inbound += 250;
  assert.equal(at(1000), null, 'the traffic starts (not judged)');
  c.inbound += 100;
  assert.equal(at(1500), null, '100 frames: the window goes on');
  c.inbound += 150;
  c.released += 250;
  assert.equal(at(2000)?.to, 'buffer', '250 frames in 1 s: judged');
  c.inbound += 60;
  assert.equal(at(2500), null);
  assert.equal(at(2999), null);
  assert.equal(at(4000)?.to, 'compare', '60 frames in 2 s: judged at the longest window');
});

test('ModeChooser: back on compare, the window starts once the secondary matched a frame again (it caught up), or after syncMs', () => {
  const m = new ModeChooser({ ...TEST_CHOOSER, settleMs: 100, syncMs: 1500 });
  const c = { compared: 0, released: 0, inbound: 0 };
  const at = (t: number) => m.observe(t, { ...c });
  at(0);
  c.inbound += 500;
  assert.equal(at(1000), null, 'the ramp');
  c.inbound += 500;
  c.released += 500;
  assert.equal(at(2000)?.to, 'buffer', "compare's first window");
  assert.equal(at(2100), null, 'settling');
  c.inbound += 500;
  assert.equal(at(3100)?.to, 'compare', "buffer's window");
  assert.equal(at(3200), null, 'settling');
  // the secondary catches up: nothing matched, so nothing judged, whatever the traffic
  c.inbound += 100;
  assert.equal(at(4200), null, 'catching up');
  c.compared += 1;
  c.inbound += 100;
  assert.equal(at(4300), null, 'matched again: the window starts here');
  c.inbound += 600;
  assert.equal(at(5300), null, 'compare 600/s against buffer 500/s: compare kept');
  assert.equal(m.trialRate.compare, 550);
  // without a match, the window starts syncMs after the settling all the same
  const n = new ModeChooser({
    ...DEFAULT_MODE_CHOOSER,
    windowMs: 1000,
    maxWindowMs: 1000,
    settleMs: 100,
    syncMs: 1500,
  });
  const d = { compared: 0, released: 0, inbound: 0 };
  n.observe(0, { ...d });
  d.inbound += 500;
  n.observe(1000, { ...d });
  d.inbound += 500;
  d.released += 500;
  assert.equal(n.observe(2000, { ...d })?.to, 'buffer');
  n.observe(2100, { ...d });
  d.inbound += 500;
  assert.equal(n.observe(3100, { ...d })?.to, 'compare');
  d.inbound += 900;
  assert.equal(n.observe(4000, { ...d }), null);
  assert.equal(n.observe(4700, { ...d }), null, 'syncMs after the settling (3200 + 1500): the window starts');
  d.inbound += 400;
  assert.equal(n.observe(5700, { ...d })?.to, 'buffer', 'compare 400/s against buffer 500/s');
});

test('FrameComparator: TCP data compares as a byte stream, whatever either side’s segment boundaries; retransmissions of verified data leave; FIN may come apart', () => {
  const rel = (r: { release: { seq: number }[] }) => r.release.map((e) => e.seq);
  const c = new FrameComparator();
  // the primary sends two segments, the secondary one
  assert.deepEqual(rel(c.primary(0, 1, tcp({ seq: 1, payload: 'hello ' }))), []);
  assert.deepEqual(rel(c.primary(1, 1, tcp({ seq: 7, payload: 'world' }))), []);
  assert.deepEqual(rel(c.secondary(1, tcp({ seq: 1, payload: 'hello world' }))), [0, 1]);
  // the other way round: one primary segment waits for both of the secondary's
  assert.deepEqual(rel(c.primary(2, 1, tcp({ seq: 12, payload: 'abcdef' }))), []);
  assert.deepEqual(rel(c.secondary(1, tcp({ seq: 12, payload: 'abc' }))), [], 'half of it came');
  assert.deepEqual(rel(c.secondary(1, tcp({ seq: 15, payload: 'def' }))), [2]);
  assert.equal(c.counts.mismatches, 0);
  // a retransmission of verified bytes leaves at once
  assert.deepEqual(rel(c.primary(3, 1, tcp({ seq: 7, payload: 'world' }))), [3]);
  // the secondary's own retransmission of compared bytes is skipped
  c.secondary(1, tcp({ seq: 15, payload: 'def' }));
  assert.deepEqual(rel(c.primary(4, 1, tcp({ seq: 18, payload: 'gh' }))), []);
  assert.deepEqual(rel(c.secondary(1, tcp({ seq: 18, payload: 'gh' }))), [4]);
  // data with FIN on the primary, the secondary's FIN in a segment of its own
  assert.deepEqual(rel(c.primary(5, 1, tcp({ seq: 20, payload: 'bye', flags: 0x19 }))), []);
  assert.deepEqual(rel(c.secondary(1, tcp({ seq: 20, payload: 'bye' }))), [], 'the FIN is not there yet');
  assert.deepEqual(rel(c.secondary(1, tcp({ seq: 23, flags: 0x11 }))), [5]);
  assert.equal(c.counts.mismatches, 0);

  // bytes that differ across the secondary's boundary: a mismatch, the connection waits for the ack
  const d = new FrameComparator();
  d.primary(0, 1, tcp({ seq: 1, payload: 'abcdef' }));
  d.secondary(1, tcp({ seq: 1, payload: 'abc' }));
  const r = d.secondary(1, tcp({ seq: 4, payload: 'dXf' }));
  assert.deepEqual([rel(r), r.mismatch, d.counts.mismatches], [[], true, 1]);
  assert.deepEqual(d.counts.kinds, { data: 1, sequence: 0, control: 0, fin: 0, frame: 0 }, 'counted by kind');
  // data ahead of the primary's (bytes the secondary sent before its checkpoint, read by its standby
  // after the load): the segment waits, and a later entry of the epoch that holds its place is compared
  const g = new FrameComparator();
  g.primary(0, 1, tcp({ seq: 1, payload: 'abc' }));
  assert.deepEqual(rel(g.secondary(1, tcp({ seq: 20, payload: 'zzz' }))), [], 'it waits');
  assert.equal(g.counts.mismatches, 0);
  assert.deepEqual(rel(g.secondary(1, tcp({ seq: 1, payload: 'abX' }))), [], 'the entry holding its place differs');
  assert.equal(g.counts.kinds.data, 1);
  const g2 = new FrameComparator();
  g2.primary(0, 1, tcp({ seq: 1, payload: 'abc' }));
  g2.secondary(1, tcp({ seq: 20, payload: 'zzz' }));
  assert.deepEqual(rel(g2.secondary(1, tcp({ seq: 1, payload: 'abc' }))), [0], 'or matches');
  // data at a sequence far from anything the primary sent differs
  const g3 = new FrameComparator();
  g3.primary(0, 1, tcp({ seq: 1, payload: 'abc' }));
  assert.equal(g3.secondary(1, tcp({ seq: 2 ** 31 + 1, payload: 'abc' })).mismatch, true);
  assert.equal(g3.counts.kinds.sequence, 1);

  // the secondary's bytes of another epoch never match
  const e = new FrameComparator();
  e.primary(0, 1, tcp({ seq: 1, payload: 'abc' }));
  assert.deepEqual(rel(e.secondary(2, tcp({ seq: 1, payload: 'abc' }))), []);
  assert.equal(e.counts.mismatches, 0, 'it waits for its acknowledgement');
  e.primary(1, 2, tcp({ seq: 4, payload: 'de' }));
  assert.deepEqual(
    rel(e.secondary(2, tcp({ seq: 4, payload: 'de' }))),
    [],
    'behind the epoch-1 frame of its connection',
  );
  assert.deepEqual(rel(e.acknowledged(1)), [1]);
});

test('OutputCommit.nextLateAtMs: when the first held frame of the open epoch turns late (the scheduler looks again then)', () => {
  const oc = new OutputCommit<Buffer>(1 << 20);
  oc.hold(0);
  oc.compareGraceMs = 100;
  assert.equal(oc.nextLateAtMs(), Number.POSITIVE_INFINITY, 'nothing held');
  oc.push(Buffer.from('a'), 10);
  assert.equal(
    oc.nextLateAtMs(),
    Number.POSITIVE_INFINITY,
    'the epoch before is not acknowledged: its ack wakes the scheduler',
  );
  oc.acknowledged(0, 50);
  assert.equal(oc.nextLateAtMs(), 150, 'counted from the ack');
  const s = oc.nextHeldSeq;
  oc.push(Buffer.from('b'), 200);
  oc.releaseCompared(s - 1, 1, 210);
  assert.equal(oc.nextLateAtMs(), 300, 'a frame that left does not count');
  oc.closeEpoch(1);
  assert.equal(oc.nextLateAtMs(), Number.POSITIVE_INFINITY, 'a new epoch: its base is not acknowledged yet');
});

test('FrameComparator: a connection the two VMs opened with their own initial sequence numbers matches (SYN by SYN), its data in that epoch compares shifted, and the secondary’s input is rewritten to its numbers', () => {
  const rel = (r: { release: { seq: number }[] }) => r.release.map((e) => e.seq);
  const c = new FrameComparator();
  // the guest answers a client's SYN: each VM picked its own ISN (SYN+ACK, ack = client ISN + 1)
  assert.deepEqual(rel(c.primary(0, 4, tcp({ seq: 1000, ack: 51, flags: 0x12 }))), []);
  assert.deepEqual(rel(c.secondary(4, tcp({ seq: 7000, ack: 51, flags: 0x12 }))), [0], 'the SYN+ACK matches');
  // data of epoch 4: the secondary's sequence numbers are 6000 lower
  c.primary(1, 4, tcp({ seq: 1001, ack: 60, payload: '+OK\r\n' }));
  assert.deepEqual(rel(c.secondary(4, tcp({ seq: 7001, ack: 60, payload: '+OK\r\n' }))), [1]);
  // … but not the same bytes at the same shifted place
  c.primary(2, 4, tcp({ seq: 1006, ack: 70, payload: 'abc' }));
  assert.equal(c.secondary(4, tcp({ seq: 7006, ack: 70, payload: 'abd' })).mismatch, true);
  assert.equal(c.counts.kinds.data, 1);
  assert.equal(c.counts.kinds.frame, 0, 'the SYN+ACKs were not a difference');

  // the client's frames for the guest, in epoch 4: ack and SACK edges in the secondary's numbers
  const client = (ack: number, sack: number[]) => {
    const f = tcp({ sport: 40000, dport: 7000, src: 0x0a000001, dst: 0x0a000002, seq: 60, ack, flags: 0x10 });
    // replace the timestamp option with NOP NOP SACK(2 edges)+padding: the header has 12 option bytes
    const opt = f.subarray(4 + 14 + 20 + 20, 4 + 14 + 20 + 20 + 12);
    opt.fill(1);
    opt[2] = 5;
    opt[3] = 10;
    opt.writeUInt32BE(sack[0]!, 4);
    opt.writeUInt32BE(sack[1]!, 8);
    return f;
  };
  const inbound = client(1006, [1010, 1020]);
  const ip = inbound.subarray(4 + 14, 4 + 14 + 20);
  const th = inbound.subarray(4 + 14 + 20);
  th.writeUInt16BE(tcpChecksum(ip, th), 16);
  const toSec = c.toSecondary(4, inbound);
  assert.notEqual(toSec, inbound, 'a rewritten copy');
  assert.equal(inbound.readUInt32BE(4 + 14 + 20 + 8), 1006, "the primary's frame is untouched");
  const sip = toSec.subarray(4 + 14, 4 + 14 + 20);
  const sth = toSec.subarray(4 + 14 + 20);
  assert.equal(sth.readUInt32BE(8), 7006, 'the acknowledgement');
  assert.deepEqual([sth.readUInt32BE(20 + 4), sth.readUInt32BE(20 + 8)], [7010, 7020], 'the SACK edges');
  // a valid TCP checksum: the one's complement sum over the pseudo-header and segment is all ones
  assert.equal(sth.readUInt16BE(16), tcpChecksum(sip, sth));
  assert.notEqual(sth.readUInt16BE(16), th.readUInt16BE(16));
  // in the next epoch the secondary holds the primary's connection: nothing to rewrite
  assert.equal(c.toSecondary(5, inbound), inbound);
  // nor for another connection
  const other = tcp({ sport: 40001, dport: 7000, src: 0x0a000001, dst: 0x0a000002, seq: 60, ack: 1006, flags: 0x10 });
  assert.equal(c.toSecondary(4, other), other);
  // the next epoch's data is compared unshifted
  c.acknowledged(4);
  c.primary(3, 5, tcp({ seq: 1009, ack: 80, payload: 'x' }));
  assert.deepEqual(rel(c.secondary(5, tcp({ seq: 1009, ack: 80, payload: 'x' }))), [3]);
});

test('tcpChecksum: the RFC 1071 sum of a real segment', () => {
  // 10.0.0.2:7000 > 10.0.0.1:40000, SYN+ACK, checked against an independent sum over pseudo-header and segment
  const f = tcp({ seq: 0x01020304, ack: 0x0a0b0c0d, flags: 0x12, payload: 'hello' });
  const ip = f.subarray(4 + 14, 4 + 14 + 20);
  const th = f.subarray(4 + 14 + 20);
  const sum = tcpChecksum(ip, th);
  th.writeUInt16BE(sum, 16);
  const words = Buffer.concat([
    ip.subarray(12, 20),
    Buffer.from([0, 6, th.length >> 8, th.length & 255]),
    th,
    Buffer.alloc(th.length & 1),
  ]);
  let s = 0;
  for (let i = 0; i < words.length; i += 2) s += words.readUInt16BE(i);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  assert.equal(s, 0xffff);
});

test('FrameComparator: data released by an acknowledgement counts as verified (its retransmission leaves); a retransmission joined to new data is compared from the verified end on', () => {
  const rel = (r: { release: { seq: number }[] }) => r.release.map((e) => e.seq);
  const c = new FrameComparator();
  // epoch 1: the primary sent [100, 110) and the secondary never matched it; the ack of 1 releases it
  c.primary(0, 1, tcp({ seq: 100, ack: 5, payload: '0123456789' }));
  c.secondary(1, tcp({ seq: 100, ack: 5, payload: 'xxxxxxxxxx' })); // (a difference: waits for the ack)
  assert.deepEqual(rel(c.acknowledged(1)), []);
  c.secondary(2, tcp({ seq: 999, ack: 5, flags: 0x10 })); // the secondary has the peer's stream up to 5
  // epoch 2: the primary retransmits [100, 110): committed bytes, it leaves without a copy
  assert.deepEqual(rel(c.primary(1, 2, tcp({ seq: 100, ack: 5, payload: '0123456789' }))), [1]);
  // … and [105, 115) joined to new bytes: compared from 110, against the secondary's [110, 115)
  assert.deepEqual(rel(c.primary(2, 2, tcp({ seq: 105, ack: 5, payload: '56789abcde' }))), []);
  assert.deepEqual(rel(c.secondary(2, tcp({ seq: 110, ack: 5, payload: 'abcde' }))), [2]);
  assert.equal(c.counts.kinds.sequence, 0, 'not a difference of sequence');
  // new bytes that differ still differ
  c.primary(3, 2, tcp({ seq: 112, ack: 5, payload: 'cdeZZ' }));
  assert.equal(c.secondary(2, tcp({ seq: 115, ack: 5, payload: 'YY' })).mismatch, true);
});

test('CompareSide: a secondary silent for a second while the guest sends output has held frames wait for checkpoints (planned as buffer mode); its next frame brings compare planning back', () => {
  let t = 0;
  const oc = new OutputCommit<Buffer>(1 << 20);
  const relay = { onGuestFrame: null, onOutsideFrame: null, gate: null, sendOutside: () => {}, guestBacklogBytes: 0 };
  const side = new CompareSide({
    mode: 'compare',
    commit: oc,
    relay,
    link: () => null,
    protecting: () => true,
    onMismatch: () => {},
    onPlanning: () => {},
    now: () => t,
  });
  side.choose(0);
  assert.equal(side.plansCompare, true);
  assert.equal(oc.compareGraceMs, DEFAULT_COMPARE_LAG_MS);
  // A long quiet spell of both (or the synchronisation, before any secondary runs) is no silence of
  // the secondary: the guest's first frame after it starts the count.
  t = 20_000;
  side.held(0, tcp({ seq: 1, payload: 'a' }));
  side.choose(t);
  assert.equal(side.plansCompare, true, 'the guest only began to talk');
  t += SECONDARY_SILENT_MS - 100;
  side.held(1, tcp({ seq: 2, payload: 'b' }));
  side.choose(t);
  assert.equal(side.plansCompare, true, 'not yet a second of output unanswered');
  t += 150;
  side.held(2, tcp({ seq: 3, payload: 'c' }));
  side.choose(t);
  assert.equal(side.plansCompare, false);
  assert.equal(side.planning, true, 'its input is still mirrored');
  assert.equal(oc.compareGraceMs, 0, 'held frames count as waiting output at once');
  t += 100;
  side.secondarySent(1, tcp({ seq: 1, payload: 'a' }));
  side.choose(t);
  assert.equal(side.plansCompare, true);
  assert.equal(oc.compareGraceMs, DEFAULT_COMPARE_LAG_MS);
});

test("CompareSide.cut: the input the guest had not taken when it stopped goes to the secondary again, as the next epoch's, and only that", async () => {
  const oc = new OutputCommit<Buffer>(1 << 20);
  oc.hold(0);
  const sent: Array<{ epoch: number; frames: Buffer[] }> = [];
  const link = {
    closed: false,
    send: (_type: number, epoch: number, payload: Buffer) => {
      sent.push({ epoch, frames: splitNetFrames(payload) });
      return Promise.resolve();
    },
  } as unknown as Link;
  const relay: GuestNet = {
    onGuestFrame: null,
    onOutsideFrame: null,
    gate: null,
    sendOutside: () => {},
    guestBacklogBytes: 0,
  };
  const side = new CompareSide({
    mode: 'compare',
    commit: oc,
    relay,
    link: () => link,
    protecting: () => true,
    onMismatch: () => {},
    onPlanning: () => {},
  });
  // 40 segments of 60 KB from a client arrive in epoch 1 (2.4 MB), then the guest stops.
  const seg = (i: number) =>
    tcp({
      seq: 1 + i * 60_000,
      payload: 'x'.repeat(60_000),
      src: 0x0a000001,
      dst: 0x0a000002,
      sport: 40000,
      dport: 7000,
    });
  const epoch = oc.openEpoch;
  for (let i = 0; i < 40; i++) relay.onOutsideFrame!(seg(i));
  oc.closeEpoch(epoch);
  side.cut(epoch);
  await new Promise((r) => setImmediate(r));
  const of = (e: number) => sent.filter((s) => s.epoch === e).flatMap((s) => s.frames);
  assert.equal(of(epoch).length, 40, "the epoch's input, once");
  // Nothing queued in Rubato: only what the socket and QEMU's read buffer may hold (about 8 segments).
  const n = Math.floor(IN_FLIGHT_SLACK_BYTES / seg(0).length);
  assert.ok(n >= 8 && n < 40);
  const again = of(epoch + 1);
  assert.equal(again.length, n);
  assert.deepEqual(again, of(epoch).slice(-n), 'the last ones, in order');
  assert.equal(side.resentBytes, n * seg(0).length);
  // With 1 MB still queued for the guest in Rubato, those are given again too (about 17 more).
  sent.length = 0;
  for (let i = 40; i < 80; i++) relay.onOutsideFrame!(seg(i));
  (relay as { guestBacklogBytes: number }).guestBacklogBytes = 1_000_000;
  oc.closeEpoch(epoch + 1);
  side.cut(epoch + 1);
  await new Promise((r) => setImmediate(r));
  const m = Math.floor((1_000_000 + IN_FLIGHT_SLACK_BYTES) / seg(0).length);
  assert.equal(of(epoch + 2).length, m);
  assert.deepEqual(of(epoch + 2), of(epoch + 1).slice(-m));
  // An epoch with little input (redis): its own frames go again, not the ones given again at the last cut
  // (which the guest took early in this epoch). Kept, those were sent at every cut, epoch after epoch.
  sent.length = 0;
  (relay as { guestBacklogBytes: number }).guestBacklogBytes = 0;
  const small = [80, 81].map((i) =>
    tcp({ seq: 1 + i * 60_000, payload: 'get', src: 0x0a000001, dst: 0x0a000002, sport: 40000, dport: 7000 }),
  );
  for (const f of small) relay.onOutsideFrame!(f);
  oc.closeEpoch(epoch + 2);
  side.cut(epoch + 2);
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(of(epoch + 3), small);
});
