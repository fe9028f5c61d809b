// NBD (fixed newstyle) constants and codecs: what Rubato's server needs to talk to QEMU's NBD
// client and to stock tools (qemu-io, qemu-img, nbd-client). Pure; no I/O. Reference: the NBD
// protocol document (doc/proto.md of the NBD project).

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;

export const HS_FLAG = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const CLIENT_FLAG = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_UNKNOWN: 0x80000006,
} as const;
export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TX_FLAG = {
  HAS_FLAGS: 1,
  READ_ONLY: 2,
  SEND_FLUSH: 4,
  SEND_FUA: 8,
  ROTATIONAL: 16,
  SEND_TRIM: 32,
  SEND_WRITE_ZEROES: 64,
} as const;
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6 } as const;
export const CMD_FLAG = { FUA: 1, NO_HOLE: 2 } as const;
export const ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const REQUEST_HEADER_BYTES = 28;
/** Largest request payload the server accepts (QEMU sends at most 32 MiB). */
export const MAX_REQUEST_BYTES = 32 << 20;

export function serverGreeting(): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(HS_FLAG.FIXED_NEWSTYLE | HS_FLAG.NO_ZEROES, 16);
  return b;
}

export function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(20 + data.length);
  b.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

export function infoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(INFO.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function infoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

export interface Request {
  magic: number;
  flags: number;
  type: number;
  handle: Buffer;
  offset: number;
  length: number;
}

export function decodeRequest(b: Buffer): Request {
  return {
    magic: b.readUInt32BE(0),
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    handle: b.subarray(8, 16),
    offset: Number(b.readBigUInt64BE(16)),
    length: b.readUInt32BE(24),
  };
}

export function simpleReply(error: number, handle: Buffer, data?: Buffer): Buffer {
  const b = Buffer.allocUnsafe(16 + (data?.length ?? 0));
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8);
  data?.copy(b, 16);
  return b;
}

export type Validation = { ok: true } | { ok: false; error: number; why: string };

/** Checks a request against the export before anything touches the disk. */
export function validateRequest(r: Request, size: number, readOnly: boolean): Validation {
  if (r.magic !== REQUEST_MAGIC)
    return { ok: false, error: ERR.EINVAL, why: `bad request magic 0x${r.magic.toString(16)}` };
  switch (r.type) {
    case CMD.READ:
    case CMD.WRITE:
    case CMD.TRIM:
    case CMD.WRITE_ZEROES:
    case CMD.CACHE:
      if (r.length > MAX_REQUEST_BYTES) return { ok: false, error: ERR.EOVERFLOW, why: `request of ${r.length} bytes` };
      if (r.offset + r.length > size)
        return { ok: false, error: ERR.EINVAL, why: `range ${r.offset}+${r.length} beyond the ${size}-byte export` };
      if (readOnly && r.type !== CMD.READ && r.type !== CMD.CACHE)
        return { ok: false, error: ERR.EPERM, why: 'read-only export' };
      return { ok: true };
    case CMD.FLUSH:
    case CMD.DISC:
      return { ok: true };
    default:
      return { ok: false, error: ERR.EINVAL, why: `unknown command ${r.type}` };
  }
}
