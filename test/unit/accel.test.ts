// The KVM probe ends at KVM's first failure instead of waiting for the boot timeout.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { watchKvmFailure } from '../../src/qemu/accel.ts';

function fakeVm(status: string, stderrTail = '') {
  return { stderrTail, status: async () => status };
}

test('the KVM probe fails as soon as QEMU stops the guest with an internal error', async () => {
  const t0 = Date.now();
  const w = watchKvmFailure(fakeVm('internal-error'));
  await assert.rejects(w.promise, /internal-error/);
  assert.ok(Date.now() - t0 < 2000);
  w.stop();
});

test('the KVM probe fails on "emulation failure" in QEMU stderr', async () => {
  const w = watchKvmFailure(fakeVm('running', 'KVM internal error. Suberror: 1\nemulation failure\n'));
  await assert.rejects(w.promise, /KVM internal error/);
  w.stop();
});

test('a running probe guest is not a failure', async () => {
  const w = watchKvmFailure(fakeVm('running'));
  const r = await Promise.race([
    w.promise.then(
      () => 'failed',
      () => 'failed',
    ),
    new Promise((r) => setTimeout(() => r('running'), 400)),
  ]);
  w.stop();
  assert.equal(r, 'running');
});
