// One authenticated replication connection: framing, the handshake (challenge–response with the
// pre-shared key), heartbeats, liveness and byte counters for the link telemetry. A frame that
// fails any check drops the connection with one clear log line; nothing reaches the replica.

import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { RubatoError, errorMessage } from '../util/errors.ts';
import { logger } from '../util/log.ts';
import { Liveness } from './liveness.ts';
import { FrameDecoder, FrameEncoder, FrameType, frameTypeName, helloKey, proof, proofEquals, sessionKey, type Frame } from './protocol/frame.ts';
import { NONCE_BYTES, decodeChallenge, decodeHello, decodeTime, decodeWelcome, encodeChallenge, encodeHello, encodeTime, encodeWelcome, type Identity, type Welcome } from './protocol/messages.ts';

const log = logger('link');
const MAX_QUEUED_FRAMES = 10_000;

export interface LinkStats {
  bytesSent: number;
  bytesReceived: number;
  rttMs: number | null;
}

export class Link extends EventEmitter {
  private readonly enc: FrameEncoder;
  private readonly dec: FrameDecoder;
  private queue: Frame[] = [];
  private waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | null = null;
  private closedErr: Error | null = null;
  private hbTimer: NodeJS.Timeout | null = null;
  private liveness: Liveness | null = null;
  private lastRxMs = Date.now();
  readonly stats: LinkStats = { bytesSent: 0, bytesReceived: 0, rttMs: null };

  constructor(readonly socket: Socket, psk: Buffer, readonly peer: string) {
    super();
    const k = helloKey(psk);
    this.enc = new FrameEncoder(k);
    this.dec = new FrameDecoder(k, peer);
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', (e) => this.close(new RubatoError('RUBATO_PEER_LOST', `link to ${peer}: ${e.message}`)));
    socket.on('close', () => this.close(new RubatoError('RUBATO_PEER_LOST', `link to ${peer} closed`)));
  }

  private onData(d: Buffer): void {
    this.lastRxMs = Date.now();
    this.liveness?.heard(this.lastRxMs);
    this.stats.bytesReceived += d.length;
    let frames: Frame[];
    try {
      frames = this.dec.push(d);
      while (frames.length && this.handshakeFrameJustArrived(frames.at(-1)!)) {
        this.deliver(frames);
        frames = [];
        if (this.pendingKey) { this.dec.setKey(this.pendingKey); this.pendingKey = null; }
        frames = this.dec.drain();
      }
    } catch (e) {
      log.warn(`rejected a frame from ${this.peer}, dropping the connection: ${errorMessage(e)}`);
      this.close(e as Error);
      return;
    }
    this.deliver(frames);
  }

  private pendingKey: Buffer | null = null;
  private handshakeFrameJustArrived(f: Frame): boolean {
    return f.type === FrameType.HELLO || f.type === FrameType.WELCOME || f.type === FrameType.CHALLENGE;
  }

  private deliver(frames: Frame[]): void {
    for (const f of frames) {
      if (f.type === FrameType.HEARTBEAT) { this.send(FrameType.HEARTBEAT_ECHO, 0, f.payload).catch(() => {}); continue; }
      if (f.type === FrameType.HEARTBEAT_ECHO) {
        try { this.stats.rttMs = (nowUs() - decodeTime(f.payload)) / 1000; } catch { /* ignore */ }
        continue;
      }
      if (f.type === FrameType.REJECT) {
        this.close(new RubatoError('RUBATO_AUTH_FAILED', `${this.peer} refused the connection: ${f.payload.toString('utf8')}`));
        return;
      }
      if (this.waiter) { const w = this.waiter; this.waiter = null; w.resolve(f); }
      else if (this.listenerCount('frame') > 0) this.emit('frame', f);
      else {
        if (this.queue.length >= MAX_QUEUED_FRAMES) { this.close(new RubatoError('RUBATO_PROTOCOL', `too many unread frames from ${this.peer}`)); return; }
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
      const t = setTimeout(() => { this.waiter = null; reject(new RubatoError('RUBATO_PEER_LOST', `no answer from ${this.peer} within ${timeoutMs} ms`)); }, timeoutMs);
      this.waiter = { resolve: (f) => { clearTimeout(t); resolve(f); }, reject: (e) => { clearTimeout(t); reject(e); } };
    });
  }

  /** Starts emitting queued and future frames as 'frame' events. */
  startEvents(): void {
    const q = this.queue;
    this.queue = [];
    for (const f of q) this.emit('frame', f);
  }

  /** Sends a frame; resolves when the kernel has taken it (back-pressure for big frames). */
  send(type: number, epoch: number, payload?: Buffer): Promise<void> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const [head, body, mac] = this.enc.encodeParts(type, epoch, payload);
    this.stats.bytesSent += head.length + body.length + mac.length;
    return new Promise((resolve, reject) => {
      this.socket.cork();
      this.socket.write(head);
      if (body.length) this.socket.write(body);
      this.socket.write(mac, (err) => (err ? reject(err) : resolve()));
      this.socket.uncork();
    });
  }

  /** Writes only the first `bytes` of a frame and stops (fault injection: death mid-transfer). */
  sendPartial(type: number, epoch: number, payload: Buffer, bytes: number): void {
    const buf = this.enc.encode(type, epoch, payload);
    this.socket.write(buf.subarray(0, Math.min(bytes, buf.length - 1)));
  }

  get writableLength(): number { return this.socket.writableLength; }

  startHeartbeats(intervalMs: number, timeoutMs: number): void {
    const live = new Liveness(Date.now(), intervalMs, timeoutMs);
    live.heard(this.lastRxMs);
    this.liveness = live;
    let confirming = false;
    this.hbTimer = setInterval(() => {
      if (live.tick(Date.now()) && !confirming) {
        // Suspected: read what is already waiting in the socket (the poll phase runs before
        // setImmediate callbacks) before calling the peer silent.
        confirming = true;
        setImmediate(() => {
          confirming = false;
          if (this.closedErr || !live.confirm(Date.now())) return;
          const excused = live.excusedMs > 0 ? `; ${live.excusedMs} ms of this side's own stalls not counted` : '';
          this.close(new RubatoError('RUBATO_PEER_LOST', `${this.peer} silent for ${live.silentMs(Date.now())} ms (timeout ${timeoutMs} ms${excused})`));
        });
      }
      this.send(FrameType.HEARTBEAT, 0, encodeTime(nowUs())).catch(() => {});
    }, intervalMs);
  }

  /** How long the peer has been silent (with heartbeats running, this side's own stalls excluded). */
  silentMs(): number { return this.liveness ? this.liveness.silentMs(Date.now()) : Date.now() - this.lastRxMs; }

  get closed(): Error | null { return this.closedErr; }

  close(err?: Error): void {
    if (this.closedErr) return;
    this.closedErr = err ?? new RubatoError('RUBATO_PEER_LOST', `link to ${this.peer} closed`);
    if (this.hbTimer) clearInterval(this.hbTimer);
    if (this.waiter) { const w = this.waiter; this.waiter = null; w.reject(this.closedErr); }
    this.socket.destroy();
    this.emit('close', this.closedErr);
  }

  // ---- handshake ----------------------------------------------------------------------------

  /** Standby side: challenge, check the primary's proof, welcome with our proof. */
  async acceptHandshake(psk: Buffer, welcome: (id: Identity) => Welcome, timeoutMs: number): Promise<Identity> {
    const nonceS = randomBytes(NONCE_BYTES);
    await this.send(FrameType.CHALLENGE, 0, encodeChallenge(nonceS));
    const f = await this.next(timeoutMs);
    if (f.type !== FrameType.HELLO) throw this.refuse(`expected HELLO, got ${frameTypeName(f.type)}`);
    const h = decodeHello(f.payload);
    if (!proofEquals(h.proof, proof(psk, 'primary', nonceS, h.nonce))) {
      throw this.refuse('authentication failed (the primary does not hold this standby\'s key)', 'RUBATO_AUTH_FAILED');
    }
    const key = sessionKey(psk, nonceS, h.nonce);
    await this.send(FrameType.WELCOME, 0, encodeWelcome(proof(psk, 'standby', h.nonce, nonceS), welcome(h.identity)));
    // The primary sends nothing between HELLO and our WELCOME: everything after is session-keyed.
    this.enc.setKey(key);
    this.dec.setKey(key);
    return h.identity;
  }

  /** Primary side: answer the challenge, check the standby's proof. */
  async connectHandshake(psk: Buffer, identity: Identity, timeoutMs: number): Promise<Welcome> {
    const f = await this.next(timeoutMs);
    if (f.type !== FrameType.CHALLENGE) throw this.refuse(`expected CHALLENGE, got ${frameTypeName(f.type)}`);
    const nonceS = decodeChallenge(f.payload);
    const nonceP = randomBytes(NONCE_BYTES);
    await this.send(FrameType.HELLO, 0, encodeHello(nonceP, proof(psk, 'primary', nonceS, nonceP), identity));
    const key = sessionKey(psk, nonceS, nonceP);
    this.pendingKey = key;
    const w = await this.next(timeoutMs);
    if (w.type !== FrameType.WELCOME) throw this.refuse(`expected WELCOME, got ${frameTypeName(w.type)}`);
    const d = decodeWelcome(w.payload);
    if (!proofEquals(d.proof, proof(psk, 'standby', nonceP, nonceS))) throw this.refuse('the standby failed to prove it holds the key', 'RUBATO_AUTH_FAILED');
    this.enc.setKey(key);
    return d.welcome;
  }

  private refuse(reason: string, code: 'RUBATO_PROTOCOL' | 'RUBATO_AUTH_FAILED' = 'RUBATO_PROTOCOL'): RubatoError {
    const err = new RubatoError(code, `handshake with ${this.peer}: ${reason}`, { peer: this.peer });
    this.send(FrameType.REJECT, 0, Buffer.from(reason)).catch(() => {}).finally(() => this.close(err));
    return err;
  }
}

export function nowUs(): number {
  return performance.timeOrigin * 1000 + performance.now() * 1000;
}
