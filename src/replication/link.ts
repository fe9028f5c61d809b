// One authenticated replication connection: framing, heartbeats, liveness, back-pressure and byte
// counters for the link telemetry (the handshake that keys it is handshake.ts). Frames go out in the
// order they were sent, encrypted slice by slice only as the socket drains (at most PUMP_BYTES ahead);
// sends resolve once theirs is in the socket and its buffer is below its high-water mark. The reader
// can be paused by its consumer. A frame that fails any check drops the connection with one clear log
// line; nothing reaches the replica.

import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { RubatoError, errorMessage, logger, sleep } from '../util/index.ts';
import { Liveness } from './liveness.ts';
import {
  FrameDecoder,
  FrameEncoder,
  FrameType,
  frameTypeName,
  helloKeys,
  type Direction,
  type Frame,
  type FrameKey,
} from './protocol/frame.ts';
import { decodeTime, encodeTime } from './protocol/messages.ts';

const log = logger('link');
const MAX_QUEUED_FRAMES = 10_000;
/** Frames at least this large go out slice by slice as they are encrypted (sendParts). */
const STREAM_FROM_BYTES = 256 << 10;
const STREAM_SLICE_BYTES = 64 << 10;
/**
 * Frames are encrypted only while the socket holds less than this unsent: the rest waits as plaintext (the
 * caller's buffers) until the socket drains. Encrypting a whole checkpoint at once queued all its ciphertext
 * in the socket, fresh memory faulted in page by page (about 1 ns per byte more in the cipher here) and
 * garbage for V8 to collect.
 */
const PUMP_BYTES = 1 << 20;

/** A frame queued to go out: its pieces in order, each with whether it is the last. */
interface Outgoing {
  pieces: Iterator<[Buffer, boolean]>;
  /** The last piece was handed to the socket; `ok`: the socket was below its high-water mark. */
  sent: (ok: boolean) => void;
  /** A flushed send: called once the kernel has the last piece. */
  written?: (e?: Error | null) => void;
  fail: (e: Error) => void;
}

export interface LinkStats {
  bytesSent: number;
  bytesReceived: number;
  rttMs: number | null;
}

export class Link extends EventEmitter {
  /** The payload of a REJECT the peer sent (the link is closed then). */
  rejected: Buffer | null = null;
  private readonly enc: FrameEncoder;
  private readonly dec: FrameDecoder;
  private queue: Frame[] = [];
  private waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | null = null;
  private closedErr: Error | null = null;
  private hbTimer: NodeJS.Timeout | null = null;
  private liveness: Liveness | null = null;
  private lastRxMs = Date.now();
  readonly stats: LinkStats = { bytesSent: 0, bytesReceived: 0, rttMs: null };
  /** Senders waiting for the socket's buffer to drain (resolved together, rejected at close). */
  private drainWaiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  /** Frames not (wholly) handed to the socket yet, in sequence order: they go out in this order. */
  private out: Outgoing[] = [];

  /** The direction this side sends in, and the one it receives. */
  readonly sends: Direction;
  readonly receives: Direction;

  constructor(
    readonly socket: Socket,
    psk: Buffer,
    readonly peer: string,
    readonly role: 'primary' | 'standby',
  ) {
    super();
    this.sends = role === 'primary' ? 'p2s' : 's2p';
    this.receives = role === 'primary' ? 's2p' : 'p2s';
    const k = helloKeys(psk);
    this.enc = new FrameEncoder(k[this.sends]);
    this.dec = new FrameDecoder(k[this.receives], peer);
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('drain', () => {
      // (the senders waiting for this drain; a frame the pump finishes below waits for the next one)
      const w = this.drainWaiters;
      this.drainWaiters = [];
      this.pump();
      for (const x of w) x.resolve();
    });
    socket.on('error', (e) => this.close(new RubatoError('RUBATO_PEER_LOST', `link to ${peer}: ${e.message}`)));
    socket.on('close', () => this.close(new RubatoError('RUBATO_PEER_LOST', `link to ${peer} closed`)));
  }

  private onData(d: Buffer): void {
    if (this.closedErr) return; // closing: nothing more is handed on
    this.lastRxMs = Date.now();
    this.liveness?.heard(this.lastRxMs);
    this.stats.bytesReceived += d.length;
    let frames: Frame[];
    try {
      frames = this.dec.push(d, performance.now());
      while (frames.length && this.handshakeFrameJustArrived(frames.at(-1)!)) {
        this.deliver(frames);
        frames = [];
        if (this.pendingKey) {
          this.dec.setKey(this.pendingKey);
          this.pendingKey = null;
        }
        frames = this.dec.drain();
      }
    } catch (e) {
      // The owner of the link reports why it closed (rate-limited for unauthenticated peers).
      log.debug(`rejected a frame from ${this.peer}, dropping the connection: ${errorMessage(e)}`);
      this.close(e as Error);
      return;
    }
    this.deliver(frames);
  }

  private pendingKey: FrameKey | null = null;
  private handshakeFrameJustArrived(f: Frame): boolean {
    return f.type === FrameType.HELLO || f.type === FrameType.WELCOME || f.type === FrameType.CHALLENGE;
  }

  private deliver(frames: Frame[]): void {
    for (const f of frames) {
      if (f.type === FrameType.HEARTBEAT) {
        this.sendQuietly(FrameType.HEARTBEAT_ECHO, f.payload);
        continue;
      }
      if (f.type === FrameType.HEARTBEAT_ECHO) {
        try {
          this.stats.rttMs = (nowUs() - decodeTime(f.payload)) / 1000;
        } catch {
          /* a malformed echo carries no round trip; the MAC already vouched for its sender */
        }
        continue;
      }
      if (f.type === FrameType.REJECT) {
        // Only the handshake can tell a REJECT bound to this session from a replayed one.
        this.rejected = f.payload;
        this.close(new RubatoError('RUBATO_PROTOCOL', `${this.peer} sent a REJECT`));
        return;
      }
      if (this.waiter) {
        const w = this.waiter;
        this.waiter = null;
        w.resolve(f);
      } else if (this.listenerCount('frame') > 0) this.emit('frame', f);
      else {
        if (this.queue.length >= MAX_QUEUED_FRAMES) {
          this.close(new RubatoError('RUBATO_PROTOCOL', `too many unread frames from ${this.peer}`));
          return;
        }
        this.queue.push(f);
      }
    }
  }

  /** The next frame (handshake use); after the handshake, listen to 'frame' instead. */
  next(timeoutMs: number): Promise<Frame> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    if (this.closedErr) return Promise.reject(this.closedErr);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.waiter = null;
        reject(new RubatoError('RUBATO_PEER_LOST', `no answer from ${this.peer} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiter = {
        resolve: (f) => {
          clearTimeout(t);
          resolve(f);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      };
    });
  }

  /** Starts emitting queued and future frames as 'frame' events. */
  startEvents(): void {
    const q = this.queue;
    this.queue = [];
    for (const f of q) this.emit('frame', f);
  }

  /**
   * Sends a frame (header, payload as it is, MAC). Resolves at once while the socket's buffer is
   * below its high-water mark, else when it has drained: a sender that awaits it cannot queue
   * without bound. Rejects when the link closes first.
   */
  send(type: number, epoch: number, payload?: Buffer, opts: { flushed?: boolean } = {}): Promise<void> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    if (payload && payload.length >= STREAM_FROM_BYTES && !opts.flushed)
      return this.sendParts(type, epoch, { parts: [payload], length: payload.length });
    const [head, body, mac] = this.enc.encodeParts(type, epoch, payload);
    return this.enqueue(body.length ? [head, body, mac] : [head, mac], opts.flushed ?? false);
  }

  /**
   * Queues a frame's pieces (its sequence number is taken: they go out after every frame queued before) and
   * writes what the socket takes. Resolves as send() does; `flushed`: once the kernel has the last piece.
   */
  private enqueue(pieces: Iterable<Buffer>, flushed: boolean): Promise<void> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const p = new Promise<void>((resolve, reject) => {
      const fail = (e: Error) => reject(e);
      this.out.push({
        pieces: withLast(pieces),
        sent: (ok) => {
          if (!flushed) this.drained(ok).then(resolve, reject);
        },
        ...(flushed ? { written: (e?: Error | null) => (e ? reject(e) : resolve()) } : {}),
        fail,
      });
    });
    if (this.out.length === 1) this.pump();
    return p;
  }

  /**
   * Writes queued frames, encrypting their slices as it goes, while the socket holds less than PUMP_BYTES unsent;
   * 'drain' goes on. Corked: the pieces of one round go out in one system call.
   */
  private pump(): void {
    while (this.out.length && !this.closedErr && this.socket.writableLength < PUMP_BYTES) {
      this.socket.cork();
      try {
        while (this.out.length && this.socket.writableLength < PUMP_BYTES) {
          const f = this.out[0]!;
          let r: IteratorResult<[Buffer, boolean]>;
          try {
            r = f.pieces.next();
          } catch (e) {
            // (a frame that cannot be encoded: the stream would be cut mid-frame, so the link ends)
            this.close(e instanceof Error ? e : new Error(String(e)));
            return;
          }
          if (r.done) {
            this.out.shift(); // (a frame of no pieces)
            f.sent(true);
            f.written?.();
            continue;
          }
          const [piece, last] = r.value;
          this.stats.bytesSent += piece.length;
          const ok = last && f.written ? this.socket.write(piece, f.written) : this.socket.write(piece);
          if (last) {
            this.out.shift();
            f.sent(ok);
          }
        }
      } finally {
        this.socket.uncork();
      }
    }
  }

  /** At once when the socket took the last write below its high-water mark, else when it drains. */
  private drained(ok: boolean): Promise<void> {
    if (ok) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.drainWaiters.push({ resolve, reject });
    });
  }

  /**
   * A large frame (a checkpoint) whose payload is the concatenation of `parts`: each encrypted
   * slice is written as soon as it is made, uncorked, so the peer receives and decrypts the first
   * slices while this side encrypts the rest; the payload is never joined into one buffer.
   */
  sendParts(type: number, epoch: number, payload: { parts: readonly Buffer[]; length: number }): Promise<void> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    return this.enqueue(this.enc.encodeSlices(type, epoch, payload, STREAM_SLICE_BYTES), false);
  }

  /**
   * Sends a last frame (BYE, FENCED) and resolves once the kernel has it, so that closing the link
   * right after cannot drop it.
   */
  sendLast(type: number): Promise<void> {
    return this.send(type, 0, undefined, { flushed: true });
  }

  /**
   * Stops reading the socket (TCP pushes back on the peer) until resumeReading(). Liveness counts
   * the paused time as heard: the silence is this side's own backlog, not the peer's.
   */
  pauseReading(): void {
    if (this.closedErr || this.readingPaused) return;
    this.readingPaused = true;
    this.socket.pause();
  }
  resumeReading(): void {
    if (this.closedErr || !this.readingPaused) return;
    this.readingPaused = false;
    this.liveness?.heard(Date.now());
    this.socket.resume();
  }
  private readingPaused = false;

  /** Keys (the handshake sets them). */
  setSendKey(key: FrameKey): void {
    this.enc.setKey(key);
  }
  /** Every frame sent from now on carries witness generation `g`, and every frame received must. */
  bindGeneration(g: number): void {
    this.enc.bindGeneration(g);
    this.dec.bindGeneration(g);
  }
  setReceiveKey(key: FrameKey): void {
    this.dec.setKey(key);
  }
  /** The largest frame accepted from the peer from now on. */
  setMaxFrameBytes(n: number): void {
    this.dec.setMaxFrameBytes(n);
  }
  /** The next handshake frame is the last with the current key; frames after it use `key`. */
  setReceiveKeyAfterNext(key: FrameKey): void {
    this.pendingKey = key;
  }

  /** Writes only the first `bytes` of a frame and stops (fault injection: death mid-transfer). */
  sendPartial(type: number, epoch: number, payload: Buffer, bytes: number): void {
    const buf = this.enc.encode(type, epoch, payload);
    this.enqueue([buf.subarray(0, Math.min(bytes, buf.length - 1))], false).catch(() => {});
  }

  get writableLength(): number {
    return this.socket.writableLength;
  }

  startHeartbeats(intervalMs: number, timeoutMs: number): void {
    const live = new Liveness(Date.now(), intervalMs, timeoutMs);
    live.heard(this.lastRxMs);
    this.liveness = live;
    let confirming = false;
    this.hbTimer = setInterval(() => {
      // While this side holds its reader paused (its own backlog), the peer's silence is ours.
      if (this.readingPaused) live.heard(Date.now());
      if (live.tick(Date.now()) && !confirming) {
        // Suspected: read what is already waiting in the socket (the poll phase runs before
        // setImmediate callbacks) before calling the peer silent.
        confirming = true;
        setImmediate(() => {
          confirming = false;
          if (this.closedErr || !live.confirm(Date.now())) return;
          const excused = live.excusedMs > 0 ? `; ${live.excusedMs} ms of this side's own stalls not counted` : '';
          this.close(
            new RubatoError(
              'RUBATO_PEER_LOST',
              `${this.peer} silent for ${live.silentMs(Date.now())} ms (timeout ${timeoutMs} ms${excused})`,
            ),
          );
        });
      }
      this.sendQuietly(FrameType.HEARTBEAT, encodeTime(nowUs()));
    }, intervalMs);
  }

  /** Heartbeats and their echoes: a failed send means the link is closing, which close() reports. */
  private sendQuietly(type: number, payload: Buffer): void {
    this.send(type, 0, payload).catch((e: unknown) =>
      log.debug(`${frameTypeName(type)} to ${this.peer} not sent: ${errorMessage(e)}`),
    );
  }

  /** How long the peer has been silent (with heartbeats running, this side's own stalls excluded). */
  silentMs(): number {
    return this.liveness ? this.liveness.silentMs(Date.now()) : Date.now() - this.lastRxMs;
  }

  get closed(): Error | null {
    return this.closedErr;
  }

  close(err?: Error): void {
    if (!this.finish(err)) return;
    this.socket.destroy();
  }

  /**
   * Ends the link after a last frame: half-closes (FIN, so the peer reads everything first) and
   * waits up to `timeoutMs` for the peer to close its side, then lets go of the socket. A plain
   * destroy could turn into a reset that makes the peer drop what it has not read yet.
   */
  async closeGracefully(err: Error, timeoutMs = 1000): Promise<void> {
    const gone = new Promise<void>((r) => {
      if (this.socket.destroyed) r();
      else this.socket.once('close', () => r());
    });
    if (!this.finish(err)) return;
    this.socket.end();
    await Promise.race([gone, sleep(timeoutMs)]);
    this.socket.destroy();
  }

  /** Marks the link closed (once): timers stop, waiters fail, 'close' is emitted. */
  private finish(err?: Error): boolean {
    if (this.closedErr) return false;
    this.closedErr = err ?? new RubatoError('RUBATO_PEER_LOST', `link to ${this.peer} closed`);
    if (this.hbTimer) clearInterval(this.hbTimer);
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(this.closedErr);
    }
    const drains = this.drainWaiters;
    this.drainWaiters = [];
    for (const x of drains) x.reject(this.closedErr);
    const out = this.out;
    this.out = [];
    for (const f of out) f.fail(this.closedErr);
    this.emit('close', this.closedErr);
    return true;
  }
}

/** The pieces, each with whether it is the last (one ahead: a generator's next slice is encrypted only when due). */
function* withLast(pieces: Iterable<Buffer>): Generator<[Buffer, boolean]> {
  let prev: Buffer | undefined;
  for (const p of pieces) {
    if (prev) yield [prev, false];
    prev = p;
  }
  if (prev) yield [prev, true];
}

export function nowUs(): number {
  return performance.timeOrigin * 1000 + performance.now() * 1000;
}
