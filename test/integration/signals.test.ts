// Signals as an operator sends them, to the real commands on loopback: SIGTERM to `rubato primary`
// stops it in order (the standby is told and does not fail over, the guest stops, nothing is left);
// SIGTERM to `rubato standby` leaves the primary unprotected — said once — until a standby returns.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { readdirSync } from 'node:fs';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { liveProcesses } from '../../src/util/procs.ts';
import { writeKeyFile } from '../../src/replication/keyfile.ts';
import { controlCommand } from '../../src/replication/control-socket.ts';
import { sleep, waitFor } from '../../src/util/async.ts';
import { alive, rubatoProcess } from '../helpers/rubato.ts';

const rubato = rubatoProcess;

const link = ['--heartbeat-ms', '50', '--timeout-ms', '600'];

function pair(dir: string, port: number) {
  const key = join(dir, 'psk');
  writeKeyFile(key);
  const standbyArgs = [
    'standby',
    '--no-witness',
    '--listen',
    `127.0.0.1:${port}`,
    '--state-dir',
    join(dir, 'standby'),
    '--key',
    key,
    '--events',
    '--no-fsync',
    ...link,
  ];
  const primaryArgs = [
    'primary',
    '--no-witness',
    '--standby',
    `127.0.0.1:${port}`,
    '--key',
    key,
    '--state-dir',
    join(dir, 'primary'),
    '--events',
    '--mem',
    '96',
    '--policy',
    'fixed:50',
    ...link,
  ];
  return { standbyArgs, primaryArgs };
}

test('SIGTERM to rubato primary: the standby is told and does not fail over; the guest stops; nothing is left', {
  timeout: 180_000,
}, async () => {
  const dir = makeTempDir('rubato-sig-p-');
  const port = 20000 + Math.floor(Math.random() * 20000);
  const { standbyArgs, primaryArgs } = pair(dir, port);
  const sb = rubato('rubato-standby', standbyArgs);
  let pr: ReturnType<typeof rubato> | null = null;
  try {
    await waitFor(() => sb.events.find((e) => e['event'] === 'listening'), 30_000, 'the standby listening');
    const primary = rubato('rubato-primary', primaryArgs);
    pr = primary;
    const started = await waitFor(
      () => primary.events.find((e) => e['event'] === 'started'),
      120_000,
      'the primary started',
    );
    await waitFor(
      () => primary.events.find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 5),
      120_000,
      'five checkpoints acknowledged',
    );
    const qemuPid = Number(started['qemuPid']);
    assert.ok(alive(qemuPid), 'the guest runs before the signal');
    primary.proc.kill('SIGTERM');
    const exit = await primary.proc.exited;
    assert.equal(exit.code, 0, 'an orderly stop exits 0');
    assert.equal(alive(qemuPid), false, 'the guest QEMU is gone');
    // Longer than the standby's failure timeout: a lost primary would have been declared by now.
    await sleep(1500);
    assert.equal(
      sb.events.find((e) => e['event'] === 'failover' || e['event'] === 'primary-lost'),
      undefined,
      'no failover, no primary-lost',
    );
    const st = await controlCommand(join(dir, 'standby'), 'status');
    assert.equal(st['state'], 'protecting');
    assert.ok(Number(st['replicaEpoch']) >= 5, 'the replica is kept');
    const left = readdirSync(join(dir, 'primary'), { recursive: true, encoding: 'utf8' }).filter((f) =>
      /\.(sock|mig|qmp|serial|net|nbd)$/.test(f),
    );
    assert.deepEqual(left, [], "no socket left in the primary's state folder");
    sb.proc.kill('SIGTERM');
    assert.equal((await sb.proc.exited).code, 0, 'the standby stops in order too');
  } finally {
    await pr?.proc.stop(3000);
    await sb.proc.stop(3000);
    removeTempDir(dir);
  }
});

test('SIGTERM to rubato standby: the primary goes on unprotected, says so once, and re-protects when a standby returns', {
  timeout: 240_000,
}, async () => {
  const dir = makeTempDir('rubato-sig-s-');
  const port = 20000 + Math.floor(Math.random() * 20000);
  const { standbyArgs, primaryArgs } = pair(dir, port);
  let sb = rubato('rubato-standby', standbyArgs);
  const pr = rubato('rubato-primary', primaryArgs);
  try {
    await waitFor(
      () => pr.events.find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 3),
      120_000,
      'checkpoints acknowledged',
    );
    sb.proc.kill('SIGTERM');
    assert.equal((await sb.proc.exited).code, 0);
    await waitFor(() => pr.events.find((e) => e['event'] === 'unprotected'), 10_000, 'the primary notices');
    await sleep(3500); // three more reconnection attempts (one a second)
    assert.equal(pr.events.filter((e) => e['event'] === 'unprotected').length, 1, 'unprotected is said once');
    assert.equal(pr.proc.child.exitCode, null, 'the primary keeps running');
    const before = pr.events.filter((e) => e['event'] === 'protecting').length;
    sb = rubato('rubato-standby', standbyArgs);
    await waitFor(
      () => pr.events.filter((e) => e['event'] === 'protecting').length > before,
      120_000,
      'protection resumed',
    );
    const n = pr.events.length;
    await waitFor(
      () => pr.events.slice(n).find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 2),
      60_000,
      'checkpoints acknowledged again',
    );
    pr.proc.kill('SIGTERM');
    assert.equal((await pr.proc.exited).code, 0);
  } finally {
    await pr.proc.stop(3000);
    await sb.proc.stop(3000);
    removeTempDir(dir);
  }
});

after(() => {
  assert.deepEqual(liveProcesses(), [], 'no process left running');
});
