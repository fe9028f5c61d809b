// `rubato bench kv`: the KV service's request latency and throughput with output commit at fixed
// 25 ms and 100 ms epochs, against the same guest unreplicated, interleaved in one run
// (U R25 U R100 U): each replicated phase is compared with the unreplicated phases around it.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeTempDir, removeTempDir, median, percentile, round } from '../util/index.ts';
import { clientProcess, startKvRig, stopKvRig, type KvRig } from '../chaos/index.ts';
import { protect, whileProtected } from './protected.ts';
import type { AccelChoice } from '../qemu/index.ts';

export interface KvBenchOptions {
  seconds: number;
  conns: number;
  accel: AccelChoice;
  outDir: string;
  periods?: number[];
  onStatus?: (s: string) => void;
}

export interface KvPhase {
  phase: string;
  periodMs: number | null;
  requests: number;
  throughputPerSec: number;
  latencyMsP50: number;
  latencyMsP99: number;
}

export async function measureKv(
  rig: KvRig,
  seconds: number,
  conns: number,
  phase: string,
  periodMs: number | null,
): Promise<KvPhase> {
  const c = clientProcess(rig.lan, [
    '--target',
    `${rig.lan.guestIp}:7000`,
    '--conns',
    String(conns),
    '--seconds',
    String(seconds),
  ]);
  await c.done;
  const acks = c.events.filter((e) => e.type === 'ack');
  const lat = acks.map((a) => a.latMs ?? 0);
  return {
    phase,
    periodMs,
    requests: acks.length,
    throughputPerSec: round(acks.length / seconds, 1),
    latencyMsP50: round(median(lat), 2),
    latencyMsP99: round(percentile(lat, 99), 2),
  };
}

export async function runKvBench(o: KvBenchOptions): Promise<{ summary: Record<string, unknown>; file: string }> {
  const status = o.onStatus ?? (() => {});
  const dir = makeTempDir('rubato-kvbench-');
  const periods = o.periods ?? [25, 100];
  const phases: KvPhase[] = [];
  let rig: KvRig | null = null;
  try {
    rig = await startKvRig(dir, o.accel, 'kvb');
    status('unreplicated');
    phases.push(await measureKv(rig, o.seconds, o.conns, 'unreplicated', null));
    for (const [i, periodMs] of periods.entries()) {
      const p = await protect(rig.vm, dir, `kv${i}`, `fixed:${periodMs}ms`, { relay: rig.io.relay, nbd: rig.io.nbd });
      status(`replicated, fixed ${periodMs} ms epochs`);
      const r = rig;
      phases.push(await whileProtected(p, () => measureKv(r, o.seconds, o.conns, `fixed:${periodMs}ms`, periodMs)));
      status('unreplicated');
      phases.push(await measureKv(rig, o.seconds, o.conns, 'unreplicated', null));
    }
  } finally {
    await stopKvRig(rig);
    removeTempDir(dir);
  }
  const cells = phases
    .map((p, i) => {
      if (p.periodMs === null) return null;
      const u = [phases[i - 1], phases[i + 1]].filter((x): x is KvPhase => !!x);
      const uThr = u.reduce((a, x) => a + x.throughputPerSec, 0) / u.length;
      const uP50 = u.reduce((a, x) => a + x.latencyMsP50, 0) / u.length;
      const uP99 = u.reduce((a, x) => a + x.latencyMsP99, 0) / u.length;
      return {
        policy: p.phase,
        throughputRatio: round(p.throughputPerSec / uThr),
        addedLatencyMsP50: round(p.latencyMsP50 - uP50, 2),
        addedLatencyMsP99: round(p.latencyMsP99 - uP99, 2),
        latencyMsP50: p.latencyMsP50,
        latencyMsP99: p.latencyMsP99,
        unreplicatedLatencyMsP50: round(uP50, 2),
        throughputPerSec: p.throughputPerSec,
        unreplicatedThroughputPerSec: round(uThr, 1),
      };
    })
    .filter((c) => c !== null);
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, 'kv-bench.json');
  const summary = { benchmark: 'kv', seconds: o.seconds, conns: o.conns, cells, results: file };
  writeFileSync(file, JSON.stringify({ summary, phases }, null, 2));
  return { summary, file };
}
