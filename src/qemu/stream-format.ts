// QEMU migration stream constants (QEMU 7.2: migration/savevm.c, migration/ram.c, migration/colo.c)
// and the encoders Rubato needs to build streams of its own (restore). Pure; no I/O.
//
// Stream layout, as Rubato reads it from a COLO primary:
//   be32 magic 'QEVM', be32 version 3
//   0x07 configuration: be32 len + machine name, then subsections (0x05 name version fields)
//   0x08 command: be16 cmd, be16 len, data            (MIG_CMD_ENABLE_COLO = 8)
//   0x01 section start: be32 id, u8 len + idstr, be32 instance, be32 version, body, footer
//   0x02/0x03 section part/end: be32 id, body, footer (0x7e be32 id)
//   ram body: records { be64 offset|flags, [u8 len + block id unless CONTINUE], payload } until EOS
//   0x04 section full (devices; bodies carry no length), 0x00 EOF, 0x06 vmdesc: be32 len + JSON
// then, per checkpoint, COLO messages (be32) on the same socket, both ways.

export const QEMU_VM_FILE_MAGIC = 0x5145564d;
/** Rubato's QEMU patch 0003: x-checkpoint-delay set to this asks a COLO primary for a pre-send… */
export const COLO_PRESEND_DELAY_MAGIC = 2147483646;
/** … which arrives after this be32 ("RBPS") as a RAM section part. */
export const COLO_PRESEND_MARK = 0x52425053;
export const QEMU_VM_FILE_VERSION = 3;

export const VM = {
  EOF: 0x00,
  SECTION_START: 0x01,
  SECTION_PART: 0x02,
  SECTION_END: 0x03,
  SECTION_FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  SECTION_FOOTER: 0x7e,
} as const;

export const MIG_CMD = {
  INVALID: 0,
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
} as const;
export const MIG_CMD_NAMES = [
  'INVALID',
  'OPEN_RETURN_PATH',
  'PING',
  'POSTCOPY_ADVISE',
  'POSTCOPY_LISTEN',
  'POSTCOPY_RUN',
  'POSTCOPY_RAM_DISCARD',
  'PACKAGED',
  'ENABLE_COLO',
  'POSTCOPY_RESUME',
  'RECV_BITMAP',
];

export const RAM_FLAG = {
  FULL: 0x01,
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80,
  COMPRESS_PAGE: 0x100,
} as const;

export const TARGET_PAGE_SIZE = 4096;
export const RAM_SECTION_VERSION = 4;

export const COLO_MSG = {
  CHECKPOINT_READY: 0,
  CHECKPOINT_REQUEST: 1,
  CHECKPOINT_REPLY: 2,
  VMSTATE_SEND: 3,
  VMSTATE_SIZE: 4,
  VMSTATE_RECEIVED: 5,
  VMSTATE_LOADED: 6,
} as const;
export const COLO_MSG_NAMES = [
  'CHECKPOINT_READY',
  'CHECKPOINT_REQUEST',
  'CHECKPOINT_REPLY',
  'VMSTATE_SEND',
  'VMSTATE_SIZE',
  'VMSTATE_RECEIVED',
  'VMSTATE_LOADED',
];

export function coloMessage(msg: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(msg, 0);
  return b;
}

/** Configuration section as QEMU writes it: machine name, optional validated capabilities. */
export function encodeConfiguration(machineName: string, capabilities: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const name = Buffer.from(machineName, 'latin1');
  const head = Buffer.allocUnsafe(5);
  head[0] = VM.CONFIGURATION;
  head.writeUInt32BE(name.length, 1);
  parts.push(head, name);
  if (capabilities.length) {
    const sub = Buffer.from('configuration/capabilities', 'latin1');
    const h = Buffer.allocUnsafe(2);
    h[0] = VM.SUBSECTION;
    h[1] = sub.length;
    const v = Buffer.allocUnsafe(8);
    v.writeUInt32BE(1, 0); // subsection version
    v.writeUInt32BE(capabilities.length, 4);
    parts.push(h, sub, v);
    for (const c of capabilities) {
      const cb = Buffer.from(c, 'latin1');
      parts.push(Buffer.from([cb.length]), cb);
    }
  }
  return Buffer.concat(parts);
}

export function encodeHeader(): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeUInt32BE(QEMU_VM_FILE_MAGIC, 0);
  b.writeUInt32BE(QEMU_VM_FILE_VERSION, 4);
  return b;
}

/**
 * A stream that loads device state only, for a QEMU whose RAM already holds the replica image
 * (x-ignore-shared): header, configuration announcing x-ignore-shared, the device-state buffer
 * (sections + EOF) exactly as QEMU emitted it at the checkpoint.
 */
export function encodeDeviceOnlyStream(machineName: string, deviceState: Buffer): Buffer {
  return Buffer.concat([encodeHeader(), encodeConfiguration(machineName, ['x-ignore-shared']), deviceState]);
}

/** A migration command record (`MIG_CMD_*`) with no data. */
export function encodeCommand(cmd: number): Buffer {
  const b = Buffer.allocUnsafe(5);
  b[0] = VM.COMMAND;
  b.writeUInt16BE(cmd, 1);
  b.writeUInt16BE(0, 3);
  return b;
}

/** Section footer: marker + section id. */
export function encodeFooter(sectionId: number): Buffer {
  const b = Buffer.allocUnsafe(5);
  b[0] = VM.SECTION_FOOTER;
  b.writeUInt32BE(sectionId, 1);
  return b;
}

/** A RAM page to write into a stream: its contents, or null for a page all of `fill`. */
export interface StreamPage {
  block: string;
  offset: number;
  data: Buffer | null;
  fill?: number;
}

const be64 = (v: number): Buffer => {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(v), 0);
  return b;
};

/**
 * The RAM section's start as a precopy without x-ignore-shared writes it: section header ("ram",
 * instance 0, version 4), the block list (MEM_SIZE), EOS and footer.
 */
export function encodeRamSectionStart(
  sectionId: number,
  blocks: readonly { id: string; lengthBytes: number }[],
): Buffer {
  const parts: Buffer[] = [];
  const h = Buffer.allocUnsafe(5);
  h[0] = VM.SECTION_START;
  h.writeUInt32BE(sectionId, 1);
  parts.push(h, Buffer.from([3]), Buffer.from('ram', 'latin1'));
  const iv = Buffer.allocUnsafe(8);
  iv.writeUInt32BE(0, 0);
  iv.writeUInt32BE(RAM_SECTION_VERSION, 4);
  parts.push(iv);
  const total = blocks.reduce((s, b) => s + b.lengthBytes, 0);
  parts.push(be64(total + RAM_FLAG.MEM_SIZE));
  for (const b of blocks) {
    const id = Buffer.from(b.id, 'latin1');
    parts.push(Buffer.from([id.length]), id, be64(b.lengthBytes));
  }
  parts.push(be64(RAM_FLAG.EOS), encodeFooter(sectionId));
  return Buffer.concat(parts);
}

/** A RAM section part or end header (`type` SECTION_PART or SECTION_END). */
export function encodeSectionHeader(type: number, sectionId: number): Buffer {
  const h = Buffer.allocUnsafe(5);
  h[0] = type;
  h.writeUInt32BE(sectionId, 1);
  return h;
}

/**
 * RAM records for `pages` (a block is named once, then CONTINUE), without EOS. `last` carries the
 * block the previous record named across calls within one stream.
 */
export function encodeRamRecords(pages: readonly StreamPage[], last: { block: string | null }): Buffer[] {
  const out: Buffer[] = [];
  for (const p of pages) {
    const cont = last.block === p.block;
    const flags = (p.data ? RAM_FLAG.PAGE : RAM_FLAG.ZERO) | (cont ? RAM_FLAG.CONTINUE : 0);
    out.push(be64(p.offset + flags));
    if (!cont) {
      const id = Buffer.from(p.block, 'latin1');
      out.push(Buffer.from([id.length]), id);
      last.block = p.block;
    }
    out.push(p.data ?? Buffer.from([p.fill ?? 0]));
  }
  return out;
}

export const encodeEos = (): Buffer => be64(RAM_FLAG.EOS);

/** A COLO message followed by a be64 value (`VMSTATE_SIZE`). */
export function coloMessageValue(msg: number, value: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt32BE(msg, 0);
  b.writeBigUInt64BE(BigInt(value), 4);
  return b;
}
