// Pull-based reader over a byte stream that arrives in chunks. Synchronous accessors for data
// already buffered (the checkpoint path parses thousands of records without an await each) and
// `need(n)` to wait for more. A stream that ends early is a typed "truncated" error, never a hang.

import { RubatoError } from './errors.ts';

export class ByteReader {
  private chunks: Buffer[] = [];
  private head = 0; // read offset in chunks[0]
  private avail = 0;
  private waiter: { n: number; resolve: () => void; reject: (e: Error) => void } | null = null;
  private endError: Error | null = null;
  /** Total bytes consumed so far (for error messages and accounting). */
  consumed = 0;

  private flow: { high: number; low: number; pause: () => void; resume: () => void; paused: boolean } | null = null;

  constructor(private readonly what: string) {}

  /**
   * Back-pressure on the producer: `pause` once more than `high` bytes wait unread, `resume` once
   * fewer than `low` do (or a reader waits for more). Bounds the memory a fast producer can fill.
   */
  setFlowControl(high: number, low: number, pause: () => void, resume: () => void): void {
    this.flow = { high, low, pause, resume, paused: false };
  }

  private consumedSome(): void {
    const f = this.flow;
    if (f?.paused && this.avail < f.low) {
      f.paused = false;
      f.resume();
    }
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.avail += chunk.length;
    const f = this.flow;
    if (f && !f.paused && this.avail > f.high) {
      f.paused = true;
      f.pause();
    }
    if (this.waiter && this.avail >= this.waiter.n) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve();
    }
  }

  /** Puts bytes back at the front (a reader that took more than its part). */
  unshift(chunk: Buffer): void {
    if (chunk.length === 0) return;
    if (this.head > 0) {
      this.chunks[0] = this.chunks[0]!.subarray(this.head);
      this.head = 0;
    }
    this.chunks.unshift(chunk);
    this.avail += chunk.length;
    this.consumed -= chunk.length;
  }

  /** The producer is gone: pending and future waits fail with this error. */
  end(err?: Error): void {
    if (this.endError) return;
    this.endError =
      err ??
      new RubatoError(
        'RUBATO_STREAM_TRUNCATED',
        `${this.what}: stream ended after ${this.consumed + this.avail} bytes`,
        { offset: this.consumed + this.avail },
      );
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(this.endError);
    }
  }

  get available(): number {
    return this.avail;
  }
  get ended(): boolean {
    return this.endError !== null;
  }
  has(n: number): boolean {
    return this.avail >= n;
  }

  need(n: number): Promise<void> {
    if (this.avail >= n) return Promise.resolve();
    if (this.endError) {
      return Promise.reject(
        new RubatoError(
          'RUBATO_STREAM_TRUNCATED',
          `${this.what}: stream ended at byte ${this.consumed + this.avail} while ${n} more bytes were expected`,
          { offset: this.consumed + this.avail },
        ),
      );
    }
    if (this.waiter) return Promise.reject(new Error('ByteReader: concurrent need()'));
    if (this.flow?.paused) {
      this.flow.paused = false;
      this.flow.resume();
    }
    return new Promise((resolve, reject) => {
      this.waiter = {
        n,
        resolve,
        reject: (e) =>
          reject(
            new RubatoError(
              'RUBATO_STREAM_TRUNCATED',
              `${this.what}: stream ended at byte ${this.consumed + this.avail} while ${n} bytes were expected (${e.message})`,
              { offset: this.consumed + this.avail },
              { cause: e },
            ),
          ),
      };
    });
  }

  /** Takes n buffered bytes; zero-copy when they sit in one chunk. Caller ensured has(n). */
  take(n: number): Buffer {
    if (n > this.avail) throw new Error(`ByteReader.take(${n}) with ${this.avail} available`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length - this.head >= n) {
      out = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length - this.head, n - filled);
        c.copy(out, filled, this.head, this.head + k);
        filled += k;
        this.head += k;
        if (this.head === c.length) {
          this.chunks.shift();
          this.head = 0;
        }
      }
    }
    this.avail -= n;
    this.consumed += n;
    if (this.flow?.paused) this.consumedSome();
    return out;
  }

  peekU8(): number {
    const c = this.chunks[0]!;
    return c[this.head]!;
  }

  u8(): number {
    const c = this.chunks[0]!;
    const v = c[this.head]!;
    this.head++;
    if (this.head === c.length) {
      this.chunks.shift();
      this.head = 0;
    }
    this.avail--;
    this.consumed++;
    return v;
  }

  be16(): number {
    return this.take(2).readUInt16BE(0);
  }
  be32(): number {
    return this.take(4).readUInt32BE(0);
  }
  /** Big-endian 64-bit as a JS number (exact below 2^53: RAM offsets and sizes). */
  be64(): number {
    const b = this.take(8);
    return b.readUInt32BE(0) * 0x1_0000_0000 + b.readUInt32BE(4);
  }

  async readU8(): Promise<number> {
    if (!this.has(1)) await this.need(1);
    return this.u8();
  }
  async readBe32(): Promise<number> {
    if (!this.has(4)) await this.need(4);
    return this.be32();
  }
  async readBe64(): Promise<number> {
    if (!this.has(8)) await this.need(8);
    return this.be64();
  }
  async readBytes(n: number): Promise<Buffer> {
    if (!this.has(n)) await this.need(n);
    return this.take(n);
  }
  async readString8(): Promise<string> {
    const n = await this.readU8();
    return (await this.readBytes(n)).toString('latin1');
  }
}
