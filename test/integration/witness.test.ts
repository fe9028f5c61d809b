// The witness on a real etcd (Debian's etcd-server, started by Rubato on loopback): one owner per
// VM at a time, the generation (fencing token) only grows, a holder cut off from etcd gives up
// before its lease can expire and another host claim the VM, and without etcd nobody claims.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';
import { sleep, waitFor } from '../../src/util/async.ts';
import { alive, rubatoProcess, type Ev } from '../helpers/rubato.ts';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import type { TrackedProcess } from '../../src/util/procs.ts';
import { writeKeyFile } from '../../src/replication/keyfile.ts';
import { testPlatform } from '../helpers/platform.ts';
import { ensurePackages } from '../../src/setup/setup.ts';
import { LocalEtcd } from '../../src/coord/local-etcd.ts';
import { EtcdClient } from '../../src/coord/etcd.ts';
import { Ownership, currentOwner, LOSS_FRACTION } from '../../src/coord/ownership.ts';
import { CuttableProxy } from '../../src/chaos/fault-proxy.ts';
import { witnessGate } from '../../src/coord/witness-gate.ts';
import { monotonicMs } from '../../src/util/clock.ts';

test('witness: one owner at a time; a holder cut from etcd gives up before another claims; the generation only grows; no etcd, no claim', {
  timeout: 120_000,
}, async () => {
  await ensurePackages();
  const dir = makeTempDir('rubato-witness-');
  const etcd = await LocalEtcd.start(dir);
  const port = Number(new URL(etcd.url).port);
  const proxy = new CuttableProxy(port);
  const direct = new EtcdClient([etcd.url], 500);
  try {
    await proxy.listen();
    const a = new Ownership(new EtcdClient([`http://127.0.0.1:${proxy.port}`], 300), 'vm1', 'ha', 2);
    const b = new Ownership(direct, 'vm1', 'hb', 2);
    assert.equal(await a.claim(), 1);
    assert.equal(await b.claim(), null, 'held by ha');
    assert.deepEqual(await currentOwner(direct, 'vm1'), { host: 'ha', generation: 1 });
    await sleep(2500); // ha keeps it by renewing, longer than its TTL
    assert.equal(await b.claim(), null, 'still held by ha after a TTL: renewed');

    let lostAt = 0;
    a.watch(() => {
      lostAt = Date.now();
    });
    const cutAt = Date.now();
    proxy.blackhole(); // ha is cut off from etcd (alive, but silent to the witness)
    let gen: number | null = null;
    while (gen === null && Date.now() - cutAt < 10_000) {
      gen = await b.claim();
      if (gen === null) await sleep(100);
    }
    const claimedAt = Date.now();
    assert.equal(gen, 2, "hb claimed the VM after ha's lease expired, with the next generation");
    assert.ok(
      lostAt > 0 && lostAt < claimedAt,
      `ha gave up (${lostAt - cutAt} ms after the cut) before hb claimed (${claimedAt - cutAt} ms)`,
    );
    assert.ok(lostAt - cutAt <= 2000 * LOSS_FRACTION + 600, 'within two thirds of the TTL (plus one renewal period)');
    assert.equal(a.held, false);
    proxy.heal();
    assert.equal(await a.reclaim(), 'superseded', 'back on etcd, ha finds a newer generation: its copy is stale');

    // A slow renewal costs a moment, not the VM: hc cut off briefly claims it again as the same copy.
    const vm2 = new Ownership(new EtcdClient([`http://127.0.0.1:${proxy.port}`], 300), 'vm2', 'hc', 2);
    assert.equal(await vm2.claim(), 1);
    let lost2 = false;
    vm2.watch(() => {
      lost2 = true;
    });
    proxy.blackhole();
    await waitFor(() => lost2 || undefined, 5000, 'hc giving vm2 up');
    assert.equal(vm2.leaseCheck(monotonicMs()) !== null, true, 'no output may leave meanwhile');
    proxy.heal();
    // (the guard asks every second: a connection reset by the heal is one failed ask)
    let again: number | 'superseded' | null = null;
    for (let i = 0; i < 20 && again === null; i++) again = await vm2.reclaim().catch(() => null);
    assert.equal(again, 2, 'claimed again as the copy of generation 1 (its own key replaced)');
    assert.equal(vm2.held, true);
    assert.deepEqual(await currentOwner(direct, 'vm2'), { host: 'hc', generation: 2 });
    await vm2.release();

    const a2 = new Ownership(direct, 'vm1', 'ha', 2);
    assert.equal(await a2.claim(), null, 'ha cannot take it back while hb holds it');
    await b.release();
    assert.equal(await a2.claim(), 3, 'released in order: the next claim gets generation 3');
    await a2.release();

    await etcd.stop();
    const c = new Ownership(new EtcdClient([etcd.url], 300), 'vm1', 'hc', 2);
    await assert.rejects(
      c.claim(),
      (e: unknown) => isRubatoError(e, 'RUBATO_PEER_LOST'),
      'no etcd: the claim fails, nobody goes live',
    );
  } finally {
    proxy.close();
    await etcd.stop();
    removeTempDir(dir);
  }
});

test('witness: a standby claims over an unrenewed owner key (before etcd expires the lease), never over one still renewed', {
  timeout: 120_000,
}, async () => {
  await ensurePackages();
  const dir = makeTempDir('rubato-witness-');
  const etcd = await LocalEtcd.start(dir);
  const proxy = new CuttableProxy(Number(new URL(etcd.url).port));
  const direct = new EtcdClient([etcd.url], 500);
  try {
    await proxy.listen();
    const a = new Ownership(new EtcdClient([`http://127.0.0.1:${proxy.port}`], 300), 'vm3', 'ha', 2);
    assert.equal(await a.claim(), 1);
    const gate = witnessGate(direct, 'hb', 2);
    gate.observe?.('vm3');
    const firstRev = (await direct.get('/rubato/vm/vm3/owner'))!.modRevision;
    // ha renews: its key is written again, and the standby, asking for a whole TTL and a second, gets nothing.
    const refused = await gate.mayActivate({ reason: 'primary-lost', vm: 'vm3', replicaEpoch: 1, silentMs: 0 });
    assert.equal(refused.allow, false, refused.why);
    assert.match(refused.why, /ha holds it/);
    assert.ok((await direct.get('/rubato/vm/vm3/owner'))!.modRevision > firstRev, 'every renewal is a new revision');
    let lostAt = 0;
    a.watch(() => {
      lostAt = monotonicMs();
    });
    proxy.blackhole(); // ha goes silent to the witness (a crash, a stall): its key stays at one revision
    const v = await gate.mayActivate({ reason: 'primary-lost', vm: 'vm3', replicaEpoch: 1, silentMs: 0 });
    const claimedAt = monotonicMs();
    assert.equal(v.allow, true, v.why);
    assert.equal(v.generation, 2);
    assert.match(v.why, /over ha's unrenewed claim/, 'claimed over the revision, not after the expiry');
    assert.ok(lostAt > 0 && lostAt < claimedAt, 'ha had given up before hb claimed');
    assert.deepEqual(await currentOwner(direct, 'vm3'), { host: 'hb', generation: 2 });
    proxy.heal();
    assert.equal(await a.reclaim(), 'superseded', 'back, ha finds the newer generation');
    await gate.releaseAll();
  } finally {
    proxy.close();
    await etcd.stop();
    removeTempDir(dir);
  }
});

test('witness with the product commands: a cut replication link leaves one live copy (the primary); its crash then lets the standby take over', {
  timeout: 240_000,
}, async () => {
  const rig = await witnessRig('w1');
  const { etcd } = rig;
  const link = new CuttableProxy(0); // (aimed at the standby once it listens)
  const direct = new EtcdClient([etcd.url], 500);
  try {
    const { s, p, started } = await rig.pair(async (standbyPort) => {
      link.targetPort = standbyPort;
      return link.listen();
    });
    assert.equal(p.list.find((e) => e['event'] === 'owner')?.['generation'], 1);

    // Both hosts alive, the replication link cut: the standby loses its primary, but the witness says it lives.
    link.blackhole();
    await waitFor(
      () => s.list.find((e) => e['event'] === 'failover-refused'),
      20_000,
      'the standby refused to go live',
    );
    await waitFor(
      () => p.list.find((e) => e['event'] === 'unprotected'),
      20_000,
      'the primary running on, unprotected',
    );
    await sleep(2000);
    assert.equal(
      s.list.some((e) => e['event'] === 'failover'),
      false,
      'no second live copy',
    );
    assert.ok(alive(Number(started['qemuPid'])), "the primary's guest runs");
    assert.deepEqual(await currentOwner(direct, 'w1'), { host: 'ha', generation: 1 });

    // Now the primary host dies: its lease expires, and the standby (still asking) takes over.
    const killAt = Date.now();
    process.kill(Number(started['qemuPid']), 'SIGKILL');
    p.proc.kill('SIGKILL');
    const fo = await waitFor(
      () => s.list.find((e) => e['event'] === 'failover'),
      20_000,
      'the failover after the crash',
    );
    const ms = Number(fo['runningAtMs']) - killAt;
    assert.ok(ms < 5000, `took over ${ms} ms after the crash (lease TTL 2 s)`);
    assert.deepEqual(
      await currentOwner(direct, 'w1'),
      { host: 'hb', generation: 2 },
      'the standby holds the next generation',
    );
  } finally {
    link.close();
    await rig.cleanup();
  }
});

test('a primary paused past its lease (SIGSTOP of controller and QEMU) is taken over; resumed, it finds the newer generation and stops its guest (exit 8)', {
  timeout: 240_000,
}, async () => {
  const rig = await witnessRig('w3');
  const { etcd } = rig;
  let stopped: number[] = [];
  try {
    const { s, p, started } = await rig.pair();
    const qemu = Number(started['qemuPid']);
    // The whole primary side freezes (a frozen host, a long stall): no renewal, no heartbeat.
    stopped = [p.proc.pid, qemu];
    for (const pid of stopped) process.kill(pid, 'SIGSTOP');
    const fo = await waitFor(() => s.list.find((e) => e['event'] === 'failover'), 30_000, 'the standby taking over');
    assert.deepEqual(await currentOwner(new EtcdClient([etcd.url], 500), 'w3'), { host: 'hb', generation: 2 });
    const eventsBefore = p.list.length;
    for (const pid of stopped) process.kill(pid, 'SIGCONT');
    stopped = [];
    const resumedAt = Date.now();
    const lost = await waitFor(
      () => p.list.find((e) => e['event'] === 'ownership-lost'),
      15_000,
      'the old primary giving up',
    );
    assert.match(String(lost['why']), /another copy took VM w3 over/);
    const exit = await p.proc.exited;
    assert.equal(exit.code, 8, 'RUBATO_VM_OWNED');
    assert.equal(alive(qemu), false, "the stale guest's QEMU is gone");
    assert.ok(Date.now() - resumedAt < 15_000);
    // Resumed, it acknowledged nothing new as the VM's holder: its frames were refused at the gate.
    assert.equal(
      p.list.slice(eventsBefore).some((e) => e['event'] === 'owner'),
      false,
      'it never held the VM again',
    );
    assert.ok(Number(fo['runningAtMs']) > 0);
  } finally {
    for (const pid of stopped) process.kill(pid, 'SIGCONT');
    await rig.cleanup();
  }
});

test('QEMU killed on a live primary host: its controller gives the lease up and tells the standby, which runs the guest without waiting for silence or the TTL', {
  timeout: 240_000,
}, async () => {
  const rig = await witnessRig('w4');
  const { etcd } = rig;
  try {
    const { s, p, started } = await rig.pair();
    const killAt = Date.now();
    process.kill(Number(started['qemuPid']), 'SIGKILL');
    const lost = await waitFor(
      () => p.list.find((e) => e['event'] === 'guest-lost'),
      10_000,
      'the controller seeing QEMU die',
    );
    assert.match(String(lost['why']), /QEMU died on this host/);
    const fo = await waitFor(() => s.list.find((e) => e['event'] === 'failover'), 20_000, 'the standby taking over');
    const lostAt = s.list.find((e) => e['event'] === 'primary-lost');
    assert.ok(lostAt, "declared lost on the primary's word");
    // On the primary's word, not its silence: no liveness timeout (500 ms) or lease TTL (2 s) waited out.
    // Its word comes over the link ("QEMU died there") or, when the link closes first, as the lease
    // it gave up in the witness (the standby looks there at once): both are the primary's own word.
    assert.match(String(lostAt['reason']), /QEMU died there|it gave the VM up in the witness/);
    const detectMs = Number(lostAt['atMs']) - killAt;
    process.stderr.write(
      `QEMU killed: standby running the guest ${Number(fo['runningAtMs']) - killAt} ms after the kill (declared lost after ${detectMs} ms)\n`,
    );
    // The standby holds the VM at a generation past the primary's last claim. Not always the next
    // one: in loaded runs it held generation 3 over the primary's 1 (it claimed twice; see the note).
    const primaryGen = Math.max(...p.list.filter((e) => e['event'] === 'owner').map((e) => Number(e['generation'])));
    const owner = await currentOwner(new EtcdClient([etcd.url], 500), 'w4');
    assert.equal(owner?.host, 'hb');
    assert.ok(
      Number(owner?.generation) > primaryGen,
      `generation ${owner?.generation} after the primary's ${primaryGen}`,
    );
    assert.notEqual((await p.proc.exited).code, 0, 'the controller exits with an error');
  } finally {
    await rig.cleanup();
  }
});

test('the controller killed on a live primary host: QEMU dies with it, the lease sentinel revokes the lease, and the standby takes over without waiting for silence or the claim wait', {
  timeout: 240_000,
}, async () => {
  const rig = await witnessRig('w5');
  const { etcd } = rig;
  try {
    const { s, p, started } = await rig.pair();
    const qemu = Number(started['qemuPid']);
    // the standby's spare: a restore's QEMU started ahead, waiting for a failover
    await waitFor(() => s.list.find((e) => e['event'] === 'spare-ready'), 60_000, "the standby's spare");
    const killAt = Date.now();
    p.proc.kill('SIGKILL'); // the controller only; its host lives
    const fo = await waitFor(() => s.list.find((e) => e['event'] === 'failover'), 20_000, 'the standby taking over');
    assert.equal(alive(qemu), false, "the primary's QEMU died with its controller");
    const lostAt = s.list.find((e) => e['event'] === 'primary-lost');
    assert.match(
      String(lostAt?.['reason']),
      /gave the VM up in the witness/,
      'declared lost on the witness, not silence',
    );
    assert.match(
      String(fo['why'] ?? ''),
      /generation 2(?! over)/,
      'a plain claim (the key was gone), not one over an unrenewed key',
    );
    assert.equal(fo['spare'], true, 'the restore took a QEMU started ahead (the spare), not a fresh one');
    process.stderr.write(
      `controller killed: standby running the guest ${Number(fo['runningAtMs']) - killAt} ms after the kill (declared lost after ${Number(lostAt?.['atMs']) - killAt} ms, its failover began after ${Number(fo['detectedAtMs']) - killAt} ms, then ${JSON.stringify(fo['phasesMs'])})\n`,
    );
    assert.deepEqual(await currentOwner(new EtcdClient([etcd.url], 500), 'w5'), { host: 'hb', generation: 2 });
  } finally {
    await rig.cleanup();
  }
});

test('witness unavailable: a healthy protected pair keeps running (nobody goes live, nobody stops)', {
  timeout: 240_000,
}, async () => {
  const rig = await witnessRig('w2');
  const { etcd } = rig;
  try {
    const { s, p, started } = await rig.pair();
    await etcd.stop();
    await waitFor(
      () => p.list.find((e) => e['event'] === 'witness-lost'),
      10_000,
      'the primary noticing the witness is gone',
    );
    const acked = p.list.filter((e) => e['event'] === 'acked').length;
    await sleep(4000); // twice the lease TTL
    assert.ok(alive(Number(started['qemuPid'])), 'the guest runs on');
    assert.ok(p.list.filter((e) => e['event'] === 'acked').length > acked + 10, 'checkpoints still acknowledged');
    assert.equal(
      p.list.some((e) => e['event'] === 'ownership-lost'),
      false,
    );
    assert.equal(
      s.list.some((e) => e['event'] === 'failover' || e['event'] === 'primary-lost'),
      false,
    );
    p.proc.kill('SIGTERM');
    assert.equal((await p.proc.exited).code, 0, 'an orderly stop still exits 0');
  } finally {
    await rig.cleanup();
  }
});

/** A local etcd, a key and a small test-guest VM definition; cleanup() ends and removes them all. */
async function witnessRig(vm: string) {
  const { guest } = await testPlatform();
  const dir = makeTempDir('rubato-witness-live-');
  let etcd: LocalEtcd;
  try {
    etcd = await LocalEtcd.start(dir);
  } catch (e) {
    removeTempDir(dir);
    throw e;
  }
  const key = join(dir, 'psk');
  writeKeyFile(key);
  const vmFile = join(dir, 'vm.json');
  writeFileSync(
    vmFile,
    JSON.stringify({
      name: vm,
      memoryMiB: 128,
      boot: {
        kernel: guest.kernel,
        initrd: guest.initrd,
        append: 'console=ttyS0 quiet panic=-1 rubato.wl=dirtier,1,4',
      },
    }),
  );
  const common = [
    '--key',
    key,
    '--events',
    '--etcd',
    etcd.url,
    '--lease-ttl',
    '2',
    '--heartbeat-ms',
    '50',
    '--timeout-ms',
    '500',
  ];
  const procs: TrackedProcess[] = [];
  /**
   * A protected pair of the product commands: `rubato standby` (hb) and `rubato protect` (ha), its
   * link through `via` when given (a proxy in front of the standby's port); resolves once protected.
   */
  const pair = async (via?: (standbyPort: number) => Promise<number>) => {
    const portB = 20000 + Math.floor(Math.random() * 20000);
    const sb = events('rubato-standby', [
      'standby',
      '--stop-timeout',
      '2',
      '--listen',
      `127.0.0.1:${portB}`,
      '--state-dir',
      join(dir, 'b'),
      '--no-fsync',
      '--host',
      'hb',
      ...common,
    ]);
    procs.push(sb.proc);
    await waitFor(() => sb.list.find((e) => e['event'] === 'listening'), 30_000, 'the standby listening');
    const port = via ? await via(portB) : portB;
    const pr = events('rubato-protect', [
      'protect',
      '--stop-timeout',
      '2',
      vmFile,
      '--standby',
      `127.0.0.1:${port}`,
      '--state-dir',
      join(dir, 'a'),
      '--host',
      'ha',
      '--policy',
      'fixed:50',
      ...common,
    ]);
    procs.unshift(pr.proc); // (stopped first: the standby is told, and does not take over)
    const started = await waitFor(() => pr.list.find((e) => e['event'] === 'started'), 60_000, 'the VM');
    await waitFor(() => pr.list.find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 3), 120_000, 'protected');
    return { s: sb, p: pr, started };
  };
  return {
    dir,
    etcd,
    vmFile,
    common,
    pair,
    cleanup: async () => {
      for (const p of procs) await p.stop(5000);
      await etcd.stop();
      removeTempDir(dir);
    },
  };
}

function events(name: string, args: string[]): { proc: TrackedProcess; list: Ev[] } {
  const r = rubatoProcess(name, args, 'error');
  return { proc: r.proc, list: r.events };
}
