// The chaos rig: a KV guest booted on a two-host LAN (its I/O on host A), and the client processes
// that load it and read back what they were told was written.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { runCommand, spawnTracked, type TrackedProcess, logger, RubatoError } from '../util/index.ts';
import { REPO_ROOT, ensureGuestImage, ensurePatchedQemu, ensureTapRelay, stockQemu } from '../setup/index.ts';
import { resolveAccel, type AccelChoice, QemuVm, guestAppend, type VmSpec } from '../qemu/index.ts';
import { Lan, type LanHost, GuestIo } from '../io/index.ts';

const log = logger('chaos');

export interface ClientEvent {
  t: number;
  type: string;
  key?: string;
  value?: string;
  conn?: number;
  id?: number;
  event?: string;
  latMs?: number;
  missing?: string[];
  checked?: number;
}

export function clientProcess(
  lan: Lan,
  args: string[],
  scriptPath = join('src', 'chaos', 'kv-client.ts'),
): { proc: TrackedProcess; events: ClientEvent[]; done: Promise<void>; stderr: () => string } {
  const tsx = pathToFileURL(join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs')).href;
  const script = join(REPO_ROOT, scriptPath);
  const proc = spawnTracked('kv-client', 'ip', [
    'netns',
    'exec',
    lan.clientNs,
    process.execPath,
    '--import',
    tsx,
    script,
    ...args,
  ]);
  const events: ClientEvent[] = [];
  let buf = '';
  proc.child.stdout?.on('data', (d: Buffer) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      try {
        events.push(JSON.parse(buf.slice(0, nl)) as ClientEvent);
      } catch {
        /* not ours */
      }
      buf = buf.slice(nl + 1);
    }
  });
  let stderr = '';
  proc.child.stderr?.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4096);
    log.debug(`client: ${d.toString().trim()}`);
  });
  return { proc, events, done: proc.exited.then(() => {}), stderr: () => stderr };
}

/** A KV guest on a LAN: topology, disk, the guest's I/O on host A, the booted VM. */
export interface KvRig {
  lan: Lan;
  hosts: LanHost[];
  io: GuestIo;
  vm: QemuVm;
  dir: string;
  binary: import('../qemu/vm.ts').QemuBinary;
  accel: string;
}

/** What the rig's guest runs (default: the KV service) and the console line that says it is ready. */
export interface RigWorkload {
  wl: Array<string | number>;
  ready: RegExp;
  /** No disk: the service keeps its data in the guest's RAM (the initramfs). */
  diskless?: boolean;
}
export const KV_WORKLOAD: RigWorkload = { wl: ['kvd', 7000, '/data/kv.log'], ready: /RUBATO kvd ready/ };
/** The KV service with its log in the guest's RAM (no disk): for compare mode, whose secondary has no disk yet. */
export const KV_RAM_WORKLOAD: RigWorkload = { wl: ['kvd', 7000, '/kv.log'], ready: /RUBATO kvd ready/, diskless: true };

export async function startKvRig(
  dir: string,
  accelChoice: AccelChoice,
  tag: string,
  workload: RigWorkload = KV_WORKLOAD,
): Promise<KvRig> {
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(accelChoice, stockQemu(), guest);
  const binary = accel === 'tcg' ? await ensurePatchedQemu() : stockQemu();
  await ensureTapRelay();
  const lan = await Lan.create(tag);
  try {
    const hosts: LanHost[] = [await lan.addHost('ha'), await lan.addHost('hb')];
    const disk = workload.diskless ? null : join(dir, 'disk.img');
    if (disk) {
      writeFileSync(disk, Buffer.alloc(32 << 20));
      const mk = await runCommand('mkfs.ext2', ['-q', '-F', disk]);
      if (mk.code !== 0) throw new RubatoError('RUBATO_SETUP_FAILED', `mkfs.ext2 failed: ${mk.stderr}`);
    }
    const spec: VmSpec = {
      name: 'kv',
      accel,
      cpus: 1,
      memMb: 128,
      kernel: guest.kernel,
      initrd: guest.initrd,
      mac: '52:54:00:ab:cd:01',
      ...(disk ? { disk: true } : {}),
      append: guestAppend(workload.wl, { ip: `${lan.guestIp}/24`, ...(disk ? { disk: 'vda' } : {}) }),
    };
    const io = await GuestIo.start(hosts[0]!, dir, 'g0', disk, await ensureTapRelay());
    const vm = await QemuVm.start(spec, {
      binary,
      runDir: dir,
      tag: 'g0',
      netSocket: io.netSocket,
      ...(io.nbdSocket ? { nbdSocket: io.nbdSocket } : {}),
    });
    await vm.waitSerial(workload.ready, 90_000);
    return { lan, hosts, io, vm, dir, binary, accel };
  } catch (e) {
    await lan.destroy();
    throw e;
  }
}

/** Stops a rig's guest, its I/O (relay, disk server) and its LAN; safe on a partly failed start. */
export async function stopKvRig(rig: KvRig | null): Promise<void> {
  if (!rig) return;
  await rig.vm.stop();
  await rig.io.close().catch(() => {});
  await rig.lan.destroy();
}
