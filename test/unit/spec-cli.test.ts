import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { qemuArgs, guestAppend, VmSpecSchema } from '../../src/qemu/spec.ts';
import { diffPages } from '../../src/capture/verify.ts';
import { REPO_ROOT } from '../../src/setup/setup.ts';

test('VM spec gives a deterministic command line with shared RAM', () => {
  const spec = VmSpecSchema.parse({
    name: 'vm1',
    accel: 'tcg',
    cpus: 2,
    memMb: 128,
    ramFile: '/dev/shm/x',
    kernel: 'k',
    initrd: 'i',
    append: guestAppend(['dirtier', 10, 16]),
  });
  const a = qemuArgs(
    spec,
    { qmpSocket: 'q', serialSocket: 's', firmwareDirs: ['/usr/share/qemu'] },
    { paused: true, incoming: true },
  );
  assert.deepEqual(
    a,
    qemuArgs(
      spec,
      { qmpSocket: 'q', serialSocket: 's', firmwareDirs: ['/usr/share/qemu'] },
      { paused: true, incoming: true },
    ),
  );
  assert.ok(a.includes('memory-backend-file,id=mem0,size=128M,mem-path=/dev/shm/x,share=on'));
  assert.ok(a.includes('-S') && a.includes('defer'));
  assert.equal(a[a.indexOf('-smp') + 1], '2');
  assert.match(a[a.indexOf('-append') + 1]!, /rubato\.wl=dirtier,10,16/);
  assert.throws(() => VmSpecSchema.parse({ ...spec, name: 'bad name!' }));
});

test('the replica comparison finds exactly the corrupted page (negative control)', () => {
  const a = Buffer.alloc(64 * 4096, 3);
  const b = Buffer.from(a);
  assert.deepEqual(diffPages(a, b), []);
  b[17 * 4096 + 4095] = 4;
  assert.deepEqual(diffPages(a, b), [17 * 4096]);
});

test('CLI: a config mistake is one clear line and exit 2, never a stack trace', () => {
  for (const args of [
    ['capture-check', '--route', 'c'],
    ['capture-check', '--mem', 'lots'],
    ['bench', 'nosuch'],
    ['simulate', '--policy', 'model'],
    ['simulate', '--trace', '/nonexistent/trace.json'],
    ['bench', 'scheduler', '--workloads', 'kv,nope'],
  ]) {
    const r = spawnSync(join(REPO_ROOT, 'bin', 'rubato'), args, { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    assert.match(r.stderr, /--route|--mem|unknown benchmark|--trace FILE|cannot read trace|--workloads: unknown nope/);
  }
});

test('several disks (virtio and scsi) and NICs: one NBD export and one relay each, the first disk boots', () => {
  const spec = VmSpecSchema.parse({
    name: 'multi',
    accel: 'tcg',
    cpus: 1,
    memMb: 256,
    disk: true,
    disks: [{ bus: 'virtio' }, { bus: 'scsi' }, { bus: 'virtio' }],
    mac: '52:54:00:00:00:01',
    bridge: 'br0',
    nics: [
      { mac: '52:54:00:00:00:01', bridge: 'br0' },
      { mac: '52:54:00:00:00:02', bridge: 'br1', vlan: 20 },
    ],
  });
  const paths = {
    qmpSocket: 'q',
    serialSocket: 's',
    firmwareDirs: [],
    netSockets: ['n0', 'n1'],
    nbdSockets: ['d0', 'd1', 'd2'],
  };
  const a = qemuArgs(spec, paths, { paused: false, incoming: false }).join(' ');
  assert.match(
    a,
    /node-name=disk0,server\.type=unix,server\.path=d0,export=disk -device virtio-blk-pci,drive=disk0,bootindex=1/,
  );
  assert.match(a, /-device virtio-scsi-pci,id=scsi0/);
  assert.match(a, /server\.path=d1,export=disk -device scsi-hd,drive=disk1,bus=scsi0\.0 /);
  assert.match(a, /server\.path=d2,export=disk -device virtio-blk-pci,drive=disk2$/);
  assert.match(a, /stream,id=n0,.*addr\.path=n0 -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01/);
  assert.match(a, /stream,id=n1,.*addr\.path=n1 -device virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02/);
  assert.throws(() => qemuArgs(spec, { ...paths, nbdSockets: ['d0'] }, { paused: false, incoming: false }), /3 disks/);
  assert.throws(() => qemuArgs(spec, { ...paths, netSockets: ['n0'] }, { paused: false, incoming: false }), /2 NICs/);
});
