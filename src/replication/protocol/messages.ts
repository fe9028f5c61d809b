// Payloads of the replication frames. Pure: parse at the boundary (every length and field is
// checked), trust inside. JSON only for small, rare messages (handshake, layout).

import { z } from 'zod';
import { protocolError } from './frame.ts';
import { VmName, VmSpecSchema } from '../../qemu/index.ts';

export const NONCE_BYTES = 32;

export const IdentitySchema = z.object({
  /** Checked like a definition's name: it names the standby's files and sockets. */
  vm: VmName,
  spec: VmSpecSchema,
  /** The primary's generation in the witness (its fencing token), when it runs with one. */
  generation: z.number().int().min(1).max(0xffffffff).optional(),
  /** compare: the standby runs a secondary VM whose replies release the primary's (COLO's idea). */
  mode: z.enum(['buffer', 'compare']).optional(),
});
export type Identity = z.infer<typeof IdentitySchema>;

export const LayoutSchema = z.object({
  machine: z.string(),
  blocks: z
    .array(z.object({ id: z.string().max(255), lengthBytes: z.number().int().positive() }))
    .min(1)
    .max(255),
  totalBytes: z.number().int().nonnegative(),
});
export type Layout = z.infer<typeof LayoutSchema>;

export const WelcomeSchema = z.object({ replicaEpoch: z.number().int().nullable(), replicaVm: z.string().nullable() });
export type Welcome = z.infer<typeof WelcomeSchema>;

function json<T>(schema: z.ZodType<T>, buf: Buffer, what: string): T {
  let v: unknown;
  try {
    v = JSON.parse(buf.toString('utf8'));
  } catch {
    throw protocolError(`${what}: payload is not JSON`);
  }
  const r = schema.safeParse(v);
  if (!r.success)
    throw protocolError(
      `${what}: ${r.error.issues[0]?.path.join('.') ?? ''} ${r.error.issues[0]?.message ?? 'invalid'}`,
    );
  return r.data;
}

export const encodeChallenge = (nonce: Buffer) => Buffer.from(nonce);
export function decodeChallenge(p: Buffer): Buffer {
  if (p.length !== NONCE_BYTES) throw protocolError(`CHALLENGE of ${p.length} bytes`);
  return p;
}

export const encodeHello = (nonce: Buffer, proof: Buffer, id: Identity) =>
  Buffer.concat([nonce, proof, Buffer.from(JSON.stringify(id))]);
export function decodeHello(p: Buffer): { nonce: Buffer; proof: Buffer; identity: Identity } {
  if (p.length < NONCE_BYTES + 32 + 2) throw protocolError(`HELLO of ${p.length} bytes`);
  return {
    nonce: p.subarray(0, NONCE_BYTES),
    proof: p.subarray(NONCE_BYTES, NONCE_BYTES + 32),
    identity: json(IdentitySchema, p.subarray(NONCE_BYTES + 32), 'HELLO'),
  };
}

export const encodeWelcome = (proof: Buffer, w: Welcome) => Buffer.concat([proof, Buffer.from(JSON.stringify(w))]);
export function decodeWelcome(p: Buffer): { proof: Buffer; welcome: Welcome } {
  if (p.length < 32 + 2) throw protocolError(`WELCOME of ${p.length} bytes`);
  return { proof: p.subarray(0, 32), welcome: json(WelcomeSchema, p.subarray(32), 'WELCOME') };
}

export const encodeLayout = (l: Layout) => Buffer.from(JSON.stringify(l));
export const decodeLayout = (p: Buffer) => json(LayoutSchema, p, 'BASE_BEGIN');

export const BASE_DATA_HEADER_BYTES = 12;
/** Writes the header of a BASE_DATA payload whose data the caller fills in place after it (no copy). */
export function setBaseDataHeader(b: Buffer, blockIndex: number, offset: number): void {
  b.writeUInt32BE(blockIndex, 0);
  b.writeBigUInt64BE(BigInt(offset), 4);
}
export function decodeBaseData(p: Buffer, layout: Layout): { blockIndex: number; offset: number; data: Buffer } {
  if (p.length < 12) throw protocolError(`BASE_DATA of ${p.length} bytes`);
  const blockIndex = p.readUInt32BE(0);
  const offset = Number(p.readBigUInt64BE(4));
  const data = p.subarray(12);
  const block = layout.blocks[blockIndex];
  if (!block) throw protocolError(`BASE_DATA names block ${blockIndex}`);
  if (offset + data.length > block.lengthBytes) throw protocolError(`BASE_DATA beyond block ${block.id}`);
  return { blockIndex, offset, data };
}

export function encodeTime(us: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(Math.max(0, Math.floor(us))));
  return b;
}
export function decodeTime(p: Buffer): number {
  if (p.length !== 8) throw protocolError(`time payload of ${p.length} bytes`);
  return Number(p.readBigUInt64BE(0));
}

/** Pages of one block filled with one byte each: be32 block index, then be64 (page offset | fill byte) per page. */
export function encodeBaseFill(blockIndex: number, pages: readonly { offset: number; fill: number }[]): Buffer {
  const b = Buffer.allocUnsafe(4 + 8 * pages.length);
  b.writeUInt32BE(blockIndex, 0);
  pages.forEach((p, i) => {
    b.writeUInt32BE(Math.floor(p.offset / 0x1_0000_0000), 4 + 8 * i);
    b.writeUInt32BE(((p.offset % 0x1_0000_0000) | (p.fill & 0xff)) >>> 0, 8 + 8 * i);
  });
  return b;
}
export function decodeBaseFill(
  p: Buffer,
  layout: Layout,
): { blockIndex: number; pages: Array<{ offset: number; fill: number }> } {
  if (p.length < 4 || (p.length - 4) % 8 !== 0) throw protocolError(`BASE_FILL of ${p.length} bytes`);
  const blockIndex = p.readUInt32BE(0);
  const block = layout.blocks[blockIndex];
  if (!block) throw protocolError(`BASE_FILL names block ${blockIndex}`);
  const pages: Array<{ offset: number; fill: number }> = [];
  for (let o = 4; o < p.length; o += 8) {
    const lo = p.readUInt32BE(o + 4);
    if ((lo & 0xf00) !== 0) throw protocolError('BASE_FILL: an offset that is not page-aligned');
    const offset = p.readUInt32BE(o) * 0x1_0000_0000 + (lo >>> 12) * 4096;
    if (offset + 4096 > block.lengthBytes) throw protocolError(`BASE_FILL beyond block ${block.id}`);
    pages.push({ offset, fill: lo & 0xff });
  }
  return { blockIndex, pages };
}

/**
 * An ACK's payload: what the standby measured of the checkpoint, be32 µs each (queued, commit, receive); empty from a
 * standby that says nothing.
 */
export const ACK_TIMINGS_BYTES = 12;
const MAX_US = 0xffff_ffff;
export function encodeAckTimings(t: { queuedMs: number; commitMs: number; receiveMs: number }): Buffer {
  const b = Buffer.allocUnsafe(ACK_TIMINGS_BYTES);
  const us = (ms: number) => Math.min(MAX_US, Math.max(0, Math.round(ms * 1000)));
  b.writeUInt32BE(us(t.queuedMs), 0);
  b.writeUInt32BE(us(t.commitMs), 4);
  b.writeUInt32BE(us(t.receiveMs), 8);
  return b;
}
export function decodeAckTimings(p: Buffer): { queuedMs: number; commitMs: number; receiveMs: number } | null {
  if (p.length === 0) return null;
  if (p.length !== ACK_TIMINGS_BYTES) throw protocolError(`ACK payload of ${p.length} bytes`);
  return {
    queuedMs: p.readUInt32BE(0) / 1000,
    commitMs: p.readUInt32BE(4) / 1000,
    receiveMs: p.readUInt32BE(8) / 1000,
  };
}

/**
 * Guest network frames in one message (NET_IN, SEC_OUT): each keeps its relay length prefix (be32
 * length + Ethernet frame); the message is those frames back to back.
 */
export function splitNetFrames(payload: Buffer, maxFrame = 65536): Buffer[] {
  const out: Buffer[] = [];
  let off = 0;
  while (off < payload.length) {
    if (payload.length - off < 4) throw protocolError('network frames: a truncated length');
    const len = payload.readUInt32BE(off);
    if (len > maxFrame || payload.length - off - 4 < len)
      throw protocolError(`network frames: a frame of ${len} bytes`);
    out.push(payload.subarray(off, off + 4 + len));
    off += 4 + len;
  }
  return out;
}
