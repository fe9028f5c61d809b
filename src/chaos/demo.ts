// `rubato demo`: the main job on one machine. Two hosts (network namespaces and a veth pair for
// the replication link), the test guest protected by a standby, a live status line, the primary
// (QEMU and controller) killed by PID, and the standby taking over. Everything it makes is removed.

import { join } from 'node:path';
import { makeTempDir, removeTempDir, type TrackedProcess, logger } from '../util/index.ts';
import { TwoHosts } from '../io/index.ts';
import { ensureGuestImage, ensurePatchedQemu, stockQemu } from '../setup/index.ts';
import { resolveAccel, type AccelChoice, parseDirtierLine } from '../qemu/index.ts';
import { writeKeyFile, formatProgress, type SyncProgress } from '../replication/index.ts';
import { nsLauncher, type Ev } from './controller-proc.ts';
import { LocalEtcd } from '../coord/index.ts';

const log = logger('demo');

export interface DemoOptions {
  seconds: number;
  memMb: number;
  rate: number;
  policy: string;
  heartbeatMs: number;
  timeoutMs: number;
  accel: AccelChoice;
  json: boolean;
  /** Cut the replication link before the kill, so only the heartbeat timeout can tell. */
  cutLink?: boolean;
}

export interface DemoResult {
  checkpoints: number;
  ackedEpoch: number;
  replicaEpoch: number;
  failover: boolean;
  failoverMs: number;
  detectionMs: number;
  restoreMs: number;
  timeoutMs: number;
  counterBefore: number;
  counterAfter: number;
  selfCheckOk: boolean;
  syncMs: number;
  syncMbPerSec: number;
  accel: string;
  /** Steady state while protected: replication traffic and the guest's dirty rate. */
  replicationMbPerSec: number;
  dirtyPagesPerSec: number;
  ckptPerSec: number;
  cutLink: boolean;
  policy: string;
  error?: string;
  /** The embedded witness both hosts used (fenced failover: the standby claimed the VM there). */
  witness?: string;
  /** How the standby was allowed to go live (the witness's verdict). */
  failoverWhy?: string;
}

export async function runDemo(o: DemoOptions, onStatus: (line: string, final?: boolean) => void): Promise<DemoResult> {
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(o.accel, stockQemu(), guest);
  if (accel === 'tcg') await ensurePatchedQemu();
  const result: DemoResult = {
    checkpoints: 0,
    ackedEpoch: -1,
    replicaEpoch: -1,
    failover: false,
    failoverMs: -1,
    detectionMs: -1,
    restoreMs: -1,
    timeoutMs: o.timeoutMs,
    counterBefore: -1,
    counterAfter: -1,
    selfCheckOk: false,
    syncMs: -1,
    syncMbPerSec: -1,
    accel,
    replicationMbPerSec: -1,
    dirtyPagesPerSec: -1,
    ckptPerSec: -1,
    cutLink: o.cutLink ?? false,
    policy: o.policy,
  };
  const dir = makeTempDir('rubato-demo-');
  let hosts: TwoHosts | null = null;
  let etcd: LocalEtcd | null = null;
  const procs: TrackedProcess[] = [];
  try {
    const h2 = await TwoHosts.create('demo');
    hosts = h2;
    onStatus(
      `two hosts: primary ${hosts.primary.ns} (${hosts.primary.ip}), standby ${hosts.standby.ns} (${hosts.standby.ip}), replication link over a veth pair`,
      true,
    );
    const key = join(dir, 'psk');
    writeKeyFile(key);
    const launch = nsLauncher(procs);
    // Safe by default: the embedded witness, a single-member etcd on a third "machine" both hosts
    // reach apart from the replication link (so a cut link is not a cut from the witness).
    etcd = await LocalEtcd.start(join(dir, 'witness'), { host: await h2.attachWitness() });
    result.witness = etcd.url;
    onStatus(`witness: etcd at ${etcd.url} (embedded, single member)`, true);
    const common = [
      '--key',
      key,
      '--heartbeat-ms',
      String(o.heartbeatMs),
      '--timeout-ms',
      String(o.timeoutMs),
      '--events',
      '--etcd',
      etcd.url,
    ];
    const port = 7400;
    const standby = launch.rubato('standby', hosts.standby.ns, [
      'standby',
      '--host',
      'standby',
      '--listen',
      `${hosts.standby.ip}:${port}`,
      '--state-dir',
      join(dir, 'standby'),
      ...common,
    ]);
    await standby.waitEvent((e) => e.event === 'listening', 30_000, 'listening');

    let lastStatus: Ev | null = null;
    let acked: Ev | null = null;
    const primary = launch.rubato(
      'primary',
      hosts.primary.ns,
      [
        'primary',
        '--host',
        'primary',
        '--standby',
        `${hosts.standby.ip}:${port}`,
        '--name',
        'demo',
        '--mem',
        String(o.memMb),
        '--workload',
        `dirtier,${o.rate},${Math.max(4, Math.floor(o.memMb / 8))}`,
        '--policy',
        o.policy,
        '--accel',
        accel,
        '--state-dir',
        join(dir, 'primary'),
        ...common,
      ],
      (e) => {
        if (e.event === 'status') {
          lastStatus = e;
          onStatus(
            `${o.policy} | epoch ${e['epoch']} (acked ${e['ackedEpoch']}) | ${e['ckptPerSec']} ckpt/s | ${e['dirtyPages']} dirty pages | pause ${e['pauseMs']} ms | ${e['mbPerSec']} MB/s | lag ${e['lagMs']} ms`,
          );
        } else if (e.event === 'sync-progress') {
          onStatus(`initial sync: ${formatProgress(e as unknown as SyncProgress)}`);
        } else if (e.event === 'acked') acked = e;
      },
    );
    const started = await primary.waitEvent((e) => e.event === 'started', 60_000, 'VM start');
    onStatus(`primary guest booting (QEMU pid ${started['qemuPid']}, ${accel})`, true);
    await primary.waitEvent(
      (e) => e.event === 'guest' && /RUBATO dirtier t=/.test(String(e['line'])),
      90_000,
      'guest workload',
    );
    const t0 = Date.now();
    await primary.waitEvent((e) => e.event === 'protecting', 120_000, 'protection');
    const synced = standby.events.find((e) => e.event === 'synced');
    result.syncMs = synced ? Number(synced['ms']) : Date.now() - t0;
    result.syncMbPerSec = synced ? Math.round((Number(synced['bytes']) / 1e6 / (result.syncMs / 1000)) * 10) / 10 : -1;
    onStatus(`protected: initial sync of ${o.memMb} MB took ${result.syncMs} ms; running for ${o.seconds} s`, true);
    await new Promise((r) => setTimeout(r, o.seconds * 1000));

    const steady = primary.events.filter((e) => e.event === 'status').slice(1);
    const avg = (k: string) => (steady.length ? steady.reduce((a, e) => a + Number(e[k]), 0) / steady.length : -1);
    result.replicationMbPerSec = Math.round(avg('mbPerSec') * 10) / 10;
    result.ckptPerSec = Math.round(avg('ckptPerSec') * 10) / 10;
    result.dirtyPagesPerSec = Math.round(avg('dirtyPages') * avg('ckptPerSec'));
    // The primary host dies: QEMU and controller, by PID, no goodbye.
    if (o.cutLink) await h2.cutLink();
    const killAt = Date.now();
    try {
      process.kill(Number(started['qemuPid']), 'SIGKILL');
    } catch {
      /* gone */
    }
    primary.proc.kill('SIGKILL');
    const lastAcked = acked as Ev | null;
    result.ackedEpoch = lastAcked ? Number(lastAcked['epoch']) : -1;
    result.counterBefore = lastAcked ? Number(lastAcked['counter']) : -1;
    const st = lastStatus as Ev | null;
    result.checkpoints = Math.max(
      Number(st?.['epoch'] ?? 0),
      ...primary.events.filter((e) => e.event === 'checkpoint').map((e) => Number(e['epoch'])),
    );
    onStatus(
      `${o.cutLink ? 'replication link cut, then ' : ''}primary killed (QEMU and controller) after ${result.checkpoints} checkpoints; last acknowledged ${result.ackedEpoch}`,
      true,
    );
    const fo = await standby.waitEvent((e) => e.event === 'failover', 30_000, 'failover');
    result.failover = true;
    result.replicaEpoch = Number(fo['epoch']);
    result.failoverMs = Number(fo['runningAtMs']) - killAt;
    result.detectionMs = Number(fo['detectedAtMs']) - killAt;
    result.restoreMs = Number(fo['restoreMs']);
    result.failoverWhy = String(fo['why']);
    const isWork = (e: Ev) => e.event === 'guest' && /RUBATO dirtier t=/.test(String(e['line']));
    const l1 = await standby.waitEvent(isWork, 20_000, 'restored guest output');
    const l2 = await standby.waitEvent(
      (e) => isWork(e) && e !== l1 && e.t >= l1.t,
      20_000,
      'more restored guest output',
    );
    const a = parseDirtierLine(String(l1['line']));
    const b = parseDirtierLine(String(l2['line']));
    const rebooted = standby.events.some(
      (e) => e.event === 'guest' && /RUBATO (boot ok|dirtier start)/.test(String(e['line'])),
    );
    result.counterAfter = a?.work ?? -1;
    result.selfCheckOk =
      !!a && !!b && a.ok && b.ok && b.work > a.work && !rebooted && result.counterAfter >= result.counterBefore;
    onStatus(
      `standby took over in ${result.failoverMs} ms (restore ${result.restoreMs} ms) from checkpoint ${result.replicaEpoch}: counter ${result.counterBefore} → ${result.counterAfter}, self-check ${result.selfCheckOk ? 'ok' : 'FAILED'}`,
      true,
    );
  } catch (e) {
    result.error = e instanceof Error ? e.message : String(e);
    log.error(`demo failed: ${result.error}`);
  } finally {
    for (const p of procs.reverse()) await p.stop(3000);
    await etcd?.stop();
    await hosts?.destroy();
    removeTempDir(dir);
  }
  return result;
}
