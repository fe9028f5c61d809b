// The one place that decides whether this side may become primary. Today it allows activation
// whenever the primary is lost (see docs/replication.md: under a network partition both sides
// may run the guest). A later fencing issue replaces this gate; nothing else activates a guest.

export interface ActivationContext {
  reason: 'primary-lost' | 'manual';
  /** The protected VM's name. */
  vm: string;
  replicaEpoch: number;
  /** ms since the primary was last heard from. */
  silentMs: number;
  /** False once activating is moot (the primary came back): a gate that retries stops then. */
  stillWanted?: () => boolean;
}

export interface ActivationGate {
  /** `generation`: the witness generation this side now holds (a fencing token), when it has one. */
  mayActivate(ctx: ActivationContext): Promise<{ allow: boolean; why: string; generation?: number }>;
  /** A standby guards `vm` from now on: a gate that claims on evidence gathers it while the primary lives. */
  observe?(vm: string): void;
  /** It guards `vm` no more (it stopped, or the primary said goodbye). */
  unobserve?(vm: string): void;
  /**
   * Whether `vm`'s holder gave it up (its claim, seen while guarding, is gone: a controller that died
   * on a live host has its lease revoked at once): no reason to wait for its silence.
   */
  released?(vm: string): Promise<boolean>;
}

export const allowAlways: ActivationGate = {
  mayActivate: async (ctx) => ({
    allow: true,
    why:
      ctx.reason === 'manual'
        ? 'operator asked for failover'
        : `primary silent for ${ctx.silentMs} ms; no fencing configured`,
  }),
};
