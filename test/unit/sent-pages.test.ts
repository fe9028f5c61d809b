// Pages sent as references to the copy both sides keep: whatever the primary turns into references,
// a standby that resolves and applies what came, in order, ends with the same pages as one that got
// every page whole; and a reference its copies cannot honour is refused, never applied.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PageMirror, SentPages } from '../../src/replication/sent-pages.ts';
import {
  decodePresend,
  decodeRecord,
  encodePresendParts,
  encodeRecord,
  encodeRecordParts,
} from '../../src/replication/protocol/record.ts';
import { isRubatoError } from '../../src/util/errors.ts';
import type { DirtyPage } from '../../src/capture/checkpoint.ts';

const PAGE = 4096;
/** A device state as QEMU frames it: one section, then EOF. */
const DEVICE_STATE_EOF = Buffer.from([0x04, 1, 0x00]);
const blocks = [
  { id: 'ram0', lengthBytes: 32 * PAGE },
  { id: 'ram1', lengthBytes: 32 * PAGE },
  { id: 'disk0', lengthBytes: 32 * PAGE },
];
/** A page whose bytes are `v` everywhere but `changes` (offset → byte). */
const page = (block: string, n: number, v: number | null, changes: Record<number, number> = {}): DirtyPage => {
  if (v === null) return { block, offset: n * PAGE, data: null, fill: 0 };
  const data = Buffer.alloc(PAGE, v);
  for (const [at, b] of Object.entries(changes)) data[Number(at)] = b;
  return { block, offset: n * PAGE, data };
};
const wire = (epoch: number, pages: readonly DirtyPage[]) =>
  encodeRecord({ epoch, pages, deviceState: DEVICE_STATE_EOF }, blocks, 'wire');
const through = (mirror: PageMirror, buf: Buffer) =>
  decodeRecord(buf, blocks, 'wire', (pages) => mirror.resolve(pages, 'test')).pages;

/** A standby's pages: each page's last copy applied (a fill written as 4096 bytes of it). */
function apply(into: Map<string, Buffer>, pages: readonly DirtyPage[]): void {
  for (const p of pages)
    into.set(`${p.block}:${p.offset}`, p.data ? Buffer.from(p.data) : Buffer.alloc(PAGE, p.fill ?? 0));
}

test('a page sent again goes as SAME, with a few bytes changed as DELTA; fills and disk pages go whole', () => {
  const s = new SentPages(blocks);
  const m = new PageMirror(blocks);
  const first = [page('ram0', 1, 7), page('ram0', 2, 7), page('disk0', 1, 7)];
  const f1 = s.filter(first);
  assert.deepEqual(f1.counts, { same: 0, delta: 0, whole: 3, savedBytes: 0 });
  assert.equal(through(m, wire(1, f1.pages)).length, 3);
  const f2 = s.filter([page('ram0', 1, 7), page('ram0', 2, 7, { 100: 1, 4095: 2 }), page('disk0', 1, 7)]);
  assert.deepEqual(
    f2.pages.map((p) => p.ref?.kind ?? 'whole'),
    ['same', 'delta', 'whole'],
  );
  const buf = wire(2, f2.pages);
  assert.ok(buf.length < 2 * PAGE, `a record of ${buf.length} bytes carries one whole page`);
  const got = through(m, buf);
  // SAME is left out (the replica holds it); DELTA comes whole
  assert.deepEqual(
    got.map((p) => `${p.block}:${p.offset / PAGE}`),
    ['ram0:2', 'disk0:1'],
  );
  assert.deepEqual(got[0]!.data, page('ram0', 2, 7, { 100: 1, 4095: 2 }).data);
  // A page that changed everywhere goes whole; a fill goes and is forgotten.
  assert.equal(s.filter([page('ram0', 1, 9)]).pages[0]!.ref, undefined);
  assert.equal(s.filter([page('ram0', 1, null)]).pages[0]!.ref, undefined);
  assert.equal(s.filter([page('ram0', 1, 9)]).pages[0]!.ref, undefined);
});

test('a reference the standby cannot honour is refused: a changed byte, a page it keeps no copy of', () => {
  const s = new SentPages(blocks);
  const m = new PageMirror(blocks);
  through(m, wire(1, s.filter([page('ram0', 1, 7), page('ram0', 2, 7)]).pages));
  const f = s.filter([page('ram0', 1, 7, { 8: 1 })]);
  const buf = wire(2, f.pages);
  // record header 24, page header 12, then the DELTA: CRC 4, runs 2, offset 2, length 2, the changed word
  assert.equal(buf.readUInt16BE(24 + 12 + 6), 8);
  const bad = Buffer.from(buf);
  bad.writeUInt8(bad.readUInt8(24 + 12 + 10) ^ 0xff, 24 + 12 + 10);
  const refused = (e: unknown) => isRubatoError(e) && e.code === 'RUBATO_REPLICA_CORRUPT';
  assert.throws(() => through(m, bad), refused);
  // A mirror that never saw page 2 (another session's) refuses its SAME.
  const fresh = new PageMirror(blocks);
  assert.throws(() => through(fresh, wire(3, s.filter([page('ram0', 2, 7)]).pages)), refused);
  // On disk, references are not a record's.
  assert.throws(
    () =>
      decodeRecord(encodeRecord({ epoch: 3, pages: f.pages, deviceState: DEVICE_STATE_EOF }, blocks, 'disk'), blocks),
    refused,
  );
});

test('the kept copies leave a standby with the same bytes as every page whole, over random sessions', () => {
  const totals = { same: 0, delta: 0 };
  for (let seed = 1; seed <= 20; seed++) {
    let x = seed * 2654435761;
    const rnd = (n: number) => {
      x = (x * 1103515245 + 12345) >>> 0;
      return (x >>> 8) % n;
    };
    const capacity = (4 + rnd(12)) * PAGE; // small: pages are forgotten often
    const s = new SentPages(blocks, capacity);
    const m = new PageMirror(blocks, capacity);
    const all = new Map<string, Buffer>();
    const got = new Map<string, Buffer>();
    for (let batch = 0; batch < 300; batch++) {
      const pages: DirtyPage[] = [];
      for (let i = rnd(12); i > 0; i--) {
        const block = blocks[rnd(3)]!.id;
        const changes: Record<number, number> = {};
        for (let c = rnd(4) === 0 ? rnd(600) : rnd(3); c > 0; c--) changes[rnd(PAGE)] = rnd(4);
        // few pages and few values: the same bytes come back often, a page twice in a batch too
        pages.push(page(block, rnd(20), rnd(6) === 0 ? null : rnd(2), changes));
      }
      apply(all, pages);
      const f = s.filter(pages);
      totals.same += f.counts.same;
      totals.delta += f.counts.delta;
      // pre-sends and records alike
      const applied =
        batch % 2
          ? through(m, wire(batch, f.pages))
          : (() => {
              const { parts, length } = encodePresendParts(batch, f.pages, blocks);
              return m.resolve(decodePresend(Buffer.concat(parts as Buffer[], length), blocks).pages, 'test');
            })();
      apply(got, applied);
      assert.deepEqual(got, all, `seed ${seed}, batch ${batch}`);
    }
  }
  assert.ok(totals.same > 100 && totals.delta > 100, `references sent: ${JSON.stringify(totals)}`);
});

test('a primary that sends no references keeps a mirror in step all the same', () => {
  const s = new SentPages(blocks, 0);
  const m = new PageMirror(blocks);
  for (let i = 0; i < 3; i++) {
    const f = s.filter([page('ram0', 1, 7)]);
    assert.equal(f.pages[0]!.ref, undefined);
    assert.equal(through(m, wire(i + 1, f.pages)).length, 1);
  }
  assert.ok(encodeRecordParts({ epoch: 1, pages: [], deviceState: DEVICE_STATE_EOF }, blocks, 'wire').length > 0);
});
