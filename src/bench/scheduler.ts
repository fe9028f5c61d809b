// `rubato bench scheduler`: every policy on the same guest, interleaved with unreplicated phases
// (U P1 U P2 U …), per workload: CPU loop, memory dirtier (10 and 50 pages/ms) and the KV service
// under load. Per cell: throughput ratio to the unreplicated phases around it, checkpoints/s,
// median pause, MB shipped, and for KV the request latency (p50/p99) and what replication added.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeTempDir, removeTempDir } from '../util/tmp.ts';
import { median, round } from '../util/stats.ts';
import { QemuVm, type QemuBinary } from '../qemu/vm.ts';
import { guestAppend, type Accel } from '../qemu/spec.ts';
import { PrimaryController, type PrimaryEvent } from '../replication/primary.ts';
import { startStandbyProcess } from './standby-proc.ts';
import { loadKeyFile } from '../cli/keyfile.ts';
import { parsePolicy } from '../scheduler/index.ts';
import { startKvRig, waitFor, type KvRig } from '../chaos/chaos.ts';
import { measureKv } from './kv.ts';
import { ProgressProbe } from './capture.ts';
import type { NetRelay } from '../io/net/relay.ts';
import type { NbdServer } from '../io/disk/nbd-server.ts';

export const BENCH_POLICIES = ['fixed:25ms', 'fixed:100ms', 'dirty-bandwidth', 'net-io', 'disk-io', 'adaptive', 'bounded-latency', 'model'] as const;

export interface SchedulerBenchOptions {
  accel: Accel; binary: QemuBinary; guest: { kernel: string; initrd: string }; quick: boolean; seconds?: number; outDir: string; onStatus?: (s: string) => void;
  policies?: readonly string[];
  /** Subset of workloads: cpu-loop, dirtier-10, dirtier-50, kv. */
  workloads?: readonly string[];
  /** Run the standby behind a (shaped) link in this namespace instead of on loopback. */
  where?: { ns: string; host: string };
  /** Results file name (default scheduler-bench.json). */
  fileName?: string;
}

export interface SchedulerCell {
  workload: string; policy: string; throughputRatio: number; checkpointsPerSec: number; pauseMsMedian: number; mbShipped: number;
  kvLatencyMsP50?: number; kvLatencyMsP99?: number; kvAddedLatencyMsP50?: number; reasons?: Record<string, number>;
}

interface Protected { stop(): Promise<void>; events: PrimaryEvent[] }

export async function protect(vm: QemuVm, dir: string, tag: string, policy: string, io?: { relay: NetRelay; nbd: NbdServer | null }, where?: { ns: string; host: string }): Promise<Protected> {
  const standby = await startStandbyProcess(dir, tag, where);
  const events: PrimaryEvent[] = [];
  const primary = new PrimaryController({
    vm, runDir: dir, standby: { host: standby.host, port: standby.port }, psk: loadKeyFile(standby.keyFile), periodMs: 25, heartbeatMs: 50, timeoutMs: 1000, retryMs: 300,
    policy: parsePolicy(policy), onEvent: (e) => events.push(e), ...(io ? { relay: io.relay, nbd: io.nbd } : {}),
  });
  primary.start();
  await waitFor(() => events.find((e) => e.event === 'protecting'), 120_000, 'protection');
  return { events, stop: async () => { await primary.stop(); await standby.stop(); } };
}

function summarise(events: PrimaryEvent[], fromMs: number, seconds: number) {
  const cps = events.filter((e): e is Extract<PrimaryEvent, { event: 'checkpoint' }> => e.event === 'checkpoint');
  const last = [...events].reverse().find((e): e is Extract<PrimaryEvent, { event: 'decisions' }> => e.event === 'decisions');
  void fromMs;
  return {
    checkpointsPerSec: round(cps.length / seconds, 1),
    pauseMsMedian: round(median(cps.map((c) => c.pauseMs))),
    mbShipped: round(cps.reduce((a, c) => a + c.bytes, 0) / 1e6, 1),
    ...(last ? { reasons: last.reasons } : {}),
  };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function runSchedulerBench(o: SchedulerBenchOptions): Promise<{ summary: Record<string, unknown>; file: string; cells: SchedulerCell[] }> {
  const status = o.onStatus ?? (() => {});
  const seconds = o.seconds ?? (o.quick ? 3 : 10);
  const policies = o.policies ?? (o.quick ? ['fixed:25ms', 'fixed:100ms', 'adaptive', 'model'] : BENCH_POLICIES);
  const cells: SchedulerCell[] = [];
  const workloads: Array<{ name: string; wl: (string | number)[] }> = [
    { name: 'cpu-loop', wl: ['cpuloop', 100] },
    { name: 'dirtier-10', wl: ['dirtier', 10, 16, 100] },
    ...(o.quick ? [] : [{ name: 'dirtier-50', wl: ['dirtier', 50, 32, 100] }]),
  ].filter((w) => !o.workloads || o.workloads.includes(w.name));
  for (const w of workloads) {
    const dir = makeTempDir('rubato-sbench-');
    let vm: QemuVm | null = null;
    try {
      vm = await QemuVm.start({ name: `sb-${w.name}`, accel: o.accel, cpus: 1, memMb: 128, kernel: o.guest.kernel, initrd: o.guest.initrd, append: guestAppend(w.wl) }, { binary: o.binary, runDir: dir });
      const probe = new ProgressProbe(vm, /work=(\d+)/);
      await vm.waitSerial(/work=/, 60_000);
      await sleep(1000);
      const u = async () => { const t0 = probe.mark(); await sleep(seconds * 1000); return probe.rate(t0, probe.mark()); };
      let uBefore = await u();
      for (const policy of policies) {
        status(`${w.name}: ${policy}`);
        const p = await protect(vm, dir, `${w.name}-${policy}`.replace(/[^a-z0-9-]/gi, ''), policy, undefined, o.where);
        await sleep(300);
        const n0 = p.events.length;
        const t0 = probe.mark();
        await sleep(seconds * 1000);
        const rate = probe.rate(t0, probe.mark());
        const s = summarise(p.events.slice(n0), t0, seconds);
        await p.stop();
        const uAfter = await u();
        cells.push({ workload: w.name, policy, throughputRatio: round(rate / ((uBefore + uAfter) / 2)), ...s });
        status(`  → ratio ${cells.at(-1)!.throughputRatio}, ${s.checkpointsPerSec} ckpt/s, pause ${s.pauseMsMedian} ms`);
        uBefore = uAfter;
      }
    } finally {
      await vm?.stop();
      removeTempDir(dir);
    }
  }
  // The KV service under a steady closed-loop load.
  const dir = makeTempDir('rubato-sbench-kv-');
  let rig: KvRig | null = null;
  if (!o.workloads || o.workloads.includes('kv')) try {
    rig = await startKvRig(dir, o.accel, 'sbk');
    let uBefore = await measureKv(rig, seconds, 4, 'unreplicated', null);
    for (const policy of policies) {
      status(`kv: ${policy}`);
      const p = await protect(rig.vm, dir, `kv-${policy}`.replace(/[^a-z0-9-]/gi, ''), policy, { relay: rig.io.relay, nbd: rig.io.nbd }, o.where);
      await sleep(300);
      const n0 = p.events.length;
      const r = await measureKv(rig, seconds, 4, policy, 0);
      const s = summarise(p.events.slice(n0), 0, seconds);
      await p.stop();
      const uAfter = await measureKv(rig, seconds, 4, 'unreplicated', null);
      const uThr = (uBefore.throughputPerSec + uAfter.throughputPerSec) / 2;
      const uP50 = (uBefore.latencyMsP50 + uAfter.latencyMsP50) / 2;
      cells.push({ workload: 'kv', policy, throughputRatio: round(r.throughputPerSec / uThr), ...s, kvLatencyMsP50: r.latencyMsP50, kvLatencyMsP99: r.latencyMsP99, kvAddedLatencyMsP50: round(r.latencyMsP50 - uP50, 2) });
      status(`  → ${r.throughputPerSec} req/s (ratio ${cells.at(-1)!.throughputRatio}), p50 ${r.latencyMsP50} ms, p99 ${r.latencyMsP99} ms, ${s.checkpointsPerSec} ckpt/s`);
      uBefore = uAfter;
    }
  } finally {
    await rig?.vm.stop();
    await rig?.io.close().catch(() => {});
    await rig?.lan.destroy();
  }
  removeTempDir(dir);
  const perPolicy: Record<string, { throughputRatio: Record<string, number>; kvLatencyP50Ms: number | null; checkpointsPerSec: Record<string, number> }> = {};
  for (const c of cells) {
    const e = (perPolicy[c.policy] ??= { throughputRatio: {}, kvLatencyP50Ms: null, checkpointsPerSec: {} });
    e.throughputRatio[c.workload] = c.throughputRatio;
    e.checkpointsPerSec[c.workload] = c.checkpointsPerSec;
    if (c.workload === 'kv') e.kvLatencyP50Ms = c.kvLatencyMsP50 ?? null;
  }
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, o.fileName ?? 'scheduler-bench.json');
  const summary = { benchmark: 'scheduler', seconds, quick: o.quick, policies: perPolicy, results: file };
  writeFileSync(file, JSON.stringify({ summary, cells }, null, 2));
  return { summary, file, cells } as { summary: Record<string, unknown>; file: string; cells: SchedulerCell[] };
}
