// The product path on one host: a user's VM (its definition file) run under protection, and the
// guest I/O a standby sets up when it takes over. `rubato protect`, `rubato standby`, the demo and
// the tests all come through here: the guest's NIC is a TAP on the named bridge behind the output
// commit relay, its disk is served by Rubato's NBD server, both wired to the primary controller.

import { join } from 'node:path';
import { readdirSync, rmSync, statSync } from 'node:fs';
import { logger, errorMessage, ensurePrivateDir, RubatoError } from '../util/index.ts';
import {
  DEFAULT_STOP_TIMEOUT_MS,
  QemuVm,
  type QemuBinary,
  VmSpecSchema,
  nicsOf,
  type Accel,
  type VmSpec,
  type ResolvedVm,
} from '../qemu/index.ts';
import {
  prepareDisk,
  type PreparedDisk,
  NbdServer,
  GuestIo,
  type NetRelay,
  checkBridge,
  diskBlockId,
  RelaySet,
  type GuestNet,
} from '../io/index.ts';
import type { PrimaryController, PrimaryEvent, PrimaryOptions, ReplicaStore, Identity } from '../replication/index.ts';
import type { Policy } from '../scheduler/index.ts';
import { ReleaseGate } from '../commit/index.ts';
import type { Ownership, OwnershipGuard } from '../coord/index.ts';
import { startPrimarySide, type PrimarySideOptions } from './primary-side.ts';
import { findOvmf, uefiVarsFor } from './firmware.ts';
import { cloudInitSeed } from './cloud-init.ts';
import { adoptInto, type AdoptSource } from './adopt.ts';
import type { LocalMigration } from './local-migration.ts';
import type { RestoredIo } from './standby-side.ts';

const log = logger('protect');

/** The guest's I/O on this host: a NIC behind the relay (when it has one) and one disk server per disk. */
export interface HostIo {
  /** The guest's network: its one NIC's relay, or a set of one relay per NIC (null: no NIC). */
  relay: GuestNet | null;
  /** The disks' servers, in the guest's order (disk0 first). */
  nbds: NbdServer[];
  netSockets: string[];
  nbdSockets: string[];
  close(): Promise<void>;
}

/** Starts the I/O for a guest with `spec` on this host (`ns`: a test topology's host namespace). */
export async function startHostIo(
  spec: VmSpec,
  runDir: string,
  tag: string,
  diskPaths: readonly string[],
  tapRelay: string,
  ns?: string,
  existing: { relay?: NetRelay | undefined; nbds?: readonly NbdServer[] | undefined } = {},
): Promise<HostIo> {
  const nbds: NbdServer[] = [];
  const nets: GuestIo[] = [];
  const closeAll = async () => {
    for (const n of nets) await n.close();
    for (const s of nbds) await s.close();
  };
  try {
    for (const [i, path] of diskPaths.entries()) {
      const kept = existing.nbds?.[i];
      const s = kept ?? new NbdServer(path, join(runDir, `${tag}${i ? `-${i}` : ''}.nbd`));
      nbds.push(s);
      if (!kept) await s.start();
    }
    // One TAP per NIC on its bridge (the first keeps the plain tag: its TAP's name is what it always was).
    for (const [i, nic] of nicsOf(spec).entries()) {
      const site = { bridge: nic.bridge, ...(ns ? { ns } : {}), ...(nic.vlan ? { vlan: nic.vlan } : {}) };
      const relay = i === 0 ? { relay: existing.relay } : {};
      nets.push(await GuestIo.start(site, runDir, i ? `${tag}-n${i}` : tag, null, tapRelay, relay));
    }
  } catch (e) {
    await closeAll().catch(() => {});
    throw e;
  }
  return {
    relay: nets.length === 0 ? null : nets.length === 1 ? nets[0]!.relay : new RelaySet(nets.map((n) => n.relay)),
    nbds,
    netSockets: nets.map((n) => n.netSocket),
    nbdSockets: nbds.map((s) => s.socketPath),
    close: closeAll,
  };
}

/**
 * The QEMU description of a user's VM. A UEFI VM needs its firmware's code (this host's OVMF); its
 * variable store is then its last disk (bus pflash), after its own disks.
 */
export function specOf(def: ResolvedVm, accel: Accel, uefiCode?: string): VmSpec {
  if (def.firmware === 'uefi' && !uefiCode)
    throw new Error(`VM ${def.name} boots through UEFI: its firmware is needed`);
  const buses = [...def.disks.map((d) => d.bus), ...(def.firmware === 'uefi' ? (['pflash'] as const) : [])];
  const nic = def.nics[0];
  const boot = def.boot;
  const several = def.nics.length > 1 || def.nics.some((n) => n.vlan);
  return VmSpecSchema.parse({
    name: def.name,
    accel,
    cpus: def.cpus,
    memMb: def.memoryMiB,
    ...(nic ? { mac: nic.mac, bridge: nic.bridge } : {}),
    ...(def.nicEventIdx === false ? { nicEventIdx: false } : {}),
    ...(several
      ? { nics: def.nics.map((n) => ({ mac: n.mac, bridge: n.bridge, ...(n.vlan ? { vlan: n.vlan } : {}) })) }
      : {}),
    ...(buses.length ? { disk: true, disks: buses.map((bus) => ({ bus })) } : {}),
    ...(def.firmware === 'uefi' ? { uefiCode } : {}),
    ...('kernel' in boot
      ? {
          kernel: boot.kernel,
          ...(boot.initrd ? { initrd: boot.initrd } : {}),
          ...(boot.append ? { append: boot.append } : {}),
        }
      : {}),
  });
}

export interface ProtectOptions {
  def: ResolvedVm;
  accel: Accel;
  binary: QemuBinary;
  stateDir: string;
  standby: PrimaryOptions['standby'];
  psk: Buffer;
  policy: Policy;
  heartbeatMs: number;
  timeoutMs: number;
  onEvent: (e: PrimaryEvent) => void;
  /** The VM's ownership in the witness (null: --no-witness): it gates every frame leaving, from QEMU's start. */
  ownership: Ownership | null;
  onGuardEvent?: PrimarySideOptions['onGuardEvent'];
  stopGuest?: PrimarySideOptions['stopGuest'];
  /** The TAP helper's binary (setup's, resolved when the command starts). */
  tapRelay: string;
  ns?: string;
  /** Extra controller settings (fault injection and tracing in tests). */
  primary?: Partial<PrimaryOptions>;
  /** An orderly stop shuts the guest down through ACPI, and powers it off after this long (default 30 s). */
  stopTimeoutMs?: number;
  /** The VM runs now in this QEMU (its QMP socket): it is live-migrated into Rubato's, not booted. */
  adopt?: { qmpPath: string };
}

export interface ProtectedVm {
  vm: QemuVm;
  primary: PrimaryController;
  guard: OwnershipGuard | null;
  /** The disks the guest runs on here, in its order. */
  disks: PreparedDisk[];
  /** How the running VM came in (adoption), or null when Rubato booted it. */
  adopted: (LocalMigration & { source: AdoptSource }) | null;
  /**
   * Hands the guest over to another QEMU on this host (`migrate` moves it from Rubato's): protection
   * ends first (the standby keeps its replica and does not take over), then the guest moves; Rubato's
   * QEMU, I/O and claims are released. A failed move leaves the guest running here, unprotected.
   */
  handOver<T>(migrate: (vm: QemuVm) => Promise<T>): Promise<T>;
  /**
   * Orderly end: the standby is told (no failover), the guest shuts down through ACPI (powered off
   * after `timeoutMs`, default the options' `stopTimeoutMs`; 0: at once), I/O and claims released.
   */
  stop(timeoutMs?: number): Promise<void>;
  /**
   * The guest's QEMU died here: the standby is told to take over now, held output is dropped
   * (never released unacknowledged), I/O and claims released. The caller gives up the lease first.
   */
  guestLost(why: string): Promise<void>;
}

/**
 * What this host must have for the VM, checked before anything is claimed or converted: its
 * bridges and its firmware (the definition's files and the key are checked when they are read).
 */
export async function checkHostFor(def: ResolvedVm, ns?: string): Promise<void> {
  for (const nic of def.nics)
    await checkBridge({ bridge: nic.bridge, ...(ns ? { ns } : {}), ...(nic.vlan ? { vlan: nic.vlan } : {}) });
  if (def.firmware === 'uefi') findOvmf();
}

/** A running VM Rubato can adopt: BIOS, its own raw disks (its QEMU writes them until the handover). */
export function checkAdoptable(def: ResolvedVm): void {
  if (def.firmware !== 'bios' || def.cloudInit)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `${def.file}: a running VM is adopted when it boots through the BIOS without a cloud-init seed (its firmware's flash would not move)`,
    );
}

/**
 * What QEMU gets for the VM on this host: its own disks, then a cloud-init seed (when it has
 * cloud-init data), then (UEFI) its variable store; and the firmware's code.
 */
async function machineOf(
  def: ResolvedVm,
  stateDir: string,
): Promise<{ def: ResolvedVm; uefiCode?: string; images: Array<{ path: string; format: 'raw' | 'qcow2' }> }> {
  const ovmf = def.firmware === 'uefi' ? findOvmf() : null;
  const disks = [...def.disks];
  if (def.cloudInit) {
    const seed = await cloudInitSeed(def, stateDir);
    disks.push({ path: seed, format: 'raw', sizeBytes: statSync(seed).size, bus: 'virtio' });
  }
  const vars = ovmf ? uefiVarsFor(def, stateDir, ovmf) : null;
  const images = [...disks, ...(vars ? [{ path: vars, format: 'raw' as const }] : [])];
  // The seed is a disk of the guest from here on (a VM brought back elsewhere keeps it as one).
  const { cloudInit: _seeded, ...plain } = def;
  return { def: { ...plain, disks }, ...(ovmf ? { uefiCode: ovmf.code } : {}), images };
}

/** QEMU leaves its QMP and console sockets behind, and those of a live migration on this host. */
function removeQemuSockets(runDir: string, vm: string): void {
  for (const f of readdirSync(runDir))
    if (f.startsWith(vm) && /\.(qmp|serial|mig|adopt|release)$/.test(f)) rmSync(join(runDir, f), { force: true });
}

/** Boots the user's VM on this host and starts protecting it (unprotected, said once, until a standby answers). */
export async function protectVm(o: ProtectOptions): Promise<ProtectedVm> {
  const runDir = join(o.stateDir, 'run');
  await checkHostFor(o.def, o.ns); // (before a qcow2 is converted)
  ensurePrivateDir(o.stateDir);
  ensurePrivateDir(runDir);
  const { def, uefiCode, images } = await machineOf(o.def, o.stateDir);
  const spec = specOf(def, o.accel, uefiCode);
  const disks: PreparedDisk[] = [];
  let io: HostIo | null = null;
  let vm: QemuVm | null = null;
  let adopted: (LocalMigration & { source: AdoptSource }) | null = null;
  try {
    for (const [i, d] of images.entries())
      disks.push(await prepareDisk(d, o.stateDir, o.def.name, i, o.adopt !== undefined));
    io = await startHostIo(
      spec,
      runDir,
      o.def.name,
      disks.map((d) => d.path),
      o.tapRelay,
      o.ns,
    );
    const ownership = o.ownership;
    if (io.relay && ownership) io.relay.gate = new ReleaseGate((now) => ownership.leaseCheck(now));
    vm = await QemuVm.start(spec, {
      binary: o.binary,
      runDir,
      netSockets: io.netSockets,
      nbdSockets: io.nbdSockets,
      ...(o.adopt ? { incoming: true } : {}),
    });
    if (o.adopt) adopted = await adoptInto(vm, o.adopt.qmpPath, join(runDir, `${o.def.name}.adopt`));
  } catch (e) {
    await vm?.stop();
    await io?.close().catch((err: unknown) => log.warn(`closing the guest's I/O: ${errorMessage(err)}`));
    for (const d of disks) d.release();
    removeQemuSockets(runDir, o.def.name);
    throw e;
  }
  const { primary, guard } = startPrimarySide({
    vm,
    runDir,
    standby: o.standby,
    psk: o.psk,
    policy: o.policy,
    heartbeatMs: o.heartbeatMs,
    timeoutMs: o.timeoutMs,
    io: { relay: io.relay ?? null, nbds: io.nbds },
    ownership: o.ownership,
    onEvent: o.onEvent,
    ...(o.onGuardEvent ? { onGuardEvent: o.onGuardEvent } : {}),
    ...(o.stopGuest ? { stopGuest: o.stopGuest } : {}),
    ...(o.primary ? { more: o.primary } : {}),
  });
  const ioRef = io;
  const vmRef = vm;
  let stopping: Promise<void> | null = null;
  const end = async (
    endProtection: () => Promise<void>,
    orderly: boolean,
    timeoutMs = o.stopTimeoutMs ?? DEFAULT_STOP_TIMEOUT_MS,
  ) => {
    await endProtection();
    // In order: protection ended first (the standby keeps its replica and does not take over: the
    // guest's shutdown is not a failure), then the guest shuts down as a host would do it.
    if (orderly && timeoutMs > 0 && !vmRef.exited) await vmRef.shutdown(timeoutMs);
    else await vmRef.stop();
    await ioRef.close().catch((e: unknown) => log.warn(`closing the guest's I/O: ${errorMessage(e)}`));
    for (const d of disks) d.release();
    removeQemuSockets(runDir, o.def.name);
  };
  return {
    vm,
    primary,
    guard,
    disks,
    adopted,
    handOver: async <T>(migrate: (vm: QemuVm) => Promise<T>): Promise<T> => {
      if (stopping) throw new RubatoError('RUBATO_NOT_RUNNING', `VM ${o.def.name} is stopping already`);
      await primary.stop();
      let moved: T;
      try {
        moved = await migrate(vmRef);
      } catch (e) {
        log.error(
          `VM ${o.def.name}: the handover failed (${errorMessage(e)}); the guest runs on here UNPROTECTED (rubato stop ends it)`,
        );
        throw e;
      }
      // The guest runs in the other QEMU: this one (stopped after the move) only goes.
      await (stopping ??= end(async () => {}, false));
      return moved;
    },
    stop: (timeoutMs) => (stopping ??= end(() => primary.stop(), true, timeoutMs)),
    guestLost: (why) => (stopping ??= end(() => primary.guestLost(why), false)),
  };
}

/** The standby's side: at failover, the guest's NIC on the same bridge name and its disk from the replica. */
export function restoreIo(
  runDir: string,
  tapRelay: string,
  ns?: string,
): {
  prepare: (
    identity: Identity,
    store: ReplicaStore,
    existing?: { relay?: NetRelay | undefined; nbds?: readonly NbdServer[] | undefined },
  ) => Promise<RestoredIo>;
  current: () => HostIo | null;
} {
  let io: HostIo | null = null;
  return {
    current: () => io,
    prepare: async (identity, store, existing) => {
      // Tagged with the VM's name: one host may run several VMs' restored guests (their TAPs differ).
      const started = await startHostIo(
        identity.spec,
        runDir,
        `${identity.vm}-active`,
        replicaDisks(store),
        tapRelay,
        ns,
        existing,
      );
      io = started;
      // (its frames are gated by the standby side's factory: standby-side.ts)
      return {
        relay: started.relay,
        netSockets: started.netSockets,
        nbdSockets: started.nbdSockets,
        close: async () => {
          if (io === started) io = null;
          await started.close();
        },
      };
    },
  };
}

/** The replica's disk images in the guest's order (blocks disk0, disk1, …). */
export function replicaDisks(store: ReplicaStore): string[] {
  const paths: string[] = [];
  for (let i = 0; store.blocks.some((b) => b.id === diskBlockId(i)); i++) paths.push(store.imagePath(diskBlockId(i)));
  return paths;
}
