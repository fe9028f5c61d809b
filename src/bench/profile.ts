// `rubato profile`: the seed paper's characterisation of one workload — pages dirtied as a function
// of epoch length (5 ms to 1 s), the pause it costs, and the network and disk operations per second,
// per vCPU count. Checkpoints come from route A at fixed periods; no standby is needed to count.

import { mkdirSync, writeFileSync } from 'node:fs';
import { sleep, makeTempDir, removeTempDir, median, round, RubatoError } from '../util/index.ts';
import { join } from 'node:path';
import { QemuVm, type QemuBinary, guestAppend, type Accel } from '../qemu/index.ts';
import { ColoCapture } from '../capture/index.ts';
import { fitDirtyCurve } from '../scheduler/index.ts';
import { startKvRig, stopKvRig, type KvRig } from '../chaos/index.ts';
import { RIG, loadClient } from './workloads.ts';
import { lineChart, svgToPng } from './plot.ts';

export interface ProfileOptions {
  workload: string;
  cpus: number[];
  epochsMs: number[];
  memMb: number;
  outDir: string;
  accel: Accel;
  binary: QemuBinary;
  guest: { kernel: string; initrd: string };
  onStatus?: (s: string) => void;
}

export interface ProfilePoint {
  epochMs: number;
  dirtyPagesMedian: number;
  pauseMsMedian: number;
  checkpoints: number;
  /**
   * The same epochs with one pre-send pass right before the checkpoint (patched QEMU), interleaved with the plain ones.
   */
  presend?: { pauseMsMedian: number; pausePagesMedian: number; checkpoints: number };
}
export interface ProfileRun {
  cpus: number;
  points: ProfilePoint[];
  curve: { a: number; b: number };
  netFramesPerSec: number | null;
  diskWritesPerSec: number | null;
  diskFlushesPerSec: number | null;
}

/** The guest command line for `workload` on `cpus` vCPUs: one instance per vCPU where parallel. */
export function workloadPrograms(workload: string, cpus: number, memMb: number): (string | number)[][] {
  const [name, arg] = workload.split(':');
  if (name === 'cpuloop') return Array.from({ length: cpus }, () => ['cpuloop', 100]);
  if (name === 'dirtier') {
    const rate = Number(arg ?? 10);
    if (!Number.isFinite(rate) || rate < 0)
      throw new RubatoError('RUBATO_CONFIG', `workload ${workload}: rate must be a number of pages/ms`);
    const wss = Math.max(4, Math.floor(memMb / 4 / cpus));
    return Array.from({ length: cpus }, (_, i) => ['dirtier', rate, wss, 100, i]);
  }
  throw new RubatoError('RUBATO_CONFIG', `unknown workload "${workload}" (cpuloop, dirtier:RATE, kv, web, disk)`);
}

async function sweep(
  vm: QemuVm,
  dir: string,
  epochsMs: number[],
  status: (s: string) => void,
): Promise<ProfilePoint[]> {
  const { capture } = await ColoCapture.start(vm, { runDir: dir });
  const points: ProfilePoint[] = [];
  try {
    await capture.checkpoint(); // the first one carries everything dirtied during the initial copy
    for (const L of epochsMs) {
      const n = Math.max(4, Math.min(30, Math.round(1500 / L)));
      const pages: number[] = [];
      const pauses: number[] = [];
      const pre = { pauses: [] as number[], pages: [] as number[] };
      await sleep(L);
      await capture.checkpoint(); // start a clean epoch of length L
      for (let i = 0; i < n; i++) {
        // Every other epoch (with the patched QEMU): a pass right before the checkpoint, whose pause
        // then carries only what the guest wrote during the pass.
        const withPass = capture.canPresend && i % 2 === 1;
        await sleep(L);
        if (withPass) await capture.presend();
        const cp = await capture.checkpoint();
        if (withPass) {
          pre.pauses.push(cp.timings.pauseMsLocal);
          pre.pages.push(cp.pages.length - (cp.presentPages ?? 0));
        } else {
          pages.push(cp.pages.length);
          pauses.push(cp.timings.pauseMsLocal);
        }
      }
      const point: ProfilePoint = {
        epochMs: L,
        dirtyPagesMedian: median(pages),
        pauseMsMedian: round(median(pauses)),
        checkpoints: pages.length,
      };
      if (pre.pauses.length)
        point.presend = {
          pauseMsMedian: round(median(pre.pauses)),
          pausePagesMedian: median(pre.pages),
          checkpoints: pre.pauses.length,
        };
      points.push(point);
      status(
        `  epoch ${L} ms: ${median(pages)} dirty pages, pause ${round(median(pauses))} ms${point.presend ? `; with a pass before it ${point.presend.pausePagesMedian} pages, ${point.presend.pauseMsMedian} ms` : ''}`,
      );
    }
  } finally {
    await capture.close();
  }
  return points;
}

export async function runProfile(
  o: ProfileOptions,
): Promise<{ runs: ProfileRun[]; json: string; svg: string; png: string; pauseSvg: string }> {
  const status = o.onStatus ?? (() => {});
  const runs: ProfileRun[] = [];
  const isRig = o.workload in RIG;
  if (!isRig) workloadPrograms(o.workload, 1, o.memMb); // a bad name fails here, before any guest boots
  for (const cpus of isRig ? [1] : o.cpus) {
    const dir = makeTempDir('rubato-profile-');
    let vm: QemuVm | null = null;
    let rig: KvRig | null = null;
    try {
      status(`${o.workload} on ${cpus} vCPU(s)`);
      let client: ReturnType<typeof loadClient> = null;
      if (isRig) {
        rig = await startKvRig(dir, o.accel, 'prof', RIG[o.workload]!.workload);
        vm = rig.vm;
        client = loadClient(o.workload, rig, 600);
        await sleep(1000);
      } else {
        const progs = workloadPrograms(o.workload, cpus, o.memMb);
        vm = await QemuVm.start(
          {
            name: `profile-${cpus}`,
            accel: o.accel,
            cpus,
            memMb: o.memMb,
            kernel: o.guest.kernel,
            initrd: o.guest.initrd,
            append: guestAppend([progs.map((p) => p.join(',')).join('+')]),
          },
          { binary: o.binary, runDir: dir },
        );
        await vm.waitSerial(/work=/, 90_000);
        await sleep(500);
      }
      const f0 = rig?.io.relay.framesFromGuest ?? 0;
      const d0 = rig?.io.nbd?.epochStats;
      const t0 = performance.now();
      const points = await sweep(vm, dir, o.epochsMs, status);
      const secs = (performance.now() - t0) / 1000;
      client?.proc.kill('SIGTERM');
      await client?.done;
      const c = fitDirtyCurve(
        points.map((p) => ({
          lengthMs: p.epochMs,
          dirtyPages: p.dirtyPagesMedian,
          pauseMs: p.pauseMsMedian,
          bytes: 0,
          transferMs: null,
          outputFrames: 0,
        })),
      );
      runs.push({
        cpus,
        points,
        curve: { a: round(c.a, 4), b: round(c.b, 4) },
        netFramesPerSec: rig ? round((rig.io.relay.framesFromGuest - f0) / secs, 1) : null,
        // NBD counters are cut at every checkpoint; the sweep's own cuts are not taken here (no disk block), so they
        // accumulate
        diskWritesPerSec: rig && d0 ? round(((rig.io.nbd?.epochStats.writes ?? 0) - d0.writes) / secs, 1) : null,
        diskFlushesPerSec: rig && d0 ? round(((rig.io.nbd?.epochStats.flushes ?? 0) - d0.flushes) / secs, 1) : null,
      });
    } finally {
      if (rig) await stopKvRig(rig);
      else await vm?.stop();
      removeTempDir(dir);
    }
  }
  mkdirSync(o.outDir, { recursive: true });
  const base = join(o.outDir, `profile-${o.workload.replace(/[^a-z0-9]+/gi, '-')}`);
  const svg = lineChart(
    runs.map((r) => ({
      label: `${r.cpus} vCPU: D(T) ≈ ${r.curve.a}·T^${r.curve.b}`,
      points: r.points.map((p) => [p.epochMs, Math.max(1, p.dirtyPagesMedian)] as [number, number]),
    })),
    {
      title: `Dirty pages per epoch — ${o.workload}`,
      xLabel: 'epoch length (ms)',
      yLabel: 'dirty pages',
      logX: true,
      logY: true,
    },
  );
  writeFileSync(
    `${base}.json`,
    JSON.stringify({ workload: o.workload, memMb: o.memMb, accel: o.accel, runs }, null, 2),
  );
  writeFileSync(`${base}.svg`, svg);
  writeFileSync(`${base}.png`, await svgToPng(svg));
  // The pause against the epoch's dirty pages, with and without a pass before it, per vCPU count.
  const pauseSvg = lineChart(
    runs.flatMap((r) => [
      {
        label: `${r.cpus} vCPU`,
        points: r.points.map(
          (p) => [Math.max(1, p.dirtyPagesMedian), Math.max(0.01, p.pauseMsMedian)] as [number, number],
        ),
      },
      ...(r.points.some((p) => p.presend)
        ? [
            {
              label: `${r.cpus} vCPU, pre-sent`,
              points: r.points
                .filter((p) => p.presend)
                .map(
                  (p) =>
                    [Math.max(1, p.dirtyPagesMedian), Math.max(0.01, p.presend!.pauseMsMedian)] as [number, number],
                ),
            },
          ]
        : []),
    ]),
    {
      title: `Pause vs dirty pages per epoch — ${o.workload}`,
      xLabel: 'dirty pages in the epoch',
      yLabel: 'pause (ms)',
      logX: true,
      logY: true,
    },
  );
  writeFileSync(`${base}-pause.svg`, pauseSvg);
  writeFileSync(`${base}-pause.png`, await svgToPng(pauseSvg));
  return { runs, json: `${base}.json`, svg: `${base}.svg`, png: `${base}.png`, pauseSvg: `${base}-pause.svg` };
}
