// The product path with a user's VM: `rubato protect VM-FILE` and `rubato standby --peer` as an
// operator runs them. A Debian VM boots from its 8 GiB disk through the firmware with a NIC on a
// bridge; nginx in it serves a client throughout; every epoch whose frames the primary released was
// committed by the standby first (the product's own events, two processes); the primary host is
// killed, the standby takes over with the connection alive, and the VM is re-protected onto the
// repaired host. Then bad input and faults: one line each, a distinct exit code, nothing left.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { writeFileSync, readdirSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { ensurePatchedQemu, ensureTestTools } from '../../src/setup/setup.ts';
import { consoleLoginPrompt, type ConsoleSeen } from '../helpers/console.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { runCommand, spawnTracked } from '../../src/util/procs.ts';
import { controlCommand } from '../../src/replication/control-socket.ts';
import { writeKeyFile } from '../../src/replication/keyfile.ts';
import { debianDemoPassed, runDebianDemo } from '../../src/chaos/debian-demo.ts';
import { addNamespace, delNamespace, ip, liveNamespaces } from '../../src/io/net/netns.ts';
import { sleep, waitFor } from '../../src/util/async.ts';
import { testPlatform } from '../helpers/platform.ts';
import { RUBATO_BIN, rubatoProcess, writeTestVm } from '../helpers/rubato.ts';

test("rubato protect: a disk-booted UEFI Debian VM with two disks and two NICs, output only after the standby committed, failover, the old primary's unit refused, re-protection", {
  timeout: 900_000,
}, async () => {
  await ensureTestTools();
  // An operator at the console (tmux) where the VM runs: on the primary, and on the standby after the failover.
  const consoles: Record<string, ConsoleSeen> = {};
  const r = await runDebianDemo(
    {
      seconds: 4,
      memMb: 768,
      policy: 'model',
      heartbeatMs: 100,
      timeoutMs: 1000,
      accel: 'auto',
      firmware: 'uefi',
      disks: 2,
      nics: 2,
      onRunning: async (phase, where) => {
        consoles[phase] = await consoleLoginPrompt(where.ns, where.stateDir, where.vm);
      },
    },
    () => {},
  );
  assert.equal(r.error, undefined, r.error);
  for (const phase of ['protected', 'failed-over']) {
    assert.match(consoles[phase]?.screen ?? '', /debian login:/, `the login prompt on the console (${phase})`);
    assert.equal(consoles[phase]?.detached, true, `Ctrl-] detached (${phase})`);
  }
  assert.equal(r.bootedFromDisk, true, 'the guest booted from its disk and started its services');
  assert.equal(r.firmware, 'uefi');
  // The second NIC (its own LAN and client) carried traffic across the failover.
  assert.ok(r.secondNic, 'a client on the second NIC');
  assert.ok(
    r.secondNic.afterFailover > 0,
    `pages through the second NIC after the failover: ${JSON.stringify(r.secondNic)}`,
  );
  assert.equal(r.secondNic.errors, 0);
  assert.equal(r.secondNic.connectionSurvived, true);
  // The counter written through the second disk (and published from the first) never went back.
  assert.ok(r.counter, 'the counter on the second disk');
  assert.ok(r.counter.beforeFailover > 0, JSON.stringify(r.counter));
  assert.equal(r.counter.wentBack, false, JSON.stringify(r.counter));
  assert.ok(r.counter.firstAfter >= r.counter.beforeFailover, JSON.stringify(r.counter));
  assert.ok(r.counter.lastAfter > r.counter.firstAfter, `the guest kept writing on B: ${JSON.stringify(r.counter)}`);
  assert.ok(r.diskGiB >= 8);
  assert.ok(r.replies.checked > 0, 'pages fetched while the guest was protected were judged');
  assert.equal(
    r.replies.early,
    0,
    `no page reached a client before a checkpoint covering its request was acknowledged: ${JSON.stringify(r.replies.examples)}`,
  );
  assert.equal(r.failover, true);
  assert.ok(r.httpRequests > 0);
  assert.equal(r.httpErrors, 0, 'the client saw no error across the failover');
  assert.equal(r.connectionSurvived, true, 'the persistent connection carried on');
  assert.equal(
    r.staleRestart.startedGuest,
    false,
    "the old primary's unit, started again after the failover, ran no copy",
  );
  assert.equal(r.staleRestart.code, 8, `refused as a stale disk: ${r.staleRestart.why}`);
  assert.match(r.staleRestart.why, /generation/);
  assert.equal(r.reprotected, true, 'the VM was protected again by the repaired host');
  process.stderr.write(`controllers resident at most: ${JSON.stringify(r.controllerRssMb)} MB\n`);
  assert.ok(
    r.controllerRssMb.primary > 0 && r.controllerRssMb.primary < 512,
    `primary controller resident ${r.controllerRssMb.primary} MB`,
  );
  assert.ok(
    r.controllerRssMb.standby > 0 && r.controllerRssMb.standby < 512,
    `standby controller resident ${r.controllerRssMb.standby} MB`,
  );
  assert.equal(debianDemoPassed(r), true);
  assert.deepEqual(liveNamespaces(), [], 'no namespace left');
});

function rubato(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return runCommand(RUBATO_BIN, args, { env: { ...process.env, RUBATO_LOG: 'error' } });
}

test('rubato protect: bad input and faults, one line and a distinct exit code each, nothing left running', {
  timeout: 300_000,
}, async () => {
  const { guest } = await testPlatform();
  const dir = makeTempDir('rubato-protect-bad-');
  const key = join(dir, 'psk');
  writeKeyFile(key);
  const img = join(dir, 'disk.img');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const vm = (o: object) => {
    const f = join(dir, `vm-${Math.random().toString(36).slice(2)}.json`);
    writeFileSync(
      f,
      JSON.stringify({
        name: 't1',
        memoryMiB: 128,
        accelerator: 'auto',
        boot: { kernel: guest.kernel, initrd: guest.initrd, append: 'console=ttyS0 quiet rubato.wl=dirtier,1,4' },
        ...o,
      }),
    );
    return f;
  };
  const protect = (file: string, extra: string[] = []) =>
    rubato([
      'protect',
      file,
      '--no-witness',
      '--standby',
      '127.0.0.1:9',
      '--key',
      key,
      '--state-dir',
      join(dir, 'state'),
      ...extra,
    ]);
  const oneLine = (r: { stderr: string }) => {
    const lines = r.stderr
      .trim()
      .split('\n')
      .filter((l) => l.startsWith('rubato:'));
    assert.equal(lines.length, 1, r.stderr);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    return lines[0]!;
  };
  try {
    let r = await protect(join(dir, 'absent.json'));
    assert.equal(r.code, 2);
    assert.match(oneLine(r), /absent\.json: \(file\): cannot read/);

    r = await protect(vm({ disks: [{ path: join(dir, 'nope.img') }] }));
    assert.equal(r.code, 2);
    assert.match(oneLine(r), /disks\[0\]\.path: cannot use .*no such file/);

    r = await protect(vm({ nics: [{ bridge: 'br0', mac: '52:54:00:zz:00:01' }] }));
    assert.equal(r.code, 2);
    assert.match(oneLine(r), /nics\[0\]\.mac: must be a MAC address/);

    r = await protect(vm({ disks: [{ path: img, format: 'qcow2' }] }));
    assert.equal(r.code, 2);
    assert.match(oneLine(r), /disks\[0\]\.format: says qcow2, but .* is raw/);

    r = await protect(vm({ disks: [{ path: img }], nics: [{ bridge: 'rbnobr0' }] }));
    assert.equal(r.code, 5, r.stderr);
    assert.match(oneLine(r), /bridge rbnobr0 does not exist/);

    // Compare mode is refused for a VM it cannot run yet; --mode auto protects it in buffer mode.
    const img2 = join(dir, 'disk2.img');
    writeFileSync(img2, Buffer.alloc(1 << 20));
    const twoDisks = { disks: [{ path: img }, { path: img2 }], nics: [{ bridge: 'rbnobr0' }] };
    r = await protect(vm(twoDisks), ['--mode', 'compare']);
    assert.equal(r.code, 2, r.stderr);
    assert.match(
      oneLine(r),
      /--mode compare: compare mode runs BIOS VMs with one disk and one NIC today \(t1 has 2 disks/,
    );
    r = await protect(vm(twoDisks), ['--mode', 'auto', '--log-level', 'info']);
    assert.equal(r.code, 5, r.stderr); // (past the mode: stopped by the missing bridge)
    assert.match(r.stderr, /--mode auto: compare mode runs .*2 disks.*; protecting it in buffer mode/);
    assert.match(oneLine(r), /bridge rbnobr0 does not exist/);

    r = await protect(vm({}), ['--key', join(dir, 'no-key')]);
    assert.equal(r.code, 2);
    oneLine(r);

    // Local checks come before the witness is asked and before a qcow2 is converted: a missing
    // bridge is said (exit 5) with an unreachable witness named, and no converted disk is left.
    const qcow = join(dir, 'disk.qcow2');
    const made = await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '64M']);
    assert.equal(made.code, 0, made.stderr);
    r = await rubato([
      'protect',
      vm({ disks: [{ path: qcow }], nics: [{ bridge: 'rbnobr0' }] }),
      '--etcd',
      'http://127.0.0.1:9',
      '--standby',
      '127.0.0.1:9',
      '--key',
      key,
      '--state-dir',
      join(dir, 'state-order'),
    ]);
    assert.equal(r.code, 5, r.stderr);
    assert.match(oneLine(r), /bridge rbnobr0 does not exist/);
    assert.equal(existsSync(join(dir, 'state-order')), false, 'nothing converted, no state folder made');

    // A dead controller is an answer with its own code (9), not a mistake (2).
    r = await rubato(['status', '--state-dir', join(dir, 'nobody'), '--json']);
    assert.equal(r.code, 9, r.stderr);
    assert.equal(JSON.parse(r.stdout).running, false);
    assert.match(oneLine(r), /no Rubato controller is running in/);

    // Safe by default: no witness named and none refused is a mistake, named in one line.
    r = await rubato(['protect', vm({}), '--standby', '127.0.0.1:9', '--key', key, '--state-dir', join(dir, 'state')]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(oneLine(r), /--etcd.*--no-witness/);
    r = await rubato(['standby', '--listen', '127.0.0.1:0', '--key', key, '--state-dir', join(dir, 'sb-none')]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(oneLine(r), /--etcd.*--no-witness/);
    // A lease that outlives the hold timer is refused.
    r = await protect(vm({}), ['--etcd', 'http://127.0.0.1:9', '--lease-ttl', '5']);
    assert.equal(r.code, 2, r.stderr);
    assert.match(oneLine(r), /contradict/);
    r = await rubato([
      'protect',
      vm({}),
      '--etcd',
      'http://127.0.0.1:9',
      '--lease-ttl',
      '5',
      '--standby',
      '127.0.0.1:9',
      '--key',
      key,
      '--state-dir',
      join(dir, 'state'),
    ]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(oneLine(r), /--lease-ttl 5 s .* --hold-ms 2000/);
    // Names that are not one safe path component.
    for (const name of ['..', '.', 'a/b', '.hidden']) {
      r = await protect(vm({ name }));
      assert.equal(r.code, 2, `${name}: ${r.stderr}`);
      assert.match(oneLine(r), /name: must be 1-40 letters/);
    }

    // A standby whose port is taken.
    const busy = createServer();
    await new Promise<void>((res) => busy.listen(0, '127.0.0.1', () => res()));
    try {
      const port = (busy.address() as { port: number }).port;
      r = await rubato([
        'standby',
        '--no-witness',
        '--listen',
        `127.0.0.1:${port}`,
        '--key',
        key,
        '--state-dir',
        join(dir, 'sb-busy'),
      ]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(oneLine(r), /cannot listen on 127\.0\.0\.1:\d+/);
    } finally {
      busy.close();
    }

    // An image a QEMU holds (it locks its images) is refused before anything starts.
    const qemu = await ensurePatchedQemu();
    const holder = spawnTracked('qemu-holder', qemu.path, [
      '-machine',
      'none',
      '-S',
      '-display',
      'none',
      '-nodefaults',
      '-drive',
      `file=${img},format=raw,if=none,id=d0`,
    ]);
    try {
      await sleep(1500);
      r = await protect(vm({ disks: [{ path: img }] }));
      assert.equal(r.code, 4, r.stderr);
      assert.match(oneLine(r), /in use/);
    } finally {
      await holder.stop(2000);
    }

    // A standby holding another key: the VM had started; it is stopped again, exit 3.
    const otherKey = join(dir, 'other');
    writeKeyFile(otherKey);
    const port = 20000 + Math.floor(Math.random() * 20000);
    const sb = spawnTracked('rubato-standby', RUBATO_BIN, [
      'standby',
      '--no-witness',
      '--listen',
      `127.0.0.1:${port}`,
      '--key',
      otherKey,
      '--state-dir',
      join(dir, 'sb'),
      '--no-fsync',
      '--events',
    ]);
    try {
      let out = '';
      sb.child.stdout?.on('data', (d: Buffer) => {
        out += d.toString();
      });
      await waitFor(() => out.includes('"listening"') || undefined, 30_000, 'the standby listening');
      r = await rubato([
        'protect',
        vm({}),
        '--no-witness',
        '--standby',
        `127.0.0.1:${port}`,
        '--key',
        key,
        '--state-dir',
        join(dir, 'state2'),
      ]);
      assert.equal(r.code, 3, r.stderr);
      assert.match(oneLine(r), /refused this key/);
    } finally {
      await sb.stop(3000);
    }
    assert.equal(
      existsSync(join(dir, 'state2', 'run'))
        ? readdirSync(join(dir, 'state2', 'run')).filter((f) => f.endsWith('.qmp')).length
        : 0,
      0,
      'no QEMU socket left',
    );
  } finally {
    removeTempDir(dir);
  }
});

test('rubato protect with its standby not yet there: the VM runs, "unprotected" is said once, protection starts when the standby answers', {
  timeout: 300_000,
}, async () => {
  const { guest } = await testPlatform();
  const dir = makeTempDir('rubato-protect-late-');
  const key = join(dir, 'psk');
  writeKeyFile(key);
  const f = join(dir, 'vm.json');
  writeFileSync(
    f,
    JSON.stringify({
      name: 'late1',
      memoryMiB: 128,
      boot: {
        kernel: guest.kernel,
        initrd: guest.initrd,
        append: 'console=ttyS0 quiet panic=-1 rubato.wl=dirtier,1,4',
      },
    }),
  );
  const port = 20000 + Math.floor(Math.random() * 20000);
  const { proc: pr, events } = rubatoProcess(
    'rubato-protect',
    [
      'protect',
      '--stop-timeout',
      '2',
      f,
      '--no-witness',
      '--standby',
      `127.0.0.1:${port}`,
      '--key',
      key,
      '--state-dir',
      join(dir, 'p'),
      '--events',
      '--policy',
      'fixed:50',
      '--heartbeat-ms',
      '50',
      '--timeout-ms',
      '500',
    ],
    'error',
  );
  let sb: ReturnType<typeof spawnTracked> | null = null;
  try {
    await waitFor(() => events.find((e) => e['event'] === 'unprotected'), 60_000, 'the VM said to be unprotected');
    await sleep(3000); // several retries meanwhile
    assert.equal(events.filter((e) => e['event'] === 'unprotected').length, 1, 'said once, not per retry');
    // The VM runs meanwhile: its console speaks (a loaded machine may take longer than the retries above to boot it).
    await waitFor(() => events.find((e) => e['event'] === 'guest'), 60_000, 'the VM running meanwhile');
    assert.equal(events.filter((e) => e['event'] === 'unprotected').length, 1, 'still said once');
    sb = spawnTracked('rubato-standby', RUBATO_BIN, [
      'standby',
      '--no-witness',
      '--listen',
      `127.0.0.1:${port}`,
      '--key',
      key,
      '--state-dir',
      join(dir, 's'),
      '--no-fsync',
    ]);
    await waitFor(
      () => events.find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 3),
      120_000,
      'protected once the standby answered',
    );
    // --no-witness is said in the events and in status.
    assert.ok(events.some((e) => e['event'] === 'fencing' && e['fencing'] === 'none'));
    const st = await controlCommand(join(dir, 'p'), 'status');
    assert.equal(st['fencing'], 'none');
    pr.kill('SIGTERM');
    assert.equal((await pr.exited).code, 0);
  } finally {
    await pr.stop(3000);
    await sb?.stop(3000);
    removeTempDir(dir);
  }
});

test('rubato protect: a TAP left behind by a killed controller is removed at start; one a live process holds is refused (exit 4)', {
  timeout: 180_000,
}, async () => {
  const { guest } = await testPlatform();
  const dir = makeTempDir('rubato-protect-tap-');
  const ns = await addNamespace(`rbtap${process.pid % 100000}`);
  const holders: Array<ReturnType<typeof spawnTracked>> = [];
  try {
    await ip(['-n', ns, 'link', 'add', 'br0', 'type', 'bridge']);
    await ip(['-n', ns, 'link', 'set', 'br0', 'up']);
    const { key } = writeTestVm(dir, 'stale1', guest);
    const f = join(dir, 'nic.json');
    writeFileSync(
      f,
      JSON.stringify({
        name: 'stale1',
        memoryMiB: 128,
        nics: [{ bridge: 'br0' }],
        boot: { kernel: guest.kernel, initrd: guest.initrd, append: 'console=ttyS0 quiet panic=-1' },
      }),
    );
    const args = [
      'protect',
      '--stop-timeout',
      '2',
      f,
      '--no-witness',
      '--standby',
      '127.0.0.1:9',
      '--key',
      key,
      '--state-dir',
      join(dir, 'p'),
      '--events',
    ];
    // What a SIGKILLed controller leaves: its persistent TAP, on the bridge.
    await ip(['-n', ns, 'tuntap', 'add', 'dev', 'tapstale1', 'mode', 'tap']);
    await ip(['-n', ns, 'link', 'set', 'tapstale1', 'master', 'br0']);
    const first = rubatoProcess('rubato-protect-tap', args, 'warn', ns);
    let stderr = '';
    first.proc.child.stderr?.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    try {
      await waitFor(() => first.events.find((e) => e['event'] === 'started'), 60_000, 'the VM started');
      assert.match(stderr, /removing TAP tapstale1, left behind/);
      first.proc.kill('SIGTERM');
      assert.equal((await first.proc.exited).code, 0);
    } finally {
      await first.proc.stop(3000);
    }
    // A TAP a live process holds is another guest's: refused, naming the process.
    await ip(['-n', ns, 'tuntap', 'add', 'dev', 'tapstale1', 'mode', 'tap']);
    const holder = spawnTracked('tap-holder', 'ip', [
      'netns',
      'exec',
      ns,
      'python3',
      '-c',
      "import fcntl,struct,os,time\nfd=os.open('/dev/net/tun',os.O_RDWR)\nfcntl.ioctl(fd,0x400454ca,struct.pack('16sH',b'tapstale1',0x1002))\nprint('held',flush=True)\ntime.sleep(60)",
    ]);
    holders.push(holder);
    let held = '';
    holder.child.stdout?.on('data', (d: Buffer) => {
      held += d.toString();
    });
    await waitFor(() => held.includes('held') || undefined, 10_000, 'the TAP held');
    const r = await runCommand('ip', ['netns', 'exec', ns, RUBATO_BIN, ...args], {
      env: { ...process.env, RUBATO_LOG: 'error' },
    });
    assert.equal(r.code, 4, r.stderr);
    assert.match(r.stderr, new RegExp(`TAP tapstale1 is in use by process ${holder.pid}`));
  } finally {
    for (const h of holders) await h.stop(2000);
    await delNamespace(ns);
    removeTempDir(dir);
  }
});
