import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, rmSync, writeFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { ReplicaStore } from '../../src/replication/replica-store.ts';
import { PageMirror, SentPages } from '../../src/replication/sent-pages.ts';
import { decodeRecord, encodeRecord, sealRecord } from '../../src/replication/protocol/record.ts';
import type { BaseImage, Checkpoint } from '../../src/capture/checkpoint.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';

const DEV = Buffer.from([0x04, 9, 9, 9, 0x00]);

function base(): BaseImage {
  return {
    machine: 'pc-i440fx-7.2',
    blocks: [
      { id: 'mem0', lengthBytes: 8 * 4096 },
      { id: 'rom', lengthBytes: 4096 },
    ],
    ram: new Map([
      ['mem0', Buffer.alloc(8 * 4096, 1)],
      ['rom', Buffer.alloc(4096, 7)],
    ]),
    deviceState: DEV,
  };
}

function cp(epoch: number, pages: Array<[number, number | null]>): Checkpoint {
  return {
    epoch,
    route: 'a',
    deviceState: Buffer.from([0x04, epoch, 0x00]),
    ramBytes: 0,
    zeroPages: 0,
    pausedAtMs: 0,
    timings: { captureMs: 0, pauseMsLocal: 0, heldMs: 0 },
    pages: pages.map(([off, v]) => ({
      block: 'mem0',
      offset: off,
      data: v === null ? null : Buffer.alloc(4096, v),
      fill: 0,
    })),
  };
}

test('commits checkpoints in order and persists them', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  await s.commit(
    cp(1, [
      [0, 5],
      [4096, null],
    ]),
  );
  await s.commit(cp(2, [[4096, 6]]));
  assert.equal(s.epoch, 2);
  const r = await ReplicaStore.open(dir);
  assert.equal(r.epoch, 2);
  const ram = await r.readImage('mem0');
  assert.equal(ram[0], 5);
  assert.equal(ram[4096], 6);
  assert.equal(ram[8192], 1);
  assert.deepEqual([...r.deviceState], [0x04, 2, 0x00]);
  assert.deepEqual(readFileSync(r.imagePath('mem0')), ram);
});

test('rejects out-of-order, malformed and out-of-range checkpoints, untouched', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  const before = Buffer.from(await s.readImage('mem0'));
  await assert.rejects(s.commit(cp(2, [[0, 3]])), (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'));
  await assert.rejects(s.commit(cp(1, [[8 * 4096, 3]])), (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'));
  const bad = cp(1, [[0, 3]]);
  bad.deviceState = Buffer.from([1, 2, 3]);
  await assert.rejects(s.commit(bad), (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'));
  assert.equal(s.epoch, 0);
  assert.deepEqual(await s.readImage('mem0'), before);
  assert.equal((await ReplicaStore.open(dir)).epoch, 0);
});

test('a crash after the commit point is finished on reopen (redo)', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  // Commit point reached (redo record renamed into place), nothing applied yet.
  writeFileSync(join(dir, 'redo.ckpt'), encodeRecord(cp(1, [[0, 42]]), s.blocks));
  const r = await ReplicaStore.open(dir);
  assert.equal(r.epoch, 1);
  assert.equal((await r.readImage('mem0'))[0], 42);
  assert.equal(existsSync(join(dir, 'redo.ckpt')), false);
});

test('a crash before the commit point leaves the previous checkpoint', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  await s.commit(cp(1, [[0, 5]]));
  const rec = encodeRecord(cp(2, [[0, 99]]), s.blocks);
  writeFileSync(join(dir, 'stage.tmp'), rec.subarray(0, rec.length - 100)); // half-written stage
  const r = await ReplicaStore.open(dir);
  assert.equal(r.epoch, 1);
  assert.equal((await r.readImage('mem0'))[0], 5);
  assert.equal(existsSync(join(dir, 'stage.tmp')), false);
});

test('a corrupt redo record is refused, never applied', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  const rec = encodeRecord(cp(1, [[0, 42]]), s.blocks);
  rec[40] = rec[40]! ^ 1;
  writeFileSync(join(dir, 'stage.tmp'), rec);
  renameSync(join(dir, 'stage.tmp'), join(dir, 'redo.ckpt'));
  await assert.rejects(ReplicaStore.open(dir), (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'));
  rmSync(join(dir, 'redo.ckpt'));
  const r = await ReplicaStore.open(dir);
  assert.equal((await r.readImage('mem0'))[0], 1);
});

test('a record on the wire carries no checksum (its frame is authenticated) but every length and page is checked; sealed, it is fit for disk', () => {
  const blocks = base().blocks;
  const wire = encodeRecord(cp(3, [[4096, 8]]), blocks, 'wire');
  assert.equal(wire.readUInt32BE(wire.length - 4), 0);
  assert.equal(decodeRecord(wire, blocks, 'wire').pages[0]!.data![0], 8);
  assert.throws(
    () => decodeRecord(wire, blocks),
    (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'),
  );
  const bad = Buffer.from(wire);
  bad[24 + 1] = 7; // the first page's kind
  assert.throws(
    () => decodeRecord(bad, blocks, 'wire'),
    (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'),
  );
  const outside = Buffer.from(wire);
  outside.writeBigUInt64BE(BigInt(8 * 4096), 24 + 4); // past the end of mem0
  assert.throws(
    () => decodeRecord(outside, blocks, 'wire'),
    (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'),
  );
  sealRecord(wire);
  assert.deepEqual(wire, encodeRecord(cp(3, [[4096, 8]]), blocks));
  assert.equal(decodeRecord(wire, blocks).epoch, 3);
});

test('page offsets above 4 GiB round-trip as written; one of 2^53 or more is refused as corrupt', () => {
  // A disk block of 12 GiB: its pages past 4 GiB need the offset's high word.
  const blocks = [{ id: 'disk:vda', lengthBytes: 12 * 2 ** 30 }];
  const offsets = [0, 2 ** 32 - 4096, 2 ** 32, 2 * 2 ** 32 + 7 * 4096, 12 * 2 ** 30 - 4096];
  const rec = {
    epoch: 9,
    deviceState: DEV,
    pages: offsets.map((offset, i) => ({ block: 'disk:vda', offset, data: Buffer.alloc(4096, i + 1) })),
  };
  const wire = encodeRecord(rec, blocks, 'wire');
  for (const [i, o] of offsets.entries()) assert.equal(Number(wire.readBigUInt64BE(24 + i * (12 + 4096) + 4)), o);
  const back = decodeRecord(wire, blocks, 'wire');
  assert.deepEqual(
    back.pages.map((p) => [p.offset, p.data![0]]),
    offsets.map((o, i) => [o, i + 1]),
  );
  const huge = Buffer.from(wire);
  huge.writeBigUInt64BE(2n ** 53n, 24 + 4);
  assert.throws(
    () => decodeRecord(huge, blocks, 'wire'),
    (e: unknown) => isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'),
  );
});

test('a record off the wire is acknowledgeable at its commit point; its images follow, and the next commit waits for them', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  const blocks = base().blocks;
  const e1 = (
    await s.commitRecord(
      encodeRecord(
        cp(1, [
          [0, 5],
          [8192, 9],
        ]),
        blocks,
        'wire',
      ),
      1,
    )
  ).epoch;
  // Returned at the commit point: the redo record is in place, memory holds the checkpoint.
  assert.equal(e1, 1);
  assert.equal(s.epoch, 1);
  assert.equal((await s.readImage('mem0'))[8192], 9);
  assert.deepEqual([...s.deviceState], [0x04, 1, 0x00]);
  // A crash now: a reopen finishes the checkpoint from its redo record.
  const copy = `${dir}-copy`;
  t.after(() => rmSync(copy, { recursive: true, force: true }));
  if (existsSync(join(dir, 'redo.ckpt'))) {
    const { cpSync } = await import('node:fs');
    cpSync(dir, copy, { recursive: true });
    const r = await ReplicaStore.open(copy);
    assert.equal(r.epoch, 1);
    assert.equal((await r.readImage('mem0'))[8192], 9);
  }
  // The next commit first waits for the previous one's files.
  await s.commitRecord(encodeRecord(cp(2, [[8192, 10]]), blocks, 'wire'), 2);
  await s.settled();
  assert.equal(existsSync(join(dir, 'redo.ckpt')), false);
  const r2 = await ReplicaStore.open(dir);
  assert.equal(r2.epoch, 2);
  assert.equal((await r2.readImage('mem0'))[0], 5);
  assert.equal((await r2.readImage('mem0'))[8192], 10);
  assert.deepEqual(readFileSync(r2.imagePath('mem0')), await r2.readImage('mem0'));
});

test('private state: replica files 0600 in 0700 folders whatever the umask; a folder others may write is refused', async (t) => {
  const { statSync, mkdirSync, chmodSync, symlinkSync } = await import('node:fs');
  const { ensurePrivateDir } = await import('../../src/util/private-files.ts');
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const old = process.umask(0);
  try {
    const s = await ReplicaStore.create(join(dir, 'r'), 'vm', base());
    await s.commit(cp(1, [[0, 5]]));
    assert.equal(statSync(join(dir, 'r')).mode & 0o777, 0o700);
    assert.equal(statSync(join(dir, 'r', 'ram')).mode & 0o777, 0o700);
    for (const f of ['ram/0.img', 'ram/1.img', 'device.bin', 'meta.json'])
      assert.equal(statSync(join(dir, 'r', f)).mode & 0o777, 0o600, f);
  } finally {
    process.umask(old);
  }
  mkdirSync(join(dir, 'open'));
  chmodSync(join(dir, 'open'), 0o777);
  assert.throws(
    () => ensurePrivateDir(join(dir, 'open')),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG') && /writable by other users/.test(e.message),
  );
  symlinkSync(join(dir, 'r'), join(dir, 'link'));
  assert.throws(
    () => ensurePrivateDir(join(dir, 'link')),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG') && /symlink/.test(e.message),
  );
});

test('memory durability: acknowledged before its commit point, written behind in order, settled() waits', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  const blocks = s.blocks;
  const rec = (e: number, v: number) =>
    encodeRecord(
      cp(e, [
        [0, v],
        [4096 * e, v],
      ]),
      blocks,
    );
  // Three checkpoints accepted back to back: each returns before its redo record exists on disk.
  for (const e of [1, 2, 3]) {
    const r = await s.commitRecord(rec(e, 10 + e), e, 'memory');
    assert.equal(r.epoch, e);
    assert.equal(s.epoch, e); // the next one must follow it, not the files
  }
  await assert.rejects(s.commitRecord(rec(3, 1), 3, 'memory'), (e: unknown) =>
    isRubatoError(e, 'RUBATO_REPLICA_CORRUPT'),
  );
  await s.settled();
  const r = await ReplicaStore.open(dir);
  assert.equal(r.epoch, 3);
  const ram = await r.readImage('mem0');
  assert.deepEqual([ram[0], ram[4096], ram[8192], ram[12288]], [13, 11, 12, 13]);
  assert.equal(existsSync(join(dir, 'redo.ckpt')), false);
});

test('memory durability: a failed write behind the ack fails the next commit and settled()', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  const blocks = s.blocks;
  rmSync(join(dir, 'ram'), { recursive: true, force: true }); // the images are gone: applying fails
  await s.commitRecord(encodeRecord(cp(1, [[0, 5]]), blocks), 1, 'memory');
  await assert.rejects(s.settled());
  await assert.rejects(s.commitRecord(encodeRecord(cp(2, [[0, 6]]), blocks), 2, 'memory'));
});

test('memory durability: checkpoints gathered while the writer is busy are written as one merged record; a merged redo record is recovered whole', async (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const s = await ReplicaStore.create(dir, 'vm', base());
  const blocks = s.blocks;
  // Page 0 rewritten by every checkpoint, page e by checkpoint e: 1 is written alone, 2..5 merged.
  for (const e of [1, 2, 3, 4, 5])
    await s.commitRecord(
      encodeRecord(
        cp(e, [
          [0, 20 + e],
          [4096 * e, 30 + e],
        ]),
        blocks,
      ),
      e,
      'memory',
    );
  await s.settled();
  const ram = await (await ReplicaStore.open(dir)).readImage('mem0');
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5].map((i) => ram[i * 4096]),
    [25, 31, 32, 33, 34, 35],
  );
  // A crash after a merged record's commit point (epochs 6..8 in one redo record): reopening applies it.
  writeFileSync(
    join(dir, 'redo.ckpt'),
    encodeRecord(
      cp(8, [
        [0, 77],
        [4096 * 7, 78],
      ]),
      blocks,
    ),
  );
  const r = await ReplicaStore.open(dir);
  assert.equal(r.epoch, 8);
  const after = await r.readImage('mem0');
  assert.deepEqual([after[0], after[7 * 4096], after[5 * 4096]], [77, 78, 35]);
});

test('pre-sent pages commit only with their checkpoint, its own copies winning, in both durabilities', async (t) => {
  for (const durability of ['disk', 'memory'] as const) {
    const dir = makeTempDir();
    t.after(() => removeTempDir(dir));
    const s = await ReplicaStore.create(dir, 'vm', base());
    const blocks = base().blocks;
    // Staged: pages 0 and 1 (page 1 sent again in the pause with newer contents), a zero page 2.
    const staged = cp(1, [
      [0, 11],
      [4096, 12],
      [8192, null],
    ]).pages;
    const rec = await s.commitRecord(encodeRecord(cp(1, [[4096, 22]]), blocks), 1, durability, staged);
    assert.equal(rec.pages.length, 4);
    await s.settled();
    const ram = await s.readImage('mem0');
    assert.deepEqual([ram[0], ram[4096], ram[8192], ram[3 * 4096]], [11, 22, 0, 1], durability);
    const r = await ReplicaStore.open(dir);
    assert.equal(r.epoch, 1);
    assert.deepEqual(await r.readImage('mem0'), ram);
  }
});

test('a record with page references commits them resolved, and is written whole, in both durabilities', async (t) => {
  for (const durability of ['disk', 'memory'] as const) {
    const dir = makeTempDir();
    t.after(() => removeTempDir(dir));
    const s = await ReplicaStore.create(dir, 'vm', base());
    const blocks = base().blocks;
    const primary = new SentPages(blocks);
    const mirror = new PageMirror(blocks);
    const send = (c: Checkpoint) =>
      s.commitRecord(
        encodeRecord({ ...c, pages: primary.filter(c.pages).pages }, blocks, 'wire'),
        c.epoch,
        durability,
        [],
        (pages) => mirror.resolve(pages, `checkpoint ${c.epoch}`),
      );
    await send(
      cp(1, [
        [0, 5],
        [4096, 6],
      ]),
    );
    // page 0 again with one byte changed (a DELTA), page 1 unchanged (SAME)
    const two = cp(2, [
      [0, 5],
      [4096, 6],
    ]);
    two.pages[0]!.data![77] = 9;
    const rec = await send(two);
    assert.deepEqual(
      rec.pages.map((p) => p.offset),
      [0],
      'the unchanged page is not written again',
    );
    await s.settled();
    const ram = await s.readImage('mem0');
    assert.deepEqual([ram[0], ram[77], ram[4096], ram[8192]], [5, 9, 6, 1], durability);
    const r = await ReplicaStore.open(dir); // what is on disk holds whole pages only
    assert.equal(r.epoch, 2);
    assert.deepEqual(await r.readImage('mem0'), ram);
  }
});
