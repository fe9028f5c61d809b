// What the primary controller tells an observer of its checkpoints (the benchmarks' trace recorder
// implements it): the core defines the interface and never imports the harness that fills it.

import type { EpochTimeline } from './pipeline.ts';

export interface CheckpointObserver {
  /**
   * Checkpoint taken: its epoch ran [startMs, endMs), paused for pauseMs, shipped `bytes`, dirtied
   * these pages (block index << 24 | page number). Times on the performance.now() clock. Returns a
   * handle for `acked` (negative: not recorded).
   */
  epoch?(
    startMs: number,
    endMs: number,
    pauseMs: number,
    bytes: number,
    pageIds: Uint32Array,
    decidedMs?: number,
  ): number;
  /** The checkpoint behind `handle` was acknowledged `ackMs` after it was sent. */
  acked?(handle: number, ackMs: number): void;
  /** The guest sent an output frame of `bytes` (held by output commit). */
  output?(atMs: number, bytes: number): void;
  /** The guest wrote or flushed its disk. */
  disk?(kind: 'write' | 'flush', atMs: number): void;
  /**
   * Output frames sent by the guest at `framesAtMs` left at `releasedMs`, released by the checkpoint whose life `t`
   * describes.
   */
  released?(t: EpochTimeline, framesAtMs: readonly number[], releasedMs: number): void;
}
