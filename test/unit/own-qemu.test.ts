import { test } from 'node:test';
import assert from 'node:assert/strict';
import { incomingArgv, ownQemuArgs, ownTapName, qmpPathOf, tapsOf } from '../../src/host/own-qemu.ts';
import { VmSpecSchema } from '../../src/qemu/spec.ts';

test("an owner's QEMU command line: where its QMP socket is, which TAPs it names, how it is started again waiting for the guest", () => {
  assert.equal(qmpPathOf(['qemu', '-qmp', 'unix:/run/vm.qmp,server=on,wait=off']), '/run/vm.qmp');
  assert.equal(qmpPathOf(['qemu', '-qmp-pretty', 'unix:rel.qmp']), 'rel.qmp');
  assert.equal(
    qmpPathOf([
      'qemu',
      '-chardev',
      'socket,id=mon0,path=/run/m.sock,server=on,wait=off',
      '-mon',
      'chardev=mon0,mode=control',
    ]),
    '/run/m.sock',
  );
  assert.equal(
    qmpPathOf(['qemu', '-chardev', 'socket,id=c,path=/x', '-mon', 'chardev=c,mode=readline']),
    null,
    'an HMP monitor is no QMP',
  );
  assert.equal(qmpPathOf(['qemu', '-qmp', 'tcp:127.0.0.1:4444']), null);
  assert.deepEqual(
    tapsOf(['qemu', '-netdev', 'tap,id=n0,ifname=tap0,script=no', '-netdev', 'user,id=u', '-netdev', 'tap,id=n1,fd=3']),
    ['tap0'],
  );
  assert.deepEqual(
    incomingArgv(['/usr/bin/qemu', '-S', '-m', '128M', '-daemonize', '-incoming', 'tcp:0:4444', '-smp', '1']),
    ['-m', '128M', '-smp', '1', '-incoming', 'defer'],
  );
});

test("an adoptable command line is Rubato's machine with the VM's own image files and TAPs without offloads", () => {
  const spec = VmSpecSchema.parse({
    name: 'web',
    accel: 'tcg',
    cpus: 1,
    memMb: 128,
    kernel: '/k',
    mac: '52:54:00:00:00:01',
    bridge: 'br0',
    disk: true,
  });
  const tap = ownTapName('web', 0);
  assert.ok(tap.length <= 15, 'a Linux interface name');
  assert.notEqual(tap, ownTapName('web', 1));
  const args = ownQemuArgs(spec, { qmpSocket: '/q', serialSocket: '/s', diskFiles: ['/img'], taps: [tap] }).join(' ');
  assert.match(args, new RegExp(`-netdev tap,id=n0,ifname=${tap},script=no,downscript=no,vnet_hdr=off`));
  assert.match(args, /-blockdev driver=file,node-name=disk0,filename=\/img -device virtio-blk-pci,drive=disk0/);
  assert.match(args, /memory-backend-ram,id=mem0,size=128M/);
  assert.doesNotMatch(args, / -S\b| -incoming /, 'it runs the guest');
});
