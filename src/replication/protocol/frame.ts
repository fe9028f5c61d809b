// Rubato's replication wire format, version 1. Pure codec: no sockets, no clocks.
//
// Frame: be32 bodyLength | u8 type | u8 version | be16 flags | be64 epoch | be64 seq | payload | mac[32]
//   bodyLength counts everything after itself; mac = HMAC-SHA256(key, length field .. payload).
//   Before the handshake completes frames are authenticated with the hello key HMAC(psk, "rubato/v1/hello");
//   afterwards with the session key HMAC(psk, "rubato/v1/session" | nonceStandby | noncePrimary).
//   seq starts at 1 in each direction and increases by exactly one: a replayed, dropped or
//   reordered frame breaks the session. A frame is at most MAX_FRAME_BYTES.

import { createHmac, timingSafeEqual } from 'node:crypto';
import { RubatoError } from '../../util/errors.ts';

export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 4 + 1 + 1 + 2 + 8 + 8;
export const MAC_BYTES = 32;
export const MAX_FRAME_BYTES = 512 << 20;

export const FrameType = {
  CHALLENGE: 1,   // standby → primary: nonce
  HELLO: 2,       // primary → standby: nonce, proof, identity
  WELCOME: 3,     // standby → primary: proof, replica state
  REJECT: 4,      // either way: reason, then close
  BASE_BEGIN: 10, // layout of the full image
  BASE_DATA: 11,  // a run of one RAM block
  BASE_END: 12,   // device state; the replica is now epoch 0
  CKPT: 20,       // one checkpoint record (see replica-store.ts), self-checksummed
  ACK: 21,        // epoch committed on the standby
  HEARTBEAT: 30,  // be64 sender time µs
  HEARTBEAT_ECHO: 31,
  FENCE: 40,      // standby → primary: stop the guest, a failover is coming
  FENCED: 41,     // primary → standby: the guest is stopped
  BYE: 50,
} as const;
export type FrameTypeName = keyof typeof FrameType;
const TYPE_NAMES = new Map<number, string>(Object.entries(FrameType).map(([k, v]) => [v, k]));
export const frameTypeName = (t: number): string => TYPE_NAMES.get(t) ?? `type ${t}`;

export interface Frame {
  type: number;
  epoch: number;
  seq: number;
  payload: Buffer;
}

export const protocolError = (msg: string, ctx: Record<string, unknown> = {}) => new RubatoError('RUBATO_PROTOCOL', msg, ctx);

export function helloKey(psk: Buffer): Buffer {
  return createHmac('sha256', psk).update('rubato/v1/hello').digest();
}

export function sessionKey(psk: Buffer, nonceStandby: Buffer, noncePrimary: Buffer): Buffer {
  return createHmac('sha256', psk).update('rubato/v1/session').update(nonceStandby).update(noncePrimary).digest();
}

export function proof(psk: Buffer, role: 'primary' | 'standby', a: Buffer, b: Buffer): Buffer {
  return createHmac('sha256', psk).update(`rubato/v1/proof/${role}`).update(a).update(b).digest();
}

export function proofEquals(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

/**
 * A frame as three buffers — header, payload (not copied), MAC — so that a checkpoint record of
 * megabytes goes to the socket as it is; the MAC covers header and payload.
 */
export function encodeFrameParts(f: Frame, key: Buffer): [Buffer, Buffer, Buffer] {
  const body = HEADER_BYTES - 4 + f.payload.length + MAC_BYTES;
  if (body + 4 > MAX_FRAME_BYTES) throw protocolError(`frame of ${body + 4} bytes exceeds the ${MAX_FRAME_BYTES}-byte limit`);
  const head = Buffer.allocUnsafe(HEADER_BYTES);
  head.writeUInt32BE(body, 0);
  head[4] = f.type;
  head[5] = PROTOCOL_VERSION;
  head.writeUInt16BE(0, 6);
  head.writeBigUInt64BE(BigInt(f.epoch), 8);
  head.writeBigUInt64BE(BigInt(f.seq), 16);
  const mac = createHmac('sha256', key).update(head).update(f.payload).digest();
  return [head, f.payload, mac];
}

export function encodeFrame(f: Frame, key: Buffer): Buffer {
  return Buffer.concat(encodeFrameParts(f, key));
}

/**
 * Incremental decoder for one direction of a session: authenticates every frame and checks the
 * sequence. Any violation throws and the decoder stays failed (the connection must be dropped).
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private avail = 0;
  private failed: Error | null = null;
  private expectSeq = 1;

  constructor(private key: Buffer, private readonly peer: string) {}

  setKey(key: Buffer): void { this.key = key; }

  push(chunk: Buffer): Frame[] {
    if (this.failed) throw this.failed;
    if (chunk.length) this.chunks.push(chunk);
    this.avail += chunk.length;
    const out: Frame[] = [];
    try {
      for (;;) {
        if (this.avail < 4) break;
        const head = this.peek(4);
        const body = head.readUInt32BE(0);
        if (body + 4 > MAX_FRAME_BYTES || body < HEADER_BYTES - 4 + MAC_BYTES) {
          throw protocolError(`frame from ${this.peer} announces ${body} bytes (allowed ${HEADER_BYTES - 4 + MAC_BYTES}..${MAX_FRAME_BYTES - 4})`, { peer: this.peer });
        }
        if (this.avail < 4 + body) break;
        const buf = this.take(4 + body);
        out.push(this.decodeOne(buf));
        // a key change (handshake) may apply to the next frame: stop after frames that change it
        if (out.at(-1)!.type === FrameType.HELLO || out.at(-1)!.type === FrameType.WELCOME || out.at(-1)!.type === FrameType.CHALLENGE) break;
      }
    } catch (e) {
      this.failed = e as Error;
      throw e;
    }
    return out;
  }

  /** Frames already buffered behind a handshake frame, decoded with the current key. */
  drain(): Frame[] { return this.push(Buffer.alloc(0)); }

  private decodeOne(buf: Buffer): Frame {
    const macAt = buf.length - MAC_BYTES;
    const mac = createHmac('sha256', this.key).update(buf.subarray(0, macAt)).digest();
    if (!timingSafeEqual(mac, buf.subarray(macAt))) throw new RubatoError('RUBATO_AUTH_FAILED', `frame from ${this.peer} failed authentication (wrong key, or forged or corrupted)`, { peer: this.peer });
    const version = buf[5]!;
    if (version !== PROTOCOL_VERSION) throw new RubatoError('RUBATO_VERSION_MISMATCH', `${this.peer} speaks protocol version ${version}, this Rubato speaks ${PROTOCOL_VERSION}`, { peer: this.peer });
    const seq = Number(buf.readBigUInt64BE(16));
    if (seq !== this.expectSeq) throw protocolError(`frame from ${this.peer} has sequence ${seq}, expected ${this.expectSeq} (replayed or dropped frame)`, { peer: this.peer });
    this.expectSeq++;
    return { type: buf[4]!, epoch: Number(buf.readBigUInt64BE(8)), seq, payload: buf.subarray(HEADER_BYTES, macAt) };
  }

  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    const b = Buffer.concat(this.chunks);
    this.chunks = [b];
    return b.subarray(0, n);
  }

  private take(n: number): Buffer {
    let first = this.chunks[0]!;
    if (first.length < n) {
      first = Buffer.concat(this.chunks);
      this.chunks = [first];
    }
    const out = first.subarray(0, n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.avail -= n;
    return out;
  }
}

/** Sender side of one direction: numbers frames and authenticates them. */
export class FrameEncoder {
  private seq = 1;
  constructor(private key: Buffer) {}
  setKey(key: Buffer): void { this.key = key; }
  encode(type: number, epoch: number, payload: Buffer = Buffer.alloc(0)): Buffer {
    return encodeFrame({ type, epoch, seq: this.seq++, payload }, this.key);
  }
  encodeParts(type: number, epoch: number, payload: Buffer = Buffer.alloc(0)): [Buffer, Buffer, Buffer] {
    return encodeFrameParts({ type, epoch, seq: this.seq++, payload }, this.key);
  }
}
