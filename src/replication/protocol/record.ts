// The checkpoint record: one checkpoint as it crosses the link (CKPT frames) and as the standby
// stages and commits it (redo.ckpt). One typed value, encoded and validated here only: the primary
// encodes it, the standby and the replica store decode it; nobody peeks at its bytes elsewhere.
//
// Format, version 1: "RBCK" be32 version=1, be64 epoch, be32 pages, be32 deviceLen,
//   pages: { u8 blockIndex, u8 kind, u8 fill, u8 0, be64 offset, payload }, device state, then be32
//   CRC-32 of everything before it (torn or corrupted records on disk). On the wire that trailer is 0:
//   the frame carrying the record is authenticated (AES-GCM), so a checksum there would only cost each
//   side a pass over every byte; the standby seals a record it writes as it came (sealRecord).
// Page kinds and their payloads:
//   0 data: the page's 4096 bytes;   1 fill: none (the page is all `fill`);
//   on the wire only (protocol 5), references to the copy both sides of the session keep (sent-pages.ts):
//   2 DELTA: be32 CRC-32 of the page's new bytes, be16 runs, then per run be16 offset, be16 length (both
//     multiples of 4, ascending, inside the page, length > 0) and its bytes;
//   3 SAME: none (the page's bytes did not change since last sent).

import { crc32 } from 'node:zlib';
import { RubatoError, assert } from '../../util/index.ts';
import {
  checkDeviceState,
  MAX_DEVICE_STATE_BYTES,
  PAGE_SIZE,
  type DirtyPage,
  type RamBlockInfo,
} from '../../capture/index.ts';

const FORMAT = 1;
const MAGIC = 0x5242434b; // "RBCK"
const PRESEND_MAGIC = 0x52425053; // "RBPS"
const HEADER_BYTES = 24;
const PAGE_HEADER_BYTES = 12;
const CHECKSUM_BYTES = 4;

/** One checkpoint: the pages dirtied in its epoch (RAM and disk blocks alike) and the device state. */
export interface CheckpointRecord {
  readonly epoch: number;
  readonly pages: readonly DirtyPage[];
  /** QEMU device sections + EOF, as emitted. */
  readonly deviceState: Buffer;
}

/** A page sent as a reference to the copy both sides keep (never on disk). */
export interface PageRef {
  kind: 'delta' | 'same';
  /** The payload as on the wire (see the format above). */
  payload: Buffer;
}
/** A page as it crosses the link: whole, or a reference (then `data` is the primary's page, or null off the wire). */
export type WirePage = DirtyPage & { ref?: PageRef };

const KIND = { data: 0, fill: 1, delta: 2, same: 3 } as const;

const corrupt = (msg: string, ctx: Record<string, unknown> = {}) => new RubatoError('RUBATO_REPLICA_CORRUPT', msg, ctx);

/**
 * An encoded record as the pieces it is made of, in order: headers, the pages' own buffers (not copied), the device
 * state, the checksum.
 */
export interface RecordParts {
  readonly parts: readonly Buffer[];
  readonly length: number;
}

/** Where a record's bytes go: `disk` (its CRC-32 computed and checked) or `wire` (inside an authenticated frame: none). */
export type RecordIntegrity = 'disk' | 'wire';

export function encodeRecordParts(
  r: CheckpointRecord,
  blocks: readonly RamBlockInfo[],
  integrity: RecordIntegrity = 'disk',
): RecordParts {
  const { parts, length } = encodePages(MAGIC, r.epoch, r.pages, blocks, r.deviceState.length);
  parts.push(r.deviceState);
  let crc = 0;
  if (integrity === 'disk') for (const x of parts) crc = crc32(x, crc);
  const sum = Buffer.allocUnsafe(CHECKSUM_BYTES);
  sum.writeUInt32BE(crc, 0);
  parts.push(sum);
  return { parts, length: length + r.deviceState.length + CHECKSUM_BYTES };
}

/** The header and the pages, as pieces (the pages' own buffers, not copied); `deviceLen` goes in the header. */
function encodePages(
  magic: number,
  epoch: number,
  pages: readonly WirePage[],
  blocks: readonly RamBlockInfo[],
  deviceLen: number,
): { parts: Buffer[]; length: number } {
  const index = new Map(blocks.map((b, i) => [b.id, i]));
  const heads = Buffer.allocUnsafe(HEADER_BYTES + PAGE_HEADER_BYTES * pages.length);
  heads.writeUInt32BE(magic, 0);
  heads.writeUInt32BE(FORMAT, 4);
  heads.writeBigUInt64BE(BigInt(epoch), 8);
  heads.writeUInt32BE(pages.length, 16);
  heads.writeUInt32BE(deviceLen, 20);
  const parts: Buffer[] = [];
  let length = HEADER_BYTES;
  let start = 0; // headers of pages without data run together in one piece
  let o = HEADER_BYTES;
  for (const p of pages) {
    const bi = index.get(p.block);
    assert(bi !== undefined, `block ${p.block} is in the layout`);
    heads[o] = bi;
    heads[o + 1] = p.ref ? KIND[p.ref.kind] : p.data ? KIND.data : KIND.fill;
    heads[o + 2] = p.fill ?? 0;
    heads[o + 3] = 0;
    writeBe64(heads, p.offset, o + 4);
    o += PAGE_HEADER_BYTES;
    length += PAGE_HEADER_BYTES;
    if (p.ref) {
      parts.push(heads.subarray(start, o), p.ref.payload);
      start = o;
      length += p.ref.payload.length;
    } else if (p.data) {
      assert(p.data.length === PAGE_SIZE, `a page of ${p.data.length} bytes`);
      parts.push(heads.subarray(start, o), p.data);
      start = o;
      length += PAGE_SIZE;
    }
  }
  if (o > start) parts.push(heads.subarray(start, o));
  return { parts, length };
}

/**
 * Pages pre-sent during epoch `epoch`, before its checkpoint (PRESEND frames): "RBPS" be32 1, be64
 * epoch, be32 pages, be32 0, then the pages as in a record. No device state and no checksum: it is
 * never stored as it is (the standby stages its pages and commits them inside the checkpoint's
 * record), and the frame carrying it is authenticated.
 */
export function encodePresendParts(
  epoch: number,
  pages: readonly WirePage[],
  blocks: readonly RamBlockInfo[],
): RecordParts {
  return encodePages(PRESEND_MAGIC, epoch, pages, blocks, 0);
}

/** Parses and checks pre-sent pages against the layout (every page inside its block); pages reference `buf`. */
export function decodePresend(buf: Buffer, blocks: readonly RamBlockInfo[]): { epoch: number; pages: WirePage[] } {
  if (buf.length < HEADER_BYTES) throw corrupt(`pre-sent pages of ${buf.length} bytes are truncated`);
  if (buf.readUInt32BE(0) !== PRESEND_MAGIC || buf.readUInt32BE(4) !== FORMAT || buf.readUInt32BE(20) !== 0)
    throw corrupt('pre-sent pages have a bad magic or format');
  const epoch = Number(buf.readBigUInt64BE(8));
  const { pages, end } = decodePages(buf, buf.length, buf.readUInt32BE(16), blocks, 'pre-sent pages', true);
  if (end !== buf.length) throw corrupt('pre-sent pages: length does not match the contents');
  checkPages(epoch, pages, blocks);
  return { epoch, pages };
}

/** `n` pages from offset HEADER_BYTES of `buf`, ending at or before `limit`. */
function decodePages(
  buf: Buffer,
  limit: number,
  n: number,
  blocks: readonly RamBlockInfo[],
  what: string,
  refs: boolean,
): { pages: WirePage[]; end: number } {
  // Each page takes at least a header: a count the buffer cannot hold is refused before any work.
  if (n * PAGE_HEADER_BYTES > limit) throw corrupt(`${what}: ${n} pages claimed in ${buf.length} bytes`);
  const pages: WirePage[] = [];
  let o = HEADER_BYTES;
  for (let i = 0; i < n; i++) {
    if (o + PAGE_HEADER_BYTES > limit) throw corrupt(`${what}: ends inside a page header`);
    const block = blocks[buf[o]!];
    if (!block) throw corrupt(`${what}: names block index ${buf[o]}`);
    const kind = buf[o + 1];
    const fill = buf[o + 2]!;
    const offset = readBe64(buf, o + 4);
    o += PAGE_HEADER_BYTES;
    if (kind === 0) {
      if (o + PAGE_SIZE > limit) throw corrupt(`${what}: ends inside a page`);
      pages.push({ block: block.id, offset, data: buf.subarray(o, o + PAGE_SIZE) });
      o += PAGE_SIZE;
    } else if (kind === 1) {
      pages.push({ block: block.id, offset, data: null, fill });
    } else if (refs && (kind === KIND.delta || kind === KIND.same)) {
      const len = kind === KIND.same ? 0 : deltaLength(buf, o, limit, what);
      if (o + len > limit) throw corrupt(`${what}: ends inside a page reference`);
      pages.push({
        block: block.id,
        offset,
        data: null,
        ref: { kind: kind === KIND.same ? 'same' : 'delta', payload: buf.subarray(o, o + len) },
      });
      o += len;
    } else {
      throw corrupt(`${what}: page kind ${kind}`);
    }
  }
  return { pages, end: o };
}

/** The length of the DELTA payload at `o`, every run checked (whole words, ascending, inside the page). */
function deltaLength(buf: Buffer, o: number, limit: number, what: string): number {
  if (o + 6 > limit) throw corrupt(`${what}: ends inside a page delta`);
  const runs = buf.readUInt16BE(o + 4);
  let p = o + 6;
  let next = 0;
  for (let r = 0; r < runs; r++) {
    if (p + 4 > limit) throw corrupt(`${what}: ends inside a page delta`);
    const at = buf.readUInt16BE(p);
    const len = buf.readUInt16BE(p + 2);
    if (at % 4 || len % 4 || len === 0 || at < next || at + len > PAGE_SIZE)
      throw corrupt(`${what}: a page delta's run ${at}+${len} is out of order or outside the page`);
    next = at + len;
    p += 4 + len;
  }
  if (p > limit) throw corrupt(`${what}: ends inside a page delta`);
  return p - o;
}

/** Writes the runs of a DELTA payload that decoding checked into the page that begins at byte `at` of `buf`. */
export function applyDelta(payload: Buffer, buf: Buffer, at = 0): void {
  const runs = payload.readUInt16BE(4);
  let p = 6;
  for (let r = 0; r < runs; r++) {
    const offset = payload.readUInt16BE(p);
    const len = payload.readUInt16BE(p + 2);
    payload.copy(buf, at + offset, p + 4, p + 4 + len);
    p += 4 + len;
  }
}

/**
 * A page's offset as be64 without a BigInt per page (offsets are integers below 2^53). The high word is
 * written first, then the low one: `>>> 0` keeps an integer's low 32 bits.
 */
function writeBe64(b: Buffer, v: number, at: number): void {
  b.writeUInt32BE(Math.floor(v / 2 ** 32), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** The be64 at `at` as a number; an offset of 2^53 or more is refused (no page of a block lies there). */
function readBe64(b: Buffer, at: number): number {
  const hi = b.readUInt32BE(at);
  if (hi >= 2 ** 21) throw corrupt(`a page offset with high word 0x${hi.toString(16)}`);
  return hi * 2 ** 32 + b.readUInt32BE(at + 4);
}

export function encodeRecord(
  r: CheckpointRecord,
  blocks: readonly RamBlockInfo[],
  integrity: RecordIntegrity = 'disk',
): Buffer {
  const { parts, length } = encodeRecordParts(r, blocks, integrity);
  return Buffer.concat(parts as Buffer[], length);
}

/** Makes a record that came off the wire fit for disk: its checksum trailer, computed in place. */
export function sealRecord(buf: Buffer): Buffer {
  assert(buf.length >= HEADER_BYTES + CHECKSUM_BYTES, `a record of ${buf.length} bytes`);
  buf.writeUInt32BE(crc32(buf.subarray(0, buf.length - CHECKSUM_BYTES)), buf.length - CHECKSUM_BYTES);
  return buf;
}

/** The largest record a replica of these blocks can receive: every page once, and a device state. */
export function recordMaxBytes(blocks: readonly RamBlockInfo[]): number {
  const pages = blocks.reduce((n, b) => n + Math.ceil(b.lengthBytes / PAGE_SIZE), 0);
  return HEADER_BYTES + pages * (PAGE_HEADER_BYTES + PAGE_SIZE) + MAX_DEVICE_STATE_BYTES + CHECKSUM_BYTES;
}

/**
 * Parses and checks a record against the replica's layout; pages reference `buf` (no copy). Every
 * length, offset and block is checked either way; `disk` checks the checksum too. Page references
 * (DELTA, SAME) are accepted off the wire only, and go through `resolve` (sent-pages.ts PageMirror) in order.
 */
export function decodeRecord(
  buf: Buffer,
  blocks: readonly RamBlockInfo[],
  integrity: RecordIntegrity = 'disk',
  resolve?: (pages: WirePage[]) => DirtyPage[],
): CheckpointRecord {
  if (buf.length < HEADER_BYTES + CHECKSUM_BYTES)
    throw corrupt(`checkpoint record of ${buf.length} bytes is truncated`);
  const body = buf.subarray(0, buf.length - CHECKSUM_BYTES);
  if (integrity === 'disk' && crc32(body) !== buf.readUInt32BE(buf.length - CHECKSUM_BYTES))
    throw corrupt('checkpoint record fails its checksum');
  if (buf.readUInt32BE(0) !== MAGIC || buf.readUInt32BE(4) !== FORMAT)
    throw corrupt('checkpoint record has a bad magic or format');
  const epoch = Number(buf.readBigUInt64BE(8));
  const devLen = buf.readUInt32BE(20);
  const refs = integrity === 'wire' && resolve !== undefined;
  const { pages, end: o } = decodePages(buf, body.length, buf.readUInt32BE(16), blocks, 'checkpoint record', refs);
  if (o + devLen !== body.length) throw corrupt('checkpoint record length does not match its contents');
  const rec: CheckpointRecord = {
    epoch,
    pages: resolve ? resolve(pages) : pages,
    deviceState: buf.subarray(o, o + devLen),
  };
  validateRecord(rec, blocks);
  return rec;
}

/** Every page inside its block and whole, the device state framed as QEMU sections + EOF. */
export function validateRecord(r: CheckpointRecord, blocks: readonly RamBlockInfo[]): void {
  checkPages(r.epoch, r.pages, blocks);
  if (!checkDeviceState(r.deviceState))
    throw corrupt(`checkpoint ${r.epoch}: device state is not framed as QEMU sections + EOF`, { epoch: r.epoch });
}

function checkPages(epoch: number, pages: readonly DirtyPage[], blocks: readonly RamBlockInfo[]): void {
  const lengths = new Map(blocks.map((b) => [b.id, b.lengthBytes]));
  for (const p of pages) {
    const len = lengths.get(p.block);
    if (len === undefined) throw corrupt(`checkpoint ${epoch} names unknown RAM block ${p.block}`, { epoch });
    if (p.offset % PAGE_SIZE !== 0 || p.offset + PAGE_SIZE > len)
      throw corrupt(`checkpoint ${epoch}: page offset ${p.offset} outside block ${p.block}`, { epoch });
    if (p.data && p.data.length !== PAGE_SIZE)
      throw corrupt(`checkpoint ${epoch}: page of ${p.data.length} bytes`, { epoch });
  }
}
