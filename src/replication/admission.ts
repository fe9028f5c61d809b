// Who may occupy the standby before authenticating: a bounded number of unauthenticated
// connections in all and per source address, and refusals logged once per address per interval
// (an attacker's flood must not become a log flood). Pure: the caller passes the time.

export interface AdmissionLimits {
  /** Unauthenticated connections at once, from all addresses. */
  maxPending: number;
  /** … from one source address. */
  maxPendingPerAddress: number;
  /** One log line per address per this many ms. */
  logEveryMs: number;
}

export const DEFAULT_ADMISSION: AdmissionLimits = { maxPending: 64, maxPendingPerAddress: 8, logEveryMs: 10_000 };

export class Admission {
  private pending = 0;
  private readonly perAddress = new Map<string, number>();
  private readonly loggedAt = new Map<string, number>();
  private suppressed = new Map<string, number>();

  constructor(private readonly limits: AdmissionLimits = DEFAULT_ADMISSION) {}

  get pendingCount(): number {
    return this.pending;
  }

  /** A new connection from `address`: may it try to authenticate? (If so, call release() once.) */
  admit(address: string): boolean {
    const n = this.perAddress.get(address) ?? 0;
    if (this.pending >= this.limits.maxPending || n >= this.limits.maxPendingPerAddress) return false;
    this.pending++;
    this.perAddress.set(address, n + 1);
    return true;
  }

  /** The connection authenticated or closed: it no longer counts. */
  release(address: string): void {
    const n = this.perAddress.get(address) ?? 0;
    if (n <= 0) return;
    this.pending--;
    if (n === 1) this.perAddress.delete(address);
    else this.perAddress.set(address, n - 1);
  }

  /**
   * Should a problem with `address` be logged now? Returns the number of problems not logged since
   * the last line (0 for the first), or null to stay quiet.
   */
  shouldLog(address: string, nowMs: number): number | null {
    const at = this.loggedAt.get(address);
    if (at !== undefined && nowMs - at < this.limits.logEveryMs) {
      this.suppressed.set(address, (this.suppressed.get(address) ?? 0) + 1);
      return null;
    }
    if (this.loggedAt.size > 10_000) {
      this.loggedAt.clear();
      this.suppressed.clear();
    } // bounded memory under address churn
    this.loggedAt.set(address, nowMs);
    const quiet = this.suppressed.get(address) ?? 0;
    this.suppressed.delete(address);
    return quiet;
  }
}
