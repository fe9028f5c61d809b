// Real QEMU (TCG here): both capture routes end to end, the verifier's negative control, failures
// on Rubato's side that must leave the guest running, and nothing left behind.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { QemuVm, type QemuBinary } from '../../src/qemu/vm.ts';
import { guestAppend, type Accel } from '../../src/qemu/spec.ts';
import { runCaptureCheck } from '../../src/bench/capture-check.ts';
import { ColoCapture } from '../../src/capture/route-a.ts';
import { makeTempDir, removeTempDir, liveTempDirs } from '../../src/util/tmp.ts';
import { liveProcesses } from '../../src/util/procs.ts';
import { isRubatoError } from '../../src/util/errors.ts';

import { testPlatform } from '../helpers/platform.ts';

let accel: Accel;
let binary: QemuBinary;
let guest: { kernel: string; initrd: string };

before(async () => {
  ({ accel, binary, guest } = await testPlatform());
});

test('route A with pre-sends (QEMU patch 0003): dirty RAM sent while the guest runs joins the next checkpoint; replica identical at sampled pauses; restores', {
  timeout: 240_000,
}, async () => {
  const r = await runCaptureCheck({
    route: 'a',
    seconds: 1,
    minCheckpoints: 40,
    memMb: 128,
    ratePagesPerMs: 10,
    epochMs: 100,
    samples: 5,
    cpus: 1,
    presendMs: 20,
    accel,
    binary,
    guest,
  });
  assert.equal(r.error, undefined);
  assert.ok((r.presends ?? 0) >= 40, `pre-sends ${r.presends}`);
  assert.equal(r.mismatchedPages, 0);
  assert.equal(r.identical, true);
  assert.equal(r.routesAgree, true, 'every page a full diff found changed was in the checkpoint (pre-sent or paused)');
  assert.ok(
    (r.pausePagesMedian ?? Infinity) < r.dirtyPagesMedian,
    `the pause carried ${r.pausePagesMedian} of ${r.dirtyPagesMedian} pages`,
  );
  assert.equal(r.restored, true);
});

for (const route of ['a', 'b'] as const) {
  test(`route ${route.toUpperCase()}: 300 checkpoints, replica identical at sampled pauses, last checkpoint restores and continues`, {
    timeout: 240_000,
  }, async () => {
    const r = await runCaptureCheck({
      route,
      seconds: 1,
      minCheckpoints: 300,
      memMb: 128,
      ratePagesPerMs: 10,
      epochMs: 25,
      samples: 3,
      cpus: 1,
      accel,
      binary,
      guest,
    });
    assert.equal(r.error, undefined);
    assert.ok(r.checkpoints >= 300, `checkpoints ${r.checkpoints}`);
    assert.ok(r.verified >= 3, `verified ${r.verified}`);
    assert.equal(r.mismatchedPages, 0);
    assert.equal(r.identical, true);
    assert.equal(r.negativeControl, true, 'the comparison detects one corrupted replica page');
    if (route === 'a') {
      assert.equal(r.routesAgree, true, "route B's full diff at route A's pause found no page route A missed");
      // Rubato's QEMU reads its trigger FIFO (patch 0004): no checkpoint waited for a QMP round trip.
      if (binary.trigger)
        assert.ok(r.triggers && r.triggers.qmp === 0 && r.triggers.fifo >= r.checkpoints, JSON.stringify(r.triggers));
    }
    assert.ok(
      r.counterAfter >= r.counterBefore && r.counterBefore > 0,
      `counter ${r.counterBefore} → ${r.counterAfter}`,
    );
    assert.equal(r.selfCheckOk, true);
    assert.equal(r.restored, true);
    assert.ok(r.pauseMsMedian > 0 && r.pauseMsMedian < 100, `pause median ${r.pauseMsMedian}`);
  });
}

test("failures on Rubato's side never leave the guest paused", { timeout: 180_000 }, async () => {
  const dir = makeTempDir();
  const vm = await QemuVm.start(
    {
      name: 'fault',
      accel,
      cpus: 1,
      memMb: 128,
      ramFile: join(dir, 'ram'),
      kernel: guest.kernel,
      initrd: guest.initrd,
      append: guestAppend(['dirtier', 10, 16]),
    },
    { binary, runDir: dir },
  );
  try {
    await vm.waitSerial(/RUBATO dirtier t=/, 60_000);
    // 1. Rubato's side dies in the middle of the initial copy.
    await assert.rejects(
      ColoCapture.start(vm, {
        runDir: dir,
        onProgress: (b) => {
          if (b > 8 << 20) throw new Error('injected: reader died mid-precopy');
        },
      }),
      /injected/,
    );
    assert.equal(await waitRunning(vm), true, 'guest running after a failed initial copy');
    await vm.waitSerial(/RUBATO dirtier t=.*check=ok/, 10_000, { fromNow: true });

    // 2. Rubato's side dies while the guest is paused in a checkpoint.
    const { capture } = await ColoCapture.start(vm, { runDir: dir });
    await capture.checkpoint();
    await assert.rejects(
      capture.checkpoint({
        hold: async () => {
          throw new Error('injected: died mid-checkpoint');
        },
      }),
      /injected/,
    );
    assert.equal(await waitRunning(vm), true, 'guest running after a failed checkpoint');
    await vm.waitSerial(/RUBATO dirtier t=.*check=ok/, 10_000, { fromNow: true });
    await assert.rejects(capture.checkpoint(), (e: unknown) => isRubatoError(e, 'RUBATO_CAPTURE_FAILED'));
  } finally {
    await vm.stop();
    removeTempDir(dir);
  }
});

async function waitRunning(vm: QemuVm): Promise<boolean> {
  const until = Date.now() + 5000;
  while (Date.now() < until) {
    if ((await vm.status()) === 'running') return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

after(() => {
  assert.deepEqual(liveProcesses(), [], 'no process left running');
  assert.deepEqual(liveTempDirs(), [], 'no temp folder left behind');
});
