// The one way a running guest is protected: its primary controller, wired to the guest's I/O and,
// with a witness, to its ownership — every frame out passes the lease-checked release gate, the
// guard fences and (once another copy took over) stops the guest, frames and acks carry the
// generation, and a QEMU that dies here gives the lease up before the standby is told. `rubato
// protect`, a standby that took over and re-protects, the chaos harness and the benchmarks all
// build their primary here, so what chaos tests is the wiring users run.

import { PrimaryController, type PrimaryEvent, type PrimaryOptions } from '../replication/index.ts';
import { ReleaseGate } from '../commit/index.ts';
import { guardOwnership, type Ownership, type OwnershipGuard } from '../coord/index.ts';
import type { Policy } from '../scheduler/index.ts';
import type { QemuVm } from '../qemu/index.ts';
import { DiskSet, type NbdServer, type GuestNet } from '../io/index.ts';

export interface PrimarySideOptions {
  vm: QemuVm;
  runDir: string;
  standby: PrimaryOptions['standby'];
  psk: Buffer;
  policy: Policy;
  heartbeatMs: number;
  timeoutMs: number;
  /** Wait between connection attempts once the quick retries are spent (default 1000 ms). */
  retryMs?: number;
  /** The guest's I/O on this host: its network relay (null: no NIC) and its disks' servers (in the guest's order). */
  io: { relay: GuestNet | null; nbds: readonly NbdServer[] };
  /** The VM's ownership in the witness; null only when the user refused one (--no-witness) or in benchmarks. */
  ownership: Ownership | null;
  onEvent: (e: PrimaryEvent) => void;
  /** What the guard says: witness-lost, owner (claimed again), ownership-lost. */
  onGuardEvent?: (e: Record<string, unknown>) => void;
  /** Stops the guest for good once another copy holds the VM (default: the controller crashes, QEMU killed). */
  stopGuest?: (why: string, primary: PrimaryController) => void;
  /** Further controller settings: the hold before unprotected release, an observer, fault injection. */
  more?: Partial<PrimaryOptions>;
}

export interface PrimarySide {
  primary: PrimaryController;
  /** Null without a witness. */
  guard: OwnershipGuard | null;
}

/** Builds the guest's primary controller with its gate and guard, and starts it (unprotected until a standby answers). */
export function startPrimarySide(o: PrimarySideOptions): PrimarySide {
  const { ownership } = o;
  // Should this controller die, its lease goes at once, once this QEMU is gone too.
  ownership?.tie(o.vm.pid);
  // (protectVm gates the relay before QEMU starts; a restored or harness guest's is gated here)
  if (ownership && o.io.relay) o.io.relay.gate ??= new ReleaseGate((now) => ownership.leaseCheck(now));
  const primary = new PrimaryController({
    vm: o.vm,
    runDir: o.runDir,
    standby: o.standby,
    psk: o.psk,
    periodMs: 25,
    policy: o.policy,
    heartbeatMs: o.heartbeatMs,
    timeoutMs: o.timeoutMs,
    retryMs: o.retryMs ?? 1000,
    fencing: ownership ? 'witness' : 'none',
    ...(o.io.relay ? { relay: o.io.relay } : {}),
    disks: new DiskSet(o.io.nbds),
    // QEMU died here: the lease goes before the standby is told, so that its claim succeeds at once.
    ...(ownership ? { generation: () => ownership.generation, beforeGuestLost: () => ownership.release() } : {}),
    onEvent: o.onEvent,
    ...o.more,
  });
  const guard = ownership
    ? guardOwnership(ownership, {
        protected: () => primary.protected,
        emit: (e) => o.onGuardEvent?.(e),
        stopGuest: (why) => {
          if (o.stopGuest) o.stopGuest(why, primary);
          else void primary.crash();
        },
      })
    : null;
  primary.start();
  return { primary, guard };
}
