// A VM across its controllers' lives, with the product commands on a two-host LAN and the witness:
// the KV guest (every SET fsynced to its disk before OK) with two disks (the second written raw,
// a counter in its first sector) and two NICs (the second on another LAN, reached only through
// its own bridge), protected by `rubato protect` on A and `rubato standby --peer` on B. A's controller restarted by its unit brings the VM back from its
// disk; A dies; B runs the VM; B's controller stopped (SIGTERM: the guest shut down) and started
// again brings the VM back on B from the disk there, with every acknowledged write, as the same
// witness generation — never as a second copy.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { existsSync, writeFileSync } from 'node:fs';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { runCommand, type TrackedProcess } from '../../src/util/procs.ts';
import { waitFor } from '../../src/util/async.ts';
import { Lan } from '../../src/io/net/lan.ts';
import { ip } from '../../src/io/net/netns.ts';
import { LocalEtcd } from '../../src/coord/local-etcd.ts';
import { EtcdClient } from '../../src/coord/etcd.ts';
import { currentOwner } from '../../src/coord/ownership.ts';
import { writeKeyFile } from '../../src/replication/keyfile.ts';
import { guestAppend } from '../../src/qemu/spec.ts';
import { clientProcess } from '../../src/chaos/kv-rig.ts';
import { ensureTapRelay } from '../../src/setup/setup.ts';
import { testPlatform } from '../helpers/platform.ts';
import { RUBATO_BIN, rubatoProcess, type Ev } from '../helpers/rubato.ts';

test("a VM's life: its controller restarted on either host brings it back from its disk with every acknowledged write, never as a second copy", {
  timeout: 600_000,
}, async () => {
  const { guest } = await testPlatform();
  await ensureTapRelay();
  const dir = makeTempDir('rubato-life-');
  const procs: TrackedProcess[] = [];
  let lan: Lan | null = null;
  let lan2: Lan | null = null;
  let etcd: LocalEtcd | null = null;
  try {
    lan = await Lan.create('life');
    const l = lan;
    const [ha, hb] = [await l.addHost('ha'), await l.addHost('hb')];
    etcd = await LocalEtcd.start(join(dir, 'witness'), { host: await l.attachRoot(200) });
    // The second NIC's segment: its own LAN and client, joined by a second bridge on each host.
    lan2 = await Lan.create('life2');
    const l2 = lan2;
    for (const h of [ha, hb]) await l2.attachHost(h, 'brn2');
    const disk = join(dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(32 << 20));
    // ext4: its journal keeps the file system's own metadata whole when a guest is powered off (the
    // test guest ignores ACPI; ext2 without fsck then hands out blocks it had already used).
    assert.equal((await runCommand('mkfs.ext4', ['-q', '-F', disk])).code, 0);
    const disk2 = join(dir, 'raw.img');
    writeFileSync(disk2, Buffer.alloc(4 << 20));
    const key = join(dir, 'psk');
    writeKeyFile(key);
    const vmFile = join(dir, 'life.json');
    writeFileSync(
      vmFile,
      JSON.stringify({
        name: 'life',
        memoryMiB: 128,
        disks: [{ path: disk }, { path: disk2 }],
        nics: [
          { bridge: ha.bridge, mac: '52:54:00:ab:cd:41' },
          { bridge: 'brn2', mac: '52:54:00:ab:cd:42' },
        ],
        boot: {
          kernel: guest.kernel,
          initrd: guest.initrd,
          append: guestAppend(['kvd', 7000, '/data/kv.log'], {
            ip: `${l.guestIp}/24`,
            disk: 'vda',
            ip2: `${l2.guestIp}/24`,
            rawDisk: 'vdb',
          }),
        },
      }),
    );
    const common = ['--key', key, '--etcd', etcd.url, '--heartbeat-ms', '100', '--timeout-ms', '1000'];
    common.push('--stop-timeout', '3', '--events');
    const run = (name: string, ns: string, args: string[]) => {
      const p = rubatoProcess(name, [...args, ...common], 'warn', ns);
      procs.push(p.proc);
      return p;
    };
    const standbyArgs = ['standby', '--host', 'hb', '--listen', `${hb.ip}:7400`, '--peer', `${ha.ip}:7400`];
    standbyArgs.push('--state-dir', join(dir, 'hb'));
    const protectArgs = [
      'protect',
      vmFile,
      '--host',
      'ha',
      '--standby',
      `${hb.ip}:7400`,
      '--state-dir',
      join(dir, 'ha'),
    ];
    const event = (p: { events: Ev[] }, f: (e: Ev) => boolean, ms: number, what: string) =>
      waitFor(() => p.events.find(f), ms, what, 100);
    const kvReady = (e: Ev) => e['event'] === 'guest' && /RUBATO kvd ready/.test(String(e['line']));
    // Key → the value last acknowledged (each load's client numbers its keys from 0: a later load overwrites).
    const acked = new Map<string, string>();
    let loads = 0;
    // Writes through both NICs at once (each its own LAN), keys apart per NIC and per load.
    const load = async (seconds: number) => {
      loads++;
      const cs = [l, l2].map((lan_, i) =>
        clientProcess(lan_, [
          '--target',
          `${lan_.guestIp}:7000`,
          '--seconds',
          String(seconds),
          '--conns',
          '2',
          '--prefix',
          `n${i}l${loads}`,
        ]),
      );
      for (const [i, c] of cs.entries()) {
        await c.done;
        const acks = c.events.filter((e) => e.type === 'ack');
        assert.ok(
          acks.length > 0,
          `writes acknowledged through NIC ${i} in ${seconds} s (${JSON.stringify(c.events.slice(-3))} ${c.stderr()})`,
        );
        for (const a of acks) acked.set(a.key!, a.value!);
      }
    };
    // The second disk's counter as the guest read it back at boot.
    const rawRead = async (p: { events: Ev[] }, what: string) => {
      const e = await event(
        p,
        (x) => x['event'] === 'guest' && /RUBATO rawdisk vdb read=\d+/.test(String(x['line'])),
        60_000,
        what,
      );
      return Number(/read=(\d+)/.exec(String(e['line']))![1]);
    };
    const verify = async () => {
      const f = join(dir, `acked-${acked.size}.jsonl`);
      writeFileSync(f, `${[...acked].map(([key, value]) => JSON.stringify({ key, value })).join('\n')}\n`);
      const c = clientProcess(l, ['--target', `${l.guestIp}:7000`, '--verify', f]);
      await c.done;
      const v = c.events.find((e) => e.type === 'verify');
      assert.ok(v, `the read-back ran: ${JSON.stringify(c.events.slice(-3))} ${c.stderr()}`);
      assert.deepEqual(v.missing, [], `every acknowledged write is there (${v.checked} checked)`);
      return v.checked ?? 0;
    };
    const generation = async () => (await currentOwner(new EtcdClient([etcd!.url]), 'life'))?.generation ?? 0;

    const sb = run('standby-b', hb.ns, standbyArgs);
    await event(sb, (e) => e['event'] === 'listening', 30_000, 'the standby listening');
    let a = run('protect-a', ha.ns, protectArgs);
    await event(a, kvReady, 90_000, 'the KV service on A');
    await event(a, (e) => e['event'] === 'protecting', 120_000, 'protection');
    await load(3);

    // A's unit restarts its controller (SIGTERM, then the same command): the VM boots from its disk on A.
    a.proc.kill('SIGTERM');
    assert.equal((await a.proc.exited).code, 0, 'an orderly stop');
    a = run('protect-a-again', ha.ns, protectArgs);
    await event(a, kvReady, 90_000, 'the KV service on A again');
    const readA = await rawRead(a, "the second disk's counter on A");
    assert.ok(readA > 0, `the second disk kept its writes across the restart (read ${readA})`);
    await event(a, (e) => e['event'] === 'protecting', 120_000, 'protection again');
    assert.ok((await verify()) > 0);
    await load(3);
    const genA = await generation();

    // Host A dies: B takes over.
    await ip(['-n', ha.ns, 'link', 'set', ha.uplink, 'down']);
    const startedA = await event(a, (e) => e['event'] === 'started', 1000, "A's QEMU");
    process.kill(Number(startedA['qemuPid']), 'SIGKILL');
    a.proc.kill('SIGKILL');
    await event(sb, (e) => e['event'] === 'failover', 60_000, 'the failover');
    await load(3);
    const genB = await generation();
    assert.ok(genB > genA, 'B holds a newer generation');
    assert.ok(existsSync(join(dir, 'hb', 'vm', 'active.json')), 'B records the VM that runs there');

    // B's controller stops in order (the guest shut down), then starts again: the VM comes back on B.
    sb.proc.kill('SIGTERM');
    assert.equal((await sb.proc.exited).code, 0, "an orderly stop of B's controller");
    const again = run('standby-b-again', hb.ns, standbyArgs);
    const resumed = await event(again, (e) => e['event'] === 'resumed', 60_000, 'the VM brought back on B');
    assert.equal(resumed['generation'], genB + 1, 'claimed again from the generation B held, no other copy between');
    await event(again, kvReady, 90_000, 'the KV service on B again');
    const readB = await rawRead(again, "the second disk's counter on B");
    assert.ok(
      readB > readA,
      `the second disk's writes on A and after the failover are on B's disk (${readA} → ${readB})`,
    );
    const checked = await verify();
    assert.equal(checked, acked.size);
    const st = await runCommand('ip', [
      'netns',
      'exec',
      hb.ns,
      RUBATO_BIN,
      'status',
      '--state-dir',
      join(dir, 'hb'),
      '--json',
    ]);
    assert.equal(st.code, 0, st.stderr);
    const status = JSON.parse(st.stdout) as Ev;
    assert.equal(status['role'], 'primary');
    assert.equal(status['running'], true);
    assert.equal(status['generation'], genB + 1);

    // The old host's unit runs protect again: its disk is stale (exit 8), no copy starts.
    await ip(['-n', ha.ns, 'link', 'set', ha.uplink, 'up']);
    const stale = run('protect-a-stale', ha.ns, protectArgs);
    const ended = await stale.proc.exited;
    assert.equal(ended.code, 8);
    assert.equal(
      stale.events.some((e) => e['event'] === 'started'),
      false,
    );

    // `rubato stop` ends B's controller in order.
    const stop = await runCommand('ip', [
      'netns',
      'exec',
      hb.ns,
      RUBATO_BIN,
      'stop',
      'life',
      '--state-dir',
      join(dir, 'hb'),
    ]);
    assert.equal(stop.code, 0, stop.stderr);
    assert.equal((await again.proc.exited).code, 0);
  } finally {
    for (const p of procs.reverse()) await p.stop(5000);
    await etcd?.stop();
    await lan2?.destroy();
    await lan?.destroy();
    removeTempDir(dir);
  }
});
