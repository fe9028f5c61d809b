// Decoder for the parts of QEMU's migration stream that Rubato consumes: header and
// configuration, commands, the RAM section's records, and the device part. It checks every
// length and offset against the RAM layout and names any stream feature it does not support.

import { RubatoError, type ByteReader } from '../../util/index.ts';
import { walkDevicePart } from './vmdesc.ts';
import {
  MIG_CMD,
  MIG_CMD_NAMES,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  RAM_FLAG,
  RAM_SECTION_VERSION,
  TARGET_PAGE_SIZE,
  VM,
} from '../../qemu/index.ts';

export const QEMU_VERSION_NOTE = 'Rubato reads the stream of QEMU 7.2';

export interface StreamConfig {
  machine: string;
  capabilities: string[];
}

export interface PageSink {
  page(block: string, offset: number, data: Buffer): void;
  zero(block: string, offset: number, fill: number): void;
  /** The RAM layout is known (the stream announced its blocks); reading waits for a returned promise. */
  layout?(blocks: ReadonlyMap<string, number>, order: readonly string[], machine: string): Promise<void> | void;
  /** After each record: a promise to wait for before reading on (a sink that forwards pages pushes back). */
  drain?(): Promise<void> | null;
}

/** Decoder state that lives across sections and checkpoints (CONTINUE refers to the last block ever sent). */
export interface RamState {
  blocks: Map<string, number>;
  blockOrder: string[];
  lastBlock: string | null;
  ramSectionId: number | null;
  ignoreShared: boolean;
  /** The machine type the stream's configuration names. */
  machine: string;
}

export function newRamState(): RamState {
  return { blocks: new Map(), blockOrder: [], lastBlock: null, ramSectionId: null, ignoreShared: false, machine: '' };
}

const formatError = (msg: string, r: ByteReader) =>
  new RubatoError('RUBATO_STREAM_FORMAT', `migration stream: ${msg} (at byte ${r.consumed})`, { offset: r.consumed });
const unsupported = (feature: string) =>
  new RubatoError(
    'RUBATO_STREAM_UNSUPPORTED',
    `migration stream uses ${feature}, which Rubato does not support (${QEMU_VERSION_NOTE}; disable that feature on the primary QEMU)`,
    { feature },
  );

export async function readHeader(r: ByteReader): Promise<StreamConfig> {
  const magic = await r.readBe32();
  if (magic !== QEMU_VM_FILE_MAGIC) throw formatError(`bad magic 0x${magic.toString(16)} (expected QEVM)`, r);
  const version = await r.readBe32();
  if (version !== QEMU_VM_FILE_VERSION) throw unsupported(`stream version ${version}`);
  const t = await r.readU8();
  if (t !== VM.CONFIGURATION) throw formatError(`expected configuration section, got type 0x${t.toString(16)}`, r);
  const nameLen = await r.readBe32();
  if (nameLen > 256) throw formatError(`machine name length ${nameLen}`, r);
  const machine = (await r.readBytes(nameLen)).toString('latin1');
  const capabilities: string[] = [];
  for (;;) {
    await r.need(1);
    if (r.peekU8() !== VM.SUBSECTION) break;
    r.u8();
    const name = await r.readString8();
    await r.readBe32(); // subsection version
    if (name === 'configuration/capabilities') {
      const n = await r.readBe32();
      if (n > 64) throw formatError(`capability count ${n}`, r);
      for (let i = 0; i < n; i++) capabilities.push(await r.readString8());
    } else if (name === 'configuration/target-page-bits') {
      const bits = await r.readBe32();
      if (1 << bits !== TARGET_PAGE_SIZE) throw unsupported(`target page size ${1 << bits}`);
    } else if (name === 'configuration/uuid') {
      await r.readBytes(16);
    } else {
      throw unsupported(`configuration subsection ${name}`);
    }
  }
  return { machine, capabilities };
}

export interface SectionHeader {
  type: number;
  sectionId: number;
  idstr?: string;
  instanceId?: number;
  versionId?: number;
}

/** Reads a section header whose type byte was already consumed. */
export async function readSectionHeader(r: ByteReader, type: number): Promise<SectionHeader> {
  const sectionId = await r.readBe32();
  if (type === VM.SECTION_START || type === VM.SECTION_FULL) {
    const idstr = await r.readString8();
    const instanceId = await r.readBe32();
    const versionId = await r.readBe32();
    return { type, sectionId, idstr, instanceId, versionId };
  }
  return { type, sectionId };
}

export async function readFooter(r: ByteReader, sectionId: number): Promise<void> {
  const mark = await r.readU8();
  if (mark !== VM.SECTION_FOOTER)
    throw formatError(`missing section footer for section ${sectionId} (got 0x${mark.toString(16)})`, r);
  const id = await r.readBe32();
  if (id !== sectionId) throw formatError(`section footer names section ${id}, expected ${sectionId}`, r);
}

/** Reads RAM records up to and including EOS. Synchronous while data is buffered. */
export async function readRamRecords(
  r: ByteReader,
  st: RamState,
  sink: PageSink,
): Promise<{ pages: number; zeros: number }> {
  let pages = 0;
  let zeros = 0;
  for (;;) {
    if (!r.has(8)) await r.need(8);
    const hdr = r.be64();
    const flags = hdr % TARGET_PAGE_SIZE;
    const addr = hdr - flags;
    const kind = flags & ~RAM_FLAG.CONTINUE;
    if (kind === RAM_FLAG.EOS) return { pages, zeros };
    if (kind === RAM_FLAG.MEM_SIZE) {
      let total = addr;
      while (total > 0) {
        const id = await r.readString8();
        const len = await r.readBe64();
        if (st.ignoreShared) await r.readBe64(); // guest-physical address of the block
        if (len === 0 || len % TARGET_PAGE_SIZE !== 0 || len > total)
          throw formatError(`RAM block ${id} has length ${len}`, r);
        if (!st.blocks.has(id)) st.blockOrder.push(id);
        st.blocks.set(id, len);
        total -= len;
      }
      const w = sink.layout?.(st.blocks, st.blockOrder, st.machine);
      if (w) await w;
      continue;
    }
    if (kind !== RAM_FLAG.ZERO && kind !== RAM_FLAG.PAGE) {
      if (kind & RAM_FLAG.XBZRLE) throw unsupported('XBZRLE page compression');
      if (kind & RAM_FLAG.COMPRESS_PAGE) throw unsupported('multi-threaded page compression');
      if (kind & RAM_FLAG.HOOK) throw unsupported('RDMA RAM hooks');
      throw formatError(`unknown RAM record flags 0x${flags.toString(16)}`, r);
    }
    let block: string;
    if (flags & RAM_FLAG.CONTINUE) {
      if (st.lastBlock === null) throw formatError('RAM record continues a block but none was named', r);
      block = st.lastBlock;
    } else {
      if (!r.has(1)) await r.need(1);
      const n = r.peekU8();
      if (!r.has(1 + n)) await r.need(1 + n);
      r.u8();
      block = r.take(n).toString('latin1');
      st.lastBlock = block;
    }
    const blen = st.blocks.get(block);
    if (blen === undefined) throw formatError(`RAM record for unknown block "${block}"`, r);
    if (addr + TARGET_PAGE_SIZE > blen)
      throw formatError(`RAM offset 0x${addr.toString(16)} outside block ${block} (${blen} bytes)`, r);
    if (kind === RAM_FLAG.ZERO) {
      if (!r.has(1)) await r.need(1);
      sink.zero(block, addr, r.u8());
      zeros++;
    } else {
      if (!r.has(TARGET_PAGE_SIZE)) await r.need(TARGET_PAGE_SIZE);
      sink.page(block, addr, r.take(TARGET_PAGE_SIZE));
      pages++;
    }
    if (sink.drain) {
      const d = sink.drain();
      if (d) await d;
    }
  }
}

export async function readCommand(r: ByteReader): Promise<{ cmd: number; data: Buffer }> {
  if (!r.has(4)) await r.need(4);
  const cmd = r.be16();
  const len = r.be16();
  const data = await r.readBytes(len);
  if (cmd === MIG_CMD.INVALID || cmd > MIG_CMD.RECV_BITMAP) throw formatError(`unknown migration command ${cmd}`, r);
  return { cmd, data };
}

export function commandName(cmd: number): string {
  return MIG_CMD_NAMES[cmd] ?? `command ${cmd}`;
}

const VMDESC_JSON_START = Buffer.from('{"page_size":', 'latin1');

/**
 * Reads the device part that closes a precopy stream: FULL sections (which carry no lengths),
 * EOF, then the VM description record. Returns the device part (sections + EOF) and the
 * description. The first byte (SECTION_FULL) has not been consumed yet.
 *
 * QEMU 7.2's device sections carry no lengths, so the device part is read by sections with the
 * sizes the VM description declares (vmdesc.ts): an EOF, VMDESCRIPTION, length and JSON opening
 * only proposes where the part may end, and a proposal counts only when the description that
 * follows it walks the part section by section to exactly that EOF. Bytes that look like the
 * marker inside a device's data (a guest can put bytes there) are passed over. Chunks are kept as
 * a list and searched through a window (linear in the part's size); every length is capped.
 */
export async function readDevicePart(
  r: ByteReader,
  maxBytes = 64 << 20,
): Promise<{ deviceState: Buffer; vmdesc: unknown }> {
  const MARK = 6; // EOF, VMDESCRIPTION, be32 length
  const parts: Buffer[] = [];
  let total = 0;
  let window: Buffer = Buffer.alloc(0); // the last bytes before the newest chunk, so a match may span chunks
  const candidates: number[] = []; // offsets of EOF bytes that may end the part
  let acc: Buffer = Buffer.alloc(0);
  const joined = () => {
    if (acc.length !== total) acc = Buffer.concat(parts, total);
    return acc;
  };
  for (;;) {
    if (!r.has(1)) await r.need(1);
    const chunk = r.take(r.available);
    parts.push(chunk);
    total += chunk.length;
    if (total > 2 * maxBytes)
      throw formatError(`device part larger than ${maxBytes} bytes with no VM description that fits it`, r);
    const hay = window.length ? Buffer.concat([window, chunk]) : chunk;
    const base = total - hay.length; // absolute offset of hay[0]
    for (let i = hay.indexOf(VMDESC_JSON_START); i >= 0; i = hay.indexOf(VMDESC_JSON_START, i + 1)) {
      if (i >= MARK && hay[i - MARK] === VM.EOF && hay[i - MARK + 1] === VM.VMDESCRIPTION)
        candidates.push(base + i - MARK);
    }
    window = hay.subarray(Math.max(0, hay.length - (VMDESC_JSON_START.length + MARK - 1)));
    for (let k = 0; k < candidates.length; ) {
      const at = candidates[k]!;
      const buf = joined();
      const jsonLen = buf.readUInt32BE(at + 2);
      const end = at + MARK + jsonLen;
      if (jsonLen > maxBytes || at > maxBytes) {
        candidates.splice(k, 1);
        continue;
      } // not a real description
      if (end > total) {
        k++;
        continue;
      } // its description has not all arrived yet
      let vmdesc: unknown;
      let walkedTo = -1;
      try {
        vmdesc = JSON.parse(buf.subarray(at + MARK, end).toString('utf8'));
        walkedTo = walkDevicePart(buf.subarray(0, at + 1), vmdesc);
      } catch {
        walkedTo = -1;
      }
      if (walkedTo !== at) {
        candidates.splice(k, 1);
        continue;
      } // marker bytes inside a section
      r.unshift(buf.subarray(end));
      if (buf[0] !== VM.SECTION_FULL) throw formatError(`device part starts with 0x${buf[0]?.toString(16)}`, r);
      return { deviceState: Buffer.from(buf.subarray(0, at + 1)), vmdesc };
    }
  }
}

/** A device-state buffer is FULL sections closed by an EOF byte. */
export function checkDeviceState(buf: Buffer): boolean {
  return buf.length >= 2 && buf[0] === VM.SECTION_FULL && buf[buf.length - 1] === VM.EOF;
}

export interface PrecopyResult {
  config: StreamConfig;
  colo: boolean;
  deviceState: Buffer;
  vmdesc: unknown;
}

/**
 * Reads a whole precopy stream: header, configuration, commands, the RAM section (pages go to
 * the sink), and the device part up to the VM description. After it, a COLO stream continues
 * with COLO messages; a plain migration stream ends.
 */
export async function readPrecopy(r: ByteReader, st: RamState, sink: PageSink): Promise<PrecopyResult> {
  const config = await readHeader(r);
  st.ignoreShared = config.capabilities.includes('x-ignore-shared');
  st.machine = config.machine;
  let colo = false;
  for (;;) {
    const t = await r.readU8();
    switch (t) {
      case VM.COMMAND: {
        const { cmd } = await readCommand(r);
        if (cmd === MIG_CMD.ENABLE_COLO) colo = true;
        else if (cmd === MIG_CMD.OPEN_RETURN_PATH) throw unsupported('the return-path capability');
        else throw unsupported(`migration command ${commandName(cmd)}`);
        break;
      }
      case VM.SECTION_START: {
        const h = await readSectionHeader(r, t);
        if (h.idstr !== 'ram') throw unsupported(`iterative section "${h.idstr}" (block or dirty-bitmap migration)`);
        if (h.versionId !== RAM_SECTION_VERSION) throw unsupported(`RAM section version ${h.versionId}`);
        st.ramSectionId = h.sectionId;
        await readRamRecords(r, st, sink);
        await readFooter(r, h.sectionId);
        break;
      }
      case VM.SECTION_PART:
      case VM.SECTION_END: {
        const h = await readSectionHeader(r, t);
        if (h.sectionId !== st.ramSectionId)
          throw formatError(`section ${h.sectionId} continues, but only RAM (${st.ramSectionId}) is iterative`, r);
        await readRamRecords(r, st, sink);
        await readFooter(r, h.sectionId);
        break;
      }
      case VM.SECTION_FULL: {
        r.unshift(Buffer.from([t]));
        const { deviceState, vmdesc } = await readDevicePart(r);
        return { config, colo, deviceState, vmdesc };
      }
      default:
        throw formatError(`unexpected record type 0x${t.toString(16)}`, r);
    }
  }
}
