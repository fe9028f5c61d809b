// Protection turned on for a VM that runs right now in its own QEMU (started by hand, with a QMP
// socket): its QEMU found from the socket, compared with Rubato's QEMU for its definition (PCI
// devices, memory, the features each NIC offers; refused with the VM untouched when they differ),
// and the guest moved live into Rubato's (local-migration.ts), whose disks are the same raw files,
// served by Rubato, and whose NICs are behind its relays. The guest keeps running and keeps its
// TCP connections. `rubato qemu-args` prints a command line that runs a VM adoptably (own-qemu.ts).

import { readFileSync, readlinkSync, existsSync } from 'node:fs';
import { RubatoError, logger, processWithFd, sleep } from '../util/index.ts';
import { QmpClient, type QemuVm } from '../qemu/index.ts';
import { migrateLocal, type LocalMigration } from './local-migration.ts';

const log = logger('adopt');

/** The running VM's QEMU: its process and how it was started (to hand the VM back the same way). */
export interface AdoptSource {
  pid: number;
  /** Its binary (/proc/PID/exe). */
  exe: string;
  /** Its command line (argv[0] first) and working folder, as /proc shows them. */
  argv: string[];
  cwd: string;
}

/** The PID of the process listening on unix socket `path` (from /proc/net/unix and /proc/PID/fd), or null. */
export function unixSocketOwner(path: string): number | null {
  const inodes = new Set<string>();
  for (const line of readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path; flags 00010000: listening
    if (f.length >= 8 && f[7] === path && (parseInt(f[3]!, 16) & 0x10000) !== 0) inodes.add(f[6]!);
  }
  if (!inodes.size) return null;
  return processWithFd((pid, fd) => {
    const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
    return m !== null && inodes.has(m[1]!);
  });
}

/** The QEMU behind a QMP socket: checked to exist and to be a QEMU, its command line read. */
export function adoptSource(qmpPath: string): AdoptSource {
  if (!existsSync(qmpPath))
    throw new RubatoError(
      'RUBATO_CONFIG',
      `--adopt ${qmpPath}: no such QMP socket (the running QEMU's -qmp unix:PATH)`,
    );
  const pid = unixSocketOwner(qmpPath);
  if (!pid) throw new RubatoError('RUBATO_CONFIG', `--adopt ${qmpPath}: no process listens on it`);
  const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
  if (!/qemu-system/.test(argv[0] ?? ''))
    throw new RubatoError('RUBATO_CONFIG', `--adopt ${qmpPath}: process ${pid} (${argv[0]}) is not a QEMU`);
  return { pid, exe: readlinkSync(`/proc/${pid}/exe`), argv, cwd: readlinkSync(`/proc/${pid}/cwd`) };
}

interface PciDevice {
  bus: number;
  slot: number;
  function: number;
  class_info?: { desc?: string; class: number };
  id: { vendor: number; device: number };
  qdev_id?: string;
}

/** The devices of a QEMU, one line each (bus:slot.function vendor:device). */
async function pciDevices(qmp: QmpClient): Promise<string[]> {
  const buses = (await qmp.execute('query-pci')) as Array<{ devices: PciDevice[] }>;
  const out: string[] = [];
  const hex = (n: number, w: number) => n.toString(16).padStart(w, '0');
  for (const b of buses)
    for (const d of b.devices)
      out.push(
        `${hex(d.bus, 2)}:${hex(d.slot, 2)}.${d.function} ${hex(d.id.vendor, 4)}:${hex(d.id.device, 4)}${d.class_info?.desc ? ` (${d.class_info.desc})` : ''}`,
      );
  return out.sort();
}

/** The features each virtio NIC offers its guest (QEMU's x-query-virtio; empty where QEMU lacks it). */
async function nicFeatures(qmp: QmpClient): Promise<string[][]> {
  try {
    const devs = (await qmp.execute('x-query-virtio')) as Array<{ path: string; name: string }>;
    const out: string[][] = [];
    for (const d of devs.filter((x) => x.name === 'virtio-net').sort((a, b) => a.path.localeCompare(b.path))) {
      const st = (await qmp.execute('x-query-virtio-status', { path: d.path })) as {
        'host-features'?: { 'dev-features'?: string[] };
      };
      out.push((st['host-features']?.['dev-features'] ?? []).map((f) => f.split(':')[0]!.trim()));
    }
    return out;
  } catch {
    return [];
  }
}

/** The first difference between the devices of the running VM and of Rubato's QEMU for it, or null. */
export async function deviceMismatch(running: QmpClient, ours: QmpClient): Promise<string | null> {
  const [a, b] = [await pciDevices(running), await pciDevices(ours)];
  for (let i = 0; i < Math.max(a.length, b.length); i++)
    if (a[i] !== b[i])
      return `PCI: the running VM has ${a[i] ?? 'nothing more'}, its definition gives ${b[i] ?? 'nothing more'}`;
  const [na, nb] = [await nicFeatures(running), await nicFeatures(ours)];
  for (const [i, f] of na.entries()) {
    const missing = f.filter((x) => !(nb[i] ?? []).includes(x));
    if (missing.length)
      return `NIC ${i}: the running VM's offers ${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', …' : ''} (a TAP with vnet_hdr: start its QEMU with vnet_hdr=off on -netdev tap)`;
  }
  const mem = async (q: QmpClient) =>
    ((await q.execute('query-memory-size-summary')) as { 'base-memory': number })['base-memory'];
  const [ma, mb] = [await mem(running), await mem(ours)];
  if (ma !== mb) return `memory: the running VM has ${ma / 2 ** 20} MiB, its definition gives ${mb / 2 ** 20} MiB`;
  return null;
}

/**
 * Moves the VM that runs behind `qmpPath` into `vm` (Rubato's QEMU, started with `-incoming defer`
 * for the same definition) and ends the old QEMU. Refused, with the VM untouched, when the two
 * differ in their devices or memory.
 */
export async function adoptInto(
  vm: QemuVm,
  qmpPath: string,
  socketPath: string,
): Promise<LocalMigration & { source: AdoptSource }> {
  const name = vm.spec.name;
  const source = adoptSource(qmpPath);
  const qmp = new QmpClient(qmpPath, `${name} (its own QEMU, pid ${source.pid})`);
  await qmp.connect(5000);
  try {
    const st = (await qmp.execute('query-status')) as { status: string };
    if (st.status !== 'running')
      throw new RubatoError('RUBATO_CONFIG', `--adopt: VM ${name} is ${st.status} in its QEMU, not running`);
    const differs = await deviceMismatch(qmp, vm.qmp);
    if (differs)
      throw new RubatoError(
        'RUBATO_CONFIG',
        `cannot adopt VM ${name}: its QEMU and its definition differ (${differs}); it runs on, untouched (rubato qemu-args prints a command line Rubato can adopt)`,
      );
    log.info(`VM ${name}: moving the running guest from its QEMU (pid ${source.pid}) into Rubato's`);
    let onExit = () => {};
    const died = new Promise<never>((_, reject) => {
      onExit = () =>
        reject(
          new RubatoError(
            'RUBATO_MIGRATION',
            `adopting VM ${name}: Rubato's QEMU ended while taking the guest (${vm.stderrTail.trim().split('\n').slice(-2).join(' | ')}); it runs on in its own QEMU`,
          ),
        );
      vm.once('exit', onExit);
    });
    const m = await Promise.race([migrateLocal(qmp, vm.qmp, socketPath, `adopting VM ${name}`), died]).finally(() =>
      vm.off('exit', onExit),
    );
    // The old QEMU holds a stopped copy: it ends now (its TAP goes with it).
    await qmp.execute('quit').catch(() => {});
    for (let i = 0; i < 100 && existsSync(`/proc/${source.pid}`); i++) await sleep(50);
    log.info(
      `VM ${name} adopted: ${m.downtimeMs} ms without the guest running (QEMU: ${m.qemuDowntimeMs} ms), ${Math.round(m.transferredBytes / 2 ** 20)} MiB in ${m.totalMs} ms`,
    );
    return { ...m, source };
  } finally {
    qmp.close();
  }
}
