import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ByteReader } from '../../src/util/byte-reader.ts';
import { newRamState, readPrecopy, readRamRecords, type PageSink } from '../../src/capture/stream/parser.ts';
import { encodeConfiguration, encodeHeader, MIG_CMD, RAM_FLAG, VM } from '../../src/qemu/stream-format.ts';
import { isRubatoError } from '../../src/util/errors.ts';

/** Builds a migration stream the way QEMU 7.2 writes it, for the decoder's tests. */
class StreamBuilder {
  parts: Buffer[] = [];
  u8(v: number) {
    this.parts.push(Buffer.from([v]));
    return this;
  }
  be16(v: number) {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    this.parts.push(b);
    return this;
  }
  be32(v: number) {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v);
    this.parts.push(b);
    return this;
  }
  be64(v: number) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(v));
    this.parts.push(b);
    return this;
  }
  str8(s: string) {
    this.u8(s.length);
    this.parts.push(Buffer.from(s, 'latin1'));
    return this;
  }
  raw(b: Buffer) {
    this.parts.push(b);
    return this;
  }
  build() {
    return Buffer.concat(this.parts);
  }
}

const BLOCK_LEN = 16 * 4096;

function precopyStream(opts: { pages?: Array<[number, number]>; extraFlags?: number } = {}): Buffer {
  const s = new StreamBuilder().raw(encodeHeader()).raw(encodeConfiguration('pc-i440fx-7.2', []));
  s.u8(VM.COMMAND).be16(MIG_CMD.ENABLE_COLO).be16(0);
  s.u8(VM.SECTION_START).be32(2).str8('ram').be32(0).be32(4);
  s.be64(BLOCK_LEN | RAM_FLAG.MEM_SIZE)
    .str8('mem0')
    .be64(BLOCK_LEN);
  s.be64(RAM_FLAG.EOS).u8(VM.SECTION_FOOTER).be32(2);
  s.u8(VM.SECTION_PART).be32(2);
  let first = true;
  for (const [off, fill] of opts.pages ?? [
    [0, 1],
    [4096, 2],
  ]) {
    s.be64(off | RAM_FLAG.PAGE | (first ? 0 : RAM_FLAG.CONTINUE) | (opts.extraFlags ?? 0));
    if (first) s.str8('mem0');
    first = false;
    s.raw(Buffer.alloc(4096, fill));
  }
  s.be64(8192 | RAM_FLAG.ZERO | RAM_FLAG.CONTINUE).u8(0);
  s.be64(RAM_FLAG.EOS).u8(VM.SECTION_FOOTER).be32(2);
  s.u8(VM.SECTION_END).be32(2).be64(RAM_FLAG.EOS).u8(VM.SECTION_FOOTER).be32(2);
  s.u8(VM.SECTION_FULL)
    .be32(3)
    .str8('timer')
    .be32(0)
    .be32(2)
    .raw(Buffer.from([1, 2, 3, 4]))
    .u8(VM.SECTION_FOOTER)
    .be32(3);
  s.u8(VM.EOF);
  const desc = Buffer.from(
    JSON.stringify({
      page_size: 4096,
      devices: [
        {
          name: 'timer',
          instance_id: 0,
          vmsd_name: 'timer',
          version: 2,
          fields: [{ name: 't', type: 'buffer', size: 4 }],
        },
      ],
    }),
  );
  s.u8(VM.VMDESCRIPTION).be32(desc.length).raw(desc);
  return s.build();
}

function sink() {
  const pages: Array<{ block: string; offset: number; first: number | null }> = [];
  const s: PageSink = {
    page: (block, offset, data) => pages.push({ block, offset, first: data[0]! }),
    zero: (block, offset) => pages.push({ block, offset, first: null }),
  };
  return { pages, s };
}

async function parse(buf: Buffer, chunk = 7) {
  const r = new ByteReader('test stream');
  const { pages, s } = sink();
  const st = newRamState();
  const p = readPrecopy(r, st, s);
  for (let i = 0; i < buf.length; i += chunk) r.push(buf.subarray(i, i + chunk));
  r.end();
  return { result: await p, pages, st };
}

test('decodes a precopy stream delivered in small chunks', async () => {
  const { result, pages, st } = await parse(precopyStream());
  assert.equal(result.colo, true);
  assert.equal(result.config.machine, 'pc-i440fx-7.2');
  assert.deepEqual(pages, [
    { block: 'mem0', offset: 0, first: 1 },
    { block: 'mem0', offset: 4096, first: 2 },
    { block: 'mem0', offset: 8192, first: null },
  ]);
  assert.equal(st.blocks.get('mem0'), BLOCK_LEN);
  assert.equal(result.deviceState[0], VM.SECTION_FULL);
  assert.equal(result.deviceState.at(-1), VM.EOF);
});

test('a truncated stream is a typed truncation error at every cut point', async () => {
  const full = precopyStream();
  for (const cut of [0, 3, 8, 20, 60, full.length - 40, full.length - 1]) {
    await assert.rejects(
      parse(full.subarray(0, cut)),
      (e: unknown) => isRubatoError(e, 'RUBATO_STREAM_TRUNCATED'),
      `cut at ${cut}`,
    );
  }
});

test('garbage is rejected with a format error, never a crash or a hang', async () => {
  let seed = 12345;
  const rnd = () => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed;
  };
  for (let i = 0; i < 200; i++) {
    const buf = Buffer.alloc(64 + (rnd() % 4096));
    for (let j = 0; j < buf.length; j++) buf[j] = rnd() & 0xff;
    if (i % 2) encodeHeader().copy(buf, 0); // past the magic, into the body
    await assert.rejects(
      parse(buf),
      (e: unknown) =>
        isRubatoError(e) &&
        ['RUBATO_STREAM_FORMAT', 'RUBATO_STREAM_TRUNCATED', 'RUBATO_STREAM_UNSUPPORTED'].includes(e.code),
    );
  }
});

test('mutated valid streams never escape as untyped errors', async () => {
  const full = precopyStream();
  for (let i = 0; i < 300; i++) {
    const m = Buffer.from(full);
    const pos = (i * 7919) % m.length;
    m[pos] = m[pos]! ^ (1 << (i % 8));
    try {
      await parse(m);
    } catch (e) {
      assert.ok(isRubatoError(e), `mutation at ${pos}: ${String(e)}`);
    }
  }
});

test('unsupported stream features are named', async () => {
  await assert.rejects(
    parse(precopyStream({ extraFlags: RAM_FLAG.XBZRLE })),
    (e: unknown) => isRubatoError(e, 'RUBATO_STREAM_UNSUPPORTED') && /XBZRLE/.test(e.message),
  );
  const rp = new StreamBuilder()
    .raw(encodeHeader())
    .raw(encodeConfiguration('pc', []))
    .u8(VM.COMMAND)
    .be16(MIG_CMD.OPEN_RETURN_PATH)
    .be16(0)
    .build();
  await assert.rejects(
    parse(rp),
    (e: unknown) => isRubatoError(e, 'RUBATO_STREAM_UNSUPPORTED') && /return-path/.test(e.message),
  );
});

test('a page outside its RAM block is rejected', async () => {
  await assert.rejects(
    parse(precopyStream({ pages: [[BLOCK_LEN, 1]] })),
    (e: unknown) => isRubatoError(e, 'RUBATO_STREAM_FORMAT') && /outside block/.test(e.message),
  );
});

test('CONTINUE refers to the last block sent, across sections', async () => {
  const st = newRamState();
  st.blocks.set('a', BLOCK_LEN);
  st.lastBlock = 'a';
  const r = new ByteReader('t');
  r.push(
    new StreamBuilder()
      .be64(4096 | RAM_FLAG.PAGE | RAM_FLAG.CONTINUE)
      .raw(Buffer.alloc(4096, 9))
      .be64(RAM_FLAG.EOS)
      .build(),
  );
  const { pages, s } = sink();
  const counts = await readRamRecords(r, st, s);
  assert.deepEqual(counts, { pages: 1, zeros: 0 });
  assert.deepEqual(pages, [{ block: 'a', offset: 4096, first: 9 }]);
});

test('a large device part arriving in many chunks is read whole; a description length past the cap is never taken', async () => {
  const { readDevicePart } = await import('../../src/capture/stream/parser.ts');
  const body = Buffer.alloc(32 << 20, 0x5a);
  const desc = Buffer.from(
    JSON.stringify({
      page_size: 4096,
      devices: [
        {
          name: 'big',
          instance_id: 0,
          vmsd_name: 'big',
          version: 1,
          fields: [{ name: 'b', type: 'buffer', size: body.length }],
        },
      ],
    }),
  );
  const s = new StreamBuilder()
    .u8(VM.SECTION_FULL)
    .be32(3)
    .str8('big')
    .be32(0)
    .be32(1)
    .raw(body)
    .u8(VM.SECTION_FOOTER)
    .be32(3)
    .u8(VM.EOF);
  s.u8(VM.VMDESCRIPTION).be32(desc.length).raw(desc);
  const buf = s.build();
  const r = new ByteReader('t');
  const p = readDevicePart(r);
  for (let i = 0; i < buf.length; i += 64 << 10) {
    r.push(buf.subarray(i, i + (64 << 10)));
    await Promise.resolve();
  }
  const { deviceState } = await p;
  assert.equal(deviceState.length, buf.length - 5 - desc.length);
  const bad = new StreamBuilder()
    .u8(VM.SECTION_FULL)
    .be32(3)
    .str8('x')
    .be32(0)
    .be32(1)
    .u8(VM.EOF)
    .u8(VM.VMDESCRIPTION)
    .be32(0xffffffff)
    .raw(Buffer.from('{"page_size": 4096'))
    .build();
  const r2 = new ByteReader('t');
  r2.push(bad);
  r2.end();
  await assert.rejects(readDevicePart(r2), (e: unknown) => isRubatoError(e));
});

test('bytes that look like the end of the device part inside a section (a guest can put them there) are passed over', async () => {
  const { readDevicePart } = await import('../../src/capture/stream/parser.ts');
  // A device buffer holding EOF, VMDESCRIPTION, a length and a JSON opening, as a guest could write it.
  const fakeJson = Buffer.from('{"page_size": 4096, "devices": []}');
  const fake = Buffer.alloc(6);
  fake[0] = VM.EOF;
  fake[1] = VM.VMDESCRIPTION;
  fake.writeUInt32BE(fakeJson.length, 2);
  const data = Buffer.concat([Buffer.from('guest data '), fake, fakeJson, Buffer.from(' more guest data')]);
  const desc = Buffer.from(
    JSON.stringify({
      page_size: 4096,
      devices: [
        {
          name: 'serial',
          instance_id: 0,
          vmsd_name: 'serial',
          version: 3,
          fields: [{ name: 'fifo', type: 'buffer', size: data.length }],
        },
      ],
    }),
  );
  const buf = new StreamBuilder()
    .u8(VM.SECTION_FULL)
    .be32(7)
    .str8('serial')
    .be32(0)
    .be32(3)
    .raw(data)
    .u8(VM.SECTION_FOOTER)
    .be32(7)
    .u8(VM.EOF)
    .u8(VM.VMDESCRIPTION)
    .be32(desc.length)
    .raw(desc)
    .raw(Buffer.from([0, 0, 0, 1]))
    .build(); // then a COLO message
  for (const chunk of [7, 1 << 20]) {
    const r = new ByteReader('t');
    const p = readDevicePart(r);
    for (let i = 0; i < buf.length; i += chunk) {
      r.push(buf.subarray(i, i + chunk));
      await Promise.resolve();
    }
    const { deviceState } = await p;
    assert.equal(
      deviceState.length,
      1 + 4 + 1 + 6 + 4 + 4 + data.length + 5 + 1,
      `chunk ${chunk}: the whole part, not cut at the guest's bytes`,
    );
    assert.equal(await r.readBe32(), 1, 'the stream continues right after the description');
  }
});
