// The primary's once-a-second status line, computed from what the pipeline, the link and output
// commit already count. Pure: the caller passes the time and the counters.

import type { PipelineStats } from './pipeline.ts';
import type { OutputStats } from '../commit/index.ts';

export interface PrimaryStatus {
  event: 'status';
  epoch: number;
  ackedEpoch: number;
  ckptPerSec: number;
  dirtyPages: number;
  pauseMs: number;
  mbPerSec: number;
  lagMs: number;
  rttMs: number | null;
  inflight: number;
  waitsForLink: number;
  heldFrames: number;
  heldBytes: number;
  oldestHeldMs: number | null;
  diskWrites: number;
  diskFlushes: number;
  unprotectedReleases: number;
}

export interface StatusInput {
  pipeline: PipelineStats;
  output: OutputStats;
  bytesSent: number;
  rttMs: number | null;
  lagMs: number;
  lastDirtyPages: number;
  pauseMs: number;
}

const round = (x: number, digits: number) => Math.round(x * 10 ** digits) / 10 ** digits;

export class StatusMeter {
  private diskWrites = 0;
  private diskFlushes = 0;

  constructor(
    private atMs: number,
    private epoch: number,
    private bytesSent: number,
    private readonly everyMs = 1000,
  ) {}

  addDisk(writes: number, flushes: number): void {
    this.diskWrites += writes;
    this.diskFlushes += flushes;
  }

  due(nowMs: number): boolean {
    return nowMs - this.atMs >= this.everyMs;
  }

  /** The status since the last one; starts the next interval. */
  take(nowMs: number, s: StatusInput): PrimaryStatus {
    const secs = Math.max((nowMs - this.atMs) / 1000, 1e-3);
    const p = s.pipeline;
    const out: PrimaryStatus = {
      event: 'status',
      epoch: p.capturedEpoch,
      ackedEpoch: p.ackedEpoch,
      ckptPerSec: round((p.capturedEpoch - this.epoch) / secs, 1),
      dirtyPages: s.lastDirtyPages,
      pauseMs: round(s.pauseMs, 2),
      mbPerSec: round((s.bytesSent - this.bytesSent) / secs / 1e6, 1),
      lagMs: Math.round(s.lagMs),
      rttMs: s.rttMs === null ? null : round(s.rttMs, 2),
      inflight: p.inflight,
      waitsForLink: p.waitsForLink,
      heldFrames: s.output.frames,
      heldBytes: s.output.bytes,
      oldestHeldMs: s.output.oldestMs === null ? null : Math.round(s.output.oldestMs),
      diskWrites: this.diskWrites,
      diskFlushes: this.diskFlushes,
      unprotectedReleases: s.output.unprotectedReleases,
    };
    this.atMs = nowMs;
    this.epoch = p.capturedEpoch;
    this.bytesSent = s.bytesSent;
    this.diskWrites = 0;
    this.diskFlushes = 0;
    return out;
  }
}
