// The last check before any guest frame becomes visible outside: the holder of the VM's lease may
// release, nobody else. Every path out goes through it — frames released after their ack,
// released unprotected, passed through while unprotected, and a restored guest's — so a host
// whose lease is not known valid (cut from the witness, stalled past its TTL) shows nothing.
// Pure: the caller passes the time and says how to judge the lease.

/** Why a frame may not leave now (null: it may). */
export type LeaseCheck = (nowMs: number) => string | null;

export class ReleaseGate {
  private refused = 0;
  private lastWhy: string | null = null;

  constructor(private readonly check: LeaseCheck) {}

  /** May a frame leave at `nowMs`? A refusal is counted (the frame is dropped: TCP retransmits it). */
  allow(nowMs: number): boolean {
    const why = this.check(nowMs);
    if (why === null) return true;
    this.refused++;
    this.lastWhy = why;
    return false;
  }

  /** Frames kept from leaving, and the latest reason. */
  get blocked(): { frames: number; why: string | null } {
    return { frames: this.refused, why: this.lastWhy };
  }
}

/** No witness (--no-witness): every frame may leave; a cut link can run two copies. */
export const noLeaseCheck: LeaseCheck = () => null;
