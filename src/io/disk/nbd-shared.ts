// What the NBD server's two threads share: the layout of the published counters and the messages.
import type { MessagePort } from 'node:worker_threads';

export const PAGE_BYTES_NBD = 4096;
/** Indexes into the shared BigInt64Array of counters for the running epoch. */
export const STAT = { writes: 0, writeBytes: 1, flushes: 2, reads: 3, errors: 4, dirtyPages: 5 } as const;
export const STAT_SLOTS = 6;

export interface WorkerData {
  imagePath: string;
  socketPath: string;
  exportName: string;
  readOnly: boolean;
  /** Writes go to an overlay in memory, not the image (a compare-mode secondary's disk). */
  overlay: boolean;
  /** SharedArrayBuffer of STAT_SLOTS BigInt64 counters. */
  stats: SharedArrayBuffer;
  /** SharedArrayBuffer of two Int32: [0] the cut reply is posted, [1] per-operation events wanted. */
  ctl: SharedArrayBuffer;
  cutPort: MessagePort;
}

export interface CutReply {
  offsets: number[];
  pages: ArrayBuffer;
  writes: number;
  writeBytes: number;
  flushes: number;
  reads: number;
  errors: number;
}
