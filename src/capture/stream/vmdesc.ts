// Walks QEMU's device part section by section with the sizes its VM description declares: the
// description (QEMU's vmdesc JSON, sent after the device part) records, for every section, its
// fields with their sizes as written, nested structs and arrays, and the subsections present. Pure.
// Used to confirm where the device part ends, since QEMU 7.2's device sections carry no lengths.

import { VM } from '../../qemu/index.ts';

interface Field {
  name?: string;
  type?: string;
  size?: number;
  array_len?: number;
  struct?: Desc;
}
interface Desc {
  vmsd_name?: string;
  version?: number;
  fields?: Field[];
  subsections?: Desc[];
}
interface Device extends Desc {
  name: string;
  instance_id: number;
}

const SUBSECTION = 0x05;

class Walk {
  constructor(
    readonly buf: Buffer,
    public off: number,
  ) {}
  need(n: number, what: string): void {
    if (!Number.isInteger(n) || n < 0 || this.off + n > this.buf.length)
      throw new Error(`${what} runs past the device part`);
  }
  u8(what: string): number {
    this.need(1, what);
    return this.buf[this.off++]!;
  }
  be32(what: string): number {
    this.need(4, what);
    const v = this.buf.readUInt32BE(this.off);
    this.off += 4;
    return v;
  }
  str8(what: string): string {
    const n = this.u8(what);
    this.need(n, what);
    const s = this.buf.toString('latin1', this.off, this.off + n);
    this.off += n;
    return s;
  }
  skip(n: number, what: string): void {
    this.need(n, what);
    this.off += n;
  }
}

function walkDesc(w: Walk, d: Desc, where: string): void {
  for (const f of d.fields ?? []) {
    const n = f.array_len ?? 1;
    const what = `${where}.${f.name ?? '?'}`;
    if (f.type === 'struct' && f.struct) {
      for (let i = 0; i < n; i++) walkDesc(w, f.struct, what);
    } else {
      if (typeof f.size !== 'number') throw new Error(`${what} has no size in the VM description`);
      w.skip(f.size * n, what);
    }
  }
  for (const s of d.subsections ?? []) {
    const what = `${where}/${s.vmsd_name ?? '?'}`;
    if (w.u8(what) !== SUBSECTION) throw new Error(`${what}: no subsection marker where the description has one`);
    if (w.str8(what) !== s.vmsd_name) throw new Error(`${what}: subsection name differs from the description`);
    if (w.be32(what) !== s.version) throw new Error(`${what}: subsection version differs from the description`);
    walkDesc(w, s, what);
  }
}

/**
 * Walks `part` (FULL sections then EOF, as QEMU wrote them) against `vmdesc`. Returns the offset
 * of the EOF byte the walk ends on, or throws saying where the two disagree.
 */
export function walkDevicePart(part: Buffer, vmdesc: unknown): number {
  const devices = (vmdesc as { devices?: unknown })?.devices;
  if (!Array.isArray(devices)) throw new Error('the VM description lists no devices');
  const w = new Walk(part, 0);
  for (const dev of devices as Device[]) {
    const where = `${dev.name}[${dev.instance_id}]`;
    if (w.u8(where) !== VM.SECTION_FULL) throw new Error(`${where}: no section where the description has one`);
    const id = w.be32(where);
    if (w.str8(where) !== dev.name) throw new Error(`${where}: section name differs from the description`);
    if (w.be32(where) !== dev.instance_id) throw new Error(`${where}: instance differs from the description`);
    if (w.be32(where) !== dev.version) throw new Error(`${where}: version differs from the description`);
    walkDesc(w, dev, where);
    if (w.u8(where) !== VM.SECTION_FOOTER || w.be32(where) !== id)
      throw new Error(`${where}: no section footer after the fields the description declares`);
  }
  if (w.u8('the end') !== VM.EOF) throw new Error('no EOF after the last section');
  return w.off - 1;
}
