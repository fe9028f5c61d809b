// Planned maintenance with the product commands on loopback: `rubato protect --listen` and
// `rubato standby --peer`; `rubato status` on both; `rubato switchover` moves the VM to the standby
// host with its last checkpoint taken with the guest stopped (no lost output), the old primary
// stays on as the new standby, and the guest — running on without a reboot — is protected by it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { runCommand, type TrackedProcess } from '../../src/util/procs.ts';
import { waitFor } from '../../src/util/async.ts';
import { testPlatform } from '../helpers/platform.ts';
import { RUBATO_BIN, alive, rubatoProcess, writeTestVm, type Ev } from '../helpers/rubato.ts';

const BIN = RUBATO_BIN;
const env = { ...process.env, RUBATO_LOG: 'warn' };
const rubato = rubatoProcess;
const work = (e: Ev) => e['event'] === 'guest' && /RUBATO dirtier t=/.test(String(e['line']));
const counter = (e: Ev) => Number(String(e['line']).match(/work=(\d+)/)?.[1] ?? -1);

test('rubato switchover: the VM moves to the standby with no reboot, the old primary becomes its standby; rubato status on both', {
  timeout: 300_000,
}, async () => {
  const { guest } = await testPlatform();
  const dir = makeTempDir('rubato-switch-');
  const { key, vmFile } = writeTestVm(dir, 'sw1', guest);
  const portA = 20000 + Math.floor(Math.random() * 20000);
  const portB = portA + 1;
  const link = ['--heartbeat-ms', '50', '--timeout-ms', '800'];
  const procs: TrackedProcess[] = [];
  try {
    const b = rubato('standby-b', [
      'standby',
      '--stop-timeout',
      '2',
      '--no-witness',
      '--listen',
      `127.0.0.1:${portB}`,
      '--peer',
      `127.0.0.1:${portA}`,
      '--key',
      key,
      '--state-dir',
      join(dir, 'b'),
      '--no-fsync',
      '--events',
      '--policy',
      'fixed:50',
      ...link,
    ]);
    procs.push(b.proc);
    await waitFor(() => b.events.find((e) => e['event'] === 'listening'), 30_000, 'standby b listening');
    const a = rubato('protect-a', [
      'protect',
      '--stop-timeout',
      '2',
      vmFile,
      '--no-witness',
      '--standby',
      `127.0.0.1:${portB}`,
      '--listen',
      `127.0.0.1:${portA}`,
      '--key',
      key,
      '--state-dir',
      join(dir, 'a'),
      '--no-fsync',
      '--events',
      '--policy',
      'fixed:50',
      ...link,
    ]);
    procs.push(a.proc);
    const started = await waitFor(() => a.events.find((e) => e['event'] === 'started'), 120_000, 'the VM started');
    await waitFor(
      () => a.events.find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 5),
      120_000,
      'protected, five checkpoints acknowledged',
    );

    const st = await runCommand(BIN, ['status', '--state-dir', join(dir, 'a'), '--json'], { env });
    const sa = JSON.parse(st.stdout) as Ev;
    assert.equal(sa['role'], 'primary');
    assert.equal(sa['protected'], true);
    assert.ok(Number(sa['ackedEpoch']) >= 5);
    const table = await runCommand(BIN, ['status', '--state-dir', join(dir, 'b')], { env });
    assert.match(table.stdout, /^role\s+standby$/m);
    assert.match(table.stdout, /^replica epoch\s+\d+$/m);

    // Past the guest's boot: its console output of the boot is long flushed.
    await waitFor(() => a.events.filter(work).length >= 20 || undefined, 60_000, 'the guest working for a while');
    const before = Math.max(...a.events.filter(work).map(counter));
    const sw = await runCommand(BIN, ['switchover', '--state-dir', join(dir, 'b')], { env });
    assert.equal(sw.code, 0, sw.stdout + sw.stderr);
    await waitFor(() => a.events.find((e) => e['event'] === 'fenced'), 30_000, 'the old primary fenced');
    const fo = await waitFor(
      () => b.events.find((e) => e['event'] === 'failover'),
      30_000,
      'the standby running the VM',
    );
    assert.equal(alive(Number(started['qemuPid'])), false, "the old primary's QEMU is gone: one copy runs");
    await waitFor(() => a.events.find((e) => e['event'] === 'standing-by'), 30_000, 'the old primary standing by');
    await waitFor(
      () => b.events.find((e) => e['event'] === 'reprotected'),
      120_000,
      'the VM protected by the old primary host',
    );
    await waitFor(
      () => b.events.find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 3),
      60_000,
      'checkpoints acknowledged by the new standby',
    );
    const after = await waitFor(
      () => b.events.find((e) => work(e) && Number(e['t']) > Number(fo['t'])),
      30_000,
      'the guest working on the new primary',
    );
    assert.ok(counter(after) >= before, `the guest continued (work ${before} → ${counter(after)}), not rebooted`);
    const reboots = b.events.filter(
      (e) => e['event'] === 'guest' && /RUBATO (boot ok|dirtier start)/.test(String(e['line'])),
    );
    assert.equal(
      reboots.length,
      0,
      `no reboot: ${JSON.stringify(reboots)} ${JSON.stringify(b.events.filter((e) => e['event'] === 'guest').slice(0, 5))}`,
    );
    const sb2 = JSON.parse(
      (await runCommand(BIN, ['status', '--state-dir', join(dir, 'b'), '--json'], { env })).stdout,
    ) as Ev;
    assert.equal(sb2['role'], 'primary');
    assert.equal(sb2['protected'], true);
    assert.ok(sb2['lastFailover'] !== null);

    for (const p of [a.proc, b.proc]) p.kill('SIGTERM');
    const codes = await Promise.all([a.proc.exited, b.proc.exited]);
    assert.deepEqual(
      codes.map((c) => c.code),
      [0, 0],
      'both stop in order',
    );
  } finally {
    for (const p of procs) await p.stop(3000);
    removeTempDir(dir);
  }
});
