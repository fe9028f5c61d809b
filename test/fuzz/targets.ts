// Fuzz targets for every decoder that reads bytes from outside: replication frames, checkpoint
// records, QEMU's migration stream, NBD requests. Seeded and deterministic; each target mutates
// valid inputs (bit flips, truncation, splices, duplication) or sends noise, and asserts the only
// outcomes are a correct decode or a typed RubatoError — never another exception, never a frame
// that differs from what was sent.

import assert from 'node:assert/strict';
import { crc32 } from 'node:zlib';
import {
  FrameDecoder,
  FrameEncoder,
  FrameType,
  helloKeys,
  sessionKeys,
  type FrameKey,
} from '../../src/replication/protocol/frame.ts';
import {
  decodePresend,
  decodeRecord,
  encodePresendParts,
  encodeRecord,
} from '../../src/replication/protocol/record.ts';
import { ByteReader } from '../../src/util/byte-reader.ts';
import { newRamState, readPrecopy } from '../../src/capture/stream/parser.ts';
import { encodeConfiguration, encodeHeader, MIG_CMD, RAM_FLAG, VM } from '../../src/qemu/stream-format.ts';
import {
  CMD,
  decodeRequest,
  validateRequest,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
} from '../../src/io/disk/nbd-proto.ts';
import { isRubatoError } from '../../src/util/errors.ts';

export type Rng = (n: number) => number;

export function rng(seed: number): Rng {
  let s = seed >>> 0 || 1;
  return (n) => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s % n;
  };
}

/** One of several mutations of `b`. */
export function mutate(b: Buffer, r: Rng): Buffer {
  const m = Buffer.from(b);
  switch (r(5)) {
    case 0: {
      const i = r(m.length * 8);
      m[i >> 3] = m[i >> 3]! ^ (1 << (i & 7));
      return m;
    }
    case 1:
      return m.subarray(0, r(m.length));
    case 2: {
      const i = r(m.length);
      return Buffer.concat([m.subarray(0, i), randomish(r, 1 + r(16)), m.subarray(i)]);
    }
    case 3: {
      const i = r(m.length);
      const j = i + r(m.length - i);
      return Buffer.concat([m, m.subarray(i, j)]);
    }
    default: {
      for (let k = 0; k < 1 + r(4); k++) m[r(m.length)] = r(256);
      return m;
    }
  }
}

function randomish(r: Rng, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = r(256);
  return b;
}

const typed = (e: unknown) => {
  if (!isRubatoError(e)) throw e;
};

function feed<T>(bytes: Buffer, r: Rng, push: (c: Buffer) => T[]): T[] {
  const out: T[] = [];
  for (let i = 0; i < bytes.length; ) {
    const n = 1 + r(300);
    out.push(...push(bytes.subarray(i, i + n)));
    i += n;
  }
  return out;
}

export interface FuzzTarget {
  name: string;
  run(r: Rng): void;
}

const psk = Buffer.alloc(32, 7);
const keys = sessionKeys(psk, Buffer.alloc(32, 1), Buffer.alloc(32, 2));
const hello = helloKeys(psk);

function frameStream(
  k: FrameKey,
  r: Rng,
): { wire: Buffer; sent: Array<{ type: number; epoch: number; payload: Buffer }> } {
  const enc = new FrameEncoder(k);
  const sent = Array.from({ length: 1 + r(4) }, () => ({
    type: [FrameType.CKPT, FrameType.ACK, FrameType.HEARTBEAT][r(3)]!,
    epoch: r(1000),
    payload: randomish(r, r(3000)),
  }));
  return { wire: Buffer.concat(sent.map((f) => enc.encode(f.type, f.epoch, f.payload))), sent };
}

export const TARGETS: FuzzTarget[] = [
  {
    name: 'frame decoder: mutated, truncated, spliced and replayed session frames',
    run(r) {
      const { wire, sent } = frameStream(keys.p2s, r);
      const bad = mutate(wire, r);
      let got: ReturnType<FrameDecoder['push']> = [];
      try {
        got = feed(bad, r, (c) => new FrameDecoder(keys.p2s, 'fuzz', 1 << 20).push(c));
      } catch (e) {
        typed(e);
      }
      // Whatever decodes is exactly what was sent, in order (a prefix: the rest failed or is missing).
      got.forEach((f, i) => {
        assert.equal(f.type, sent[i]?.type);
        assert.deepEqual(f.payload, sent[i]?.payload);
      });
    },
  },
  {
    name: 'frame decoder: frames reflected from the other direction or under the hello key never decode',
    run(r) {
      const { wire } = frameStream(r(2) ? keys.s2p : hello.p2s, r);
      assert.throws(
        () => new FrameDecoder(keys.p2s, 'fuzz', 1 << 20).push(wire),
        (e: unknown) => isRubatoError(e),
      );
    },
  },
  {
    name: 'frame decoder: noise before authentication',
    run(r) {
      const noise = randomish(r, 1 + r(2000));
      if (r(2) && noise.length >= 4) noise.writeUInt32BE(r(1 << 16), 0);
      try {
        new FrameDecoder(hello.p2s, 'fuzz').push(noise);
      } catch (e) {
        typed(e);
      }
    },
  },
  {
    name: 'checkpoint record decoder (checksums recomputed half the time, so deeper checks run)',
    run(r) {
      const blocks = [
        { id: 'mem0', lengthBytes: 16 * 4096 },
        { id: 'disk0', lengthBytes: 8 * 4096 },
      ];
      const pages = Array.from({ length: r(6) }, () => ({
        block: r(2) ? 'mem0' : 'disk0',
        offset: 4096 * r(8),
        data: r(3) ? randomish(r, 4096) : null,
        fill: r(256),
      }));
      const rec = encodeRecord(
        { epoch: 1 + r(100), pages, deviceState: Buffer.from([VM.SECTION_FULL, 1, 2, VM.EOF]) },
        blocks,
      );
      const bad = mutate(rec, r);
      if (r(2) && bad.length > 8) {
        bad.writeUInt32BE(crc32(bad.subarray(0, bad.length - 4)), bad.length - 4);
      }
      try {
        decodeRecord(bad, blocks, r(2) ? 'wire' : 'disk');
      } catch (e) {
        typed(e);
      }
    },
  },
  {
    name: 'pre-sent pages decoder',
    run(r) {
      const blocks = [
        { id: 'mem0', lengthBytes: 16 * 4096 },
        { id: 'disk0', lengthBytes: 8 * 4096 },
      ];
      const pages = Array.from({ length: r(6) }, () => ({
        block: r(2) ? 'mem0' : 'disk0',
        offset: 4096 * r(8),
        data: r(3) ? randomish(r, 4096) : null,
        fill: r(256),
      }));
      const { parts, length } = encodePresendParts(1 + r(100), pages, blocks);
      const bad = mutate(Buffer.concat(parts as Buffer[], length), r);
      try {
        const got = decodePresend(bad, blocks);
        // Whatever decodes stays inside its blocks, whole pages only.
        for (const p of got.pages)
          assert.ok(
            p.offset % 4096 === 0 &&
              p.offset + 4096 <= blocks.find((b) => b.id === p.block)!.lengthBytes &&
              (!p.data || p.data.length === 4096),
          );
      } catch (e) {
        typed(e);
      }
    },
  },
  {
    name: 'migration stream parser',
    run(r) {
      const bad = mutate(precopyStream(r), r);
      const rd = new ByteReader('fuzz');
      const p = readPrecopy(rd, newRamState(), { page: () => {}, zero: () => {} });
      p.catch(() => {}); // inspected below
      feed(bad, r, (c) => {
        rd.push(c);
        return [];
      });
      rd.end();
      pending.push(p.then(() => {}, typed));
    },
  },
  {
    name: 'NBD request codec',
    run(r) {
      const h = randomish(r, REQUEST_HEADER_BYTES);
      if (r(2)) h.writeUInt32BE(REQUEST_MAGIC, 0);
      const req = decodeRequest(h);
      const v = validateRequest(req, 1 << 20, r(2) === 0);
      // A data request accepted stays inside the export (FLUSH and DISC carry no range that is used).
      const data = req.type !== CMD.DISC && req.type !== CMD.FLUSH;
      if (v.ok && data)
        assert.ok(
          req.offset + req.length <= 1 << 20,
          `a valid request stays inside the export (type ${req.type}, ${req.offset}+${req.length})`,
        );
    },
  },
];

/** Async outcomes of the stream parser target, awaited by the runner. */
export const pending: Promise<void>[] = [];

function precopyStream(r: Rng): Buffer {
  const parts: Buffer[] = [encodeHeader(), encodeConfiguration('pc-i440fx-7.2', [])];
  const u8 = (v: number) => parts.push(Buffer.from([v]));
  const be16 = (v: number) => {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    parts.push(b);
  };
  const be32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v);
    parts.push(b);
  };
  const be64 = (v: number) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(v));
    parts.push(b);
  };
  const str8 = (s: string) => {
    u8(s.length);
    parts.push(Buffer.from(s, 'latin1'));
  };
  u8(VM.COMMAND);
  be16(MIG_CMD.ENABLE_COLO);
  be16(0);
  u8(VM.SECTION_START);
  be32(2);
  str8('ram');
  be32(0);
  be32(4);
  be64((16 * 4096) | RAM_FLAG.MEM_SIZE);
  str8('mem0');
  be64(16 * 4096);
  be64(RAM_FLAG.EOS);
  u8(VM.SECTION_FOOTER);
  be32(2);
  u8(VM.SECTION_PART);
  be32(2);
  for (let i = 0; i < 1 + r(4); i++) {
    be64((4096 * r(16)) | RAM_FLAG.PAGE);
    str8('mem0');
    parts.push(randomish(r, 4096));
  }
  be64(RAM_FLAG.EOS);
  u8(VM.SECTION_FOOTER);
  be32(2);
  u8(VM.SECTION_FULL);
  be32(3);
  str8('timer');
  be32(0);
  be32(2);
  parts.push(randomish(r, 8));
  u8(VM.SECTION_FOOTER);
  be32(3);
  u8(VM.EOF);
  const desc = Buffer.from(
    JSON.stringify({
      page_size: 4096,
      devices: [
        {
          name: 'timer',
          instance_id: 0,
          vmsd_name: 'timer',
          version: 2,
          fields: [{ name: 't', type: 'buffer', size: 8 }],
        },
      ],
    }),
  );
  u8(VM.VMDESCRIPTION);
  be32(desc.length);
  parts.push(desc);
  return Buffer.concat(parts);
}

/** Runs every target for `ms` (or `iterations` each, whichever comes first). */
export async function fuzzAll(
  seed: number,
  ms: number,
  iterations = Number.POSITIVE_INFINITY,
): Promise<Record<string, number>> {
  const counts: Record<string, number> = {};
  for (const t of TARGETS) {
    const r = rng(seed ^ (t.name.length * 2654435761));
    const until = performance.now() + ms;
    let n = 0;
    while (n < iterations && performance.now() < until) {
      t.run(r);
      n++;
      if (pending.length > 64) await Promise.all(pending.splice(0));
    }
    await Promise.all(pending.splice(0));
    counts[t.name] = n;
  }
  return counts;
}
