// Where the machine's CPU went during a measured window: the guest's QEMU, the primary
// controller (this process), the standby controller, everything else, and idle — in cores
// (1.0 = one core busy the whole window). On 2 cores the controllers compete with the guest.

import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { procStatFields } from '../util/index.ts';

const TICK_S = 0.01; // USER_HZ is 100 on Linux

/** utime + stime of a process (all its threads), seconds; null when it is gone. */
function processCpuS(pid: number): number | null {
  const f = procStatFields(`/proc/${pid}/stat`);
  return f ? (Number(f[11]) + Number(f[12])) * TICK_S : null;
}

/** Busy and total CPU seconds of the whole machine. */
function machineCpuS(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = line.reduce((a, b) => a + b, 0) * TICK_S;
  const idle = ((line[3] ?? 0) + (line[4] ?? 0)) * TICK_S;
  return { busy: total - idle, total };
}

export interface CpuShare {
  guest: number;
  primary: number;
  standby: number;
  other: number;
  idle: number;
  cores: number;
}

/** Starts a window over the named processes; `end()` returns the cores each used on average. */
export function cpuWindow(pids: { guest: number; standby: number | null }): { end(): CpuShare } {
  const t0 = performance.now();
  const m0 = machineCpuS();
  const g0 = processCpuS(pids.guest) ?? 0;
  const p0 = processCpuS(process.pid) ?? 0;
  const s0 = pids.standby ? (processCpuS(pids.standby) ?? 0) : 0;
  return {
    end(): CpuShare {
      const wall = (performance.now() - t0) / 1000;
      const m1 = machineCpuS();
      const per = (x: number) => Math.round((x / wall) * 100) / 100;
      const guest = (processCpuS(pids.guest) ?? g0) - g0;
      const primary = (processCpuS(process.pid) ?? p0) - p0;
      const standby = pids.standby ? (processCpuS(pids.standby) ?? s0) - s0 : 0;
      const busy = m1.busy - m0.busy;
      const n = cpus().length;
      return {
        guest: per(guest),
        primary: per(primary),
        standby: per(standby),
        other: per(Math.max(0, busy - guest - primary - standby)),
        idle: per(Math.max(0, n * wall - busy)),
        cores: n,
      };
    },
  };
}
