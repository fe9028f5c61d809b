// `rubato bench capture`: pause per checkpoint and bytes per checkpoint against dirty pages, for
// both routes, at several dirty rates and epoch lengths, and the guest's progress rate against the
// same guest unreplicated, measured side by side in the same run on the same VM.

import { mkdirSync, writeFileSync } from 'node:fs';
import { sleep, makeTempDir, removeTempDir, median, percentile, round } from '../util/index.ts';
import { join } from 'node:path';
import { QemuVm, type QemuBinary, guestAppend, parseDirtierLine, type Accel } from '../qemu/index.ts';
import { ColoCapture, ExternalCapture, PauseMeter } from '../capture/index.ts';

export interface CaptureBenchOptions {
  accel: Accel;
  binary: QemuBinary;
  guest: { kernel: string; initrd: string };
  quick: boolean;
  seconds?: number;
  outDir: string;
  onStatus?: (s: string) => void;
}

export interface CaptureCell {
  route: 'a' | 'b';
  ratePagesPerMs: number;
  epochMs: number;
  checkpoints: number;
  epochMsActual: number;
  dirtyPagesMedian: number;
  bytesPerCheckpointMedian: number;
  pauseMsMedian: number;
  pauseMsP99: number;
  /** Route A target: 1.5 ms + 2.5 µs per dirty page. */
  pauseTargetMs: number;
  progressPerSecUnreplicated: number;
  progressPerSecReplicated: number;
  progressRatio: number;
}

/**
 * Guest progress per host second from its console counters (stamped on arrival); several instances (` id=N`) are
 * summed.
 */
export class ProgressProbe {
  private readonly samples = new Map<string, Array<{ t: number; work: number }>>();
  constructor(vm: QemuVm, counterRe?: RegExp) {
    vm.on('serial', (line: string) => {
      let work: number | null = null;
      if (counterRe) {
        const c = line.match(counterRe);
        if (c) work = Number(c[1]);
      } else {
        work = parseDirtierLine(line)?.work ?? null;
      }
      if (work === null) return;
      const id = line.match(/ id=(\d+)/)?.[1] ?? '0';
      let a = this.samples.get(id);
      if (!a) this.samples.set(id, (a = []));
      a.push({ t: performance.now(), work });
    });
  }
  mark(): number {
    return performance.now();
  }
  /** Work per second between two marks, summed over the instances. */
  rate(fromT: number, toT: number): number {
    let sum = 0;
    let any = false;
    for (const samples of this.samples.values()) {
      const w = samples.filter((s) => s.t >= fromT && s.t <= toT);
      if (w.length < 2) continue;
      const a = w[0]!;
      const b = w[w.length - 1]!;
      sum += ((b.work - a.work) / (b.t - a.t)) * 1000;
      any = true;
    }
    return any ? sum : Number.NaN;
  }
}

export async function runCaptureBench(
  o: CaptureBenchOptions,
): Promise<{ cells: CaptureCell[]; summary: Record<string, unknown>; file: string }> {
  const status = o.onStatus ?? (() => {});
  const memMb = o.quick ? 128 : 256;
  const rates = o.quick ? [10] : [1, 10, 50];
  const epochs = o.quick ? [25] : [25, 100];
  const seconds = o.seconds ?? (o.quick ? 4 : 10);
  const cells: CaptureCell[] = [];
  for (const route of ['a', 'b'] as const) {
    for (const rate of rates) {
      const dir = makeTempDir('rubato-bench-');
      let vm: QemuVm | null = null;
      try {
        vm = await QemuVm.start(
          {
            name: `bench-${route}-${rate}`,
            accel: o.accel,
            cpus: 1,
            memMb,
            ramFile: join(dir, 'guest.ram'),
            kernel: o.guest.kernel,
            initrd: o.guest.initrd,
            append: guestAppend(['dirtier', rate, Math.floor(memMb / 4), 100]),
          },
          { binary: o.binary, runDir: dir },
        );
        const probe = new ProgressProbe(vm);
        await vm.waitSerial(/RUBATO dirtier t=/, 60_000);
        await sleep(1000);
        const meter = new PauseMeter(vm.qmp);
        // Unreplicated and replicated phases alternate (U R U R U) on the same VM, so that every
        // replicated phase is compared with the unreplicated phases right before and after it.
        const measureU = async () => {
          status(`route ${route.toUpperCase()}, ${rate} pages/ms: unreplicated for ${seconds} s`);
          const u0 = probe.mark();
          await sleep(seconds * 1000);
          return probe.rate(u0, probe.mark());
        };
        let uBefore = await measureU();
        for (const epochMs of epochs) {
          const { capture } = await (route === 'a'
            ? ColoCapture.start(vm, { runDir: dir })
            : ExternalCapture.start(vm, { runDir: dir }));
          meter.startNow();
          status(`route ${route.toUpperCase()}, ${rate} pages/ms, ${epochMs} ms epochs: replicating for ${seconds} s`);
          const dirty: number[] = [];
          const bytes: number[] = [];
          await sleep(300);
          const r0 = probe.mark();
          let n = 0;
          let next = performance.now() + epochMs;
          while (performance.now() - r0 < seconds * 1000) {
            const wait = next - performance.now();
            if (wait > 0) await sleep(wait);
            const cp = await capture.checkpoint();
            next = Math.max(performance.now(), next + epochMs);
            n++;
            dirty.push(cp.pages.length);
            bytes.push(cp.ramBytes + cp.deviceState.length);
          }
          const r1 = probe.mark();
          await sleep(150);
          const pauses = meter.pausesMs();
          const replicated = probe.rate(r0, r1);
          await capture.close();
          await sleep(300);
          const uAfter = await measureU();
          const unreplicated = (uBefore + uAfter) / 2;
          uBefore = uAfter;
          const dm = median(dirty);
          const cell: CaptureCell = {
            route,
            ratePagesPerMs: rate,
            epochMs,
            checkpoints: n,
            epochMsActual: round((r1 - r0) / n, 2),
            dirtyPagesMedian: dm,
            bytesPerCheckpointMedian: median(bytes),
            pauseMsMedian: round(median(pauses)),
            pauseMsP99: round(percentile(pauses, 99)),
            pauseTargetMs: round(1.5 + 0.0025 * dm),
            progressPerSecUnreplicated: round(unreplicated, 1),
            progressPerSecReplicated: round(replicated, 1),
            progressRatio: round(replicated / unreplicated),
          };
          cells.push(cell);
          status(
            `  → ${n} checkpoints, ${dm} dirty pages, pause median ${cell.pauseMsMedian} ms (target ${cell.pauseTargetMs}), progress ratio ${cell.progressRatio}`,
          );
        }
      } finally {
        await vm?.stop();
        removeTempDir(dir);
      }
    }
  }
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, 'capture-bench.json');
  const a25 = cells.find((c) => c.route === 'a' && c.epochMs === 25 && c.ratePagesPerMs === 10);
  const summary = {
    benchmark: 'capture',
    accel: o.accel,
    memMb,
    seconds,
    results: file,
    routeA: {
      pauseTargetMetAll: cells.filter((c) => c.route === 'a').every((c) => c.pauseMsMedian <= c.pauseTargetMs),
      progressRatioAt25msAnd10PagesPerMs: a25?.progressRatio ?? null,
    },
    cells: cells.map((c) => ({
      route: c.route,
      rate: c.ratePagesPerMs,
      epochMs: c.epochMs,
      dirty: c.dirtyPagesMedian,
      pauseMsMedian: c.pauseMsMedian,
      pauseMsP99: c.pauseMsP99,
      progressRatio: c.progressRatio,
    })),
  };
  writeFileSync(file, JSON.stringify({ summary, cells }, null, 2));
  return { cells, summary, file };
}
