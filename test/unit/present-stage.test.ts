import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PresentStage } from '../../src/replication/present-stage.ts';
import { decodePresend, encodePresendParts } from '../../src/replication/protocol/record.ts';
import { isRubatoError } from '../../src/util/errors.ts';
import type { DirtyPage } from '../../src/capture/checkpoint.ts';

const blocks = [
  { id: 'mem0', lengthBytes: 64 * 4096 },
  { id: 'disk0', lengthBytes: 4 * 4096 },
];
const page = (offset: number, v: number | null, block = 'mem0'): DirtyPage => ({
  block,
  offset,
  data: v === null ? null : Buffer.alloc(4096, v),
  ...(v === null ? { fill: 0 } : {}),
});
const wire = (epoch: number, pages: DirtyPage[]) => {
  const { parts, length } = encodePresendParts(epoch, pages, blocks);
  return Buffer.concat(parts as Buffer[], length);
};

test('pre-sent pages: round trip through the codec; out-of-block pages, bad magic and a wrong length fail typed', () => {
  const pages = [page(0, 5), page(4096, null), page(3 * 4096, 7, 'disk0')];
  const got = decodePresend(wire(9, pages), blocks);
  assert.equal(got.epoch, 9);
  assert.deepEqual(
    got.pages.map((p) => [p.block, p.offset, p.data?.[0] ?? null]),
    [
      ['mem0', 0, 5],
      ['mem0', 4096, null],
      ['disk0', 3 * 4096, 7],
    ],
  );
  const corrupt = (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT');
  assert.throws(() => decodePresend(wire(1, [page(4 * 4096, 1, 'disk0')]), blocks), corrupt);
  const bad = wire(1, pages);
  bad.writeUInt32BE(0x52424348, 0);
  assert.throws(() => decodePresend(bad, blocks), corrupt);
  assert.throws(() => decodePresend(wire(1, pages).subarray(0, 100), blocks), corrupt);
  const more = wire(1, pages);
  more.writeUInt32BE(1_000_000, 16); // claims more pages than it can hold: refused before any work
  assert.throws(() => decodePresend(more, blocks), corrupt);
});

test("stage: a page sent again replaces its older copy; take empties it; another epoch's pages are a protocol error", () => {
  const st = new PresentStage(1 << 20);
  st.add(3, [page(0, 1), page(4096, 2)], 9000);
  st.add(3, [page(0, 9)], 5000);
  assert.equal(st.size, 2);
  assert.throws(
    () => st.add(4, [page(0, 1)], 5000),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
  assert.throws(
    () => st.take(4),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
  const got = st.take(3);
  assert.deepEqual(
    got.map((p) => [p.offset, p.data![0]]).sort((a, b) => a[0]! - b[0]!),
    [
      [0, 9],
      [4096, 2],
    ],
  );
  assert.equal(st.size, 0);
  assert.deepEqual(st.take(5), []); // nothing pre-sent for a checkpoint: nothing staged
});

test('stage: past its bound the live pages are copied out of their frames (contents kept, pinned bytes drop)', () => {
  const st = new PresentStage(40 * 4096);
  const frame = Buffer.alloc(32 * 4096, 0);
  for (let pass = 0; pass < 4; pass++) {
    // each pass: one frame of 32 pages; only the last pass's copy of each page stays live
    const pages = Array.from({ length: 8 }, (_, i): DirtyPage => {
      const data = Buffer.alloc(4096, pass * 10 + i);
      return { block: 'mem0', offset: i * 4096, data };
    });
    st.add(1, pages, frame.length);
  }
  assert.ok(st.pinnedBytes <= 40 * 4096, `pinned ${st.pinnedBytes}`);
  assert.equal(st.pinnedBytes, 8 * 4096);
  const got = st.take(1).sort((a, b) => a.offset - b.offset);
  assert.deepEqual(
    got.map((p) => p.data![0]),
    [30, 31, 32, 33, 34, 35, 36, 37],
  );
});
