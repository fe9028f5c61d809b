// Where a released output frame's time went: per frame, the segments of its checkpoint's life
// (pipeline.ts EpochTimeline) from the moment the guest sent it to the moment it left. Pure; the
// benchmarks feed it as a checkpoint observer and report p50/p99 per segment.

import type { EpochTimeline } from './pipeline.ts';
import { percentile, round } from '../util/index.ts';

/**
 * The segments, in order; their sum is the frame's added latency:
 * - wait: held until the checkpoint that releases it was decided (the policy's choice);
 * - trigger: from the decision until the guest paused (QEMU's checkpoint thread woken, vCPUs stopped);
 * - pause: the pause (capture of dirty pages and device state);
 * - encode: the checkpoint's record built after the guest resumed;
 * - send: handed to the link (encryption, socket writes);
 * - link: the network both ways with the standby's receive and ack paths (the ack's round trip
 *   less what the standby reports spending);
 * - standbyQueue: waiting on the standby behind earlier checkpoints;
 * - standbyCommit: the standby's commit (decode, verify, the commit point) up to its ack;
 * - release: from the ack's arrival to the frame written to the outside.
 */
export const SEGMENTS = [
  'wait',
  'trigger',
  'pause',
  'encode',
  'send',
  'link',
  'standbyQueue',
  'standbyCommit',
  'release',
] as const;
export type Segment = (typeof SEGMENTS)[number];
/** Per segment p50, p99 and mean (ms): the means add up to the total's mean, the percentiles need not. */
export type Breakdown = Record<Segment | 'total', { p50: number; p99: number; mean: number }> & {
  frames: number;
  /**
   * Not a segment (it overlaps send and link): the standby's time from a checkpoint's first byte to its last,
   * decrypted, per checkpoint.
   */
  standbyReceive: { p50: number; p99: number; mean: number };
};

/** One frame's segments (ms). */
export function segmentsOf(t: EpochTimeline, frameAtMs: number, releasedMs: number): Record<Segment, number> {
  const roundTrip = t.ackedMs - t.sentMs;
  const sb = t.standby ?? { queuedMs: 0, commitMs: 0 };
  return {
    wait: Math.max(0, t.decidedMs - frameAtMs),
    trigger: t.pauseBeganMs - Math.max(t.decidedMs, Math.min(frameAtMs, t.pauseBeganMs)),
    pause: t.resumedMs - Math.max(t.pauseBeganMs, Math.min(frameAtMs, t.resumedMs)),
    encode: t.encodedMs - t.resumedMs,
    send: t.sentMs - t.encodedMs,
    link: Math.max(0, roundTrip - sb.queuedMs - sb.commitMs),
    standbyQueue: sb.queuedMs,
    standbyCommit: sb.commitMs,
    release: releasedMs - t.ackedMs,
  };
}

export class LatencyBreakdown {
  private readonly v: Record<Segment | 'total', number[]> = Object.fromEntries(
    [...SEGMENTS, 'total'].map((s) => [s, []]),
  ) as unknown as Record<Segment | 'total', number[]>;
  private readonly maxFrames: number;
  private seen = 0;
  private readonly receive: number[] = [];

  /** Keeps at most `maxFrames` frames (a reservoir sample beyond). */
  constructor(maxFrames = 200_000) {
    this.maxFrames = maxFrames;
  }

  get frames(): number {
    return this.seen;
  }

  /** Frames released by one checkpoint. */
  add(t: EpochTimeline, framesAtMs: readonly number[], releasedMs: number): void {
    if (t.standby && framesAtMs.length && this.receive.length < this.maxFrames) this.receive.push(t.standby.receiveMs);
    for (const at of framesAtMs) {
      const s = segmentsOf(t, at, releasedMs);
      const slot = this.seen < this.maxFrames ? this.seen : Math.floor(Math.random() * (this.seen + 1));
      this.seen++;
      if (slot >= this.maxFrames) continue;
      for (const k of SEGMENTS) this.v[k][slot] = s[k];
      this.v.total[slot] = releasedMs - at;
    }
  }

  /** Forget what was seen (a measured window starts). */
  reset(): void {
    for (const k of [...SEGMENTS, 'total'] as const) this.v[k].length = 0;
    this.receive.length = 0;
    this.seen = 0;
  }

  summary(): Breakdown {
    const stat = (xs: readonly number[]) =>
      xs.length
        ? {
            p50: round(percentile(xs, 50), 3),
            p99: round(percentile(xs, 99), 3),
            mean: round(xs.reduce((a, b) => a + b, 0) / xs.length, 3),
          }
        : { p50: 0, p99: 0, mean: 0 };
    const out = { frames: this.seen, standbyReceive: stat(this.receive) } as Breakdown;
    for (const k of [...SEGMENTS, 'total'] as const) out[k] = stat(this.v[k]);
    return out;
  }
}

/** One line: the mean of each segment (ms), which add up to the total's, e.g. "wait 6.1 + pause 1.9 + … = 11.8". */
export function formatBreakdown(b: Breakdown): string {
  return `${SEGMENTS.map((k) => `${k} ${b[k].mean.toFixed(2)}`).join(' + ')} = ${b.total.mean.toFixed(2)} ms mean (p50 ${b.total.p50.toFixed(2)}, p99 ${b.total.p99.toFixed(2)}; ${b.frames} frames; standby receive ${b.standbyReceive.mean.toFixed(2)})`;
}
