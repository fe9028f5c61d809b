import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, ftruncateSync, writeFileSync, readFileSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { defaultMac, loadVmDefinition, parseVmDefinition } from '../../src/qemu/definition.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError, type RubatoError } from '../../src/util/errors.ts';
import { REPO_ROOT } from '../../src/setup/setup.ts';
import { specOf } from '../../src/host/protect.ts';
import { findOvmf, uefiVarsFor } from '../../src/host/firmware.ts';
import { VmSpecSchema, diskBuses, qemuArgs } from '../../src/qemu/spec.ts';

function sparse(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, bytes);
  closeSync(fd);
}

const refused = (re: RegExp) => (e: unknown) =>
  isRubatoError(e, 'RUBATO_CONFIG') && re.test((e as RubatoError).message);

test('VM definition: a disk-booted VM with a 20 GiB sparse image and a NIC is read, resolved and checked', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  sparse(join(dir, 'big.raw'), 20 * 2 ** 30);
  const file = join(dir, 'vm.json');
  writeFileSync(
    file,
    JSON.stringify({
      name: 'web1',
      memoryMiB: 2048,
      disks: [{ path: 'big.raw' }],
      nics: [{ bridge: 'br0' }],
      boot: { from: 'disk' },
    }),
  );
  const vm = loadVmDefinition(file);
  assert.equal(vm.cpus, 1);
  assert.equal(vm.accelerator, 'auto');
  assert.deepEqual(vm.disks, [{ path: join(dir, 'big.raw'), format: 'raw', sizeBytes: 20 * 2 ** 30, bus: 'virtio' }]);
  assert.equal(vm.nics[0]!.mac, defaultMac('web1'));
  assert.match(vm.nics[0]!.mac, /^52:54:00(:[0-9a-f]{2}){3}$/);
  assert.equal(defaultMac('web1'), defaultMac('web1'), 'the same name gets the same MAC');
});

test('VM definition: the qcow2 header decides the format; a wrong declared format is named', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const img = join(dir, 'a.qcow2');
  const head = Buffer.alloc(4096);
  head.write('QFI\xfb', 0, 'latin1');
  writeFileSync(img, head);
  const def = (format?: string) =>
    JSON.stringify({
      name: 'q',
      memoryMiB: 256,
      disks: [{ path: img, ...(format ? { format } : {}) }],
      boot: { from: 'disk' },
    });
  assert.equal(parseVmDefinition(def(), join(dir, 'q.json')).disks[0]!.format, 'qcow2');
  assert.throws(
    () => parseVmDefinition(def('raw'), join(dir, 'q.json')),
    refused(/q\.json: disks\[0\]\.format: says raw, but .* is qcow2/),
  );
});

test('VM definition: every mistake is one line naming the file and the field', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const f = join(dir, 'bad.json');
  const base = { name: 'ok', memoryMiB: 256, boot: { kernel: join(dir, 'k') } };
  writeFileSync(join(dir, 'k'), 'kernel');
  const cases: Array<[unknown, RegExp]> = [
    [{ ...base, name: 'bad name!' }, /bad\.json: name: must be 1-40/],
    [{ ...base, memoryMiB: 'lots' }, /bad\.json: memoryMiB: /],
    [
      { ...base, nics: [{ bridge: 'br0', mac: '01:00:5e:00:00:01' }] },
      /bad\.json: nics\[0\]\.mac: must be a unicast address/,
    ],
    [{ ...base, nics: [{ bridge: 'br0', mac: 'zz' }] }, /bad\.json: nics\[0\]\.mac: must be a MAC address/],
    [
      { ...base, disks: [{ path: 'missing.raw' }] },
      /bad\.json: disks\[0\]\.path: cannot use .*missing\.raw: no such file/,
    ],
    [
      { ...base, disks: Array.from({ length: 17 }, () => ({ path: 'k' })) },
      /bad\.json: disks: Rubato protects up to 16 disks per VM/,
    ],
    [{ ...base, disks: [{ path: 'k', bus: 'ide' }] }, /bad\.json: disks\[0\]\.bus: /],
    [
      {
        ...base,
        nics: [
          { bridge: 'br0', mac: '52:54:00:00:00:01' },
          { bridge: 'br1', mac: '52:54:00:00:00:01' },
        ],
      },
      /bad\.json: nics: two NICs have the same MAC address/,
    ],
    [{ ...base, nics: [{ bridge: 'br0', vlan: 5000 }] }, /bad\.json: nics\[0\]\.vlan: /],
    [{ ...base, boot: { from: 'disk' } }, /bad\.json: boot: boots from the disk, but the VM has no disk/],
    [{ ...base, boot: { from: 'network' } }, /bad\.json: boot: must be/],
    [{ ...base, colour: 'blue' }, /bad\.json: \(top level\): /],
    [{ ...base, boot: { kernel: 'nope' } }, /bad\.json: boot\.kernel: cannot use .*nope: no such file/],
    [{ ...base, firmware: 'coreboot' }, /bad\.json: firmware: /],
    [{ ...base, uefiVars: 'k' }, /bad\.json: uefiVars: is a UEFI variable store, but the VM boots through the BIOS/],
    [{ ...base, firmware: 'uefi', uefiVars: 'k' }, /bad\.json: uefiVars: .*not an OVMF variable store/],
    [{ ...base, cloudInit: { userData: 'gone' } }, /bad\.json: cloudInit\.userData: cannot use .*gone: no such file/],
    [{ ...base, cloudInit: { userData: 'big' } }, /bad\.json: cloudInit\.userData: .*larger than 1024 KiB/],
  ];
  sparse(join(dir, 'big'), 2 << 20);
  for (const [def, re] of cases) {
    writeFileSync(f, JSON.stringify(def));
    assert.throws(() => loadVmDefinition(f), refused(re), JSON.stringify(def));
  }
  writeFileSync(f, '{ "name": ');
  assert.throws(() => loadVmDefinition(f), refused(/bad\.json: \(file\): not JSON/));
  assert.throws(() => loadVmDefinition(join(dir, 'none.json')), refused(/none\.json: \(file\): cannot read it/));
});

test('VM definition: the examples parse (their images aside)', () => {
  for (const ex of ['web1.json', 'kernel-boot.json']) {
    const text = readFileSync(join(REPO_ROOT, 'examples', ex), 'utf8');
    // The shapes are valid: the only complaint is the image the example points at.
    assert.throws(() => parseVmDefinition(text, ex), refused(/disks\[0\]\.path: cannot use .*no such file/), ex);
  }
});

test('VM definition: several disks and NICs, each with its bus, bridge, VLAN and a stable MAC of its own', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  writeFileSync(join(dir, 'a.img'), Buffer.alloc(8192));
  writeFileSync(join(dir, 'b.img'), Buffer.alloc(8192));
  const d = parseVmDefinition(
    JSON.stringify({
      name: 'two',
      memoryMiB: 256,
      disks: [{ path: 'a.img' }, { path: 'b.img', bus: 'scsi' }],
      nics: [{ bridge: 'br0' }, { bridge: 'br1', vlan: 20 }],
      boot: { from: 'disk' },
    }),
    join(dir, 'two.json'),
  );
  assert.deepEqual(
    d.disks.map((x) => x.bus),
    ['virtio', 'scsi'],
  );
  assert.equal(d.nics.length, 2);
  assert.notEqual(d.nics[0]!.mac, d.nics[1]!.mac);
  assert.equal(d.nics[1]!.vlan, 20);
});

test('VM definition: a UEFI VM with its own variable store and cloud-init data; QEMU gets OVMF as flash 0 and the store as flash 1, its last disk', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  writeFileSync(join(dir, 'a.img'), Buffer.alloc(8192));
  writeFileSync(join(dir, 'vars.fd'), Buffer.alloc(540672));
  writeFileSync(join(dir, 'user-data'), '#cloud-config\n');
  const d = parseVmDefinition(
    JSON.stringify({
      name: 'efi',
      memoryMiB: 256,
      firmware: 'uefi',
      uefiVars: 'vars.fd',
      cloudInit: { userData: 'user-data' },
      disks: [{ path: 'a.img' }],
      boot: { from: 'disk' },
    }),
    join(dir, 'efi.json'),
  );
  assert.equal(d.firmware, 'uefi');
  assert.equal(d.uefiVars, join(dir, 'vars.fd'));
  assert.equal(d.cloudInit?.userData, join(dir, 'user-data'));
  const spec = specOf(d, 'tcg', '/usr/share/OVMF/OVMF_CODE_4M.fd');
  assert.deepEqual(diskBuses(spec), ['virtio', 'pflash']);
  const args = qemuArgs(
    spec,
    { qmpSocket: 'q', serialSocket: 's', firmwareDirs: [], nbdSockets: ['d0', 'd1'] },
    {
      paused: false,
      incoming: false,
    },
  ).join(' ');
  assert.match(args, /-machine pc,accel=tcg,memory-backend=mem0,pflash0=fw-code,pflash1=disk1/);
  assert.match(args, /driver=file,node-name=fw-code,filename=\/usr\/share\/OVMF\/OVMF_CODE_4M\.fd,read-only=on/);
  assert.match(args, /virtio-blk-pci,drive=disk0,bootindex=1/);
  assert.doesNotMatch(args, /drive=disk1/, 'the store is no block device of the guest');
  assert.throws(() => specOf(d, 'tcg'), /firmware is needed/);
  // A BIOS VM has no store; a store is the last disk only.
  assert.equal(VmSpecSchema.safeParse({ ...spec, uefiCode: undefined }).success, false);
  assert.equal(VmSpecSchema.safeParse({ ...spec, disks: [{ bus: 'pflash' }, { bus: 'virtio' }] }).success, false);
});

test('UEFI firmware: a host without OVMF is told what to install; a VM without its own store gets a private one from the template, kept', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  assert.throws(
    () => findOvmf(join(dir, 'none')),
    (e: unknown) =>
      isRubatoError(e, 'RUBATO_SETUP_FAILED') && /install Debian's ovmf package/.test((e as Error).message),
  );
  const fw = join(dir, 'OVMF');
  mkdirSync(fw);
  writeFileSync(join(fw, 'OVMF_CODE_4M.fd'), Buffer.alloc(4096));
  writeFileSync(join(fw, 'OVMF_VARS_4M.fd'), Buffer.alloc(8192, 1));
  const ovmf = findOvmf(fw);
  assert.equal(ovmf.code, join(fw, 'OVMF_CODE_4M.fd'));
  writeFileSync(join(dir, 'k'), 'kernel');
  const def = parseVmDefinition(
    JSON.stringify({ name: 'efi', memoryMiB: 256, firmware: 'uefi', boot: { kernel: 'k' } }),
    join(dir, 'efi.json'),
  );
  const state = join(dir, 'state');
  const vars = uefiVarsFor(def, state, ovmf);
  assert.equal(vars, join(state, 'uefi', 'efi.vars.fd'));
  assert.equal(statSync(vars).mode & 0o777, 0o600);
  writeFileSync(vars, Buffer.alloc(8192, 2)); // the firmware wrote it
  assert.equal(uefiVarsFor(def, state, ovmf), vars);
  assert.equal(readFileSync(vars)[0], 2, 'kept, not made again');
  writeFileSync(join(dir, 'small.fd'), Buffer.alloc(4096));
  const own = parseVmDefinition(
    JSON.stringify({ name: 'efi', memoryMiB: 256, firmware: 'uefi', uefiVars: 'small.fd', boot: { kernel: 'k' } }),
    join(dir, 'efi.json'),
  );
  assert.throws(
    () => uefiVarsFor(own, state, ovmf),
    refused(/uefiVars: .*small\.fd is 4096 bytes, but this host's OVMF/),
  );
});
