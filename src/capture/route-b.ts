// Route B (external): guest RAM lives in a shared file. Per checkpoint: stop, migrate the device
// state only (x-ignore-shared) to a socket Rubato reads, take the dirty pages from the RAM file
// (soft-dirty where the kernel really reports writes, else a full diff against the last copy),
// cont. Portable to QEMUs without COLO, and an independent cross-check of route A.
// The guest is always continued, also when a step fails.

import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { openSync, readSync, closeSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { RubatoError, assert, errorMessage, logger, ByteReader, withTimeout } from '../util/index.ts';
import { type QemuVm, MAIN_RAM_ID } from '../qemu/index.ts';
import { newRamState, readPrecopy, type PageSink, type RamState } from './stream/parser.ts';
import { PAGE_SIZE, type BaseImage, type Checkpoint, type DirtyPage } from './checkpoint.ts';
import { readRamFile } from './verify.ts';
import type { CheckpointOptions } from './route-a.ts';

const log = logger('capture-b');

export type DirtyTracking = 'auto' | 'soft-dirty' | 'diff';

export interface ExternalCaptureOptions {
  runDir: string;
  tracking?: DirtyTracking;
  checkpointTimeoutMs?: number;
}

interface StreamImage {
  machine: string;
  blocks: Map<string, Buffer>;
  order: string[];
  deviceState: Buffer;
}

export class ExternalCapture {
  private epoch = 0;
  private busy = false;
  private failed: Error | null = null;
  /** Last copy of the main RAM (diff mode) and of the small non-shared blocks (ROMs). */
  private prevMain: Buffer;
  private spare: Buffer | null = null;
  private prevOther: Map<string, Buffer>;
  private softDirty: 'unknown' | 'yes' | 'no';
  private ramVaddr: number | null = null;
  private readonly st: RamState = newRamState();

  private constructor(
    private readonly vm: QemuVm,
    private readonly ramFile: string,
    private readonly opts: ExternalCaptureOptions,
    base: BaseImage,
    private readonly server: Server,
    private readonly sockPath: string,
  ) {
    this.prevMain = Buffer.from(base.ram.get(MAIN_RAM_ID)!);
    this.prevOther = new Map([...base.ram].filter(([id]) => id !== MAIN_RAM_ID).map(([id, b]) => [id, Buffer.from(b)]));
    const t = opts.tracking ?? 'auto';
    this.softDirty = t === 'diff' ? 'no' : 'unknown';
  }

  get trackingMode(): string {
    return this.softDirty === 'yes' ? 'soft-dirty' : this.softDirty === 'no' ? 'diff' : 'unverified';
  }

  static async start(vm: QemuVm, opts: ExternalCaptureOptions): Promise<{ capture: ExternalCapture; base: BaseImage }> {
    const ramFile = vm.spec.ramFile;
    if (!ramFile)
      throw new RubatoError(
        'RUBATO_CONFIG',
        `route B needs the guest RAM in a shared file (VM ${vm.spec.name} has no ramFile)`,
      );
    await vm.qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'x-ignore-shared', state: true },
        { capability: 'events', state: true },
      ],
    });
    await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40 });
    const sockPath = join(opts.runDir, `${vm.spec.name}.migb`);
    rmSync(sockPath, { force: true });
    const server = createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(sockPath, () => resolve());
    });
    // The base image: one stop/migrate/copy/cont cycle with a full copy of the RAM file.
    const st = newRamState();
    await vm.qmp.execute('stop');
    try {
      const img = await migrateOnce(vm, server, sockPath, st, 30_000);
      const main = readRamFile(ramFile);
      const ram = new Map<string, Buffer>([[MAIN_RAM_ID, main], ...img.blocks]);
      const base: BaseImage = {
        machine: img.machine,
        blocks: [
          { id: MAIN_RAM_ID, lengthBytes: main.length },
          ...img.order.map((id) => ({ id, lengthBytes: img.blocks.get(id)!.length })),
        ],
        ram,
        deviceState: img.deviceState,
      };
      const capture = new ExternalCapture(vm, ramFile, opts, base, server, sockPath);
      capture.st.blocks = st.blocks;
      capture.clearSoftDirty();
      return { capture, base };
    } catch (e) {
      server.close();
      throw e;
    } finally {
      await continueGuest(vm);
    }
  }

  get lastEpoch(): number {
    return this.epoch;
  }

  async checkpoint(opts: CheckpointOptions = {}): Promise<Checkpoint> {
    if (this.failed)
      throw new RubatoError(
        'RUBATO_CAPTURE_FAILED',
        `capture of VM ${this.vm.spec.name} has failed: ${this.failed.message}`,
      );
    assert(!this.busy, 'one checkpoint at a time');
    this.busy = true;
    const t0 = performance.now();
    const pausedAtMs = Date.now();
    try {
      await this.vm.qmp.execute('stop');
      const img = await migrateOnce(
        this.vm,
        this.server,
        this.sockPath,
        this.st,
        this.opts.checkpointTimeoutMs ?? 10_000,
      );
      const pages: DirtyPage[] = [];
      this.collectMain(pages);
      for (const id of img.order) {
        const now = img.blocks.get(id)!;
        const prev = this.prevOther.get(id);
        for (let o = 0; o < now.length; o += PAGE_SIZE) {
          if (prev?.compare(now, o, o + PAGE_SIZE, o, o + PAGE_SIZE) !== 0)
            pages.push({ block: id, offset: o, data: now.subarray(o, o + PAGE_SIZE) });
        }
        this.prevOther.set(id, now);
      }
      this.clearSoftDirty();
      const tLocal = performance.now();
      this.epoch++;
      const cp: Checkpoint = {
        epoch: this.epoch,
        route: 'b',
        pages,
        deviceState: img.deviceState,
        ramBytes: pages.reduce((s, p) => s + (p.data ? PAGE_SIZE : 0), 0),
        zeroPages: 0,
        pausedAtMs,
        timings: { captureMs: tLocal - t0, pauseMsLocal: 0, heldMs: 0 },
      };
      if (opts.hold) {
        await opts.hold(cp);
        cp.timings.heldMs = performance.now() - tLocal;
      }
      await continueGuest(this.vm);
      cp.timings.pauseMsLocal = performance.now() - t0;
      return cp;
    } catch (e) {
      this.failed = e as Error;
      log.warn(`capture of VM ${this.vm.spec.name} failed, resuming the guest unprotected: ${errorMessage(e)}`);
      await continueGuest(this.vm);
      throw e;
    } finally {
      this.busy = false;
    }
  }

  /** Dirty pages of the main RAM: soft-dirty when verified, else a full diff against the last copy. */
  private collectMain(pages: DirtyPage[]): void {
    const useSoft = this.softDirty !== 'no' ? this.softDirtyPages() : null;
    if (this.softDirty === 'yes' && useSoft) {
      const fd = openSync(this.ramFile, 'r');
      try {
        for (const o of useSoft) {
          const data = Buffer.allocUnsafe(PAGE_SIZE);
          readSync(fd, data, 0, PAGE_SIZE, o);
          data.copy(this.prevMain, o);
          pages.push({ block: MAIN_RAM_ID, offset: o, data });
        }
      } finally {
        closeSync(fd);
      }
      return;
    }
    const now = readRamFile(this.ramFile, this.spare ?? undefined);
    const diff: number[] = [];
    for (let o = 0; o < now.length; o += PAGE_SIZE) {
      if (now.compare(this.prevMain, o, o + PAGE_SIZE, o, o + PAGE_SIZE) !== 0) {
        diff.push(o);
        pages.push({ block: MAIN_RAM_ID, offset: o, data: Buffer.from(now.subarray(o, o + PAGE_SIZE)) });
      }
    }
    this.spare = this.prevMain;
    this.prevMain = now;
    if (this.softDirty === 'unknown' && useSoft) {
      // Trust soft-dirty only if it reported every page the diff found, and at least one.
      const set = new Set(useSoft);
      const ok = diff.length > 0 && diff.every((o) => set.has(o));
      this.softDirty = ok ? 'yes' : 'no';
      log.info(
        ok
          ? 'dirty tracking: soft-dirty verified against a full diff'
          : `dirty tracking: this kernel's soft-dirty bits missed ${diff.filter((o) => !set.has(o)).length} of ${diff.length} written pages; using a full diff of the RAM file`,
      );
    } else if (this.softDirty === 'unknown') {
      this.softDirty = 'no';
      log.info('dirty tracking: soft-dirty unavailable; using a full diff of the RAM file');
    }
  }

  private clearSoftDirty(): void {
    if (this.softDirty === 'no') return;
    try {
      writeFileSync(`/proc/${this.vm.pid}/clear_refs`, '4');
    } catch {
      this.softDirty = 'no';
    }
  }

  /** Offsets (in the RAM file) whose soft-dirty bit (pagemap bit 55) is set in QEMU's mapping. */
  private softDirtyPages(): number[] | null {
    try {
      if (this.ramVaddr === null) {
        const maps = readFileSync(`/proc/${this.vm.pid}/maps`, 'utf8').split('\n');
        const line = maps.find((l) => l.endsWith(this.ramFile) && / rw.s /.test(l) && / 00000000 /.test(l));
        if (!line) return null;
        this.ramVaddr = parseInt(line.split('-')[0]!, 16);
      }
      const size = this.prevMain.length;
      const n = size / PAGE_SIZE;
      const entries = Buffer.allocUnsafe(n * 8);
      const fd = openSync(`/proc/${this.vm.pid}/pagemap`, 'r');
      try {
        readSync(fd, entries, 0, entries.length, (this.ramVaddr / PAGE_SIZE) * 8);
      } finally {
        closeSync(fd);
      }
      const out: number[] = [];
      for (let i = 0; i < n; i++) if (entries[i * 8 + 6]! & 0x80) out.push(i * PAGE_SIZE); // bit 55
      return out;
    } catch {
      return null;
    }
  }

  async close(): Promise<void> {
    this.failed ??= new RubatoError('RUBATO_CAPTURE_FAILED', 'capture closed');
    this.server.close();
    rmSync(this.sockPath, { force: true });
    await continueGuest(this.vm);
  }
}

/** One device-state migration of a stopped VM into the listening socket. */
async function migrateOnce(
  vm: QemuVm,
  server: Server,
  sockPath: string,
  st: RamState,
  timeoutMs: number,
): Promise<StreamImage> {
  const reader = new ByteReader(`device-state stream of VM ${vm.spec.name}`);
  const accepted = new Promise<Socket>((resolve) => {
    server.once('connection', (s: Socket) => {
      s.on('data', (d: Buffer) => reader.push(d));
      s.on('error', () => reader.end());
      s.on('close', () => reader.end());
      resolve(s);
    });
  });
  await vm.qmp.execute('migrate', { uri: `unix:${sockPath}` });
  const sock = await withTimeout(accepted, timeoutMs, `VM ${vm.spec.name} did not connect for its device state`);
  const blocks = new Map<string, Buffer>();
  const block = (id: string) => {
    let b = blocks.get(id);
    if (!b) {
      b = Buffer.alloc(st.blocks.get(id)!);
      blocks.set(id, b);
    }
    return b;
  };
  const sink: PageSink = {
    page: (id, off, data) => {
      data.copy(block(id), off);
    },
    zero: (id, off, fill) => {
      block(id).fill(fill, off, off + PAGE_SIZE);
    },
  };
  try {
    const pre = await withTimeout(
      readPrecopy(reader, st, sink),
      timeoutMs,
      `device state of VM ${vm.spec.name} did not arrive`,
    );
    for (const id of st.blockOrder) if (id !== MAIN_RAM_ID) block(id);
    // QEMU must leave finish-migrate before the VM may be continued (one migrate per cont).
    const until = Date.now() + timeoutMs;
    for (;;) {
      const m = await vm.qmp.execute<{ status?: string }>('query-migrate');
      if (m.status === 'completed') break;
      if (m.status === 'failed' || m.status === 'cancelled')
        throw new RubatoError('RUBATO_CAPTURE_FAILED', `device-state migration of VM ${vm.spec.name} ${m.status}`);
      if (Date.now() > until)
        throw new RubatoError('RUBATO_STREAM_TIMEOUT', `device-state migration of VM ${vm.spec.name} did not complete`);
      await new Promise((r) => setTimeout(r, 1));
    }
    return {
      machine: pre.config.machine,
      blocks,
      order: st.blockOrder.filter((id) => id !== MAIN_RAM_ID),
      deviceState: pre.deviceState,
    };
  } finally {
    sock.destroy();
  }
}

async function continueGuest(vm: QemuVm): Promise<void> {
  if (vm.exited || vm.qmp.isClosed) return;
  try {
    const until = Date.now() + 5000;
    for (;;) {
      const st = await vm.status();
      if (st === 'running') return;
      if (st !== 'finish-migrate') break;
      if (Date.now() > until) break;
      await new Promise((r) => setTimeout(r, 1));
    }
    await vm.qmp.execute('cont');
  } catch (e) {
    log.warn(`could not continue VM ${vm.spec.name}: ${errorMessage(e)}`);
  }
}
