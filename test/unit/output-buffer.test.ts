import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OutputBuffer } from '../../src/io/net/output-buffer.ts';

test('frames wait for the commit of their epoch', () => {
  const b = new OutputBuffer(1 << 20);
  b.hold();
  assert.equal(b.push(Buffer.from('a'), 0), null);
  const t1 = b.advance(); // checkpoint 1 taken: 'a' belongs to it
  assert.equal(b.push(Buffer.from('b'), 1), null);
  assert.deepEqual(b.commit(t1).map(String), ['a']);
  const t2 = b.advance();
  assert.deepEqual(b.commit(t2).map(String), ['b']);
});

test('property: no frame leaves before its epoch commits, under reordered and duplicate acks and link loss', () => {
  let seed = 7;
  const rnd = (n: number) => { seed = (seed * 1103515245 + 12345) >>> 0; return seed % n; };
  for (let run = 0; run < 200; run++) {
    const b = new OutputBuffer(1 << 30);
    b.hold();
    const tagOf = new Map<string, number>();
    const closed: number[] = [];
    let committedMax = 0;
    let id = 0;
    for (let step = 0; step < 300; step++) {
      const op = rnd(10);
      if (op < 5) {
        const name = `f${id++}`;
        tagOf.set(name, b.openTag);
        assert.equal(b.push(Buffer.from(name), step), null);
      } else if (op < 7) {
        closed.push(b.advance());
      } else if (op < 9 && closed.length) {
        // an ack for any closed epoch: in order, stale (reordered) or repeated (duplicate)
        const tag = closed[rnd(closed.length)]!;
        const out = b.commit(tag);
        committedMax = Math.max(committedMax, tag);
        for (const f of out) assert.ok(tagOf.get(String(f))! <= committedMax, `released ${String(f)} (tag ${tagOf.get(String(f))}) with commit ${committedMax}`);
        // every frame up to the commit has left
        for (const [name, t] of tagOf) if (t <= committedMax) tagOf.delete(name);
      } else {
        // link loss: no commit arrives; nothing may leave on its own
        assert.equal(b.stats(step).frames, tagOf.size);
      }
    }
  }
});

test('the bound drops, visibly, instead of queueing without limit', () => {
  const b = new OutputBuffer(10);
  b.hold();
  b.push(Buffer.alloc(8), 0);
  assert.equal(b.push(Buffer.alloc(8), 0), null);
  assert.equal(b.stats(0).dropped, 1);
  assert.equal(b.stats(0).frames, 1);
});

test('committing an epoch still open is a bug, and is caught', () => {
  const b = new OutputBuffer(100);
  b.hold();
  assert.throws(() => b.commit(b.openTag), /invariant/);
});

test('giving up protection releases everything, then passes through', () => {
  const b = new OutputBuffer(100);
  b.hold();
  b.push(Buffer.from('x'), 0);
  assert.deepEqual(b.giveUp().map(String), ['x']);
  assert.equal(String(b.push(Buffer.from('y'), 0)), 'y');
});
