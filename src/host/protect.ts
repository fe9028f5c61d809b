// The product path on one host: a user's VM (its definition file) run under protection, and the
// guest I/O a standby sets up when it takes over. `rubato protect`, `rubato standby`, the demo and
// the tests all come through here: the guest's NIC is a TAP on the named bridge behind the output
// commit relay, its disk is served by Rubato's NBD server, both wired to the primary controller.

import { join } from 'node:path';
import { readdirSync, rmSync } from 'node:fs';
import { logger, errorMessage, ensurePrivateDir } from '../util/index.ts';
import { QemuVm, type QemuBinary, VmSpecSchema, type Accel, type VmSpec, type ResolvedVm } from '../qemu/index.ts';
import { prepareDisk, type PreparedDisk, NbdServer, GuestIo, type NetRelay, checkBridge } from '../io/index.ts';
import {
  DISK_BLOCK_ID,
  type PrimaryController,
  type PrimaryEvent,
  type PrimaryOptions,
  type ReplicaStore,
  type Identity,
} from '../replication/index.ts';
import type { Policy } from '../scheduler/index.ts';
import { ReleaseGate, type LeaseCheck } from '../commit/index.ts';
import type { Ownership, OwnershipGuard } from '../coord/index.ts';
import { startPrimarySide, type PrimarySideOptions } from './primary-side.ts';

const log = logger('protect');

/** The guest's I/O on this host: a NIC behind the relay (when it has one) and its disk server. */
export interface HostIo {
  relay: GuestIo['relay'] | null;
  nbd: NbdServer | null;
  netSocket?: string;
  nbdSocket?: string;
  close(): Promise<void>;
}

/** Starts the I/O for a guest with `spec` on this host (`ns`: a test topology's host namespace). */
export async function startHostIo(
  spec: VmSpec,
  runDir: string,
  tag: string,
  diskPath: string | null,
  tapRelay: string,
  ns?: string,
  existing: { relay?: NetRelay | undefined; nbd?: NbdServer | undefined } = {},
): Promise<HostIo> {
  if (spec.mac && spec.bridge) {
    const io = await GuestIo.start(
      { bridge: spec.bridge, ...(ns ? { ns } : {}) },
      runDir,
      tag,
      diskPath,
      tapRelay,
      existing,
    );
    return {
      relay: io.relay,
      nbd: io.nbd,
      netSocket: io.netSocket,
      ...(io.nbdSocket ? { nbdSocket: io.nbdSocket } : {}),
      close: () => io.close(),
    };
  }
  const nbd = existing.nbd ?? (diskPath ? new NbdServer(diskPath, join(runDir, `${tag}.nbd`)) : null);
  if (!existing.nbd) await nbd?.start();
  return {
    relay: null,
    nbd,
    ...(nbd ? { nbdSocket: nbd.socketPath } : {}),
    close: async () => {
      await nbd?.close();
    },
  };
}

/** The QEMU description of a user's VM. */
export function specOf(def: ResolvedVm, accel: Accel): VmSpec {
  const nic = def.nics[0];
  const boot = def.boot;
  return VmSpecSchema.parse({
    name: def.name,
    accel,
    cpus: def.cpus,
    memMb: def.memoryMiB,
    ...(nic ? { mac: nic.mac, bridge: nic.bridge } : {}),
    ...(def.disks.length ? { disk: true } : {}),
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
}

export interface ProtectedVm {
  vm: QemuVm;
  primary: PrimaryController;
  guard: OwnershipGuard | null;
  disk: PreparedDisk | null;
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
 * bridges (the definition's files and the key are checked when they are read).
 */
export async function checkHostFor(def: ResolvedVm, ns?: string): Promise<void> {
  for (const nic of def.nics) await checkBridge({ bridge: nic.bridge, ...(ns ? { ns } : {}) });
}

/** Boots the user's VM on this host and starts protecting it (unprotected, said once, until a standby answers). */
export async function protectVm(o: ProtectOptions): Promise<ProtectedVm> {
  const runDir = join(o.stateDir, 'run');
  await checkHostFor(o.def, o.ns); // (before a qcow2 is converted)
  ensurePrivateDir(o.stateDir);
  ensurePrivateDir(runDir);
  const spec = specOf(o.def, o.accel);
  const disk = o.def.disks[0] ? await prepareDisk(o.def.disks[0], o.stateDir, o.def.name) : null;
  let io: HostIo | null = null;
  let vm: QemuVm | null = null;
  try {
    io = await startHostIo(spec, runDir, o.def.name, disk?.path ?? null, o.tapRelay, o.ns);
    const ownership = o.ownership;
    if (io.relay && ownership) io.relay.gate = new ReleaseGate((now) => ownership.leaseCheck(now));
    vm = await QemuVm.start(spec, {
      binary: o.binary,
      runDir,
      ...(io.netSocket ? { netSocket: io.netSocket } : {}),
      ...(io.nbdSocket ? { nbdSocket: io.nbdSocket } : {}),
    });
  } catch (e) {
    await vm?.stop();
    await io?.close().catch((err: unknown) => log.warn(`closing the guest's I/O: ${errorMessage(err)}`));
    disk?.release();
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
    io: { relay: io.relay ?? null, nbd: io.nbd },
    ownership: o.ownership,
    onEvent: o.onEvent,
    ...(o.onGuardEvent ? { onGuardEvent: o.onGuardEvent } : {}),
    ...(o.stopGuest ? { stopGuest: o.stopGuest } : {}),
    ...(o.primary ? { more: o.primary } : {}),
  });
  const ioRef = io;
  const vmRef = vm;
  let stopping: Promise<void> | null = null;
  const end = async (endProtection: () => Promise<void>, orderly: boolean, timeoutMs = o.stopTimeoutMs ?? 30_000) => {
    await endProtection();
    // In order: protection ended first (the standby keeps its replica and does not take over: the
    // guest's shutdown is not a failure), then the guest shuts down as a host would do it.
    if (orderly && timeoutMs > 0 && !vmRef.exited) {
      log.info(`VM ${o.def.name}: shutting the guest down (ACPI; powered off after ${timeoutMs / 1000} s)`);
      const how = await vmRef.shutdown(timeoutMs);
      log.info(`VM ${o.def.name}: ${how === 'guest' ? 'the guest shut down' : 'powered off'}`);
    } else await vmRef.stop();
    await ioRef.close().catch((e: unknown) => log.warn(`closing the guest's I/O: ${errorMessage(e)}`));
    disk?.release();
    // QEMU leaves its QMP and console sockets behind.
    for (const f of readdirSync(runDir))
      if (f.startsWith(o.def.name) && /\.(qmp|serial|mig)$/.test(f)) rmSync(join(runDir, f), { force: true });
  };
  return {
    vm,
    primary,
    guard,
    disk,
    stop: (timeoutMs) => (stopping ??= end(() => primary.stop(), true, timeoutMs)),
    guestLost: (why) => (stopping ??= end(() => primary.guestLost(why), false)),
  };
}

/** The standby's side: at failover, the guest's NIC on the same bridge name and its disk from the replica. */
export function restoreIo(
  runDir: string,
  tapRelay: string,
  ns?: string,
  leaseCheck?: (vm: string) => LeaseCheck,
): {
  prepare: (
    identity: Identity,
    store: ReplicaStore,
    existing?: { relay?: NetRelay | undefined; nbd?: NbdServer | undefined },
  ) => Promise<{ netSocket?: string; nbdSocket?: string }>;
  current: () => HostIo | null;
} {
  let io: HostIo | null = null;
  return {
    current: () => io,
    prepare: async (identity, store, existing) => {
      const hasDisk = store.blocks.some((b) => b.id === DISK_BLOCK_ID);
      // Tagged with the VM's name: one host may run several VMs' restored guests (their TAPs differ).
      io = await startHostIo(
        identity.spec,
        runDir,
        `${identity.vm}-active`,
        hasDisk ? store.imagePath(DISK_BLOCK_ID) : null,
        tapRelay,
        ns,
        existing,
      );
      // The restored guest's frames leave only under this host's lease (claimed before the restore).
      if (io.relay && leaseCheck) io.relay.gate = new ReleaseGate(leaseCheck(identity.vm));
      return {
        ...(io.netSocket ? { netSocket: io.netSocket } : {}),
        ...(io.nbdSocket ? { nbdSocket: io.nbdSocket } : {}),
      };
    },
  };
}
