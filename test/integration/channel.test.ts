// The replication channel on a real guest, seen from the wire: guest memory never crosses it in
// clear text, and one flipped bit makes the pair re-synchronise — not fail over.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { QemuVm, type QemuBinary } from '../../src/qemu/vm.ts';
import { guestAppend, type Accel } from '../../src/qemu/spec.ts';
import { PrimaryController, type PrimaryEvent } from '../../src/replication/primary.ts';
import { StandbyController, type StandbyEvent } from '../../src/replication/standby.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { liveProcesses } from '../../src/util/procs.ts';
import { sleep, waitFor } from '../../src/util/async.ts';
import { CuttableProxy } from '../../src/chaos/fault-proxy.ts';
import { testPlatform } from '../helpers/platform.ts';

let accel: Accel;
let binary: QemuBinary;
let guest: { kernel: string; initrd: string };

before(async () => {
  ({ accel, binary, guest } = await testPlatform());
});

test('guest memory is encrypted on the wire; a flipped bit re-synchronises the pair instead of failing over', {
  timeout: 240_000,
}, async () => {
  const dir = makeTempDir('rubato-channel-');
  const psk = randomBytes(32);
  const sEvents: StandbyEvent[] = [];
  const pEvents: PrimaryEvent[] = [];
  const standby = new StandbyController({
    host: '127.0.0.1',
    port: 0,
    stateDir: join(dir, 'standby'),
    psk,
    heartbeatMs: 50,
    timeoutMs: 800,
    fsync: false,
    binaryFor: async () => binary,
    onEvent: (e) => sEvents.push(e),
  });
  const proxy = new CuttableProxy(0);
  let vm: QemuVm | null = null;
  let primary: PrimaryController | null = null;
  try {
    await standby.start();
    proxy.targetPort = standby.boundPort;
    const marker = Buffer.from('Linux version');
    let tail = Buffer.alloc(0);
    let clearText = 0;
    proxy.onForward = (d) => {
      const w = Buffer.concat([tail, d]);
      if (w.includes(marker)) clearText++;
      tail = w.subarray(Math.max(0, w.length - marker.length));
    };
    const port = await proxy.listen();
    vm = await QemuVm.start(
      {
        name: 'ch',
        accel,
        cpus: 1,
        memMb: 96,
        kernel: guest.kernel,
        initrd: guest.initrd,
        append: guestAppend(['dirtier', 10, 16]),
      },
      { binary, runDir: dir },
    );
    const p = new PrimaryController({
      vm,
      runDir: dir,
      standby: { host: '127.0.0.1', port },
      psk,
      periodMs: 25,
      heartbeatMs: 50,
      timeoutMs: 800,
      retryMs: 200,
      onEvent: (e) => pEvents.push(e),
    });
    primary = p;
    p.start();
    await waitFor(() => p.ackedEpoch >= 10, 120_000, 'ten checkpoints acknowledged');
    // The replica holds the guest kernel's banner (so the capture below would have seen it in clear).
    const image = readFileSync(join(dir, 'standby', 'replica', 'ram', '0.img'));
    assert.ok(image.includes(marker), 'negative control: the guest memory holds the marker');
    assert.equal(clearText, 0, 'no guest memory in clear text on the wire');
    // Every page of the image that is not all zero crossed the proxy (zero pages travel as 8-byte fills).
    const zero = Buffer.alloc(4096);
    let dataBytes = 0;
    for (let o = 0; o < image.length; o += 4096) if (!image.subarray(o, o + 4096).equals(zero)) dataBytes += 4096;
    assert.ok(
      dataBytes > 8 << 20 && proxy.forwarded > dataBytes,
      `the full image crossed the proxy (${proxy.forwarded} bytes for ${dataBytes} bytes of non-zero pages)`,
    );

    // One bit flipped in the next checkpoint frame.
    const generation = p.pipeline.generation;
    proxy.flipBit(2000);
    await waitFor(() => p.pipeline.generation > generation && p.protected, 60_000, 're-synchronised');
    await waitFor(() => p.ackedEpoch >= 5, 60_000, 'checkpoints acknowledged again');
    await sleep(1000); // past the standby's liveness timeout
    assert.equal(
      sEvents.find((e) => e.event === 'failover' || e.event === 'primary-lost'),
      undefined,
      'no failover after a corrupted frame',
    );
    assert.equal(standby.state, 'protecting');
    assert.equal(
      pEvents.filter((e) => e.event === 'protecting').length,
      2,
      'protected, then protected again after the re-sync',
    );
    assert.equal(clearText, 0, 'still nothing in clear text after the re-sync');
  } finally {
    await primary?.stop();
    await vm?.stop();
    await standby.stop();
    proxy.close();
    removeTempDir(dir);
  }
});

after(() => {
  assert.deepEqual(liveProcesses(), [], 'no process left running');
});
