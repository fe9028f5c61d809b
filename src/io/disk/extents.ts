// Which parts of a disk image hold data: `qemu-img map` (raw and qcow2 alike; for raw it asks the
// file system for holes), so that a sparse 16 GiB image with 700 MB written costs 700 MB to copy.
// Without qemu-img the whole image is one extent (the copy then skips zero chunks as it reads).

import { statSync } from 'node:fs';
import { z } from 'zod';
import { runCommand, RubatoError } from '../../util/index.ts';

const PAGE = 4096;

export interface Extent {
  start: number;
  length: number;
}

const MapEntry = z.object({ start: z.number(), length: z.number(), data: z.boolean(), zero: z.boolean().optional() });

/** Allocated data extents of a raw image, ascending, merged. */
export async function allocatedExtents(path: string): Promise<Extent[]> {
  const size = statSync(path).size;
  const r = await runCommand('qemu-img', ['map', '--output=json', '-U', '-f', 'raw', path]).catch(() => null);
  if (r?.code !== 0) return size > 0 ? [{ start: 0, length: size }] : [];
  let entries: z.infer<typeof MapEntry>[];
  try {
    entries = z.array(MapEntry).parse(JSON.parse(r.stdout));
  } catch (e) {
    throw new RubatoError('RUBATO_CONFIG', `qemu-img map ${path}: unexpected output (${(e as Error).message})`);
  }
  const out: Extent[] = [];
  for (const e of entries) {
    if (!e.data || e.zero) continue;
    // whole pages: the replica is written page by page
    const start = Math.floor(e.start / PAGE) * PAGE;
    const end = Math.min(Math.ceil(size / PAGE) * PAGE, Math.ceil((e.start + e.length) / PAGE) * PAGE);
    const last = out.at(-1);
    if (last && last.start + last.length >= start) last.length = Math.max(last.length, end - last.start);
    else out.push({ start, length: end - start });
  }
  return out;
}

export const extentBytes = (xs: readonly Extent[]): number => xs.reduce((s, x) => s + x.length, 0);
