// Replication and failover on real QEMU, with the primary killed at many points spread over every
// phase of the epoch pipeline. The guests form one lineage: each failover's restored guest is the
// next scenario's primary, so failover is shown to be repeatable as well.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { QemuVm, type QemuBinary } from '../../src/qemu/vm.ts';
import { guestAppend, type Accel } from '../../src/qemu/spec.ts';
import { PrimaryController, type FaultPoint } from '../../src/replication/primary.ts';
import { StandbyController, type StandbyEvent } from '../../src/replication/standby.ts';
import { makeTempDir, removeTempDir, liveTempDirs } from '../../src/util/tmp.ts';
import { liveProcesses } from '../../src/util/procs.ts';
import { parseDirtierLine } from '../../src/qemu/spec.ts';
import { liveMigrationSockets } from '../../src/capture/route-a.ts';
import { CuttableProxy } from '../../src/chaos/fault-proxy.ts';
import { parsePolicy } from '../../src/scheduler/index.ts';

import { testPlatform } from '../helpers/platform.ts';

let accel: Accel;
let binary: QemuBinary;
let guest: { kernel: string; initrd: string };
const psk = randomBytes(32);
const dirs: string[] = [];

before(async () => {
  ({ accel, binary, guest } = await testPlatform());
});

type Kill = 'qemu' | 'controller' | 'link';
type Point = FaultPoint | 'after-commit-before-ack';
/**
 * `presend`: epochs of 150 ms whose dirty RAM is pre-sent every 30 ms (staged on the standby, committed with the
 * checkpoint).
 */
interface Scenario {
  kill: Kill;
  point: Point;
  epoch: number;
  presend?: boolean;
}

interface Outcome {
  ackedEpoch: number;
  ackedCounter: number;
  replicaEpoch: number;
  sentEpoch: number;
  counterAfter: number;
  selfCheckOk: boolean;
  rebooted: boolean;
  failoverMs: number;
  /** Checkpoints whose epoch had pages pre-sent (streamed to the standby before its pause). */
  presentCheckpoints: number;
  /** Dirty pages sent as unchanged, a reference to the standby's copy of their bytes (sent-pages.ts). */
  unchangedPages: number;
  /** Checkpoints that went as several frames (more pages than a frame holds: its leading pages as PRESEND frames). */
  splitCheckpoints: number;
}

/** Protects `vm` with a fresh standby, kills the primary at the scenario's point, returns the restored guest. */
async function failoverOnce(vm: QemuVm, s: Scenario): Promise<{ outcome: Outcome; next: QemuVm }> {
  const stateDir = makeTempDir('rubato-standby-');
  dirs.push(stateDir);
  const events: StandbyEvent[] = [];
  let primary: PrimaryController | null = null;
  let killedAt = 0;
  let killed = false;
  let presentCheckpoints = 0;
  let unchangedPages = 0;
  let splitCheckpoints = 0;
  const proxy = s.kill === 'link' ? new CuttableProxy(0) : null;
  const kill = async () => {
    if (killed) return;
    killed = true;
    killedAt = Date.now();
    if (s.kill === 'qemu') await vm.kill();
    else if (s.kill === 'controller') await primary!.crash();
    else {
      proxy!.blackhole();
      await primary!.crash();
    }
  };
  const standby = new StandbyController({
    host: '127.0.0.1',
    port: 0,
    stateDir,
    psk,
    heartbeatMs: 50,
    timeoutMs: 500,
    fsync: false,
    binaryFor: async () => binary,
    onEvent: (e) => events.push(e),
    beforeAck: async (epoch) => {
      if (s.point === 'after-commit-before-ack' && epoch === s.epoch) await kill();
    },
  });
  await standby.start();
  const port = standby.boundPort;
  let targetPort = port;
  if (proxy) {
    proxy.targetPort = port;
    targetPort = await proxy.listen();
  }
  primary = new PrimaryController({
    vm,
    runDir: stateDir,
    standby: { host: '127.0.0.1', port: targetPort },
    psk,
    periodMs: 25,
    heartbeatMs: 50,
    timeoutMs: 500,
    retryMs: 200,
    // (with pre-sends, frames of 16 pages: checkpoints and passes go as several frames, wire-frames.ts)
    ...(s.presend ? { policy: parsePolicy('fixed:150,presend=30'), framePages: 16 } : {}),
    onEvent: (e) => {
      if (e.event === 'checkpoint' && (e.presentPages ?? 0) > 0) presentCheckpoints++;
      if (e.event === 'checkpoint' && (e.leadFrames ?? 0) > 0) splitCheckpoints++;
      if (e.event === 'checkpoint') unchangedPages += e.samePages ?? 0;
    },
    fault: async (point, epoch, ctx) => {
      if (killed || point !== s.point || epoch !== s.epoch) return;
      if (point === 'mid-transfer') ctx.sendPartial(0.5);
      await kill();
    },
  });
  primary.start();
  const failover = await waitFor(
    () => events.find((e) => e.event === 'failover'),
    60_000,
    `failover (scenario ${JSON.stringify(s)})`,
  );
  const next = standby.vm!;
  standby.vm = null; // the lineage keeps it; the standby object must not stop it
  await standby.stop();
  proxy?.close();
  const lines: string[] = [];
  next.on('serial', (l: string) => lines.push(l));
  const l1 = parseDirtierLine((await next.waitSerial(/RUBATO dirtier t=.*/, 20_000))[0]);
  const l2 = parseDirtierLine((await next.waitSerial(/RUBATO dirtier t=.*/, 5_000, { fromNow: true }))[0]);
  const replicaEpoch = failover.event === 'failover' ? failover.epoch : -1;
  return {
    next,
    outcome: {
      ackedEpoch: primary.ackedEpoch,
      ackedCounter: primary.ackedCounter,
      replicaEpoch,
      sentEpoch: primary.epoch,
      counterAfter: l1?.work ?? -1,
      selfCheckOk: !!l1?.ok && !!l2?.ok && (l2?.work ?? 0) > (l1?.work ?? 0),
      rebooted: next.serialLines.some((l) => /RUBATO (boot ok|dirtier start)/.test(l)),
      failoverMs: failover.event === 'failover' ? failover.runningAtMs - killedAt : -1,
      presentCheckpoints,
      unchangedPages,
      splitCheckpoints,
    },
  };
}

async function waitFor<T>(f: () => T | undefined, ms: number, what: string): Promise<NonNullable<T>> {
  const until = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v) return v as NonNullable<T>;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const POINTS: Point[] = ['mid-epoch', 'mid-pause', 'mid-transfer', 'after-commit-before-ack'];
const KILLS: Kill[] = ['qemu', 'controller', 'link'];
const SCENARIOS: Scenario[] = [];
for (let i = 0; i < Number(process.env['RUBATO_FAILOVER_KILLS'] ?? 21); i++) {
  SCENARIOS.push({
    point: POINTS[i % POINTS.length]!,
    kill: KILLS[Math.floor(i / POINTS.length) % KILLS.length]!,
    epoch: 3 + ((i * 7) % 11),
  });
}
// With pre-sends: pages of the dying epoch are staged on the standby when the primary dies in its
// pause or mid-transfer (they must never be applied), or committed with it just before its ack.
SCENARIOS.push(
  { point: 'mid-pause', kill: 'controller', epoch: 4, presend: true },
  { point: 'mid-transfer', kill: 'qemu', epoch: 5, presend: true },
  { point: 'after-commit-before-ack', kill: 'link', epoch: 4, presend: true },
);

test(`failover after the primary is killed at ${SCENARIOS.length} points across every phase`, {
  timeout: 1_200_000,
}, async () => {
  const first = makeTempDir('rubato-lineage-');
  dirs.push(first);
  let vm = await QemuVm.start(
    {
      name: 'ha',
      accel,
      cpus: 1,
      memMb: 128,
      ramFile: join(first, 'ram'),
      kernel: guest.kernel,
      initrd: guest.initrd,
      append: guestAppend(['dirtier', 10, 16]),
    },
    { binary, runDir: first },
  );
  try {
    await vm.waitSerial(/RUBATO dirtier t=/, 60_000);
    const failoverMs: number[] = [];
    let unchangedPages = 0;
    for (const s of SCENARIOS) {
      const { outcome: o, next } = await failoverOnce(vm, s);
      vm = next;
      const what = `${s.kill} killed ${s.point} at epoch ${s.epoch}${s.presend ? ' (pre-sends)' : ''}: ${JSON.stringify(o)}`;
      // Everything acknowledged is in the replica; nothing the primary did not finish sending is.
      assert.ok(
        o.replicaEpoch >= o.ackedEpoch && o.replicaEpoch <= o.sentEpoch,
        `replica epoch within [acked, sent]: ${what}`,
      );
      if (s.point === 'after-commit-before-ack')
        assert.ok(o.replicaEpoch >= s.epoch, `the checkpoint committed before its ack survives: ${what}`);
      if (s.point === 'mid-transfer' && s.kill !== 'qemu')
        assert.ok(o.replicaEpoch < s.epoch, `a half-sent checkpoint is never applied: ${what}`);
      assert.ok(
        o.counterAfter >= o.ackedCounter && o.ackedCounter > 0,
        `counter resumes at or after the acked checkpoint: ${what}`,
      );
      assert.equal(o.selfCheckOk, true, `self-check: ${what}`);
      assert.equal(o.rebooted, false, `guest continued, not rebooted: ${what}`);
      if (s.presend) assert.ok(o.presentCheckpoints >= 2, `the epochs before the kill pre-sent pages: ${what}`);
      if (s.presend) assert.ok(o.splitCheckpoints >= 1, `a checkpoint went as several frames: ${what}`);
      failoverMs.push(o.failoverMs);
      unchangedPages += o.unchangedPages;
    }
    process.stderr.write(`failover ms: ${failoverMs.join(' ')}; dirty pages sent as unchanged: ${unchangedPages}\n`);
    // The replicas above were restored from checkpoints with pages sent as references: the guest's kernel
    // writes some pages again with the bytes they had.
    assert.ok(unchangedPages > 0, 'some dirty pages were left out as unchanged');
  } finally {
    await vm.stop();
  }
});

after(() => {
  for (const d of dirs) removeTempDir(d);
  assert.deepEqual(liveMigrationSockets(), [], 'no migration socket left listening');
  assert.deepEqual(liveProcesses(), [], 'no process left running');
  assert.deepEqual(liveTempDirs(), [], 'no temp folder left behind');
});
