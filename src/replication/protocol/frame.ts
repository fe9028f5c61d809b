// Rubato's replication wire format, version 4. Pure codec: no sockets, no clocks.
//
// Frame: be32 bodyLength | u8 type | u8 version | be16 flags | be32 generation | be64 epoch | be64 seq | body | tag
//   bodyLength counts everything after itself. Two phases, with keys per direction (p2s: primary →
//   standby, s2p: standby → primary), so a frame reflected back to its sender or replayed across
//   directions fails:
//   - hello (until the handshake completes): body = payload in clear (nonces, proofs, the VM's
//     identity: nothing secret), tag = HMAC-SHA256(helloKey[dir], header ‖ payload), 32 bytes;
//     helloKey[dir] = HKDF-SHA256(psk, salt "rubato/v2/hello", info dir). A hello frame is at most
//     HELLO_MAX_FRAME_BYTES: nothing larger is read, let alone buffered, before authentication.
//   - session: body = AES-256-GCM(sessionKey[dir], nonce = be32 0 ‖ be64 seq, aad = header)(payload),
//     tag = the 16-byte GCM tag; sessionKey[dir] = HKDF-SHA256(psk, salt nonceStandby ‖ noncePrimary,
//     info "rubato/v2/session/" dir). Keys are fresh per connection and seq never repeats within
//     one, so no (key, nonce) pair is ever used twice. Guest memory is never on the wire in clear.
//   generation: the primary's witness generation (its fencing token; 0 without a witness). The hello
//   carries it; from then on every frame of the session, both ways (checkpoints and acks alike),
//   must carry exactly the session's: a decoder bound to a generation refuses any other.
//   seq starts at 1 in each direction and increases by exactly one: a replayed, dropped or
//   reordered frame breaks the session. A session frame is at most the decoder's current limit
//   (set from the session's layout), never above MAX_FRAME_BYTES.

import {
  createCipheriv,
  createDecipheriv,
  createHmac,
  hkdfSync,
  timingSafeEqual,
  type DecipherGCM,
  type Hmac,
} from 'node:crypto';
import { RubatoError, assert } from '../../util/index.ts';

export const PROTOCOL_VERSION = 5;
export const HEADER_BYTES = 4 + 1 + 1 + 2 + 4 + 8 + 8;
export const HMAC_TAG_BYTES = 32;
export const GCM_TAG_BYTES = 16;
export const MAX_FRAME_BYTES = 1 << 30;
/** Largest frame accepted before the handshake is authenticated. */
export const HELLO_MAX_FRAME_BYTES = 16 << 10;

export const FrameType = {
  CHALLENGE: 1, // standby → primary: nonce
  HELLO: 2, // primary → standby: nonce, proof, identity
  WELCOME: 3, // standby → primary: proof, replica state
  REJECT: 4, // either way: reason, then close
  BASE_BEGIN: 10, // layout of the full image
  BASE_DATA: 11, // a run of one RAM block
  BASE_END: 12, // device state; the replica is now epoch 0
  BASE_FILL: 13, // pages of one block that are all one byte (zero pages)
  CKPT: 20, // one checkpoint record (see replica-store.ts), self-checksummed
  ACK: 21, // epoch committed on the standby
  PRESEND: 22, // pages of the running epoch sent before its checkpoint (record.ts); staged, committed with it
  NET_IN: 23, // primary → standby (compare mode): frames the guest received in epoch N, for the secondary
  SEC_OUT: 24, // standby → primary (compare mode): frames the secondary sent running from checkpoint N-1
  HEARTBEAT: 30, // be64 sender time µs
  HEARTBEAT_ECHO: 31,
  FENCE: 40, // standby → primary: stop the guest, a failover is coming
  FENCED: 41, // primary → standby: the guest is stopped
  BYE: 50,
  GUEST_LOST: 51, // primary → standby: the guest's QEMU died on this host (its lease is given up): take over now
} as const;
const TYPE_NAMES = new Map<number, string>(Object.entries(FrameType).map(([k, v]) => [v, k]));
export const frameTypeName = (t: number): string => TYPE_NAMES.get(t) ?? `type ${t}`;

export interface Frame {
  type: number;
  epoch: number;
  seq: number;
  payload: Buffer;
  /** The witness generation the frame was sent under (0: none). */
  generation?: number;
  /**
   * Received frames: when its header arrived (the clock given to FrameDecoder.push), for the receive time of large
   * frames.
   */
  startedMs?: number;
}

export const protocolError = (msg: string, ctx: Record<string, unknown> = {}) =>
  new RubatoError('RUBATO_PROTOCOL', msg, ctx);

/** Which way a frame travels. */
export type Direction = 'p2s' | 's2p';
/** A direction's key and how it protects frames. */
export interface FrameKey {
  readonly kind: 'hmac' | 'aead';
  readonly key: Buffer;
}

const tagBytes = (k: FrameKey) => (k.kind === 'aead' ? GCM_TAG_BYTES : HMAC_TAG_BYTES);
const hkdf = (ikm: Buffer, salt: Buffer | string, info: string) => Buffer.from(hkdfSync('sha256', ikm, salt, info, 32));

/** The per-direction keys that authenticate the handshake. */
export function helloKeys(psk: Buffer): Record<Direction, FrameKey> {
  return {
    p2s: { kind: 'hmac', key: hkdf(psk, 'rubato/v2/hello', 'p2s') },
    s2p: { kind: 'hmac', key: hkdf(psk, 'rubato/v2/hello', 's2p') },
  };
}

/** The per-direction keys that encrypt and authenticate a session after the handshake. */
export function sessionKeys(psk: Buffer, nonceStandby: Buffer, noncePrimary: Buffer): Record<Direction, FrameKey> {
  const salt = Buffer.concat([nonceStandby, noncePrimary]);
  return {
    p2s: { kind: 'aead', key: hkdf(psk, salt, 'rubato/v2/session/p2s') },
    s2p: { kind: 'aead', key: hkdf(psk, salt, 'rubato/v2/session/s2p') },
  };
}

export function proof(psk: Buffer, role: 'primary' | 'standby', a: Buffer, b: Buffer): Buffer {
  return createHmac('sha256', psk).update(`rubato/v2/proof/${role}`).update(a).update(b).digest();
}

/**
 * A REJECT's binding to the HELLO it answers: an old REJECT replayed to a starting primary does
 * not carry the tag of this primary's fresh nonce, so it cannot make it give up.
 */
export function rejectTag(psk: Buffer, nonceP: Buffer, reason: Buffer): Buffer {
  return createHmac('sha256', psk).update('rubato/v2/reject').update(nonceP).update(reason).digest();
}
export const REJECT_TAG_BYTES = 32;

export function proofEquals(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

function nonceOf(seq: number): Buffer {
  const n = Buffer.alloc(12);
  n.writeBigUInt64BE(BigInt(seq), 4);
  return n;
}

const GEN_AT = 8;
const EPOCH_AT = 12;
const SEQ_AT = 20;

function header(type: number, generation: number, epoch: number, seq: number, bodyLength: number): Buffer {
  const head = Buffer.allocUnsafe(HEADER_BYTES);
  head.writeUInt32BE(bodyLength, 0);
  head[4] = type;
  head[5] = PROTOCOL_VERSION;
  head.writeUInt16BE(0, 6);
  head.writeUInt32BE(generation, GEN_AT);
  head.writeBigUInt64BE(BigInt(epoch), EPOCH_AT);
  head.writeBigUInt64BE(BigInt(seq), SEQ_AT);
  return head;
}

/** The header of a frame carrying `payloadBytes`, refused above the frame limit. */
function frameHead(f: Omit<Frame, 'payload'>, payloadBytes: number, k: FrameKey): Buffer {
  const body = HEADER_BYTES - 4 + payloadBytes + tagBytes(k);
  if (body + 4 > MAX_FRAME_BYTES)
    throw protocolError(`frame of ${body + 4} bytes exceeds the ${MAX_FRAME_BYTES}-byte limit`);
  return header(f.type, f.generation ?? 0, f.epoch, f.seq, body);
}

/**
 * A frame as three buffers — header, body, tag — so that a record of megabytes goes to the socket
 * without being joined to its header; in a session the body is the payload encrypted.
 */
export function encodeFrameParts(f: Frame, k: FrameKey): [Buffer, Buffer, Buffer] {
  const head = frameHead(f, f.payload.length, k);
  if (k.kind === 'hmac') return [head, f.payload, createHmac('sha256', k.key).update(head).update(f.payload).digest()];
  const c = createCipheriv('aes-256-gcm', k.key, nonceOf(f.seq));
  c.setAAD(head);
  const ct = f.payload.length ? c.update(f.payload) : Buffer.alloc(0);
  c.final();
  return [head, ct, c.getAuthTag()];
}

/**
 * The same frame as pieces to write in order — header, the body in encrypted slices of at most
 * `sliceBytes`, the tag — made one at a time: a large record's first slices are on the wire (and
 * the peer decrypting them) while the rest is still being encrypted.
 */
export function* encodeFrameSlices(
  f: Omit<Frame, 'payload'>,
  payload: { parts: readonly Buffer[]; length: number },
  k: FrameKey,
  sliceBytes: number,
): Generator<Buffer> {
  const head = frameHead(f, payload.length, k);
  if (k.kind === 'hmac') {
    const mac = createHmac('sha256', k.key).update(head);
    yield head;
    for (const p of payload.parts) {
      mac.update(p);
      yield p;
    }
    yield mac.digest();
    return;
  }
  const c = createCipheriv('aes-256-gcm', k.key, nonceOf(f.seq));
  c.setAAD(head);
  yield head;
  // The pieces (pages of 4 KiB, headers of a few bytes) are gathered into one reused slice, so the
  // cipher runs on whole slices and nothing as large as the record is allocated.
  const slice = Buffer.allocUnsafe(Math.min(sliceBytes, Math.max(1, payload.length)));
  let fill = 0;
  let total = 0;
  for (const p of payload.parts) {
    let o = 0;
    while (o < p.length) {
      const n = Math.min(p.length - o, slice.length - fill);
      p.copy(slice, fill, o, o + n);
      fill += n;
      o += n;
      if (fill === slice.length) {
        yield c.update(slice);
        total += fill;
        fill = 0;
      }
    }
  }
  if (fill) {
    yield c.update(slice.subarray(0, fill));
    total += fill;
  }
  assert(total === payload.length, `frame payload of ${total} bytes, announced ${payload.length}`);
  c.final();
  yield c.getAuthTag();
}

export function encodeFrame(f: Frame, k: FrameKey): Buffer {
  return Buffer.concat(encodeFrameParts(f, k));
}

/** A frame being read: its header is known, its body arrives piece by piece into one buffer. */
interface Partial {
  head: Buffer;
  seq: number;
  payload: Buffer;
  got: number;
  tag: Buffer;
  tagGot: number;
  startedMs: number;
  hmac: Hmac | null;
  decipher: DecipherGCM | null;
}

/**
 * Incremental decoder for one direction of a session: authenticates every frame and checks the
 * sequence. Bounds first: a frame's length is checked against the current limit before anything
 * is allocated for it; its body is decrypted as it arrives into the one buffer it will be read
 * from, and handed on only once its tag verified. Any violation throws and the decoder stays
 * failed (the connection must be dropped). It stops after each handshake frame (the key may
 * change there): drain() goes on with the new key.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private avail = 0;
  private failed: Error | null = null;
  private expectSeq = 1;
  private cur: Partial | null = null;
  private maxFrameBytes: number;
  private generation: number | null = null;

  constructor(
    private key: FrameKey,
    private readonly peer: string,
    maxFrameBytes?: number,
  ) {
    this.maxFrameBytes = maxFrameBytes ?? (key.kind === 'hmac' ? HELLO_MAX_FRAME_BYTES : MAX_FRAME_BYTES);
  }

  setKey(key: FrameKey): void {
    this.key = key;
  }
  /** From now on every frame must carry this witness generation (the session's). */
  bindGeneration(g: number): void {
    this.generation = g;
  }
  /** The largest frame this side accepts from now on (the session's layout sets it). */
  setMaxFrameBytes(n: number): void {
    this.maxFrameBytes = Math.min(n, MAX_FRAME_BYTES);
  }

  /** `nowMs`: when the chunk arrived (the caller's clock), kept as startedMs of a frame whose header it completes. */
  push(chunk: Buffer, nowMs = 0): Frame[] {
    if (this.failed) throw this.failed;
    this.nowMs = nowMs;
    if (chunk.length) {
      this.chunks.push(chunk);
      this.avail += chunk.length;
    }
    const out: Frame[] = [];
    try {
      for (;;) {
        const f = this.step();
        if (!f) break;
        out.push(f);
        // a key change (handshake) may apply to the next frame: stop after frames that change it
        if (isHandshake(f.type)) break;
      }
    } catch (e) {
      this.failed = e as Error;
      throw e;
    }
    return out;
  }

  /** Frames already buffered behind a handshake frame, decoded with the current key. */
  drain(): Frame[] {
    return this.push(Buffer.alloc(0), this.nowMs);
  }
  private nowMs = 0;

  /** Advances the frame being read; returns it once complete and verified. */
  private step(): Frame | null {
    if (!this.cur) {
      if (this.avail < 4) return null;
      this.checkLength(this.peekLength());
      if (this.avail < HEADER_BYTES) return null;
      this.cur = this.begin(this.take(HEADER_BYTES, true));
    }
    const c = this.cur;
    while (c.got < c.payload.length && this.avail > 0) {
      const piece = this.take(Math.min(c.payload.length - c.got, this.chunks[0]!.length), false);
      if (c.decipher) c.decipher.update(piece).copy(c.payload, c.got);
      else {
        piece.copy(c.payload, c.got);
        c.hmac!.update(piece);
      }
      c.got += piece.length;
    }
    while (c.got === c.payload.length && c.tagGot < c.tag.length && this.avail > 0) {
      const piece = this.take(Math.min(c.tag.length - c.tagGot, this.chunks[0]!.length), false);
      piece.copy(c.tag, c.tagGot);
      c.tagGot += piece.length;
    }
    if (c.got < c.payload.length || c.tagGot < c.tag.length) return null;
    this.cur = null;
    return this.finish(c);
  }

  /** A frame's announced length, from its first four bytes (which may span chunks). */
  private peekLength(): number {
    const first = this.chunks[0]!;
    if (first.length >= 4) return first.readUInt32BE(0);
    return Buffer.concat(this.chunks.slice(0, 4)).readUInt32BE(0);
  }

  private checkLength(body: number): void {
    const tagLen = tagBytes(this.key);
    if (body + 4 > this.maxFrameBytes || body < HEADER_BYTES - 4 + tagLen) {
      throw protocolError(
        `frame from ${this.peer} announces ${body} bytes (allowed ${HEADER_BYTES - 4 + tagLen}..${this.maxFrameBytes - 4} now)`,
        { peer: this.peer },
      );
    }
  }

  private begin(head: Buffer): Partial {
    const body = head.readUInt32BE(0);
    const tagLen = tagBytes(this.key);
    this.checkLength(body);
    const seq = Number(head.readBigUInt64BE(SEQ_AT));
    const payloadLen = body - (HEADER_BYTES - 4) - tagLen;
    let hmac: Hmac | null = null;
    let decipher: DecipherGCM | null = null;
    if (this.key.kind === 'hmac') hmac = createHmac('sha256', this.key.key).update(head);
    else {
      decipher = createDecipheriv('aes-256-gcm', this.key.key, nonceOf(seq));
      decipher.setAAD(head);
    }
    return {
      head,
      seq,
      payload: Buffer.allocUnsafe(payloadLen),
      got: 0,
      tag: Buffer.allocUnsafe(tagLen),
      tagGot: 0,
      hmac,
      decipher,
      startedMs: this.nowMs,
    };
  }

  private finish(c: Partial): Frame {
    let ok: boolean;
    if (c.hmac) {
      ok = timingSafeEqual(c.hmac.digest(), c.tag);
    } else {
      c.decipher!.setAuthTag(c.tag);
      try {
        c.decipher!.final();
        ok = true;
      } catch {
        ok = false;
      }
    }
    if (!ok)
      throw new RubatoError(
        'RUBATO_AUTH_FAILED',
        `frame from ${this.peer} failed authentication (wrong key, or forged, reflected or corrupted)`,
        { peer: this.peer },
      );
    const version = c.head[5]!;
    if (version !== PROTOCOL_VERSION)
      throw new RubatoError(
        'RUBATO_VERSION_MISMATCH',
        `${this.peer} speaks protocol version ${version}, this Rubato speaks ${PROTOCOL_VERSION}`,
        { peer: this.peer },
      );
    if (c.seq !== this.expectSeq)
      throw protocolError(
        `frame from ${this.peer} has sequence ${c.seq}, expected ${this.expectSeq} (replayed or dropped frame)`,
        { peer: this.peer },
      );
    this.expectSeq++;
    const generation = c.head.readUInt32BE(GEN_AT);
    if (this.generation !== null && generation !== this.generation) {
      throw protocolError(
        `frame from ${this.peer} carries witness generation ${generation}, this session's is ${this.generation} (a stale or foreign primary)`,
        { peer: this.peer },
      );
    }
    return {
      type: c.head[4]!,
      epoch: Number(c.head.readBigUInt64BE(EPOCH_AT)),
      seq: c.seq,
      payload: c.payload,
      generation,
      startedMs: c.startedMs,
    };
  }

  /** Takes n bytes (n ≤ avail); `join` allows crossing chunks (headers only: HEADER_BYTES). */
  private take(n: number, join: boolean): Buffer {
    let first = this.chunks[0]!;
    if (first.length < n) {
      if (!join) n = first.length;
      else {
        const parts: Buffer[] = [];
        let need = n;
        while (need > 0) {
          const c = this.chunks[0]!;
          if (c.length <= need) {
            parts.push(c);
            this.chunks.shift();
            need -= c.length;
          } else {
            parts.push(c.subarray(0, need));
            this.chunks[0] = c.subarray(need);
            need = 0;
          }
        }
        this.avail -= n;
        return Buffer.concat(parts, n);
      }
    }
    first = this.chunks[0]!;
    const out = first.subarray(0, n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.avail -= n;
    return out;
  }
}

const isHandshake = (t: number) => t === FrameType.HELLO || t === FrameType.WELCOME || t === FrameType.CHALLENGE;

/** Sender side of one direction: numbers frames and protects them. */
export class FrameEncoder {
  private seq = 1;
  private generation = 0;
  constructor(private key: FrameKey) {}
  setKey(key: FrameKey): void {
    this.key = key;
  }
  /** The witness generation every frame carries from now on. */
  bindGeneration(g: number): void {
    this.generation = g;
  }
  encode(type: number, epoch: number, payload: Buffer = Buffer.alloc(0)): Buffer {
    return encodeFrame({ type, epoch, seq: this.seq++, payload, generation: this.generation }, this.key);
  }
  encodeParts(type: number, epoch: number, payload: Buffer = Buffer.alloc(0)): [Buffer, Buffer, Buffer] {
    return encodeFrameParts({ type, epoch, seq: this.seq++, payload, generation: this.generation }, this.key);
  }
  /** The frame's pieces, encrypted a slice at a time (see encodeFrameSlices); the sequence number is taken now. */
  encodeSlices(
    type: number,
    epoch: number,
    payload: { parts: readonly Buffer[]; length: number },
    sliceBytes: number,
  ): Generator<Buffer> {
    return encodeFrameSlices(
      { type, epoch, seq: this.seq++, generation: this.generation },
      payload,
      this.key,
      sliceBytes,
    );
  }
}
