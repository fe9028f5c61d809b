// What the NBD server's two threads share: the layout of the published counters and the messages.
import type { MessagePort } from 'node:worker_threads';

export const PAGE_BYTES_NBD = 4096;
/**
 * Indexes into the shared BigInt64Array of counters for the running epoch; `cut`: the last cut the
 * worker had applied when it published them (counters of an older epoch are not the running one's).
 */
export const STAT = { writes: 0, writeBytes: 1, flushes: 2, reads: 3, errors: 4, dirtyPages: 5, cut: 6 } as const;
export const STAT_SLOTS = 7;
/** Indexes into the shared Int32Array of controls. */
export const CTL = {
  /** A synchronous cut's reply is posted on cutPort. */
  replied: 0,
  /** Per-operation events are wanted (a trace is being recorded). */
  ioEvents: 1,
  /** The last cut the controller marked: every request begun after it belongs to the next epoch. */
  marked: 2,
} as const;
export const CTL_SLOTS = 3;

export interface WorkerData {
  imagePath: string;
  socketPath: string;
  exportName: string;
  readOnly: boolean;
  /** Writes go to an overlay in memory, not the image (a compare-mode secondary's disk). */
  overlay: boolean;
  /** SharedArrayBuffer of STAT_SLOTS BigInt64 counters. */
  stats: SharedArrayBuffer;
  /** SharedArrayBuffer of CTL_SLOTS Int32 (see CTL). */
  ctl: SharedArrayBuffer;
  cutPort: MessagePort;
}

/** The controller's messages on cutPort. */
export type CutRequest =
  /** Cut `seq` (marked already), answered on cutPort while the controller waits. */
  | { cut: number; discard: boolean }
  /** Cut `seq`'s writes, answered on the worker's port as `{ ev: 'cut', seq, reply }` (no one waits). */
  | { collect: number; discard: boolean }
  | { overlay: 'discard' | 'commit' }
  | { close: true };

export interface CutReply {
  offsets: number[];
  pages: ArrayBuffer;
  writes: number;
  writeBytes: number;
  flushes: number;
  reads: number;
  errors: number;
}

/** The reply for a cut with no writes. */
export const emptyCutReply = (): CutReply => ({
  offsets: [],
  pages: new ArrayBuffer(0),
  writes: 0,
  writeBytes: 0,
  flushes: 0,
  reads: 0,
  errors: 0,
});
