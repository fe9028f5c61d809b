// A checkpoint's pages as they go on the link: no frame carries more than `framePages` pages. A larger
// checkpoint sends its leading pages as PRESEND frames of that many pages (staged on the standby and
// committed only with the checkpoint, as a pass's pages are), then its CKPT record with the rest and the
// device state. Pure (no I/O).
//
// Why: the standby decrypts a frame into one buffer of the frame's size. Above 32 MiB (MALLOC_MMAP_THRESHOLD_,
// bin/rubato; glibc's ceiling for it) malloc maps every such buffer afresh and unmaps it when freed, so each
// page of it is faulted in: about 9 µs a page in this virtual machine, 2-3 ns per byte. A 2-vCPU dirtier's
// checkpoints are about 33 MB, and the standby spent 1.6 s of every 9.5 in that copy (docs/evaluation.md,
// stop 49). Frames of a few MiB come from malloc's heap and reuse its memory.

import { PAGE_SIZE, type DirtyPage, type RamBlockInfo } from '../capture/index.ts';
import { encodePresendParts, encodeRecordParts, type RecordParts } from './protocol/record.ts';
import type { SentPages, SentPagesCounts } from './sent-pages.ts';

/** Pages per frame on the link: 4 MiB of page data. */
export const FRAME_PAGES = (4 << 20) / PAGE_SIZE;

/** What goes on the link for one checkpoint: `lead` as PRESEND frames, in order, then `record` as its CKPT. */
export interface WireCheckpoint {
  lead: RecordParts[];
  record: RecordParts;
  counts: SentPagesCounts;
  /** All of it, in bytes: the lead frames' payloads and the record. */
  length: number;
}

/**
 * Checkpoint `epoch` as frames. The pages go through `sent` (references to the copies both sides keep) batch by
 * batch, in the order the frames will be sent: send all of it, and nothing in between.
 */
export function checkpointFrames(
  cp: { epoch: number; pages: readonly DirtyPage[]; deviceState: Buffer },
  sent: SentPages,
  blocks: readonly RamBlockInfo[],
  framePages = FRAME_PAGES,
): WireCheckpoint {
  const counts = noCounts();
  const batches = split(cp.pages, framePages);
  const last = batches.pop() ?? [];
  const lead = batches.map((b) => encodePresendParts(cp.epoch, filtered(sent, b, counts), blocks));
  const record = encodeRecordParts(
    { epoch: cp.epoch, pages: filtered(sent, last, counts), deviceState: cp.deviceState },
    blocks,
    'wire',
  );
  return { lead, record, counts, length: lead.reduce((n, f) => n + f.length, record.length) };
}

/** Pre-sent pages of checkpoint `epoch` as PRESEND frames of at most `framePages` pages each (through `sent`, in order). */
export function presendFrames(
  epoch: number,
  pages: readonly DirtyPage[],
  sent: SentPages,
  blocks: readonly RamBlockInfo[],
  framePages = FRAME_PAGES,
): { frames: RecordParts[]; counts: SentPagesCounts } {
  const counts = noCounts();
  const frames = split(pages, framePages).map((b) => encodePresendParts(epoch, filtered(sent, b, counts), blocks));
  return { frames, counts };
}

function filtered(sent: SentPages, pages: readonly DirtyPage[], into: SentPagesCounts) {
  const r = sent.filter(pages);
  into.same += r.counts.same;
  into.delta += r.counts.delta;
  into.whole += r.counts.whole;
  into.savedBytes += r.counts.savedBytes;
  return r.pages;
}

/** Consecutive batches of at most `n` pages (none for no pages). */
function split<T>(pages: readonly T[], n: number): T[][] {
  const size = Math.max(1, Math.floor(n));
  const out: T[][] = [];
  for (let i = 0; i < pages.length; i += size) out.push(pages.slice(i, i + size));
  return out;
}

const noCounts = (): SentPagesCounts => ({ same: 0, delta: 0, whole: 0, savedBytes: 0 });
