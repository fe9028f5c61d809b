import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NetRelay } from '../../src/io/index.ts';

const frame = (fill: number, len: number): Buffer => {
  const f = Buffer.alloc(4 + len, fill);
  f.writeUInt32BE(len, 0);
  return f;
};

/** Splits what the guest side read back into frames (each must be whole and in order). */
function frames(stream: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let off = 0;
  while (off + 4 <= stream.length) {
    const len = stream.readUInt32BE(off);
    out.push(stream.subarray(off, off + 4 + len));
    off += 4 + len;
  }
  assert.equal(off, stream.length, 'the guest got whole frames only');
  return out;
}

test('NetRelay: the outside stream reaches the guest as whole frames (a frame from elsewhere never lands inside one); each is seen once', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'rubato-relay-'));
  const relay = new NetRelay(join(dir, 'g.sock'));
  let outsidePeer: Socket | null = null;
  const outside = createServer((s) => {
    outsidePeer = s;
  });
  await new Promise<void>((r) => outside.listen(join(dir, 'o.sock'), r));
  try {
    await relay.start();
    const guest = connect(join(dir, 'g.sock'));
    await new Promise<void>((r) => guest.once('connect', () => r()));
    let got = Buffer.alloc(0);
    guest.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
    });
    await relay.attachOutside(join(dir, 'o.sock'));
    while (!outsidePeer) await new Promise((r) => setTimeout(r, 5));
    const seen: Buffer[] = [];
    relay.onOutsideFrame = (f) => seen.push(Buffer.from(f));
    const a = frame(1, 10);
    const b = frame(2, 3000);
    const c = frame(3, 7);
    // A whole, then B's first bytes; a mirrored frame C arrives meanwhile; then the rest of B.
    (outsidePeer as Socket).write(Buffer.concat([a, b.subarray(0, 100)]));
    await new Promise((r) => setTimeout(r, 50));
    relay.toGuest(c);
    (outsidePeer as Socket).write(b.subarray(100));
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(frames(got), [a, c, b]);
    assert.deepEqual(seen, [a, b], 'the outside frames, each once, whole');
    assert.equal(relay.stats().framesToGuest, 3);
    guest.destroy();
  } finally {
    await relay.close();
    (outsidePeer as Socket | null)?.destroy();
    await new Promise<void>((r) => outside.close(() => r()));
    rmSync(dir, { recursive: true, force: true });
  }
});

test('Framer: a stream cut at every point gives each frame once, whole and in order; only a cut frame is copied', async () => {
  const { Framer } = await import('../../src/io/index.ts');
  const stream = Buffer.concat([frame(1, 3), frame(2, 0), frame(3, 1500), frame(4, 7), frame(5, 64)]);
  for (let a = 0; a <= stream.length; a += 7)
    for (let b = a; b <= stream.length; b += 97) {
      const framer = new Framer();
      const seen: Buffer[] = [];
      const written: Buffer[] = [];
      for (const part of [stream.subarray(0, a), stream.subarray(a, b), stream.subarray(b)]) {
        const runs = framer.push(part, (f) => seen.push(Buffer.from(f)));
        if (runs) written.push(...runs);
      }
      assert.deepEqual(seen, frames(stream), `cut at ${a} and ${b}`);
      assert.ok(Buffer.concat(written).equals(stream), `written on as it came, cut at ${a} and ${b}`);
    }
  // frames that lie whole in one read are handed on as a view into it, not a copy
  const whole = new Framer().push(stream)!;
  assert.equal(whole.length, 1);
  assert.equal(whole[0]!.buffer, stream.buffer);
  const bad = Buffer.alloc(8);
  bad.writeUInt32BE(1 << 20, 0);
  assert.throws(() => new Framer().push(bad), /network frame of 1048576 bytes/);
});
