// Many VMs on many hosts: `rubato agent` on three namespace hosts, one etcd, two small VMs added
// with `rubato vm add`. The agents place, boot and protect them; a host is drained (switchover, no
// lost write) and let back in; then a host that runs a VM and holds another's standby is killed,
// and the agents fail over, re-place the standbys and re-protect everything with no operator.
// Plus the cluster commands' answers to bad input, on a real etcd.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { runClusterDemo } from '../../src/chaos/cluster-demo.ts';
import { liveProcesses, runCommand } from '../../src/util/procs.ts';
import { liveTempDirs, makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { liveNamespaces } from '../../src/io/net/netns.ts';
import { ensurePackages } from '../../src/setup/setup.ts';
import { LocalEtcd } from '../../src/coord/local-etcd.ts';
import { RUBATO_BIN } from '../helpers/rubato.ts';

test('agents: three hosts, two VMs placed and protected; a drain moves them with no lost write; a host killed, all running and protected again', {
  timeout: 900_000,
}, async () => {
  const r = await runClusterDemo(
    { hosts: 3, vms: 2, seconds: 3, heartbeatMs: 100, timeoutMs: 1000, leaseTtl: 1, policy: 'model', drain: true },
    (l) => process.stderr.write(`${l}\n`),
  );
  process.stderr.write(`cluster: ${JSON.stringify(r)}\n`);
  assert.equal(r.error, undefined);
  // Placement spreads: no host runs or stands by for both VMs at once.
  const before = r.before;
  assert.equal(new Set(before.map((b) => b.primary)).size, 2, 'the two VMs run on different hosts');
  assert.equal(new Set(before.map((b) => b.standby)).size, 2, 'no host is standby for all');
  for (const b of before) assert.notEqual(b.primary, b.standby);
  assert.ok(r.drained, 'drained');
  for (const a of r.drained.after)
    assert.ok(a.primary !== r.drained.host && a.standby !== r.drained.host, `${a.vm} left ${r.drained.host}`);
  assert.ok(r.hostKilled);
  for (const a of r.after) {
    assert.notEqual(a.primary, r.hostKilled);
    assert.notEqual(a.standby, r.hostKilled);
    assert.equal(a.state, 'protected');
  }
  assert.ok(
    r.after.some((a) => a.generation >= 2),
    'a VM failed over (its generation advanced)',
  );
  assert.equal(r.allRunning, true);
  assert.equal(r.allProtected, true);
  assert.ok(r.acknowledged > 50, `acknowledged ${r.acknowledged}`);
  assert.equal(r.lost, 0);
});

test('cluster commands: a VM added twice, an unknown host drained, a missing witness: one line each, distinct from success', {
  timeout: 120_000,
}, async () => {
  await ensurePackages();
  const dir = makeTempDir('rubato-vmcli-');
  const etcd = await LocalEtcd.start(join(dir, 'etcd'));
  try {
    const disk = join(dir, 'd.img');
    writeFileSync(disk, Buffer.alloc(1 << 20));
    const file = join(dir, 'vm.json');
    writeFileSync(
      file,
      JSON.stringify({ name: 'web', memoryMiB: 128, disks: [{ path: 'd.img' }], boot: { from: 'disk' } }),
    );
    const rubato = (args: string[]) => runCommand(RUBATO_BIN, args);
    const add = await rubato(['vm', 'add', file, '--etcd', etcd.url]);
    assert.equal(add.code, 0, add.stderr);
    const again = await rubato(['vm', 'add', file, '--etcd', etcd.url]);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /^rubato: VM web is already in the cluster/);
    assert.equal(again.stderr.trim().split('\n').length, 1);
    const list = await rubato(['vm', 'list', '--etcd', etcd.url, '--json']);
    assert.equal(list.code, 0, list.stderr);
    const rows = JSON.parse(list.stdout) as Array<{ vm: string; state: string; primary: string | null }>;
    assert.deepEqual(
      rows.map((x) => [x.vm, x.primary, x.state]),
      [['web', null, 'unplaced (no host up)']],
    );
    const drain = await rubato(['host', 'drain', 'nohost', '--etcd', etcd.url]);
    assert.equal(drain.code, 2);
    assert.match(drain.stderr, /^rubato: no agent named nohost is up/);
    const noEtcd = await rubato(['vm', 'list', '--etcd', 'http://127.0.0.1:9']);
    assert.notEqual(noEtcd.code, 0);
    assert.match(noEtcd.stderr, /^rubato: etcd http:\/\/127\.0\.0\.1:9: /);
    assert.equal(noEtcd.stderr.trim().split('\n').length, 1);
    const badAgent = await rubato(['agent', '--etcd', etcd.url, '--address', 'not-an-ip', '--key', file]);
    assert.equal(badAgent.code, 2);
    assert.match(badAgent.stderr, /^rubato: --address: /);
  } finally {
    await etcd.stop();
    removeTempDir(dir);
  }
});

after(() => {
  assert.deepEqual(liveProcesses(), [], 'no process left running');
  assert.deepEqual(liveTempDirs(), [], 'no temp folder left behind');
  assert.deepEqual(liveNamespaces(), [], 'no namespace left behind');
});
