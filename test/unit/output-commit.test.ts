import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OutputCommit, type DiskEpochCut } from '../../src/commit/output-commit.ts';

const frames = (out: Array<{ frame: Buffer }>) => out.map((o) => String(o.frame));

test('frames wait for the acknowledgement of their epoch', () => {
  const b = new OutputCommit(1 << 20);
  b.hold(0);
  assert.equal(b.push(Buffer.from('a'), 0), null);
  b.closeEpoch(1); // checkpoint 1 taken: 'a' belongs to it
  assert.equal(b.push(Buffer.from('b'), 1), null);
  assert.deepEqual(frames(b.acknowledged(1)), ['a']);
  b.closeEpoch(2);
  assert.deepEqual(frames(b.acknowledged(2)), ['b']);
});

test('property: no frame leaves before its epoch is acknowledged, under coalesced acks and link loss', () => {
  let seed = 7;
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  for (let run = 0; run < 200; run++) {
    const b = new OutputCommit(1 << 30);
    b.hold(0);
    const epochOf = new Map<string, number>();
    let closed = 0;
    let acked = -1;
    let id = 0;
    for (let step = 0; step < 300; step++) {
      const op = rnd(10);
      if (op < 5) {
        const name = `f${id++}`;
        epochOf.set(name, b.openEpoch);
        assert.equal(b.push(Buffer.from(name), step), null);
      } else if (op < 7) {
        b.closeEpoch(++closed);
      } else if (op < 9 && closed > acked) {
        // an ack for a closed epoch: the next one, or a later one (acks coalesce)
        const epoch = Math.min(closed, acked + 1 + rnd(3));
        acked = epoch;
        for (const f of b.acknowledged(epoch))
          assert.ok(epochOf.get(String(f.frame))! <= acked, `released ${String(f.frame)} with ${acked} acked`);
        for (const [name, e] of epochOf) if (e <= acked) epochOf.delete(name);
      } else {
        // link loss: no ack arrives; nothing may leave on its own
        assert.equal(b.stats(step).frames, epochOf.size);
      }
    }
  }
});

test('the bound drops, visibly, instead of queueing without limit', () => {
  const b = new OutputCommit(10);
  b.hold(0);
  b.push(Buffer.alloc(8), 0);
  assert.equal(b.push(Buffer.alloc(8), 0), null);
  assert.equal(b.stats(0).counts.dropped, 1);
  assert.equal(b.stats(0).frames, 1);
});

test('every assertion of output commit fires on the defect it guards against', () => {
  assert.throws(() => new OutputCommit(0), /positive bound/);
  const idle = new OutputCommit(100);
  assert.throws(() => idle.closeEpoch(0), /closed while not holding/, 'an epoch closed before protection');
  assert.throws(() => idle.acknowledged(0), /ack of epoch 0 while not holding/, 'an ack before protection');
  const b = new OutputCommit(100);
  b.hold(0);
  b.push(Buffer.from('a'), 0);
  assert.throws(() => b.acknowledged(b.openEpoch), /still open/, 'an ack of output no checkpoint covers yet');
  assert.equal(b.stats(0).frames, 1, 'and nothing left');
  b.closeEpoch(1);
  assert.throws(() => b.closeEpoch(3), /closing epoch 3 while epoch 2 is open/, 'an epoch skipped');
  assert.deepEqual(frames(b.acknowledged(1)), ['a']);
  assert.throws(() => b.acknowledged(1), /went backwards \(1 after 1\)/, 'a duplicate ack');
  assert.throws(() => b.acknowledged(0), /went backwards \(0 after 1\)/, 'an older ack');
});

test('every frame counts in exactly one way out: released, passed through, released unprotected, dropped', () => {
  const b = new OutputCommit(10);
  assert.equal(String(b.push(Buffer.from('p'), 0)), 'p'); // before protection
  b.hold(0);
  b.push(Buffer.from('r'), 0);
  b.push(Buffer.alloc(20), 0); // over the bound
  b.closeEpoch(1);
  b.acknowledged(1);
  b.push(Buffer.from('u'), 0);
  b.releaseUnprotected('no standby');
  b.push(Buffer.from('q'), 0); // unprotected: passes
  assert.deepEqual(b.stats(0).counts, {
    released: 1,
    passedThrough: 2,
    releasedUnprotected: 1,
    dropped: 1,
    compared: 0,
  });
});

test('giving up protection releases everything, counted with its reason, then passes through', () => {
  const b = new OutputCommit(100);
  b.hold(0);
  b.push(Buffer.from('x'), 0);
  assert.deepEqual(b.releaseUnprotected('no standby for 2000 ms').map(String), ['x']);
  assert.deepEqual(b.state, { kind: 'unprotected', reason: 'no standby for 2000 ms' });
  assert.equal(String(b.push(Buffer.from('y'), 0)), 'y');
  const s = b.stats(0);
  assert.equal(s.counts.releasedUnprotected, 1);
  assert.equal(s.unprotectedReleases, 1);
});

test('a resynchronisation covers output still held from the lost session with the new full image', () => {
  const b = new OutputCommit(100);
  b.hold(0);
  b.closeEpoch(1);
  b.push(Buffer.from('old'), 0); // epoch 2 of the lost generation
  const base = b.hold(0); // new generation: its full image covers 'old'
  assert.equal(base.frames, 1);
  assert.deepEqual(frames(b.acknowledged(0)), ['old']);
});

test('closing an epoch cuts the disk epoch with it', async () => {
  let cuts = 0;
  const disk = {
    cutEpoch: (): DiskEpochCut => {
      const writes = ++cuts;
      return {
        collect: () =>
          Promise.resolve({
            disks: [{ block: 'disk0', pages: new Map([[writes * 4096, Buffer.alloc(4096)]]) }],
            writes,
            flushes: 0,
          }),
      };
    },
  };
  const b = new OutputCommit(100, disk);
  const base = b.hold(0).disk;
  const c = b.closeEpoch(1);
  assert.equal(cuts, 2, 'each close cuts the disk at once');
  assert.equal((await base?.collect())?.writes, 1);
  assert.equal((await c.disk?.collect())?.writes, 2);
  assert.equal(c.epoch, 1);
});
