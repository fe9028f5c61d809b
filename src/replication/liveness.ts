// Peer liveness for one link, as pure logic over a clock the caller passes in.
//
// A peer is declared silent only for time this side was actually awake to hear it. When our own
// process stalls (a major GC, a long synchronous copy, a starved CPU), the heartbeat timer fires
// late and whatever the peer sent meanwhile is still unread in the socket: counting the stall as
// the peer's silence would fail over a healthy primary. So a late tick shifts the silence window by
// the stall, and a silence verdict is only a suspicion until pending input has been read
// (`confirm`, called after one I/O turn of the event loop).

export class Liveness {
  private lastRxMs: number;
  private lastTickMs: number;
  /** Time excused because this side was stalled (for the log line and tests). */
  excusedMs = 0;

  constructor(
    nowMs: number,
    private readonly intervalMs: number,
    private readonly timeoutMs: number,
  ) {
    this.lastRxMs = nowMs;
    this.lastTickMs = nowMs;
  }

  /** Anything arrived from the peer. */
  heard(nowMs: number): void {
    this.lastRxMs = Math.max(this.lastRxMs, nowMs);
  }

  /** Milliseconds of silence this side was awake for. */
  silentMs(nowMs: number): number {
    return nowMs - this.lastRxMs;
  }

  /** A heartbeat-timer tick; true when the peer looks silent for longer than the timeout. */
  tick(nowMs: number): boolean {
    const late = nowMs - this.lastTickMs - this.intervalMs;
    this.lastTickMs = nowMs;
    // A tick more than one interval late means we were not running: do not charge the peer.
    if (late > this.intervalMs) {
      this.lastRxMs = Math.min(nowMs, this.lastRxMs + late);
      this.excusedMs += late;
    }
    return this.silentMs(nowMs) > this.timeoutMs;
  }

  /** After pending input has been read: is the peer still silent? */
  confirm(nowMs: number): boolean {
    return this.silentMs(nowMs) > this.timeoutMs;
  }
}
