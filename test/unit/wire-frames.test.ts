// A checkpoint split into frames of a bounded size: a standby that stages the leading PRESEND frames and
// commits them with the CKPT ends with exactly the pages, in order, that the checkpoint sent as one record;
// no frame carries more pages than the bound.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PageMirror, SentPages } from '../../src/replication/sent-pages.ts';
import { PresentStage } from '../../src/replication/present-stage.ts';
import { checkpointFrames, presendFrames } from '../../src/replication/wire-frames.ts';
import { decodePresend, decodeRecord, type RecordParts } from '../../src/replication/protocol/record.ts';
import type { DirtyPage } from '../../src/capture/checkpoint.ts';

const PAGE = 4096;
const DEVICE_STATE_EOF = Buffer.from([0x04, 1, 0x00]);
const blocks = [
  { id: 'ram0', lengthBytes: 64 * PAGE },
  { id: 'disk0', lengthBytes: 64 * PAGE },
];
const join = (f: RecordParts) => Buffer.concat(f.parts as Buffer[], f.length);
const page = (block: string, n: number, v: number): DirtyPage => ({
  block,
  offset: n * PAGE,
  data: Buffer.alloc(PAGE, v),
});
const key = (p: DirtyPage) => `${p.block}:${p.offset / PAGE}:${p.data ? p.data[0] : `fill${p.fill}`}`;

/** What a standby commits for checkpoint `epoch` from these frames: staged PRESEND pages first, then the record's. */
function standbyCommits(
  m: PageMirror,
  stage: PresentStage,
  epoch: number,
  w: { lead: RecordParts[]; record: RecordParts },
): DirtyPage[] {
  for (const f of w.lead) {
    const buf = join(f);
    const { epoch: e, pages } = decodePresend(buf, blocks);
    assert.equal(e, epoch);
    stage.add(e, m.resolve(pages, 'test'), buf.length);
  }
  const rec = decodeRecord(join(w.record), blocks, 'wire', (pages) => m.resolve(pages, 'test'));
  assert.equal(rec.epoch, epoch);
  assert.deepEqual(rec.deviceState, DEVICE_STATE_EOF);
  return stage.take(epoch).concat(rec.pages);
}

test('a checkpoint of more pages than a frame holds goes as PRESEND frames of at most that many, then its CKPT', () => {
  const pages = Array.from({ length: 23 }, (_, i) => page(i % 3 ? 'ram0' : 'disk0', i, i));
  for (const [framePages, leads, last] of [
    [5, 4, 3],
    [23, 0, 23],
    [24, 0, 23],
    [1, 22, 1],
  ] as const) {
    const w = checkpointFrames(
      { epoch: 7, pages, deviceState: DEVICE_STATE_EOF },
      new SentPages(blocks, 0),
      blocks,
      framePages,
    );
    assert.equal(w.lead.length, leads, `frames of ${framePages}`);
    for (const f of w.lead) assert.equal(decodePresend(join(f), blocks).pages.length, framePages);
    assert.equal(decodeRecord(join(w.record), blocks, 'wire').pages.length, last);
    assert.equal(
      w.length,
      w.lead.reduce((n, f) => n + f.length, w.record.length),
    );
    const got = standbyCommits(new PageMirror(blocks, 0), new PresentStage(1 << 20), 7, w);
    // (the stage gives its pages by block and offset; each page here is distinct)
    assert.deepEqual(got.map(key).sort(), pages.map(key).sort(), `frames of ${framePages}`);
  }
  // no pages: one CKPT with the device state alone
  const empty = checkpointFrames(
    { epoch: 3, pages: [], deviceState: DEVICE_STATE_EOF },
    new SentPages(blocks),
    blocks,
    4,
  );
  assert.equal(empty.lead.length, 0);
  assert.equal(decodeRecord(join(empty.record), blocks, 'wire').pages.length, 0);
});

test('split frames keep both sides’ copies in step: references resolve as when each batch went in one frame', () => {
  let x = 12345;
  const rnd = (n: number) => {
    x = (x * 1103515245 + 12345) >>> 0;
    return (x >>> 8) % n;
  };
  const s = new SentPages(blocks, 24 * PAGE);
  const m = new PageMirror(blocks, 24 * PAGE);
  const stage = new PresentStage(1 << 20);
  const replica = new Map<string, string>();
  const truth = new Map<string, string>();
  let refs = 0;
  for (let epoch = 1; epoch <= 60; epoch++) {
    // a pass during the epoch, then the pause's pages: both split at 3 pages a frame
    const pass = Array.from({ length: rnd(8) }, () => page('ram0', rnd(30), rnd(3)));
    const pause = Array.from({ length: rnd(12) }, () => page(rnd(4) ? 'ram0' : 'disk0', rnd(30), rnd(3)));
    const pre = presendFrames(epoch, pass, s, blocks, 3);
    const w = checkpointFrames({ epoch, pages: pause, deviceState: DEVICE_STATE_EOF }, s, blocks, 3);
    refs += pre.counts.same + pre.counts.delta + w.counts.same + w.counts.delta;
    assert.ok(pre.frames.every((f) => decodePresend(join(f), blocks).pages.length <= 3));
    const committed = standbyCommits(m, stage, epoch, { lead: [...pre.frames, ...w.lead], record: w.record });
    for (const p of committed) replica.set(`${p.block}:${p.offset}`, key(p));
    for (const p of [...pass, ...pause]) truth.set(`${p.block}:${p.offset}`, key(p));
    assert.deepEqual(replica, truth, `epoch ${epoch}`);
  }
  assert.ok(refs > 50, `references were sent: ${refs}`);
});
