import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import {
  FrameDecoder,
  FrameEncoder,
  FrameType,
  encodeFrame,
  helloKeys,
  sessionKeys,
  HEADER_BYTES,
  HELLO_MAX_FRAME_BYTES,
  type FrameKey,
} from '../../src/replication/protocol/frame.ts';
import {
  decodeHello,
  encodeHello,
  decodeBaseData,
  decodeLayout,
  encodeLayout,
} from '../../src/replication/protocol/messages.ts';
import { isRubatoError } from '../../src/util/errors.ts';

const key: FrameKey = { kind: 'aead', key: randomBytes(32) };
const hello: FrameKey = { kind: 'hmac', key: randomBytes(32) };

function roundTrip(frames: Buffer[], chunk: number) {
  const all = Buffer.concat(frames);
  const dec = new FrameDecoder(key, 'test');
  const out = [];
  for (let i = 0; i < all.length; i += chunk) out.push(...dec.push(all.subarray(i, i + chunk)));
  return out;
}

test('frames round-trip through any chunking', () => {
  const enc = new FrameEncoder(key);
  const frames = [
    enc.encode(FrameType.CKPT, 7, randomBytes(10_000)),
    enc.encode(FrameType.ACK, 7),
    enc.encode(FrameType.HEARTBEAT, 0, randomBytes(8)),
  ];
  for (const chunk of [1, 3, 64, 1 << 20]) {
    const out = roundTrip(frames, chunk);
    assert.deepEqual(
      out.map((f) => [f.type, f.epoch, f.seq]),
      [
        [FrameType.CKPT, 7, 1],
        [FrameType.ACK, 7, 2],
        [FrameType.HEARTBEAT, 0, 3],
      ],
    );
  }
});

test('a frame under the wrong key is rejected as an authentication failure', () => {
  const f = new FrameEncoder({ kind: 'aead', key: randomBytes(32) }).encode(FrameType.ACK, 1);
  assert.throws(
    () => new FrameDecoder(key, 'p').push(f),
    (e: unknown) => isRubatoError(e, 'RUBATO_AUTH_FAILED'),
  );
});

test('every single-bit corruption of a frame is rejected with a typed error', () => {
  for (const k of [key, hello]) {
    const f = new FrameEncoder(k).encode(FrameType.CKPT, 3, randomBytes(300));
    for (let i = 0; i < f.length * 8; i += 3) {
      const m = Buffer.from(f);
      m[i >> 3] = m[i >> 3]! ^ (1 << (i & 7));
      const dec = new FrameDecoder(k, 'p');
      let frames: unknown[] = [];
      try {
        frames = dec.push(m);
      } catch (e) {
        assert.ok(isRubatoError(e), String(e));
        continue;
      }
      // A corrupted length may leave the decoder waiting for more: it must not have produced a frame.
      assert.equal(frames.length, 0, `bit ${i}`);
    }
  }
});

test('replayed and reordered frames break the session', () => {
  const enc = new FrameEncoder(key);
  const a = enc.encode(FrameType.ACK, 1);
  const b = enc.encode(FrameType.ACK, 2);
  const dec = new FrameDecoder(key, 'p');
  dec.push(a);
  assert.throws(
    () => dec.push(a),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL') && /sequence/.test(e.message),
  );
  const dec2 = new FrameDecoder(key, 'p');
  assert.throws(
    () => dec2.push(b),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
});

test('a wrong protocol version is named', () => {
  const f = encodeFrame({ type: FrameType.ACK, epoch: 1, seq: 1, payload: Buffer.alloc(0) }, hello);
  f[5] = 9;
  // recompute the MAC so only the version is wrong
  createHmac('sha256', hello.key).update(f.subarray(0, HEADER_BYTES)).digest().copy(f, HEADER_BYTES);
  assert.throws(
    () => new FrameDecoder(hello, 'p').push(f),
    (e: unknown) => isRubatoError(e, 'RUBATO_VERSION_MISMATCH') && /version 9/.test(e.message),
  );
});

test('absurd lengths are rejected before any allocation', () => {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(0xffffffff, 0);
  assert.throws(
    () => new FrameDecoder(key, 'p').push(b),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
});

test('random input never escapes as an untyped error', () => {
  let seed = 99;
  const rnd = () => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed;
  };
  for (let i = 0; i < 500; i++) {
    const buf = Buffer.alloc(1 + (rnd() % 200));
    for (let j = 0; j < buf.length; j++) buf[j] = rnd() & 0xff;
    if (i % 2 && buf.length >= 4) buf.writeUInt32BE(Math.min(buf.length, 60), 0);
    try {
      new FrameDecoder(key, 'p').push(buf);
    } catch (e) {
      assert.ok(isRubatoError(e), String(e));
    }
  }
});

test('message payloads are checked at the boundary', () => {
  assert.throws(
    () => decodeHello(Buffer.alloc(10)),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
  const bad = encodeHello(randomBytes(32), randomBytes(32), { vm: 'x', spec: { name: 'x' } } as never);
  assert.throws(
    () => decodeHello(bad),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
  const layout = decodeLayout(
    encodeLayout({ machine: 'pc', blocks: [{ id: 'mem0', lengthBytes: 8192 }], totalBytes: 8192 }),
  );
  const d = Buffer.alloc(12 + 4096);
  d.writeBigUInt64BE(8192n, 4);
  assert.throws(
    () => decodeBaseData(d, layout),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL') && /beyond/.test(e.message),
  );
  const psk = randomBytes(32);
  const h = helloKeys(psk);
  const sk = sessionKeys(psk, randomBytes(32), randomBytes(32));
  assert.notDeepEqual(h.p2s.key, h.s2p.key);
  assert.notDeepEqual(sk.p2s.key, sk.s2p.key);
  assert.notDeepEqual(h.p2s.key, sk.p2s.key);
});

test('a frame reflected back to its sender fails: each direction has its own key', () => {
  const psk = randomBytes(32);
  const sk = sessionKeys(psk, randomBytes(32), randomBytes(32));
  const heartbeat = new FrameEncoder(sk.s2p).encode(FrameType.HEARTBEAT, 0, randomBytes(8));
  // the standby's own heartbeat, sent back to it as if from the primary
  assert.throws(
    () => new FrameDecoder(sk.p2s, 'p').push(heartbeat),
    (e: unknown) => isRubatoError(e, 'RUBATO_AUTH_FAILED'),
  );
  assert.equal(new FrameDecoder(sk.s2p, 'p').push(heartbeat).length, 1);
});

test('session payloads are encrypted: the plaintext is nowhere on the wire', () => {
  const secret = Buffer.from('Linux version 6.1.0-rubato-test '.repeat(64));
  const wire = new FrameEncoder(key).encode(FrameType.CKPT, 1, secret);
  assert.equal(wire.includes(Buffer.from('Linux version')), false);
  assert.deepEqual(new FrameDecoder(key, 'p').push(wire)[0]!.payload, secret);
});

test('before authentication nothing above the hello limit is read, let alone buffered', () => {
  const head = Buffer.alloc(HEADER_BYTES);
  head.writeUInt32BE(500 << 20, 0); // a 500 MiB claim
  assert.throws(
    () => new FrameDecoder(hello, 'p').push(head),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL') && /announces/.test(e.message),
  );
  const big = new FrameEncoder(hello).encode(FrameType.HELLO, 0, randomBytes(HELLO_MAX_FRAME_BYTES));
  assert.throws(
    () => new FrameDecoder(hello, 'p').push(big),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL'),
  );
  // after the handshake the limit is the session's: a bounded decoder buffers at most one frame
  const dec = new FrameDecoder(key, 'p', 1 << 20);
  assert.throws(() => dec.push(new FrameEncoder(key).encode(FrameType.CKPT, 1, randomBytes(2 << 20))), /announces/);
});

test("every frame carries the session's witness generation; a decoder bound to one refuses any other", () => {
  const enc = new FrameEncoder(key);
  enc.bindGeneration(7);
  const ckpt = enc.encode(FrameType.CKPT, 3, randomBytes(100));
  const dec = new FrameDecoder(key, 'p');
  dec.bindGeneration(7);
  const [f] = dec.push(ckpt);
  assert.equal(f!.generation, 7);
  // The same session's next frame, sent under an older generation (a primary that lost the witness).
  enc.bindGeneration(6);
  assert.throws(
    () => dec.push(enc.encode(FrameType.CKPT, 4, randomBytes(100))),
    (e: unknown) => isRubatoError(e, 'RUBATO_PROTOCOL') && /generation 6.*session's is 7/.test((e as Error).message),
  );
  // The generation is authenticated (it is part of the header, the AEAD's associated data): rewriting it breaks the
  // tag.
  const forged = Buffer.from(new FrameEncoder(key).encode(FrameType.ACK, 1));
  forged.writeUInt32BE(9, 8);
  assert.throws(
    () => new FrameDecoder(key, 'p').push(forged),
    (e: unknown) => isRubatoError(e, 'RUBATO_AUTH_FAILED'),
  );
});

test('a frame encrypted slice by slice from its parts decodes to their concatenation, whatever the slice size', () => {
  const key: FrameKey = { kind: 'aead', key: randomBytes(32) };
  const parts = [
    randomBytes(24),
    randomBytes(12),
    randomBytes(4096),
    Buffer.alloc(0),
    randomBytes(12),
    randomBytes(4096),
    randomBytes(777),
    randomBytes(4),
  ];
  const length = parts.reduce((n, p) => n + p.length, 0);
  for (const slice of [1, 4096, 5000, 65536]) {
    const enc = new FrameEncoder(key);
    enc.bindGeneration(7);
    const pieces = [...enc.encodeSlices(FrameType.CKPT, 5, { parts, length }, slice)];
    assert.ok(
      pieces.every((p) => p.length <= Math.max(slice, HEADER_BYTES)),
      'no piece above a slice (or the header)',
    );
    const dec = new FrameDecoder(key, 'p');
    dec.bindGeneration(7);
    // Delivered in odd chunks, as a socket would.
    const wire = Buffer.concat(pieces);
    const frames = [];
    for (let o = 0; o < wire.length; o += 1000) frames.push(...dec.push(wire.subarray(o, o + 1000), o));
    assert.equal(frames.length, 1);
    assert.deepEqual(frames[0]!.payload, Buffer.concat(parts));
    assert.equal(frames[0]!.epoch, 5);
    assert.equal(frames[0]!.startedMs, 0, 'the arrival time of the chunk that carried its header');
  }
  // A payload shorter than announced is caught before anything is sent as complete.
  assert.throws(
    () => [...new FrameEncoder(key).encodeSlices(FrameType.CKPT, 1, { parts, length: length + 1 }, 4096)],
    /invariant/,
  );
});
