// `rubato bench scheduler`: every policy on the same guest, interleaved with unreplicated phases
// (U P1 U P2 U …), per workload: CPU loop, memory dirtier (10 and 50 pages/ms) and the KV service
// under load. Per cell: throughput ratio to the unreplicated phases around it, checkpoints/s,
// median pause, MB shipped, and for KV the request latency (p50/p99) and what replication added.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeTempDir, removeTempDir, fitLine, median, percentile, round, sleep, RubatoError } from '../util/index.ts';
import { QemuVm, type QemuBinary, guestAppend, type Accel } from '../qemu/index.ts';
import {
  type PrimaryEvent,
  LatencyBreakdown,
  formatBreakdown,
  type Breakdown,
  type Durability,
} from '../replication/index.ts';
import { startKvRig, stopKvRig, type KvRig } from '../chaos/index.ts';
import { RIG, RIG_WORKLOADS, loadClient } from './workloads.ts';
import { measureKv } from './kv.ts';
import { ProgressProbe } from './capture.ts';
import type { NetRelay, NbdServer } from '../io/index.ts';
import { TraceRecorder, writeTrace } from '../sim/index.ts';
import { cpuWindow, type CpuShare } from './cpu.ts';
import { protect, whileProtected } from './protected.ts';

export const BENCH_POLICIES = [
  'fixed:25ms',
  'fixed:100ms',
  'dirty-bandwidth',
  'net-io',
  'disk-io',
  'adaptive',
  'bounded-latency',
  'model',
] as const;

export interface SchedulerBenchOptions {
  accel: Accel;
  binary: QemuBinary;
  guest: { kernel: string; initrd: string };
  quick: boolean;
  seconds?: number;
  outDir: string;
  onStatus?: (s: string) => void;
  policies?: readonly string[];
  /**
   * Subset of workloads: cpu-loop, dirtier-10, dirtier-50, dirtier-10x2, dirtier-10x4 (2 and 4 vCPUs), kv, web, disk
   * (default: the 1-vCPU ones; quick: no web, disk).
   */
  workloads?: readonly string[];
  /** Run the standby behind a (shaped) link in this namespace instead of on loopback. */
  where?: { ns: string; host: string };
  /** Results file name (default scheduler-bench.json). */
  fileName?: string;
  /** The replication link's class, for the traces' metadata (default loopback). */
  linkName?: string;
  /** Record every cell's event trace into outDir/traces/ (for rubato simulate --trace). */
  traces?: boolean;
  /** The standby's durability per cell (each policy runs once per entry, interleaved; default memory). */
  durabilities?: readonly Durability[];
}

export interface SchedulerCell {
  workload: string;
  policy: string;
  throughputRatio: number;
  checkpointsPerSec: number;
  pauseMsMedian: number;
  pauseMsP99: number;
  mbShipped: number;
  /** Of the dirty pages, the shares sent as references to the standby's copy (unchanged, changed runs). */
  pageRefs: { sameShare: number; deltaShare: number; mbSaved: number };
  kvLatencyMsP50?: number;
  kvLatencyMsP99?: number;
  kvAddedLatencyMsP50?: number;
  reasons?: Record<string, number>;
  /** The request latency p50 of the unreplicated phases around the cell (mean of the two). */
  kvLatencyMsP50Unreplicated?: number;
  /** Share of the measured window the guest was paused for checkpoints. */
  pausedFraction: number;
  /** Relative spread of the two unreplicated phases around the cell: the noise floor of its ratio. */
  noise: number;
  /** The cell's event trace (when recorded). */
  trace?: string;
  /**
   * Cores used on average in the measured window by the guest's QEMU, each controller, the rest (the client), and idle.
   */
  cpu: CpuShare;
  /** The same in the unreplicated phase after the cell. */
  cpuUnreplicated: CpuShare;
  /**
   * CPU per replicated byte: each controller's cores ÷ the bytes replicated per second — the checkpoints' and
   * pre-sends' pages, whether they went whole or as references to the standby's copy (null: nothing replicated).
   */
  primaryNsPerByte: number | null;
  standbyNsPerByte: number | null;
  /** The standby's durability in this cell. */
  durability: Durability;
  /** The most this process (the primary controller and the harness) held resident in the cell's window, MB. */
  primaryRssMbMax: number;
  /** Services: where each released output frame's time went (p50/p99 per segment, ms). */
  latencyBreakdown?: Breakdown;
}

export function summarise(events: PrimaryEvent[], seconds: number) {
  const cps = events.filter((e): e is Extract<PrimaryEvent, { event: 'checkpoint' }> => e.event === 'checkpoint');
  const last = [...events]
    .reverse()
    .find((e): e is Extract<PrimaryEvent, { event: 'decisions' }> => e.event === 'decisions');
  return {
    checkpointsPerSec: round(cps.length / seconds, 1),
    pausedFraction: round(cps.reduce((a, c) => a + c.pauseMs, 0) / (seconds * 1000), 4),
    pauseMsMedian: round(median(cps.map((c) => c.pauseMs))),
    pauseMsP99: round(
      percentile(
        cps.map((c) => c.pauseMs),
        99,
      ),
    ),
    /**
     * Of the pause: QEMU's stream read (request to device state), the rest is closing the epoch (the disk's cut) and
     * resuming.
     */
    captureMsMedian: round(median(cps.map((c) => c.captureMs))),
    /**
     * What the pause is made of: pause ≈ fixedMs + usPerPage·pages, least squares over the cell's checkpoints (the
     * pages in the pause; pre-sent ones went out while the guest ran). null with fewer than 20 checkpoints, or when
     * the points make no such line.
     */
    pauseFit: pauseFit(cps),
    pausePagesMedian: round(median(cps.map((c) => c.pages)), 0),
    /** Checkpoint records and pre-sent pages. */
    mbShipped: round(cps.reduce((a, c) => a + c.bytes + (c.presentBytes ?? 0), 0) / 1e6, 1),
    pageRefs: pageRefs(cps),
    ...(last ? { reasons: last.reasons } : {}),
  };
}

/**
 * Of the dirty pages (the pauses' and the pre-sends'), the shares sent as a reference to the standby's copy
 * (`sent-pages.ts`): unchanged (SAME) and as their changed runs (DELTA); and the page bytes that saved.
 */
function pageRefs(cps: ReadonlyArray<Extract<PrimaryEvent, { event: 'checkpoint' }>>): {
  sameShare: number;
  deltaShare: number;
  mbSaved: number;
} {
  const pages = Math.max(
    1,
    cps.reduce((a, c) => a + c.pages + (c.presentPages ?? 0), 0),
  );
  const sum = (f: (c: (typeof cps)[number]) => number | undefined) => cps.reduce((a, c) => a + (f(c) ?? 0), 0);
  return {
    sameShare: round(sum((c) => c.samePages) / pages, 3),
    deltaShare: round(sum((c) => c.deltaPages) / pages, 3),
    mbSaved: round(sum((c) => c.savedBytes) / 1e6, 1),
  };
}

function pauseFit(
  cps: ReadonlyArray<{ pages: number; pauseMs: number }>,
): { fixedMs: number; usPerPage: number } | null {
  if (cps.length < 20) return null; // too few to say
  const line = fitLine(
    cps.map((c) => c.pages),
    cps.map((c) => c.pauseMs),
  );
  // A line through a negative pause, or one falling with more pages, is noise (a few large pauses), not a cost model.
  if (!line || line.intercept < 0 || line.slope < 0) return null;
  return { fixedMs: round(line.intercept), usPerPage: round(line.slope * 1000, 2) };
}

/** A recorder for one cell, and how to write what it saw in the measured window. */
function cellTrace(o: SchedulerBenchOptions, accel: string, workload: string, policy: string, cpus: number) {
  if (!o.traces) return { rec: undefined, save: (_from: number) => undefined };
  const rec = new TraceRecorder({ workload, policy, link: o.linkName ?? 'loopback', cpus, accel }, performance.now());
  return {
    rec,
    save: (fromMs: number): string => {
      const dir = join(o.outDir, 'traces');
      mkdirSync(dir, { recursive: true });
      const file = join(
        dir,
        `${workload}-${policy}-${o.linkName ?? 'loopback'}.json`
          .replace(/[^a-z0-9.-]+/gi, '-')
          .replace(/-json$/, '.json'),
      );
      writeTrace(file, rec.finish(performance.now(), fromMs));
      return file;
    },
  };
}

interface Load {
  perSec: number;
  latencyMsP50?: number;
  latencyMsP99?: number;
}

/** One measurement window of a rig workload: requests/s (with latency) or records/s. */
function loadFor(name: string, rig: KvRig, seconds: number): () => Promise<Load> {
  if (name === 'kv')
    return async () => {
      const k = await measureKv(rig, seconds, 4, name, null);
      return { perSec: k.throughputPerSec, latencyMsP50: k.latencyMsP50, latencyMsP99: k.latencyMsP99 };
    };
  if (name === 'web') {
    return async () => {
      const c = loadClient('web', rig, seconds)!;
      await c.done;
      const lat = c.events.filter((e) => e.type === 'ack').map((e) => e.latMs ?? 0);
      if (!lat.length)
        throw new RubatoError(
          'RUBATO_CAPTURE_FAILED',
          `the web client completed no request (${c.events.find((e) => e.type === 'error')?.event ?? 'no output'})`,
        );
      return {
        perSec: round(lat.length / seconds, 1),
        latencyMsP50: round(median(lat), 2),
        latencyMsP99: round(percentile(lat, 99), 2),
      };
    };
  }
  const probe = new ProgressProbe(rig.vm, /RUBATO fsyncer t=\d+ work=(\d+)/);
  return async () => {
    const t0 = probe.mark();
    await sleep(seconds * 1000);
    return { perSec: round(probe.rate(t0, probe.mark()), 1) };
  };
}

/**
 * A first protected phase, not measured: the first protection of a fresh guest runs measurably
 * slower than the ones after it (seen as 0.81–0.82× against 0.88–0.94× for the same policy), which
 * would charge whichever policy comes first.
 */
async function warmUp(
  vm: QemuVm,
  dir: string,
  name: string,
  policy: string,
  io: { relay: NetRelay; nbd: NbdServer | null } | undefined,
  where: SchedulerBenchOptions['where'],
): Promise<void> {
  const p = await protect(vm, dir, `${name}-warmup`.replace(/[^a-z0-9-]/gi, ''), policy, io, where);
  await whileProtected(p, () => sleep(2000));
}

const spread = (a: number, b: number) => round(Math.abs(a - b) / Math.max(1e-9, (a + b) / 2), 3);

/** The names `--workloads` accepts: guests that only compute, then services on a LAN (RIG_WORKLOADS). */
export const SCHEDULER_WORKLOADS = [
  'cpu-loop',
  'dirtier-10',
  'dirtier-50',
  'dirtier-10x2',
  'dirtier-10x4',
  ...RIG_WORKLOADS,
] as const;

/** One guest's cells: a warm-up, then per policy a protected phase between unreplicated ones. */
async function runCells(
  o: SchedulerBenchOptions,
  policies: readonly string[],
  cells: SchedulerCell[],
  g: {
    name: string;
    cpus: number;
    accel: string;
    vm: QemuVm;
    dir: string;
    io?: { relay: NetRelay; nbd: NbdServer | null };
    measure: () => Promise<Load>;
  },
): Promise<void> {
  const status = o.onStatus ?? (() => {});
  if (process.env['RUBATO_GUEST_NICE']) {
    const { readdirSync } = await import('node:fs');
    const { setPriority } = await import('node:os');
    for (const tid of readdirSync(`/proc/${g.vm.pid}/task`))
      setPriority(Number(tid), Number(process.env['RUBATO_GUEST_NICE']));
  }
  await warmUp(g.vm, g.dir, g.name, policies[0]!, g.io, o.where);
  const measureU = async () => {
    const w = cpuWindow({ guest: g.vm.pid, standby: null });
    const r = await g.measure();
    return { ...r, cpu: w.end() };
  };
  let uBefore = await measureU();
  const durabilities = o.durabilities ?? ['memory'];
  for (const policy of policies)
    for (const durability of durabilities) {
      status(`${g.name}: ${policy}${durabilities.length > 1 ? `, durability ${durability}` : ''}`);
      const tr = cellTrace(o, g.accel, g.name, policy, g.cpus);
      const latency = g.io ? new LatencyBreakdown() : undefined;
      const p = await protect(
        g.vm,
        g.dir,
        `${g.name}-${policy}-${durability}`.replace(/[^a-z0-9-]/gi, ''),
        policy,
        g.io,
        o.where,
        tr.rec,
        latency,
        durability,
      );
      const { t0, r, s } = await whileProtected(p, async () => {
        await sleep(300);
        const n0 = p.events.length;
        latency?.reset();
        const t0 = performance.now();
        const cpu = cpuWindow({ guest: g.vm.pid, standby: p.standbyPid });
        let rssMax = process.memoryUsage.rss();
        const rssTimer = setInterval(() => {
          rssMax = Math.max(rssMax, process.memoryUsage.rss());
        }, 100);
        const r = await g.measure().finally(() => clearInterval(rssTimer));
        const seconds = (performance.now() - t0) / 1000;
        return {
          t0,
          r,
          s: {
            ...summarise(p.events.slice(n0), seconds),
            cpu: cpu.end(),
            seconds,
            rssMax: Math.round(rssMax / 2 ** 20),
          },
        };
      });
      const trace = tr.save(t0);
      const uAfter = await measureU();
      const lat =
        r.latencyMsP50 !== undefined && uBefore.latencyMsP50 !== undefined && uAfter.latencyMsP50 !== undefined
          ? {
              kvLatencyMsP50: r.latencyMsP50,
              kvLatencyMsP99: r.latencyMsP99!,
              kvAddedLatencyMsP50: round(r.latencyMsP50 - (uBefore.latencyMsP50 + uAfter.latencyMsP50) / 2, 2),
              kvLatencyMsP50Unreplicated: round((uBefore.latencyMsP50 + uAfter.latencyMsP50) / 2, 2),
            }
          : {};
      const breakdown = latency && latency.frames > 0 ? latency.summary() : undefined;
      const bytesPerSec = ((s.mbShipped + s.pageRefs.mbSaved) * 1e6) / s.seconds;
      const nsPerByte = (cores: number) => (bytesPerSec > 0 ? round((cores * 1e9) / bytesPerSec, 1) : null);
      const { seconds: _window, rssMax, ...measured } = s;
      cells.push({
        workload: g.name,
        policy,
        durability,
        throughputRatio: round(r.perSec / ((uBefore.perSec + uAfter.perSec) / 2)),
        ...measured,
        primaryNsPerByte: nsPerByte(s.cpu.primary),
        standbyNsPerByte: nsPerByte(s.cpu.standby),
        primaryRssMbMax: rssMax,
        ...lat,
        noise: spread(uBefore.perSec, uAfter.perSec),
        ...(trace ? { trace } : {}),
        ...(breakdown ? { latencyBreakdown: breakdown } : {}),
        cpuUnreplicated: uAfter.cpu,
      });
      status(
        `  → ${r.perSec}/s (ratio ${cells.at(-1)!.throughputRatio})${r.latencyMsP50 !== undefined ? `, p50 ${r.latencyMsP50} ms, p99 ${r.latencyMsP99} ms` : ''}, ${s.checkpointsPerSec} ckpt/s, pause ${s.pauseMsMedian} ms (p99 ${s.pauseMsP99} ms, stream ${s.captureMsMedian} ms), ${s.mbShipped} MB shipped (dirty pages sent as unchanged ${Math.round(s.pageRefs.sameShare * 100)} %, as changed runs ${Math.round(s.pageRefs.deltaShare * 100)} %: ${s.pageRefs.mbSaved} MB saved)`,
      );
      if (breakdown) status(`    released frames: ${formatBreakdown(breakdown)}`);
      const u = uAfter.cpu;
      status(
        `    cores: guest ${s.cpu.guest} (unreplicated ${u.guest}), primary ${s.cpu.primary} (${u.primary}), standby ${s.cpu.standby}, other ${s.cpu.other} (${u.other}), idle ${s.cpu.idle} (${u.idle}); ns per replicated byte: primary ${cells.at(-1)!.primaryNsPerByte}, standby ${cells.at(-1)!.standbyNsPerByte}; primary resident at most ${rssMax} MB`,
      );
      uBefore = uAfter;
    }
}

export async function runSchedulerBench(
  o: SchedulerBenchOptions,
): Promise<{ summary: Record<string, unknown>; file: string; cells: SchedulerCell[] }> {
  const seconds = o.seconds ?? (o.quick ? 3 : 10);
  const policies = o.policies ?? (o.quick ? ['fixed:25ms', 'fixed:100ms', 'adaptive', 'model'] : BENCH_POLICIES);
  const cells: SchedulerCell[] = [];
  // Parallel variants run one dirtier per vCPU, each with its own 16 MB working set (progress summed).
  const dirtiers = (rate: number, wssMb: number, cpus: number) =>
    Array.from({ length: cpus }, (_, i) => ['dirtier', rate, wssMb, 100, i].join(',')).join('+');
  const workloads: Array<{ name: string; cpus: number; wl: string }> = [
    { name: 'cpu-loop', cpus: 1, wl: 'cpuloop,100' },
    { name: 'dirtier-10', cpus: 1, wl: dirtiers(10, 16, 1) },
    ...(o.quick ? [] : [{ name: 'dirtier-50', cpus: 1, wl: dirtiers(50, 32, 1) }]),
    { name: 'dirtier-10x2', cpus: 2, wl: dirtiers(10, 16, 2) },
    { name: 'dirtier-10x4', cpus: 4, wl: dirtiers(10, 16, 4) },
  ].filter((w) => (o.workloads ? o.workloads.includes(w.name) : w.cpus === 1));
  for (const w of workloads) {
    const dir = makeTempDir('rubato-sbench-');
    let vm: QemuVm | null = null;
    try {
      vm = await QemuVm.start(
        {
          name: `sb-${w.name}`,
          accel: o.accel,
          cpus: w.cpus,
          memMb: 128,
          kernel: o.guest.kernel,
          initrd: o.guest.initrd,
          append: guestAppend([w.wl]),
        },
        { binary: o.binary, runDir: dir },
      );
      const probe = new ProgressProbe(vm, /work=(\d+)/);
      await vm.waitSerial(/work=/, 60_000);
      await sleep(1000);
      const measure = async (): Promise<Load> => {
        const t0 = probe.mark();
        await sleep(seconds * 1000);
        return { perSec: probe.rate(t0, probe.mark()) };
      };
      await runCells(o, policies, cells, { name: w.name, cpus: w.cpus, accel: o.accel, vm, dir, measure });
    } finally {
      await vm?.stop();
      removeTempDir(dir);
    }
  }
  // Services on a LAN (NIC and disk through Rubato's relay and disk server), each under a steady
  // load: the KV service and the web server driven from the client namespace (closed loop, 4
  // connections), and the fsync-heavy writer on the replicated disk.
  for (const name of RIG_WORKLOADS) {
    if (o.workloads ? !o.workloads.includes(name) : o.quick && name !== 'kv') continue;
    const dir = makeTempDir(`rubato-sbench-${name}-`);
    let rig: KvRig | null = null;
    try {
      rig = await startKvRig(dir, o.accel, `sb${name.slice(0, 2)}`, RIG[name]!.workload);
      await runCells(o, policies, cells, {
        name,
        cpus: 1,
        accel: rig.accel,
        vm: rig.vm,
        dir,
        io: { relay: rig.io.relay, nbd: rig.io.nbd },
        measure: loadFor(name, rig, seconds),
      });
    } finally {
      await stopKvRig(rig);
      removeTempDir(dir);
    }
  }
  const perPolicy: Record<
    string,
    {
      throughputRatio: Record<string, number>;
      kvLatencyP50Ms: number | null;
      kvAddedLatencyP50Ms: number | null;
      checkpointsPerSec: Record<string, number>;
      pauseMsMedian: number;
      pauseMsMedianByWorkload: Record<string, number>;
      kvLatencyBreakdownP50?: Record<string, number>;
      primaryNsPerByte: Record<string, number | null>;
      standbyNsPerByte: Record<string, number | null>;
      primaryRssMbMax: Record<string, number>;
    }
  > = {};
  for (const c of cells) {
    const e = (perPolicy[o.durabilities && o.durabilities.length > 1 ? `${c.policy}/${c.durability}` : c.policy] ??= {
      throughputRatio: {},
      kvLatencyP50Ms: null,
      kvAddedLatencyP50Ms: null,
      checkpointsPerSec: {},
      pauseMsMedian: 0,
      pauseMsMedianByWorkload: {},
      primaryNsPerByte: {},
      standbyNsPerByte: {},
      primaryRssMbMax: {},
    });
    e.primaryNsPerByte[c.workload] = c.primaryNsPerByte;
    e.standbyNsPerByte[c.workload] = c.standbyNsPerByte;
    e.primaryRssMbMax[c.workload] = c.primaryRssMbMax;
    e.throughputRatio[c.workload] = c.throughputRatio;
    e.checkpointsPerSec[c.workload] = c.checkpointsPerSec;
    e.pauseMsMedianByWorkload[c.workload] = c.pauseMsMedian;
    e.pauseMsMedian = round(median(Object.values(e.pauseMsMedianByWorkload)));
    if (c.workload === 'kv') {
      e.kvLatencyP50Ms = c.kvLatencyMsP50 ?? null;
      e.kvAddedLatencyP50Ms = c.kvAddedLatencyMsP50 ?? null;
      if (c.latencyBreakdown)
        e.kvLatencyBreakdownP50 = Object.fromEntries(
          Object.entries(c.latencyBreakdown)
            .filter(([k]) => k !== 'frames')
            .map(([k, v]) => [k, (v as { p50: number }).p50]),
        );
    }
  }
  const kvU = cells
    .filter((c) => c.workload === 'kv' && c.kvLatencyMsP50Unreplicated !== undefined)
    .map((c) => c.kvLatencyMsP50Unreplicated!);
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, o.fileName ?? 'scheduler-bench.json');
  const summary = {
    benchmark: 'scheduler',
    seconds,
    quick: o.quick,
    kvLatencyP50MsUnreplicated: kvU.length ? round(median(kvU), 2) : null,
    policies: perPolicy,
    results: file,
  };
  writeFileSync(file, JSON.stringify({ summary, cells }, null, 2));
  return { summary, file, cells } as { summary: Record<string, unknown>; file: string; cells: SchedulerCell[] };
}
