// The NBD serving engine for the guest's disk: QEMU's NBD client (and stock tools) read and write a
// raw image through it. Every write lands in the image and marks its 4 KiB pages dirty for the
// current epoch, with their contents as they stand after the write, so that a checkpoint carries
// the disk exactly as it was at the pause. A malformed request gets an NBD error, never a crash.
// It runs in its own worker thread (nbd-worker.ts) and does its file I/O synchronously there: the
// controller's event loop never waits for the disk; NbdServer (nbd-server.ts) is its face.

import { createServer, type Server, type Socket } from 'node:net';
import { closeSync, fdatasyncSync, fstatSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { logger, RubatoError, errorMessage, ByteReader } from '../../util/index.ts';
import {
  CLIENT_FLAG,
  CMD,
  CMD_FLAG,
  ERR,
  IHAVEOPT,
  MAX_REQUEST_BYTES,
  OPT,
  REP,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  TX_FLAG,
  decodeRequest,
  infoBlockSize,
  infoExport,
  optionReply,
  serverGreeting,
  simpleReply,
  validateRequest,
} from './nbd-proto.ts';

import { PAGE_BYTES_NBD as PAGE } from './nbd-shared.ts';

const log = logger('nbd');
const MAX_OPTION_BYTES = 64 << 10;
/** Requests served at once per connection. */
const MAX_INFLIGHT = 32;
/** … and bytes being read or written at once (the next request waits below it). */
const MAX_INFLIGHT_BYTES = 64 << 20;
/** Bound on the dirty set of one epoch; past it the epoch must be ended (the engine is told). */
export const MAX_DIRTY_BYTES_PER_EPOCH = 512 << 20;

export interface DiskEpochStats {
  writes: number;
  writeBytes: number;
  flushes: number;
  reads: number;
  errors: number;
}

export interface DiskEpoch extends DiskEpochStats {
  /** Page offset → contents after the epoch's last write to it. */
  pages: Map<number, Buffer>;
}

export class NbdEngine {
  private server: Server | null = null;
  private fd: number | null = null;
  private size = 0;
  private dirty = new Map<number, Buffer>();
  private stats: DiskEpochStats = { writes: 0, writeBytes: 0, flushes: 0, reads: 0, errors: 0 };
  private readonly conns = new Set<Socket>();
  /** Called when the epoch's dirty set passes its bound (the engine should checkpoint now). */
  onPressure: (() => void) | null = null;
  /** Called on every flush (the scheduler treats flushes like waiting output). */
  onFlush: (() => void) | null = null;
  /** Called on every write and flush (traces record disk times). */
  onIo: ((kind: 'write' | 'flush') => void) | null = null;

  /**
   * Overlay mode (a compare-mode secondary's disk): writes land here, page by page, never in the
   * image; reads see them over the image. Dropped when the secondary takes a checkpoint, written
   * into the image when it is promoted (then the engine serves the image as usual).
   */
  private overlay: Map<number, Buffer> | null;

  constructor(
    readonly imagePath: string,
    readonly socketPath: string,
    readonly exportName = 'disk',
    private readonly readOnly = false,
    overlay = false,
  ) {
    this.overlay = overlay ? new Map() : null;
  }

  /** Overlay mode: forget the writes (the secondary was brought back to a checkpoint). */
  discardOverlay(): void {
    if (this.overlay) this.overlay = new Map();
  }

  /** Overlay mode ends: its pages go into the image, and writes go there from now on. */
  commitOverlay(): number {
    const o = this.overlay;
    if (!o) return 0;
    for (const [off, page] of o) writeSync(this.fd!, page, 0, PAGE, off);
    fdatasyncSync(this.fd!);
    this.overlay = null;
    return o.size;
  }

  /** Reads `length` bytes at `offset` into `buf`, overlay pages over the image. */
  private readInto(buf: Buffer, offset: number, length: number): void {
    readSync(this.fd!, buf, 0, length, offset);
    const o = this.overlay;
    if (!o?.size) return;
    const first = Math.floor(offset / PAGE) * PAGE;
    for (let p = first; p < offset + length; p += PAGE) {
      const page = o.get(p);
      if (!page) continue;
      const from = Math.max(p, offset);
      const to = Math.min(p + PAGE, offset + length);
      page.copy(buf, from - offset, from - p, to - p);
    }
  }

  /** Overlay mode: a write (null: zeroes) into the overlay's pages. */
  private writeOverlay(offset: number, length: number, payload: Buffer | null): void {
    const o = this.overlay!;
    const first = Math.floor(offset / PAGE) * PAGE;
    for (let p = first; p < offset + length; p += PAGE) {
      let page = o.get(p);
      if (!page) {
        page = Buffer.alloc(PAGE);
        readSync(this.fd!, page, 0, PAGE, p);
        o.set(p, page);
      }
      const from = Math.max(p, offset);
      const to = Math.min(p + PAGE, offset + length);
      if (payload) payload.copy(page, from - p, from - offset, to - offset);
      else page.fill(0, from - p, to - p);
    }
    this.stats.writes++;
    this.stats.writeBytes += length;
  }

  get sizeBytes(): number {
    return this.size;
  }
  /** The epoch's dirty set has passed its bound: the epoch must end now. */
  get underPressure(): boolean {
    return this.dirty.size * PAGE > MAX_DIRTY_BYTES_PER_EPOCH;
  }
  /** Pages dirtied in the running epoch. */
  get dirtyPages(): number {
    return this.dirty.size;
  }
  /** Called after every request and at every cut (the worker publishes the counters). */
  onChange: (() => void) | null = null;
  /**
   * Called as each request begins, before it touches the image or the counters: the worker ends
   * the epoch there if the controller marked a cut since the last request (see nbd-worker.ts).
   */
  beforeRequest: (() => void) | null = null;
  get epochStats(): DiskEpochStats {
    return { ...this.stats };
  }

  async start(): Promise<void> {
    this.fd = openSync(this.imagePath, this.readOnly ? 'r' : 'r+');
    this.size = fstatSync(this.fd).size;
    if (this.size % PAGE !== 0) {
      closeSync(this.fd);
      this.fd = null;
      throw new RubatoError(
        'RUBATO_CONFIG',
        `disk image ${this.imagePath} is ${this.size} bytes; Rubato needs a multiple of 4096`,
      );
    }
    rmSync(this.socketPath, { force: true });
    this.server = createServer((s) => this.serve(s));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(this.socketPath, () => resolve());
    });
  }

  /** Ends the epoch: its dirty pages and counters, and a fresh set for the next one. */
  cutEpoch(): DiskEpoch {
    const e: DiskEpoch = { pages: this.dirty, ...this.stats };
    this.dirty = new Map();
    this.stats = { writes: 0, writeBytes: 0, flushes: 0, reads: 0, errors: 0 };
    this.onChange?.();
    return e;
  }

  async close(): Promise<void> {
    for (const c of this.conns) c.destroy();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
    rmSync(this.socketPath, { force: true });
  }

  private serve(sock: Socket): void {
    this.conns.add(sock);
    const r = new ByteReader('NBD client');
    sock.on('data', (d: Buffer) => r.push(d));
    sock.on('close', () => {
      r.end();
      this.conns.delete(sock);
    });
    sock.on('error', () => {});
    void this.session(sock, r)
      .catch((e) => {
        log.debug(`NBD session ended: ${errorMessage(e)}`);
      })
      .finally(() => sock.destroy());
  }

  private async session(sock: Socket, r: ByteReader): Promise<void> {
    sock.write(serverGreeting());
    const clientFlags = await r.readBe32();
    if (!(clientFlags & CLIENT_FLAG.FIXED_NEWSTYLE)) {
      log.warn('NBD client does not speak fixed newstyle; closing');
      return;
    }
    const noZeroes = (clientFlags & CLIENT_FLAG.NO_ZEROES) !== 0;
    const txFlags =
      TX_FLAG.HAS_FLAGS |
      TX_FLAG.SEND_FLUSH |
      TX_FLAG.SEND_FUA |
      TX_FLAG.SEND_TRIM |
      TX_FLAG.SEND_WRITE_ZEROES |
      (this.readOnly ? TX_FLAG.READ_ONLY : 0);
    // Option haggling
    for (;;) {
      const magic = (await r.readBytes(8)).readBigUInt64BE(0);
      if (magic !== IHAVEOPT) {
        log.warn('NBD option without IHAVEOPT; closing');
        return;
      }
      const opt = await r.readBe32();
      const len = await r.readBe32();
      if (len > MAX_OPTION_BYTES) {
        sock.write(optionReply(opt, REP.ERR_INVALID));
        return;
      }
      const data = await r.readBytes(len);
      if (opt === OPT.EXPORT_NAME) {
        const name = data.toString('utf8');
        if (name !== this.exportName && name !== '') return; // protocol: the server just closes
        const b = Buffer.alloc(10 + (noZeroes ? 0 : 124));
        b.writeBigUInt64BE(BigInt(this.size), 0);
        b.writeUInt16BE(txFlags, 8);
        sock.write(b);
        break;
      }
      if (opt === OPT.GO || opt === OPT.INFO) {
        if (data.length < 6 || data.readUInt32BE(0) + 6 > data.length) {
          sock.write(optionReply(opt, REP.ERR_INVALID));
          continue;
        }
        const nameLen = data.readUInt32BE(0);
        const name = data.subarray(4, 4 + nameLen).toString('utf8');
        if (name !== this.exportName && name !== '') {
          sock.write(optionReply(opt, REP.ERR_UNKNOWN));
          continue;
        }
        sock.write(optionReply(opt, REP.INFO, infoExport(this.size, txFlags)));
        sock.write(optionReply(opt, REP.INFO, infoBlockSize(1, PAGE, MAX_REQUEST_BYTES)));
        sock.write(optionReply(opt, REP.ACK));
        if (opt === OPT.GO) break;
        continue;
      }
      if (opt === OPT.ABORT) {
        sock.write(optionReply(opt, REP.ACK));
        return;
      }
      if (opt === OPT.LIST) {
        const n = Buffer.from(this.exportName);
        const d = Buffer.alloc(4 + n.length);
        d.writeUInt32BE(n.length, 0);
        n.copy(d, 4);
        sock.write(optionReply(opt, REP.SERVER, d));
        sock.write(optionReply(opt, REP.ACK));
        continue;
      }
      sock.write(optionReply(opt, REP.ERR_UNSUP));
    }
    // Transmission: requests are served concurrently, at most MAX_INFLIGHT at a time; while the
    // socket cannot take more replies, no further request is read (back-pressure on the client).
    const inflight = new Set<Promise<void>>();
    let inflightBytes = 0;
    const start = (p: Promise<void>, bytes: number) => {
      inflight.add(p);
      inflightBytes += bytes;
      void p.finally(() => {
        inflight.delete(p);
        inflightBytes -= bytes;
      });
    };
    try {
      for (;;) {
        while (inflight.size >= MAX_INFLIGHT || inflightBytes >= MAX_INFLIGHT_BYTES) await Promise.race(inflight);
        if (sock.writableNeedDrain) {
          await new Promise<void>((res) => {
            const done = () => {
              sock.off('drain', done);
              sock.off('close', done);
              res();
            };
            sock.on('drain', done);
            sock.on('close', done);
          });
        }
        const head = await r.readBytes(REQUEST_HEADER_BYTES);
        this.beforeRequest?.();
        const req = decodeRequest(head);
        const v = validateRequest(req, this.size, this.readOnly);
        if (req.magic !== REQUEST_MAGIC) {
          // The stream is out of step: answer once, then hang up.
          this.stats.errors++;
          sock.write(simpleReply(ERR.EINVAL, req.handle));
          log.warn(`NBD: ${v.ok ? 'bad request' : v.why}; closing the connection`);
          return;
        }
        let payload: Buffer | null = null;
        if (req.type === CMD.WRITE) {
          if (req.length > MAX_REQUEST_BYTES) {
            sock.write(simpleReply(ERR.EOVERFLOW, req.handle));
            return;
          }
          payload = await r.readBytes(req.length);
        }
        if (!v.ok) {
          this.stats.errors++;
          log.debug(`NBD error reply: ${v.why}`);
          sock.write(simpleReply(v.error, req.handle));
          continue;
        }
        if (req.type === CMD.DISC) return;
        start(this.serveRequest(sock, req, payload), req.type === CMD.READ || req.type === CMD.WRITE ? req.length : 0);
      }
    } finally {
      await Promise.allSettled(inflight);
    }
  }

  /**
   * One request. A write's reply goes out only after its pages are recorded dirty (read back as
   * they now stand), so every write the guest saw completed before a checkpoint's pause is in
   * that checkpoint: QEMU drains its block requests before it saves the device state.
   */
  private async serveRequest(
    sock: Socket,
    req: ReturnType<typeof decodeRequest>,
    payload: Buffer | null,
  ): Promise<void> {
    this.beforeRequest?.(); // (a write's payload may have come in a later turn)
    try {
      switch (req.type) {
        case CMD.READ: {
          const buf = Buffer.allocUnsafe(req.length);
          this.readInto(buf, req.offset, req.length);
          this.stats.reads++;
          sock.write(simpleReply(0, req.handle, buf));
          break;
        }
        case CMD.WRITE:
          if (this.overlay) {
            this.writeOverlay(req.offset, req.length, payload);
            sock.write(simpleReply(0, req.handle));
            break;
          }
          writeSync(this.fd!, payload!, 0, req.length, req.offset);
          this.written(req.offset, req.length, (req.flags & CMD_FLAG.FUA) !== 0, payload);
          sock.write(simpleReply(0, req.handle));
          break;
        case CMD.TRIM:
        case CMD.WRITE_ZEROES:
          if (this.overlay) {
            this.writeOverlay(req.offset, req.length, null);
            sock.write(simpleReply(0, req.handle));
            break;
          }
          writeSync(this.fd!, Buffer.alloc(req.length), 0, req.length, req.offset);
          this.written(req.offset, req.length, (req.flags & CMD_FLAG.FUA) !== 0, null);
          sock.write(simpleReply(0, req.handle));
          break;
        case CMD.FLUSH:
          fdatasyncSync(this.fd!);
          this.stats.flushes++;
          this.onIo?.('flush');
          this.onFlush?.();
          sock.write(simpleReply(0, req.handle));
          break;
        case CMD.CACHE:
          sock.write(simpleReply(0, req.handle));
          break;
      }
    } catch (e) {
      this.stats.errors++;
      log.warn(`NBD I/O error: ${errorMessage(e)}`);
      if (!sock.destroyed) sock.write(simpleReply(ERR.EIO, req.handle));
    }
    this.onChange?.();
  }

  /**
   * Marks the pages a write touched dirty, with their contents as they now stand: pages the write
   * covered whole are its payload; the partly covered ones at its edges are read back from the
   * image. Synchronous, like the write before it: no other request runs in between, so the dirty
   * map always holds what the image holds.
   */
  private written(offset: number, length: number, fua: boolean, payload: Buffer | null): void {
    this.stats.writes++;
    this.stats.writeBytes += length;
    this.onIo?.('write');
    if (fua) {
      fdatasyncSync(this.fd!);
      this.stats.flushes++;
      this.onIo?.('flush');
    }
    const first = Math.floor(offset / PAGE) * PAGE;
    const end = Math.min(this.size, Math.ceil((offset + length) / PAGE) * PAGE);
    for (let o = first; o < end; o += PAGE) {
      const whole = o >= offset && o + PAGE <= offset + length;
      if (whole && payload) {
        this.dirty.set(o, Buffer.from(payload.subarray(o - offset, o - offset + PAGE)));
      } else if (whole) {
        this.dirty.set(o, Buffer.alloc(PAGE)); // zeroes written
      } else {
        const page = Buffer.alloc(PAGE);
        readSync(this.fd!, page, 0, PAGE, o);
        this.dirty.set(o, page);
      }
    }
    if (this.underPressure) this.onPressure?.();
  }
}
