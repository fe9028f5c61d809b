// The guest's network path through Rubato: QEMU's -netdev stream connects here; frames to the
// guest pass at once; frames from the guest go to `onGuestFrame` (output commit decides when they
// leave) and reach the outside (taprelay → TAP → bridge) through `sendOutside`. A transport only:
// it never decides on its own that a frame may leave.

import { createServer, connect, type Server, type Socket } from 'node:net';
import { rmSync } from 'node:fs';
import { logger, RubatoError, monotonicMs } from '../../util/index.ts';
import type { ReleaseGate } from '../../commit/index.ts';

const log = logger('relay');
const MAX_FRAME = 65536;
/** Bytes from the outside waiting for the guest to read them, past which more are dropped. */
const GUEST_BACKLOG_MAX = 4 << 20;

/**
 * Splits a be32-length-prefixed byte stream into frames. Returns the complete frames of what came,
 * as at most two runs (a frame completed from the last read's rest, then the whole frames that lie
 * in this read as it came; to be written on corked, in one system call), or null when no frame
 * completed. A frame cut by a read is completed by copying only itself: the read is not copied.
 */
export class Framer {
  /** The start of a frame a read cut (its bytes so far). */
  private rest: Buffer | null = null;
  push(d: Buffer, onFrame?: (f: Buffer) => void): Buffer[] | null {
    const runs: Buffer[] = [];
    if (this.rest) {
      const r = this.rest;
      if (r.length < 4) {
        // (too little of it to know its length: joined with the read, as it is rare and short)
        this.rest = null;
        d = Buffer.concat([r, d]);
      } else {
        const need = 4 + frameLength(r, 0) - r.length;
        if (d.length < need) {
          this.rest = Buffer.concat([r, d]);
          return null;
        }
        const f = Buffer.concat([r, d.subarray(0, need)]);
        this.rest = null;
        onFrame?.(f);
        runs.push(f);
        d = d.subarray(need);
      }
    }
    let off = 0;
    while (d.length - off >= 4) {
      const len = frameLength(d, off);
      if (d.length - off < 4 + len) break;
      onFrame?.(d.subarray(off, off + 4 + len)); // frames keep their length prefix
      off += 4 + len;
    }
    if (off > 0) runs.push(d.subarray(0, off));
    if (off < d.length) this.rest = d.subarray(off);
    return runs.length ? runs : null;
  }
}

/** The length a frame's prefix at `off` announces, bounded. */
function frameLength(b: Buffer, off: number): number {
  const len = b.readUInt32BE(off);
  if (len > MAX_FRAME) throw new RubatoError('RUBATO_PROTOCOL', `network frame of ${len} bytes`);
  return len;
}

/** Sockets corked until the end of this turn: what is written to one in a turn leaves in one system call. */
const corkedThisTurn = new WeakSet<Socket>();
function corkForTurn(s: Socket): void {
  if (corkedThisTurn.has(s)) return;
  corkedThisTurn.add(s);
  s.cork();
  process.nextTick(() => {
    corkedThisTurn.delete(s);
    s.uncork();
  });
}

export class NetRelay {
  /** Where frames from the guest go; until set, they leave at once (an unprotected guest). */
  onGuestFrame: ((frame: Buffer) => void) | null = null;
  /** Sees every frame from the outside on its way to the guest (compare mode mirrors them to the secondary). */
  onOutsideFrame: ((frame: Buffer) => void) | null = null;
  /** The lease check every frame passes on its way out (set by the VM's owner; null: no witness). */
  gate: ReleaseGate | null = null;
  private server: Server | null = null;
  private guest: Socket | null = null;
  private outside: Socket | null = null;
  private outsideDropped = 0;
  private guestDropped = 0;
  framesFromGuest = 0;
  framesToGuest = 0;

  constructor(readonly guestSocketPath: string) {}

  /** Bytes written towards the guest's QEMU that this process still holds (QEMU has not read them). */
  get guestBacklogBytes(): number {
    return this.guest?.writableLength ?? 0;
  }

  async start(): Promise<void> {
    rmSync(this.guestSocketPath, { force: true });
    this.server = createServer((s) => this.onGuest(s));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(this.guestSocketPath, () => resolve());
    });
  }

  private onGuest(s: Socket): void {
    this.guest?.destroy();
    this.guest = s;
    s.setNoDelay(true);
    const framer = new Framer();
    s.on('data', (d: Buffer) => {
      try {
        framer.push(d, (f) => {
          this.framesFromGuest++;
          if (this.onGuestFrame) this.onGuestFrame(f);
          else this.sendOutside(f);
        });
      } catch (e) {
        log.warn(`guest NIC stream broken: ${(e as Error).message}`);
        s.destroy();
      }
    });
    s.on('error', () => {});
    s.on('close', () => {
      if (this.guest === s) this.guest = null;
    });
  }

  /** Connects the outside (a taprelay socket); frames from it go to the guest unchanged. */
  async attachOutside(path: string, timeoutMs = 5000): Promise<void> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      try {
        const s = await new Promise<Socket>((resolve, reject) => {
          const c = connect(path, () => resolve(c));
          c.once('error', reject);
        });
        s.setNoDelay(true);
        this.outside = s;
        const framer = new Framer();
        s.on('data', (d: Buffer) => {
          try {
            // Whole frames only (a mirrored frame written by toGuest never lands inside one), and
            // all of a read's frames in one write: QEMU's stream netdev stalled for good under a
            // write per frame (wrk and redis-benchmark against the Debian guest, unreplicated).
            const whole = framer.push(d, (f) => {
              this.framesToGuest++;
              this.onOutsideFrame?.(f);
            });
            if (whole) this.toGuestBounded(whole);
          } catch (e) {
            log.warn(`TAP relay stream broken: ${(e as Error).message}`);
            s.destroy();
          }
        });
        s.on('error', () => {});
        s.on('close', () => {
          if (this.outside === s) this.outside = null;
        });
        return;
      } catch (e) {
        if (Date.now() > until)
          throw new RubatoError('RUBATO_NETNS', `cannot reach the TAP relay at ${path}: ${(e as Error).message}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  /**
   * A frame (with its length prefix) for the guest from elsewhere than the TAP (a secondary's mirrored input).
   * The frames of one turn reach QEMU in one system call: corked until the turn's end (a write per frame
   * cost the standby a system call and a write request each).
   */
  toGuest(f: Buffer): void {
    this.framesToGuest++;
    const g = this.guest;
    if (!g) return;
    corkForTurn(g);
    g.write(f);
  }

  /**
   * Frames from the outside for the guest, dropped (and counted) while its QEMU does not read them
   * (a paused guest: a restore waiting for its checkpoint), as a NIC drops what its ring cannot hold.
   */
  private toGuestBounded(runs: Buffer[]): void {
    const g = this.guest;
    if (!g) return;
    if (g.writableLength > GUEST_BACKLOG_MAX) this.guestDropped++;
    else {
      if (runs.length > 1) corkForTurn(g);
      for (const r of runs) g.write(r);
    }
  }

  /** A frame leaves for the outside (dropped, and counted, when no TAP is attached or the lease is not known valid). */
  sendOutside(f: Buffer): void {
    if (this.gate && !this.gate.allow(monotonicMs())) return;
    const out = this.outside;
    if (!out) {
      this.outsideDropped++;
      return;
    }
    // The frames released in one turn (a checkpoint's acknowledgement, a compared batch) leave in
    // one system call: corked until the turn's end.
    corkForTurn(out);
    out.write(f);
  }

  stats(): { framesFromGuest: number; framesToGuest: number; outsideDropped: number; guestDropped: number } {
    return {
      framesFromGuest: this.framesFromGuest,
      framesToGuest: this.framesToGuest,
      outsideDropped: this.outsideDropped,
      guestDropped: this.guestDropped,
    };
  }

  async close(): Promise<void> {
    this.guest?.destroy();
    this.outside?.destroy();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    rmSync(this.guestSocketPath, { force: true });
  }
}
