// Protection turned on for a VM that runs right now in its own QEMU (started by hand, with a QMP
// socket), and handed back the same way: a live migration on this host, over a unix socket, into
// Rubato's QEMU (whose disks are the same raw files, served by Rubato, and whose NICs are behind
// its relays), and back into a QEMU started with the owner's own command line. The guest keeps
// running and keeps its TCP connections; its downtime is the gap between the source's STOP and
// the destination's RESUME (QMP events, one host clock).
//
// Both QEMUs must have the same devices: Rubato starts its own from the VM's definition, compares
// the PCI devices of both before anything moves, and refuses (the VM running on, untouched) when they
// differ. `rubato qemu-args` prints the command line that runs a VM adoptably.

import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { RubatoError, logger, writePrivateAtomic } from '../util/index.ts';
import { QmpClient, qemuArgs, type QemuVm, type QmpEvent, type VmSpec } from '../qemu/index.ts';

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
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m && inodes.has(m[1]!)) return Number(pid);
      } catch {
        /* closed meanwhile */
      }
    }
  }
  return null;
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

/** Where a QEMU command line puts its QMP socket (-qmp unix:PATH,…, or -chardev socket + -mon control). */
export function qmpPathOf(argv: readonly string[]): string | null {
  const chardevs = new Map<string, string>();
  for (let i = 0; i < argv.length - 1; i++) {
    if (argv[i] === '-chardev') {
      const o = argv[i + 1]!;
      const id = /(?:^|,)id=([^,]+)/.exec(o)?.[1];
      const path = /(?:^|,)path=([^,]+)/.exec(o)?.[1];
      if (o.startsWith('socket') && id && path) chardevs.set(id, path);
    }
  }
  for (let i = 0; i < argv.length - 1; i++) {
    const a = argv[i];
    const o = argv[i + 1]!;
    if ((a === '-qmp' || a === '-qmp-pretty') && o.startsWith('unix:')) return o.slice(5).split(',')[0]!;
    if (a === '-mon' && /(?:^|,)mode=control/.test(o)) {
      const id = /(?:^|,)chardev=([^,]+)/.exec(o)?.[1];
      if (id && chardevs.has(id)) return chardevs.get(id)!;
    }
  }
  return null;
}

/** The TAP devices a QEMU command line names (-netdev tap,ifname=…). */
export function tapsOf(argv: readonly string[]): string[] {
  const taps: string[] = [];
  for (let i = 0; i < argv.length - 1; i++)
    if (argv[i] === '-netdev' && argv[i + 1]!.startsWith('tap,')) {
      const name = /(?:^|,)ifname=([^,]+)/.exec(argv[i + 1]!)?.[1];
      if (name) taps.push(name);
    }
  return taps;
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

export interface LocalMigration {
  /** From the source's STOP to the destination's RESUME. */
  downtimeMs: number;
  /** QEMU's own figures (source side). */
  qemuDowntimeMs: number;
  totalMs: number;
  transferredBytes: number;
}

const waitEvent = (qmp: QmpClient, name: string, ms: number): Promise<QmpEvent> =>
  new Promise((resolve, reject) => {
    const on = (e: QmpEvent) => {
      if (e.event !== name) return;
      clearTimeout(t);
      qmp.off('event', on);
      resolve(e);
    };
    const t = setTimeout(() => {
      qmp.off('event', on);
      reject(new RubatoError('RUBATO_TIMEOUT', `no ${name} within ${ms} ms`));
    }, ms);
    qmp.on('event', on);
  });
const stamp = (e: QmpEvent) =>
  e.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : Date.now();

/**
 * Moves the running guest from `from` to `to` (started with `-incoming defer`, paused) over unix
 * socket `uri`, and runs it there. A failed migration leaves the guest running in `from`.
 */
export async function migrateLocal(
  from: QmpClient,
  to: QmpClient,
  socketPath: string,
  what: string,
  timeoutMs = 300_000,
): Promise<LocalMigration> {
  const uri = `unix:${socketPath}`;
  // The destination says when its copy is complete (MIGRATION events) and runs the guest at once
  // (it was started paused); polling its state covers an event that did not come.
  let resumeAsked = false;
  const resume = () => {
    if (resumeAsked) return;
    resumeAsked = true;
    void to.execute('cont').catch(() => {});
  };
  const onMigration = (e: QmpEvent) => {
    if (e.event === 'MIGRATION' && e.data?.['status'] === 'completed') resume();
  };
  await to.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  to.on('event', onMigration);
  const stopped = waitEvent(from, 'STOP', timeoutMs);
  stopped.catch(() => {});
  const resumed = waitEvent(to, 'RESUME', timeoutMs);
  resumed.catch(() => {});
  try {
    await to.execute('migrate-incoming', { uri });
    await from.execute('migrate', { uri });
    const until = Date.now() + timeoutMs;
    let last = 0;
    for (;;) {
      const st = (await from.execute('query-migrate')) as Record<string, unknown>;
      const status = String(st['status'] ?? 'none');
      if (status === 'completed') {
        for (let i = 0; !resumeAsked && i < 500; i++) {
          const dst = (await to.execute('query-migrate')) as Record<string, unknown>;
          if (dst['status'] === 'completed') resume();
          else if (dst['status'] === 'failed')
            throw new RubatoError('RUBATO_MIGRATION', `${what}: the destination failed to load the guest`);
          else await new Promise((r) => setTimeout(r, 10));
        }
        const stop = await stopped;
        const run = await Promise.race([resumed, new Promise<null>((r) => setTimeout(() => r(null), 5000))]);
        const ram = (st['ram'] ?? {}) as Record<string, number>;
        return {
          downtimeMs: Math.round((run ? stamp(run) : Date.now()) - stamp(stop)),
          qemuDowntimeMs: Number(st['downtime'] ?? -1),
          totalMs: Number(st['total-time'] ?? -1),
          transferredBytes: ram['transferred'] ?? 0,
        };
      }
      if (status === 'failed' || status === 'cancelled')
        throw new RubatoError(
          'RUBATO_MIGRATION',
          `${what}: the migration ${status}: ${String(st['error-desc'] ?? '')}`,
        );
      if (Date.now() > until) {
        await from.execute('migrate_cancel').catch(() => {});
        throw new RubatoError('RUBATO_MIGRATION', `${what}: not done within ${timeoutMs / 1000} s (cancelled)`);
      }
      if (Date.now() - last > 2000) {
        const ram = (st['ram'] ?? {}) as Record<string, number>;
        log.info(`${what}: ${status}, ${Math.round((ram['transferred'] ?? 0) / 2 ** 20)} MiB sent`);
        last = Date.now();
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    to.off('event', onMigration);
  }
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
    const died = new Promise<never>((_, reject) =>
      vm.once('exit', () =>
        reject(
          new RubatoError(
            'RUBATO_MIGRATION',
            `adopting VM ${name}: Rubato's QEMU ended while taking the guest (${vm.stderrTail.trim().split('\n').slice(-2).join(' | ')}); it runs on in its own QEMU`,
          ),
        ),
      ),
    );
    died.catch(() => {});
    const m = await Promise.race([migrateLocal(qmp, vm.qmp, socketPath, `adopting VM ${name}`), died]);
    // The old QEMU holds a stopped copy: it ends now (its TAP goes with it).
    await qmp.execute('quit').catch(() => {});
    for (let i = 0; i < 100 && existsSync(`/proc/${source.pid}`); i++) await new Promise((r) => setTimeout(r, 50));
    log.info(
      `VM ${name} adopted: ${m.downtimeMs} ms without the guest running (QEMU: ${m.qemuDowntimeMs} ms), ${Math.round(m.transferredBytes / 2 ** 20)} MiB in ${m.totalMs} ms`,
    );
    return { ...m, source };
  } finally {
    qmp.close();
  }
}

/** The TAP name the owner's QEMU uses for NIC `i` of VM `name` (printed with its command line). */
export const ownTapName = (name: string, i: number): string =>
  `rbo${createHash('sha256').update(name).digest('hex').slice(0, 8)}n${i}`;

/**
 * The QEMU command line (after the binary) that runs the VM as its owner would, without Rubato, in
 * a way Rubato can adopt: the same machine and devices as Rubato's QEMU, its disks' image files,
 * TAPs by name (made and put on their bridges by the owner), QMP and serial on unix sockets.
 */
export function ownQemuArgs(
  spec: VmSpec,
  o: { qmpSocket: string; serialSocket: string; diskFiles: readonly string[]; taps: readonly string[] },
): string[] {
  return qemuArgs(
    spec,
    {
      qmpSocket: o.qmpSocket,
      serialSocket: o.serialSocket,
      firmwareDirs: [],
      own: { diskFiles: o.diskFiles, taps: o.taps },
    },
    { paused: false, incoming: false },
  );
}

const AdoptedSchema = z
  .object({
    vm: z.string(),
    /** The owner's QEMU: its binary, command line and working folder, to hand the VM back the same way. */
    exe: z.string(),
    argv: z.array(z.string().max(64 * 1024)).max(4096),
    cwd: z.string(),
    at: z.number(),
  })
  .strict();
export type AdoptedRecord = z.infer<typeof AdoptedSchema>;
const adoptedFile = (stateDir: string) => join(stateDir, 'adopted.json');

/** Written once Rubato runs the adopted VM: how to hand it back (`rubato release`). */
export async function recordAdopted(stateDir: string, vm: string, source: AdoptSource): Promise<void> {
  const rec: AdoptedRecord = { vm, exe: source.exe, argv: source.argv, cwd: source.cwd, at: Date.now() };
  await writePrivateAtomic(adoptedFile(stateDir), Buffer.from(`${JSON.stringify(rec, null, 2)}\n`), true);
}

export function readAdopted(stateDir: string, vm: string): AdoptedRecord {
  const f = adoptedFile(stateDir);
  if (!existsSync(f))
    throw new RubatoError('RUBATO_CONFIG', `VM ${vm} was not adopted from a QEMU of its own: rubato stop ends it`);
  if (statSync(f).size > 1 << 20) throw new RubatoError('RUBATO_CONFIG', `${f}: too large to be a record Rubato wrote`);
  const r = AdoptedSchema.safeParse(JSON.parse(readFileSync(f, 'utf8')));
  if (!r.success || r.data.vm !== vm)
    throw new RubatoError('RUBATO_CONFIG', `${f}: not a record Rubato wrote for VM ${vm}`);
  return r.data;
}

export function forgetAdopted(stateDir: string): void {
  rmSync(adoptedFile(stateDir), { force: true });
}

/** The owner's command line to start the VM again, waiting for it (`-incoming defer`). */
export function incomingArgv(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-daemonize' || a === '-S') continue;
    if (a === '-incoming') {
      i++;
      continue;
    }
    out.push(a);
  }
  return [...out, '-incoming', 'defer'];
}
