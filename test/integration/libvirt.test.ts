// `rubato import --libvirt`: a domain defined in Debian's libvirt with `virsh define` (two disks,
// raw and qcow2, two NICs with their MACs, a CD-ROM and a shared folder Rubato cannot
// carry) becomes a VM file that `rubato protect` accepts: the guest boots under Rubato from it.
// libvirtd is started for the test when none answers, and ended by its PID.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { runCommand, spawnTracked, type TrackedProcess } from '../../src/util/procs.ts';
import { waitFor } from '../../src/util/async.ts';
import { Lan } from '../../src/io/net/lan.ts';
import { writeKeyFile } from '../../src/replication/keyfile.ts';
import { guestAppend, VIRSH_TIMEOUT_MS } from '../../src/qemu/index.ts';
import { ensureLibvirt, ensureTapRelay } from '../../src/setup/setup.ts';
import { testPlatform } from '../helpers/platform.ts';
import { RUBATO_BIN, rubatoProcess, type Ev } from '../helpers/rubato.ts';

const URI = 'qemu:///system';
const virsh = (args: string[]) => runCommand('virsh', ['-c', URI, ...args], { timeoutMs: VIRSH_TIMEOUT_MS });

test('rubato import --libvirt: a domain made by virsh define becomes a VM file rubato protect boots', {
  timeout: 300_000,
}, async () => {
  const { guest } = await testPlatform();
  await ensureLibvirt();
  await ensureTapRelay();
  const dir = makeTempDir('rubato-libvirt-');
  const procs: TrackedProcess[] = [];
  let lan: Lan | null = null;
  const name = `rubato-import-${process.pid}`;
  let defined = false;
  try {
    if ((await virsh(['version'])).code !== 0) {
      const d = spawnTracked('libvirtd', '/usr/sbin/libvirtd', ['--pid-file', join(dir, 'libvirtd.pid')]);
      procs.push(d);
      await waitFor(async () => (await virsh(['version'])).code === 0, 30_000, 'libvirtd answering', 300);
    }
    lan = await Lan.create('lv');
    const ha = await lan.addHost('ha');
    const root = join(dir, 'root.img');
    writeFileSync(root, Buffer.alloc(16 << 20));
    const data = join(dir, 'data.qcow2');
    assert.equal((await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', data, '32M'])).code, 0);
    const append = guestAppend(['cpuloop'], { ip: `${lan.guestIp}/24` });
    const xml = `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${guest.kernel}</kernel><initrd>${guest.initrd}</initrd><cmdline>${append}</cmdline></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${root}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${data}'/><target dev='sda' bus='scsi'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:4c:56:01'/><source bridge='${ha.bridge}'/><model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:4c:56:02'/><source bridge='${ha.bridge}'/><model type='e1000'/></interface>
    <filesystem type='mount' accessmode='passthrough'><source dir='${dir}'/><target dir='shared'/></filesystem>
  </devices>
</domain>`;
    writeFileSync(join(dir, 'domain.xml'), xml);
    const def = await virsh(['define', join(dir, 'domain.xml')]);
    assert.equal(def.code, 0, def.stderr);
    defined = true;

    const vmFile = join(dir, 'imported.json');
    const imp = await runCommand(RUBATO_BIN, ['import', '--libvirt', name, '--out', vmFile]);
    assert.equal(imp.code, 0, imp.stderr);
    const notes = imp.stderr.trim().split('\n');
    for (const re of [/hdc: not carried/, /model e1000 carried as virtio-net/, /filesystem: not carried/])
      assert.ok(
        notes.some((l) => re.test(l)),
        `${re} in ${imp.stderr}`,
      );
    assert.ok(
      notes.every((l) => l.startsWith(`rubato import: ${name}: `)),
      'one line each, naming the VM',
    );
    const vm = JSON.parse(readFileSync(vmFile, 'utf8')) as Ev;
    assert.equal(vm['name'], name);
    assert.equal(vm['memoryMiB'], 128);
    assert.deepEqual(vm['disks'], [
      { path: root, bus: 'virtio', format: 'raw' },
      { path: data, bus: 'scsi', format: 'qcow2' },
    ]);
    assert.deepEqual(vm['nics'], [
      { bridge: ha.bridge, mac: '52:54:00:4c:56:01' },
      { bridge: ha.bridge, mac: '52:54:00:4c:56:02' },
    ]);
    // An existing file is not overwritten.
    const again = await runCommand(RUBATO_BIN, ['import', '--libvirt', name, '--out', vmFile]);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /exists \(--force to overwrite it\)/);

    const key = join(dir, 'psk');
    writeKeyFile(key);
    // A NIC on a VLAN needs a bridge that filters VLANs: said before anything starts (exit 5).
    const tagged = join(dir, 'tagged.json');
    const nics = vm['nics'] as Ev[];
    writeFileSync(tagged, JSON.stringify({ ...vm, nics: [nics[0], { ...nics[1], vlan: 7 }] }));
    const refused = await runCommand('ip', [
      'netns',
      'exec',
      ha.ns,
      RUBATO_BIN,
      'protect',
      tagged,
      '--no-witness',
      '--standby',
      '127.0.0.1:1',
      '--key',
      key,
      '--state-dir',
      join(dir, 'tagged-state'),
    ]);
    assert.equal(refused.code, 5, refused.stderr);
    assert.match(refused.stderr, /does not filter VLANs, and a NIC is on VLAN 7/);

    // rubato protect runs the imported file.
    const p = rubatoProcess(
      'protect',
      [
        'protect',
        vmFile,
        '--no-witness',
        '--standby',
        '127.0.0.1:1',
        '--key',
        key,
        '--state-dir',
        join(dir, 'state'),
        '--stop-timeout',
        '1',
        '--events',
      ],
      'warn',
      ha.ns,
    );
    procs.push(p.proc);
    let stderr = '';
    p.proc.child.stderr?.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-2000);
    });
    const booted = await Promise.race([
      waitFor(
        () => p.events.find((e) => e['event'] === 'guest' && /RUBATO boot ok/.test(String(e['line']))),
        120_000,
        'the imported VM booted by rubato protect',
        200,
      ),
      p.proc.exited.then((x) => {
        throw new Error(`rubato protect ended (exit ${x.code}): ${stderr}`);
      }),
    ]);
    assert.ok(booted);
    p.proc.kill('SIGTERM');
    assert.equal((await p.proc.exited).code, 0);
  } finally {
    if (defined) await virsh(['undefine', name]);
    for (const p of procs.reverse()) await p.stop(5000);
    await lan?.destroy();
    removeTempDir(dir);
  }
});
