import type { QemuVm } from '../qemu/index.ts';
import { startPrimarySide } from '../host/index.ts';
import {
  type PrimaryEvent,
  loadKeyFile,
  type LatencyBreakdown,
  type CheckpointObserver,
  type Durability,
  type ReleaseMode,
} from '../replication/index.ts';
import { startStandbyProcess } from './standby-proc.ts';
import { parsePolicy } from '../scheduler/index.ts';
import { waitFor } from '../util/index.ts';
import type { NetRelay, NbdServer } from '../io/index.ts';
import type { TraceRecorder } from '../sim/index.ts';

export interface Protected {
  stop(): Promise<void>;
  events: PrimaryEvent[];
  standbyPid: number;
  /** The primary's status (output counts, compare counts). */
  snapshot(): Record<string, unknown>;
}

/** The trace recorder (if any) and the latency breakdown (if any) as one observer. */
export function observing(trace?: TraceRecorder, latency?: LatencyBreakdown): CheckpointObserver | undefined {
  if (!trace && !latency) return undefined;
  if (!latency) return trace;
  const released = (t: Parameters<LatencyBreakdown['add']>[0], f: readonly number[], r: number) => latency.add(t, f, r);
  if (!trace) return { released };
  return {
    epoch: trace.epoch.bind(trace),
    acked: trace.acked.bind(trace),
    output: trace.output.bind(trace),
    disk: trace.disk.bind(trace),
    released,
  };
}

export async function protect(
  vm: QemuVm,
  dir: string,
  tag: string,
  policy: string,
  io?: { relay: NetRelay; nbd: NbdServer | null },
  where?: { ns: string; host: string },
  trace?: TraceRecorder,
  latency?: LatencyBreakdown,
  durability: Durability = 'memory',
  mode: ReleaseMode = 'buffer',
): Promise<Protected> {
  const standby = await startStandbyProcess(dir, tag, where, durability);
  const events: PrimaryEvent[] = [];
  const observer = observing(trace, latency);
  // (one pair on one machine, measuring replication: no witness)
  const { primary } = startPrimarySide({
    vm,
    runDir: dir,
    standby: { host: standby.host, port: standby.port },
    psk: loadKeyFile(standby.keyFile),
    heartbeatMs: 50,
    timeoutMs: 1000,
    retryMs: 300,
    policy: parsePolicy(policy),
    onEvent: (e) => events.push(e),
    io: { relay: io?.relay ?? null, nbds: io?.nbd ? [io.nbd] : [] },
    ownership: null,
    more: { mode, ...(observer ? { observer } : {}) },
  });
  const stop = async () => {
    await primary.stop();
    await standby.stop();
  };
  try {
    await waitFor(() => events.find((e) => e.event === 'protecting'), 120_000, 'protection');
    // Compare and auto modes measure once the standby's secondary runs (until then replies wait as in buffer mode).
    if (mode !== 'buffer') await waitFor(() => standby.secondaryRunning(), 300_000, "the standby's secondary VM");
  } catch (e) {
    await stop(); // no standby process or primary loop outlives a failed start
    throw e;
  }
  return { events, stop, standbyPid: standby.pid, snapshot: () => primary.snapshot() };
}

/** Runs a protected phase; the protection (primary and standby process) ends even when it fails. */
export async function whileProtected<T>(p: Protected, f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } finally {
    await p.stop();
  }
}
