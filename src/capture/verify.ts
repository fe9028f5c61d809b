// Byte-for-byte comparison of a replica with the guest's RAM (the paused primary's shared RAM
// file). The only check that catches a dirty page QEMU failed to report. Pure but for reading.

import { openSync, readSync, closeSync, fstatSync } from 'node:fs';
import { PAGE_SIZE } from './checkpoint.ts';

/** Offsets of the pages that differ between two equally long images. */
export function diffPages(a: Buffer, b: Buffer, limit = Number.POSITIVE_INFINITY): number[] {
  if (a.length !== b.length) throw new Error(`images differ in length: ${a.length} vs ${b.length}`);
  const out: number[] = [];
  for (let o = 0; o < a.length; o += PAGE_SIZE) {
    if (a.compare(b, o, o + PAGE_SIZE, o, o + PAGE_SIZE) !== 0) {
      out.push(o);
      if (out.length >= limit) break;
    }
  }
  return out;
}

/** Reads a whole RAM file into `into` (reused between calls to spare allocations). */
export function readRamFile(path: string, into?: Buffer): Buffer {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const buf = into && into.length === size ? into : Buffer.allocUnsafe(size);
    let off = 0;
    while (off < size) {
      const n = readSync(fd, buf, off, Math.min(size - off, 16 << 20), off);
      if (n <= 0) throw new Error(`short read of ${path} at ${off}`);
      off += n;
    }
    return buf;
  } finally {
    closeSync(fd);
  }
}
