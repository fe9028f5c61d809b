// Protection turned on for a VM that already runs, and turned off again, with no reboot: the test
// guest (a keep-alive web server whose answers count up, a counter written through its disk) in a
// plain QEMU of its owner's, a client holding one connection open throughout.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { runCommand, spawnTracked, type TrackedProcess } from '../../src/util/procs.ts';
import { waitFor } from '../../src/util/async.ts';
import { Lan } from '../../src/io/net/lan.ts';
import { ip, liveNamespaces } from '../../src/io/net/netns.ts';
import { writeKeyFile } from '../../src/replication/keyfile.ts';
import { guestAppend } from '../../src/qemu/spec.ts';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { adoptDemoPassed, runAdoptDemo, serialLine } from '../../src/chaos/adopt-demo.ts';
import { nsLauncher } from '../../src/chaos/controller-proc.ts';
import { ensureTapRelay, stockQemu } from '../../src/setup/setup.ts';
import { testPlatform } from '../helpers/platform.ts';
import { RUBATO_BIN, alive, rubatoProcess } from '../helpers/rubato.ts';

test('rubato demo --adopt: a running VM is adopted live with its client connection open, protected, and survives its host', {
  timeout: 600_000,
}, async () => {
  const r = await runAdoptDemo({ seconds: 3, memMb: 128, heartbeatMs: 100, timeoutMs: 1000, accel: 'auto' }, () => {});
  assert.equal(r.error, undefined, r.error);
  assert.equal(r.adopted, true);
  assert.ok(r.adoptDowntimeMs >= 0 && r.qemuDowntimeMs >= 0, JSON.stringify(r));
  assert.equal(r.ownQemuEnded, true, "the owner's QEMU ended after the move: one copy");
  assert.equal(r.protected, true);
  assert.equal(r.failover, true);
  assert.equal(r.httpErrors, 0, 'no error through the adoption and the failover');
  assert.equal(r.connectionSurvived, true, 'the one keep-alive connection carried on');
  assert.equal(r.counterWentBack, false, "the guest's answers never counted back");
  assert.equal(adoptDemoPassed(r), true);
  assert.deepEqual(liveNamespaces(), [], 'no namespace left');
});

test('rubato release: an adopted VM goes back to a QEMU of its own, live; a VM that differs from its definition is refused and runs on', {
  timeout: 300_000,
}, async () => {
  const { guest } = await testPlatform();
  await ensureTapRelay();
  const dir = makeTempDir('rubato-release-');
  const procs: TrackedProcess[] = [];
  let lan: Lan | null = null;
  let releasedPid = 0;
  try {
    lan = await Lan.create('rel');
    const l = lan;
    const ha = await l.addHost('ha');
    const disk = join(dir, 'counter.img');
    writeFileSync(disk, Buffer.alloc(4 << 20));
    const vm = (memoryMiB: number) => ({
      name: 'web',
      memoryMiB,
      disks: [{ path: disk }],
      nics: [{ bridge: ha.bridge, mac: '52:54:00:ad:0b:02' }],
      boot: {
        kernel: guest.kernel,
        initrd: guest.initrd,
        append: guestAppend(['webd', 80], { ip: `${l.guestIp}/24`, rawDisk: 'vda' }),
      },
    });
    const vmFile = join(dir, 'web.json');
    writeFileSync(vmFile, JSON.stringify(vm(128)));
    const bigger = join(dir, 'bigger.json');
    writeFileSync(bigger, JSON.stringify(vm(256)));
    const key = join(dir, 'psk');
    writeKeyFile(key);

    // The owner's QEMU, as `rubato qemu-args` prints it (TAPs made as it says).
    const printed = await runCommand(RUBATO_BIN, ['qemu-args', vmFile, '--run-dir', dir]);
    assert.equal(printed.code, 0, printed.stderr);
    const lines = printed.stdout.trim().split('\n');
    const tapLine = lines.find((x) => x.startsWith('# ip tuntap add dev '))!;
    const tap = /dev (\S+)/.exec(tapLine)![1]!;
    await ip(['-n', ha.ns, 'tuntap', 'add', 'dev', tap, 'mode', 'tap']);
    await ip(['-n', ha.ns, 'link', 'set', tap, 'master', ha.bridge, 'up']);
    const argv = lines
      .at(-1)!
      .replace(/^qemu-system-x86_64 /, '')
      .match(/'[^']*'|\S+/g)!
      .map((a) => a.replace(/^'(.*)'$/, '$1'));
    const qmpPath = join(dir, 'web.qmp');
    const own = spawnTracked('qemu:own', 'ip', ['netns', 'exec', ha.ns, stockQemu().path, ...argv]);
    procs.push(own);
    await serialLine(join(dir, 'web.serial'), /RUBATO webd ready/, 120_000);

    const client = nsLauncher(procs).httpClient('client', l.clientNs, `${l.guestIp}:80`, '/', true);
    await client.waitEvent((e) => e.type === 'ok', 60_000, 'a first answer');

    const protect = (file: string) => [
      'protect',
      file,
      '--adopt',
      qmpPath,
      '--no-witness',
      '--standby',
      '127.0.0.1:1',
      '--key',
      key,
      '--state-dir',
      join(dir, 'state'),
      '--events',
    ];
    // A definition that differs (its memory) is refused before anything moves; the VM runs on.
    const refused = await runCommand('ip', ['netns', 'exec', ha.ns, RUBATO_BIN, ...protect(bigger)]);
    assert.equal(refused.code, 2, refused.stderr);
    assert.match(
      refused.stderr,
      /cannot adopt VM web: .*memory: the running VM has 128 MiB, its definition gives 256 MiB/,
    );
    assert.ok(alive(own.pid), "the VM's own QEMU runs on");
    const tRefused = Date.now();
    await client.waitEvent((e) => e.type === 'ok' && e.t > tRefused, 10_000, 'answers after the refusal');

    // Adopted (no standby here: it runs unprotected, said once), then released.
    const p = rubatoProcess('protect', protect(vmFile), 'warn', ha.ns);
    procs.push(p.proc);
    const adopted = await waitFor(() => p.events.find((e) => e['event'] === 'adopted'), 120_000, 'the adoption', 100);
    assert.equal(adopted['fromPid'], own.pid);
    await own.exited;
    const tAdopted = Date.now();
    await client.waitEvent((e) => e.type === 'ok' && e.t > tAdopted, 10_000, 'answers from the adopted VM');

    const rel = await runCommand('ip', [
      'netns',
      'exec',
      ha.ns,
      RUBATO_BIN,
      'release',
      'web',
      '--state-dir',
      join(dir, 'state'),
    ]);
    assert.equal(rel.code, 0, rel.stderr);
    const out = JSON.parse(rel.stdout) as { ok: boolean; pid: number; downtimeMs: number };
    assert.equal(out.ok, true);
    releasedPid = out.pid;
    assert.ok(out.downtimeMs >= 0);
    assert.equal((await p.proc.exited).code, 0, 'the controller ends once the VM is handed back');
    assert.ok(alive(releasedPid), 'the VM runs in its own QEMU again, outliving the controller');
    const back = new QmpClient(qmpPath, 'web (released)');
    await back.connect(5000);
    assert.equal(((await back.execute('query-status')) as { status: string }).status, 'running');
    back.close();
    const tReleased = Date.now();
    await client.waitEvent((e) => e.type === 'ok' && e.t > tReleased + 1000, 15_000, 'answers after the release');

    client.proc.kill('SIGTERM');
    await client.proc.exited;
    const persistent = client.events.filter((e) => e.type === 'ok' && e['conn'] === 'persistent');
    assert.equal(new Set(persistent.map((e) => e['socket'])).size, 1, 'one connection through both moves');
    assert.equal(client.events.filter((e) => e.type === 'error').length, 0, 'no error');
    let prev = 0;
    for (const e of persistent) {
      const n = Number(/rubato (\d+)/.exec(String(e['body']))?.[1] ?? 0);
      assert.ok(n >= prev, `the guest's answers count on (${prev} then ${n})`);
      prev = n;
    }
  } finally {
    if (releasedPid > 0 && alive(releasedPid)) process.kill(releasedPid, 'SIGKILL');
    for (const p of procs.reverse()) await p.stop(5000);
    await lan?.destroy();
    removeTempDir(dir);
  }
});
