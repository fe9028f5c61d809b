// A guest's NICs as output commit sees them: one relay per NIC (each behind its own TAP on its own
// bridge), held and released as one stream of frames. A frame goes back out through the NIC it came
// from (remembered per frame object, which output commit keeps as it is).

import type { ReleaseGate } from '../../commit/index.ts';
import type { NetRelay } from './relay.ts';

/** What the primary needs of a guest's network: one relay, or a RelaySet of several. */
export interface GuestNet {
  onGuestFrame: ((frame: Buffer) => void) | null;
  onOutsideFrame: ((frame: Buffer) => void) | null;
  gate: ReleaseGate | null;
  sendOutside(f: Buffer): void;
  /** Bytes on their way to the guest still held by Rubato (not read by QEMU yet). */
  readonly guestBacklogBytes: number;
}

export class RelaySet implements GuestNet {
  private readonly nicOf = new WeakMap<Buffer, number>();
  private guestHandler: ((frame: Buffer) => void) | null = null;

  constructor(readonly relays: readonly NetRelay[]) {}

  get onGuestFrame(): ((frame: Buffer) => void) | null {
    return this.guestHandler;
  }
  set onGuestFrame(f: ((frame: Buffer) => void) | null) {
    this.guestHandler = f;
    for (const [i, r] of this.relays.entries())
      r.onGuestFrame = f
        ? (frame) => {
            this.nicOf.set(frame, i);
            f(frame);
          }
        : null;
  }

  /** (compare mode runs with one NIC only: a mirrored frame would not say which NIC it came in on) */
  get onOutsideFrame(): ((frame: Buffer) => void) | null {
    return this.relays[0]?.onOutsideFrame ?? null;
  }
  set onOutsideFrame(f: ((frame: Buffer) => void) | null) {
    for (const r of this.relays) r.onOutsideFrame = f;
  }

  /** One gate for every NIC: the VM's lease. */
  get gate(): ReleaseGate | null {
    return this.relays[0]?.gate ?? null;
  }
  set gate(g: ReleaseGate | null) {
    for (const r of this.relays) r.gate = g;
  }

  sendOutside(f: Buffer): void {
    this.relays[this.nicOf.get(f) ?? 0]?.sendOutside(f);
  }

  get guestBacklogBytes(): number {
    return this.relays.reduce((n, r) => n + r.guestBacklogBytes, 0);
  }
}
