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

/** The rig's guest as the harness decided it: booted by whichever process runs it (`bootRigGuest`). */
export interface RigGuest {
  spec: VmSpec;
  binary: import('../qemu/vm.ts').QemuBinary;
  /** The guest's disk image (null: diskless). */
  disk: string | null;
  /** The console line that says the guest's service is up, and how long it may take. */
  ready: RegExp;
  readyMs: number;
  tapRelay: string;
}

/** A rig before its guest boots: its LAN, its hosts, and the guest to boot on the first. */
export interface RigPlan {
  lan: Lan;
  hosts: LanHost[];
  guest: RigGuest;
  dir: string;
  accel: string;
}

/** Boots a rig's guest on `site` (its I/O there: relay, disk server, TAP): in the harness, or in a host's process. */
export async function bootRigGuest(
  g: RigGuest,
  site: LanHost,
  dir: string,
  tag = 'g0',
): Promise<{ io: GuestIo; vm: QemuVm }> {
  const io = await GuestIo.start(site, dir, tag, g.disk, g.tapRelay);
  let vm: QemuVm | null = null;
  try {
    vm = await QemuVm.start(g.spec, {
      binary: g.binary,
      runDir: dir,
      tag,
      netSocket: io.netSocket,
      ...(io.nbdSocket ? { nbdSocket: io.nbdSocket } : {}),
    });
    await vm.waitSerial(g.ready, g.readyMs);
    return { io, vm };
  } catch (e) {
    await vm?.stop();
    await io.close().catch(() => {});
    throw e;
  }
}

/** Boots a planned rig's guest in this process: the rig complete. */
export async function bootRig(plan: RigPlan): Promise<KvRig> {
  try {
    const { io, vm } = await bootRigGuest(plan.guest, plan.hosts[0]!, plan.dir);
    return { lan: plan.lan, hosts: plan.hosts, io, vm, dir: plan.dir, binary: plan.guest.binary, accel: plan.accel };
  } catch (e) {
    await plan.lan.destroy();
    throw e;
  }
}

export async function startKvRig(
  dir: string,
  accelChoice: AccelChoice,
  tag: string,
  workload: RigWorkload = KV_WORKLOAD,
): Promise<KvRig> {
  return bootRig(await planKvRig(dir, accelChoice, tag, workload));
}

/** A KV rig's LAN, hosts and guest, not booted yet. */
export async function planKvRig(
  dir: string,
  accelChoice: AccelChoice,
  tag: string,
  workload: RigWorkload = KV_WORKLOAD,
): Promise<RigPlan> {
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(accelChoice, stockQemu(), guest);
  const binary = accel === 'tcg' ? await ensurePatchedQemu() : stockQemu();
  const tapRelay = await ensureTapRelay();
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
    return { lan, hosts, dir, accel, guest: { spec, binary, disk, ready: workload.ready, readyMs: 90_000, tapRelay } };
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
