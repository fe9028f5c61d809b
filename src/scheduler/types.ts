// Scheduler types. Pure data: telemetry in, a decision out. No clocks (time is a number the
// engine or the simulator passes in), no timers, no I/O — so the same policy runs live and in
// the simulator, deterministically.

export interface EpochRecord {
  /** Guest run time of the epoch (resume → pause), ms. */
  lengthMs: number;
  dirtyPages: number;
  /** Of dirtyPages, those the pause itself carried (less than dirtyPages when pre-sends sent the rest). */
  pausePages?: number;
  /** Guest pause for this checkpoint, ms. */
  pauseMs: number;
  /** Bytes shipped for it. */
  bytes: number;
  /** Send → ack, ms (null until acked). */
  transferMs: number | null;
  /** Output frames produced during the epoch. */
  outputFrames: number;
}

export interface Telemetry {
  nowMs: number;
  /** When the running epoch began (guest resumed after the last checkpoint). */
  epochStartMs: number;
  /** Past epochs, oldest first (bounded by the engine). */
  history: readonly EpochRecord[];
  /** Output produced in the running epoch and waiting for it to be checkpointed. */
  output: { frames: number; bytes: number; oldestMs: number | null };
  /** Disk activity of the running epoch. */
  disk: { writes: number; flushes: number };
  link: { bytesPerSec: number | null; rttMs: number | null };
  /** Checkpoints shipped but not yet acknowledged. */
  backlog: number;
  /** Pre-sends in the running epoch (dirty RAM sent while the guest ran): pages sent, when the last was. */
  presend?: { pages: number; lastMs: number | null };
  /** The host's idle cores lately, when known (pre-sends during an epoch are free only on idle cores). */
  hostIdleCores?: number;
}

export type Decision = { checkpoint: true; reason: string } | { checkpoint: false; wakeAtMs: number; reason: string };

export interface Policy {
  readonly name: string;
  readonly minEpochMs: number;
  readonly maxEpochMs: number;
  /**
   * Pre-send the dirty RAM this often while an epoch runs, and once before a long epoch's pause (Infinity: only then;
   * 0/absent: never; needs the patched QEMU).
   */
  readonly presendMs?: number;
  /** presend=auto: passes planned so that the pause stays within this (see presendIntervalFor). */
  readonly presendTargetPauseMs?: number;
  decide(t: Telemetry): Decision;
}

export const PAGE_BYTES = 4096;
