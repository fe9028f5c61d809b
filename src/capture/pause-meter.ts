// Measures guest pauses from QEMU's own STOP/RESUME events (QMP timestamps, µs resolution):
// the pause the guest really saw, not our estimate of it. Pauses held for verification are excluded.

import type { QmpClient, QmpEvent } from '../qemu/index.ts';

const MAX_KEPT = 100_000;

export class PauseMeter {
  private stoppedAt: number | null = null;
  private readonly pauses: Array<{ startMs: number; durMs: number }> = [];
  private readonly excluded: number[] = [];
  private sinceMs = 0;

  constructor(qmp: QmpClient) {
    qmp.on('event', (e: QmpEvent) => {
      const t = e.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : Date.now();
      if (e.event === 'STOP') this.stoppedAt = t;
      else if (e.event === 'RESUME' && this.stoppedAt !== null) {
        if (this.pauses.length < MAX_KEPT) this.pauses.push({ startMs: this.stoppedAt, durMs: t - this.stoppedAt });
        this.stoppedAt = null;
      }
    });
  }

  /** Counts only pauses that start from now on (not the end of the initial copy, say). */
  startNow(): void {
    this.sinceMs = Date.now();
  }

  /** Leaves out the pause that contains this wall-clock time (a checkpoint held for verification). */
  exclude(atMs: number): void {
    this.excluded.push(atMs);
  }

  pausesMs(): number[] {
    return this.pauses
      .filter(
        (p) =>
          p.startMs >= this.sinceMs && !this.excluded.some((x) => x >= p.startMs - 20 && x <= p.startMs + p.durMs + 20),
      )
      .map((p) => p.durMs);
  }

  get count(): number {
    return this.pauses.length;
  }
}
