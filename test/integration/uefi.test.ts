// A UEFI VM protected by the product commands: OVMF boots the test guest, which writes an EFI
// variable every 2 s through its firmware into the VM's variable store (a flash Rubato serves and
// replicates like a disk); a cloud-init seed rides along as a disk. A dies, B takes the VM over;
// B's controller restarted brings it back from B's disks: the firmware, booted again from the
// replicated store, hands the guest the variable it wrote last — on A before the failover and on B
// after it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { runCommand, type TrackedProcess } from '../../src/util/procs.ts';
import { waitFor } from '../../src/util/async.ts';
import { Lan } from '../../src/io/net/lan.ts';
import { ip } from '../../src/io/net/netns.ts';
import { LocalEtcd } from '../../src/coord/local-etcd.ts';
import { writeKeyFile } from '../../src/replication/keyfile.ts';
import { guestAppend } from '../../src/qemu/spec.ts';
import { ensurePackages, ensureTapRelay } from '../../src/setup/setup.ts';
import { testPlatform } from '../helpers/platform.ts';
import { rubatoProcess, type Ev } from '../helpers/rubato.ts';

test('a UEFI VM: its variable store and cloud-init seed are replicated; brought back on B, the firmware has what the guest wrote last', {
  timeout: 600_000,
}, async () => {
  const { guest } = await testPlatform();
  await ensurePackages(); // (OVMF, dosfstools, mtools)
  await ensureTapRelay();
  const dir = makeTempDir('rubato-uefi-');
  const procs: TrackedProcess[] = [];
  let lan: Lan | null = null;
  let etcd: LocalEtcd | null = null;
  try {
    lan = await Lan.create('uefi');
    const l = lan;
    const [ha, hb] = [await l.addHost('ha'), await l.addHost('hb')];
    etcd = await LocalEtcd.start(join(dir, 'witness'), { host: await l.attachRoot(200) });
    const userData = join(dir, 'user-data');
    writeFileSync(userData, '#cloud-config\nhostname: efi\n');
    const key = join(dir, 'psk');
    writeKeyFile(key);
    const vmFile = join(dir, 'efi.json');
    writeFileSync(
      vmFile,
      JSON.stringify({
        name: 'efi',
        memoryMiB: 256,
        firmware: 'uefi',
        cloudInit: { userData },
        nics: [{ bridge: ha.bridge }],
        boot: {
          kernel: guest.kernel,
          initrd: guest.initrd,
          append: guestAppend([], { ip: `${l.guestIp}/24`, efivar: 'efi' }),
        },
      }),
    );
    const common = ['--key', key, '--etcd', etcd.url, '--heartbeat-ms', '100', '--timeout-ms', '1000'];
    common.push('--stop-timeout', '2', '--events');
    const run = (name: string, ns: string, args: string[]) => {
      const p = rubatoProcess(name, [...args, ...common], 'warn', ns);
      procs.push(p.proc);
      return p;
    };
    const standbyArgs = ['standby', '--host', 'hb', '--listen', `${hb.ip}:7400`, '--peer', `${ha.ip}:7400`];
    standbyArgs.push('--state-dir', join(dir, 'hb'));
    const event = (p: { events: Ev[] }, f: (e: Ev) => boolean, ms: number, what: string) =>
      waitFor(() => p.events.find(f), ms, what, 100);
    const line = (re: RegExp) => (e: Ev) => e['event'] === 'guest' && re.test(String(e['line']));
    const writtenAfter = (p: { events: Ev[] }, t: number) =>
      p.events
        .filter((e) => line(/RUBATO efivar written=efi-\d+/)(e) && Number(e['t']) > t)
        .map((e) => Number(/written=efi-(\d+)/.exec(String(e['line']))![1]));

    const sb = run('standby-b', hb.ns, standbyArgs);
    await event(sb, (e) => e['event'] === 'listening', 30_000, 'the standby listening');
    const a = run('protect-a', ha.ns, [
      'protect',
      vmFile,
      '--host',
      'ha',
      '--standby',
      `${hb.ip}:7400`,
      '--state-dir',
      join(dir, 'ha'),
    ]);
    const first = await event(a, line(/RUBATO efivar found=/), 180_000, 'the guest booted through OVMF');
    assert.match(String(first['line']), /found=none/, 'a new VM: an empty variable store');
    const prot = await event(a, (e) => e['event'] === 'protecting', 120_000, 'protection');
    // Two writes after protection began: the first of them is in a checkpoint the standby acknowledged.
    const efiLines = (p: { events: Ev[] }) =>
      p.events
        .filter(line(/RUBATO efivar/))
        .slice(-3)
        .map((e) => String(e['line']))
        .join(' | ');
    await waitFor(
      () => writtenAfter(a, Number(prot['t'])).length >= 2,
      30_000,
      'variable writes under protection',
    ).catch((e: unknown) => {
      throw new Error(`${(e as Error).message}; the guest said: ${efiLines(a)}`);
    });
    const onA = writtenAfter(a, Number(prot['t']))[0]!;

    await ip(['-n', ha.ns, 'link', 'set', ha.uplink, 'down']);
    const started = await event(a, (e) => e['event'] === 'started', 1000, "A's QEMU");
    process.kill(Number(started['qemuPid']), 'SIGKILL');
    a.proc.kill('SIGKILL');
    const fo = await event(sb, (e) => e['event'] === 'failover', 60_000, 'the failover');
    await waitFor(() => writtenAfter(sb, Number(fo['t'])).length >= 2, 30_000, 'variable writes on B');

    // The seed went with the VM: B's replica of its first disk is the CIDATA volume.
    const active = JSON.parse(readFileSync(join(dir, 'hb', 'vm', 'active.json'), 'utf8')) as { disks: string[] };
    assert.equal(active.disks.length, 2, 'the seed and the variable store');
    const listing = await runCommand('mdir', ['-b', '-i', active.disks[0]!, '::/']);
    assert.match(listing.stdout, /user-data/, listing.stderr);
    assert.match(listing.stdout, /meta-data/);

    // B's controller stops in order and starts again: the VM boots on B from B's disks.
    sb.proc.kill('SIGTERM');
    assert.equal((await sb.proc.exited).code, 0, "an orderly stop of B's controller");
    const onB = Math.max(...writtenAfter(sb, Number(fo['t'])));
    const again = run('standby-b-again', hb.ns, standbyArgs);
    await event(again, (e) => e['event'] === 'resumed', 60_000, 'the VM brought back on B');
    const found = await event(again, line(/RUBATO efivar found=/), 180_000, 'the guest booted again through OVMF');
    const m = /found=efi-(\d+)/.exec(String(found['line']));
    assert.ok(m, `the firmware kept the variable: ${String(found['line'])}`);
    const n = Number(m[1]);
    assert.ok(n > onA, `written on A under protection (${onA}), then on B: the store has ${n}`);
    assert.ok(n >= onB, `the last write on B before its stop (${onB}) is in the store (${n})`);
  } finally {
    for (const p of procs.reverse()) await p.stop(5000);
    await etcd?.stop();
    await lan?.destroy();
    removeTempDir(dir);
  }
});
