// How many of the host's cores sat idle lately (from the kernel's per-CPU counters, os.cpus()):
// pre-sending copies the guest's memory beside it, which is free on idle cores and taken from the
// guest's on a saturated host.

import { cpus } from 'node:os';

const totals = () =>
  cpus().reduce(
    (a, c) => ({
      cores: a.cores + 1,
      idle: a.idle + c.times.idle,
      all: a.all + c.times.idle + c.times.user + c.times.nice + c.times.sys + c.times.irq,
    }),
    { cores: 0, idle: 0, all: 0 },
  );

export class HostIdleMeter {
  private last = totals();
  private lastAtMs = performance.now();
  private value: number | null = null;

  /** Idle cores over the last `everyMs` or more (null until one interval has passed). */
  idleCores(nowMs: number, everyMs = 1000): number | null {
    if (nowMs - this.lastAtMs >= everyMs) {
      const t = totals();
      const all = t.all - this.last.all;
      if (all > 0) this.value = (t.cores * (t.idle - this.last.idle)) / all;
      this.last = t;
      this.lastAtMs = nowMs;
    }
    return this.value;
  }
}
