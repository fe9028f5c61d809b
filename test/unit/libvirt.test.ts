import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseDomainXml, networkBridgeOf } from '../../src/qemu/libvirt.ts';
import { isRubatoError } from '../../src/util/errors.ts';

const domain = (devices: string, os = "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>") =>
  `<domain type='kvm'><name>web1</name><memory unit='KiB'>1048576</memory><currentMemory unit='KiB'>524288</currentMemory>
   <vcpu placement='static'>4</vcpu>${os}<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>${devices}</devices></domain>`;
const rootDisk =
  "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/web1.qcow2'/><target dev='vda' bus='virtio'/></disk>";

test('libvirt import: cpus, memory, disks with their format and bus, NICs with MAC and VLAN, a network as its bridge', () => {
  const { def, notes } = parseDomainXml(
    domain(
      `${rootDisk}
       <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/srv/data.img'/><target dev='sda' bus='scsi'/></disk>
       <disk type='file' device='disk'><source file='/srv/old.img'/><target dev='hda' bus='ide'/></disk>
       <interface type='bridge'><mac address='52:54:00:AA:00:01'/><source bridge='br0'/><vlan><tag id='42'/></vlan><model type='virtio'/></interface>
       <interface type='network'><mac address='52:54:00:aa:00:02'/><source network='default'/><model type='e1000'/></interface>
       <interface type='network'><source network='nowhere'/></interface>
       <interface type='direct'><source dev='eth0' mode='bridge'/></interface>
       <controller type='usb'/><memballoon model='virtio'/>`,
    ),
    'web1.xml',
    (net) => (net === 'default' ? 'virbr0' : null),
  );
  assert.equal(def.name, 'web1');
  assert.equal(def.cpus, 4);
  assert.equal(def.memoryMiB, 512, 'the current memory, not the maximum');
  assert.equal(def.accelerator, 'auto');
  assert.equal(def.firmware, 'bios');
  assert.deepEqual(def.disks, [
    { path: '/srv/web1.qcow2', bus: 'virtio', format: 'qcow2' },
    { path: '/srv/data.img', bus: 'scsi', format: 'raw' },
    { path: '/srv/old.img', bus: 'virtio' },
  ]);
  assert.deepEqual(def.nics, [
    { bridge: 'br0', mac: '52:54:00:aa:00:01', vlan: 42 },
    { bridge: 'virbr0', mac: '52:54:00:aa:00:02' },
  ]);
  assert.deepEqual(def.boot, { from: 'disk' });
  const said = (re: RegExp) =>
    assert.ok(
      notes.some((n) => re.test(n)),
      `${re} in ${JSON.stringify(notes)}`,
    );
  said(/disk hda: on bus ide, carried as virtio-blk/);
  said(/libvirt network default carried as its bridge virbr0/);
  said(/model e1000 carried as virtio-net/);
  said(/libvirt network nowhere has no bridge/);
  said(/type direct is not carried/);
  assert.equal(notes.length, 5, 'controllers and the balloon are not worth a line');
});

test('libvirt import: firmware, its variable store, a direct kernel boot; what cannot be carried is one line each', () => {
  const { def, notes } = parseDomainXml(
    domain(
      `<disk type='file' device='cdrom'><target dev='sdb' bus='sata'/><readonly/></disk>
       <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdb' bus='virtio'/></disk>
       <hostdev mode='subsystem' type='pci'/><filesystem type='mount'/><tpm model='tpm-crb'/><graphics type='vnc'/>
       <video><model type='qxl'/></video><audio id='1' type='none'/><serial type='pty'/>`,
      `<os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
         <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
         <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
         <kernel>/boot/vmlinuz</kernel><initrd>/boot/initrd.img</initrd><cmdline>console=ttyS0 root=/dev/vda</cmdline></os>`,
    ),
    'web1.xml',
  );
  assert.equal(def.firmware, 'uefi');
  assert.equal(def.uefiVars, '/var/lib/libvirt/qemu/nvram/web1_VARS.fd');
  assert.deepEqual(def.boot, {
    kernel: '/boot/vmlinuz',
    initrd: '/boot/initrd.img',
    append: 'console=ttyS0 root=/dev/vda',
  });
  assert.deepEqual(def.disks, []);
  for (const re of [
    /Secure Boot: not carried/,
    /machine pc-q35-7\.2: the VM runs on the pc/,
    /cdrom sdb: not carried/,
    /disk vdb: not carried \(a block disk/,
    /hostdev: not carried: a passthrough device/,
    /filesystem: not carried: a shared host folder/,
    /tpm: not carried/,
    /graphics: not carried: a protected VM runs headless/,
    /video: not carried/,
  ])
    assert.ok(
      notes.some((n) => re.test(n)),
      `${re} in ${JSON.stringify(notes)}`,
    );
  assert.equal(notes.length, 9);
});

test('libvirt import: a domain Rubato cannot run is a typed one-line error, never a crash', () => {
  const refused = (xml: string, re: RegExp) =>
    assert.throws(
      () => parseDomainXml(xml, 'd.xml'),
      (e: unknown) =>
        isRubatoError(e, 'RUBATO_CONFIG') && re.test((e as Error).message) && !/\n/.test((e as Error).message),
      re.source,
    );
  refused('<domain><name>x', /d\.xml: not XML/);
  refused('<network><name>x</name></network>', /d\.xml: not a libvirt domain/);
  refused(domain(rootDisk).replace('<name>web1</name>', ''), /has no <name>/);
  refused(domain(rootDisk).replace('web1', 'bad name!'), /is not a Rubato VM name/);
  refused(domain(rootDisk).replace(/<vcpu[^<]*<\/vcpu>/, '<vcpu>0</vcpu>'), /<vcpu> 0: 1-64 CPUs/);
  refused(domain(rootDisk).replace(/<memory.*?<\/currentMemory>/s, ''), /has no <memory>/);
  refused(domain(rootDisk).replace("unit='KiB'>524288", "unit='parsecs'>1"), /<memory> 1 parsecs/);
  refused(domain(''), /nothing to boot/);
  refused(`<domain>${' '.repeat(1 << 20)}</domain>`, /too large/);
  // Entities are not expanded (no billion laughs): the name stays as written, and is no VM name.
  refused(
    `<!DOCTYPE domain [<!ENTITY a "web1">]>${domain(rootDisk).replace('<name>web1</name>', '<name>&a;</name>')}`,
    /"&a;" is not a Rubato VM name/,
  );
});

test("libvirt import: a network's bridge from its XML", () => {
  assert.equal(networkBridgeOf("<network><name>default</name><bridge name='virbr0' stp='on'/></network>"), 'virbr0');
  assert.equal(networkBridgeOf('<network><name>x</name></network>'), null);
  assert.equal(networkBridgeOf('not xml <'), null);
});
