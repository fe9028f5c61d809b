// `rubato bench failover`: repeated demo runs on two namespace hosts. Failover time from primary
// death to the guest running on the standby (median, p99), with detection reported separately,
// for a crash (the link closes at once) and a partition (only the heartbeat timeout tells);
// initial sync rate on the namespace link; replication traffic against the guest's dirty rate.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { median, percentile, round } from '../util/index.ts';
import { runDemo, type DemoResult } from '../chaos/index.ts';
import type { AccelChoice } from '../qemu/index.ts';

export interface FailoverBenchOptions {
  runs: number;
  timeoutMs: number;
  accel: AccelChoice;
  outDir: string;
  onStatus?: (s: string) => void;
}

export async function runFailoverBench(
  o: FailoverBenchOptions,
): Promise<{ summary: Record<string, unknown>; file: string }> {
  const status = o.onStatus ?? (() => {});
  const runs: DemoResult[] = [];
  for (let i = 0; i < o.runs * 2; i++) {
    const cutLink = i % 2 === 1;
    status(`run ${i + 1}/${o.runs * 2}: ${cutLink ? 'partition (link cut) then kill' : 'kill'}`);
    const r = await runDemo(
      {
        seconds: 3,
        memMb: 128,
        rate: 10,
        policy: 'fixed:25ms',
        heartbeatMs: 50,
        timeoutMs: o.timeoutMs,
        accel: o.accel,
        json: true,
        cutLink,
      },
      () => {},
    );
    status(
      `  → ${r.failover ? `failover ${r.failoverMs} ms (detection ${r.detectionMs} ms, restore ${r.restoreMs} ms)` : `no failover: ${r.error}`}`,
    );
    runs.push(r);
  }
  const stats = (rs: DemoResult[]) => {
    const ok = rs.filter((r) => r.failover && r.selfCheckOk);
    const f = ok.map((r) => r.failoverMs);
    return {
      runs: rs.length,
      succeeded: ok.length,
      failoverMsMedian: median(f),
      failoverMsP99: percentile(f, 99),
      detectionMsMedian: median(ok.map((r) => r.detectionMs)),
      restoreMsMedian: median(ok.map((r) => r.restoreMs)),
      targetMs: o.timeoutMs + 300,
      withinTarget: f.every((x) => x <= o.timeoutMs + 300),
    };
  };
  const all = runs.filter((r) => r.failover);
  const summary = {
    benchmark: 'failover',
    timeoutMs: o.timeoutMs,
    crash: stats(runs.filter((r) => !r.cutLink)),
    partition: stats(runs.filter((r) => r.cutLink)),
    initialSyncMbPerSecMedian: median(all.map((r) => r.syncMbPerSec)),
    steadyState: {
      replicationMbPerSecMedian: median(all.map((r) => r.replicationMbPerSec)),
      dirtyPagesPerSecMedian: median(all.map((r) => r.dirtyPagesPerSec)),
      dirtyMbPerSecMedian: round(median(all.map((r) => (r.dirtyPagesPerSec * 4096) / 1e6)), 1),
      checkpointsPerSecMedian: median(all.map((r) => r.ckptPerSec)),
    },
  };
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, 'failover-bench.json');
  writeFileSync(file, JSON.stringify({ summary, runs }, null, 2));
  return { summary: { ...summary, results: file }, file };
}
