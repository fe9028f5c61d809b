// What a holder may assume of its witness lease, on its own monotonic clock. Pure: times are
// passed in (ms), so the live ownership and the fault simulator share every rule here.
//
// etcd starts a lease's TTL when it handles the grant or keep-alive, never before its request was
// sent. So a lease is known valid only from the *send* time of the latest request etcd confirmed,
// and only for part of the TTL (LOSS_FRACTION: margin for clock rate and a renewal in flight).
// Past the whole TTL since that send time etcd may have expired it and another host may hold the
// VM: the holder must then act as if that happened until etcd says otherwise.

/** A holder acts as owner for this fraction of the TTL after its last confirmed request was sent. */
export const LOSS_FRACTION = 2 / 3;

export class LeaseClock {
  private sentMs: number | null = null;
  private gone = false;

  constructor(
    readonly ttlMs: number,
    readonly lossFraction = LOSS_FRACTION,
  ) {}

  /** etcd confirmed a grant or keep-alive whose request was sent at `sentMs` (its answer may come late). */
  confirmed(sentMs: number): void {
    if (this.sentMs === null || sentMs > this.sentMs) this.sentMs = sentMs;
    this.gone = false;
  }

  /** etcd said the lease is gone (expired or revoked). */
  expired(): void {
    this.gone = true;
  }

  /** A new lease follows (after a loss, a claim grants a fresh one). */
  reset(): void {
    this.sentMs = null;
    this.gone = false;
  }

  get lastConfirmedSentMs(): number | null {
    return this.sentMs;
  }

  /** Until when this holder may release output or run alone (null: not at all). */
  validUntilMs(): number | null {
    return this.gone || this.sentMs === null ? null : this.sentMs + this.ttlMs * this.lossFraction;
  }

  valid(nowMs: number): boolean {
    const until = this.validUntilMs();
    return until !== null && nowMs < until;
  }

  /** ms since the latest confirmed request was sent (Infinity: none). */
  silentMs(nowMs: number): number {
    return this.sentMs === null ? Number.POSITIVE_INFINITY : nowMs - this.sentMs;
  }

  /** The whole TTL passed since the last confirmed request: etcd may have let another host claim the VM. */
  mayHaveExpired(nowMs: number): boolean {
    return this.gone || this.silentMs(nowMs) >= this.ttlMs;
  }
}

/** How a VM is fenced: by the witness, or (the user's explicit choice, --no-witness) not at all. */
export type Fencing = 'witness' | 'none';

/** Allowance for two hosts' monotonic clocks running at different rates (they differ by parts per million). */
export const CLOCK_RATE_MARGIN = 0.05;

/**
 * How long a standby must see the holder's owner key at one revision before it may claim the VM
 * over it. Every renewal writes the key again, so the holder's latest confirmed renewal was sent
 * before that revision was applied, hence before the standby first saw it: past this wait, the
 * holder's lease clock (`LOSS_FRACTION` of the TTL from that send) has run out on any clock.
 */
export function takeoverWaitMs(ttlMs: number, lossFraction = LOSS_FRACTION): number {
  return ttlMs * lossFraction * (1 + CLOCK_RATE_MARGIN);
}
