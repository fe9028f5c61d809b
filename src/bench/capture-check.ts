// `rubato capture-check`: protect a dirtier guest locally for N checkpoints, compare the replica
// with the paused guest's RAM byte for byte at sampled checkpoints, cross-check route A's dirty set
// against a full diff at the same pause, then restore the last checkpoint on a fresh QEMU and see
// the guest continue. Everything it starts is stopped and removed, also on failure.

import { copyFileSync } from 'node:fs';
import { sleep, makeTempDir, removeTempDir, logger, median, percentile, round } from '../util/index.ts';
import { join } from 'node:path';
import {
  QemuVm,
  type QemuBinary,
  DIRTIER_LINE_RE,
  guestAppend,
  MAIN_RAM_ID,
  parseDirtierLine,
  type Accel,
  type VmSpec,
  restoreVm,
} from '../qemu/index.ts';
import { ReplicaStore } from '../replication/index.ts';
import { ColoCapture, ExternalCapture, diffPages, readRamFile, PauseMeter, type Checkpoint } from '../capture/index.ts';

const log = logger('capture-check');

export interface CaptureCheckOptions {
  route: 'a' | 'b';
  seconds: number;
  minCheckpoints: number;
  memMb: number;
  ratePagesPerMs: number;
  epochMs: number;
  samples: number;
  accel: Accel;
  binary: QemuBinary;
  guest: { kernel: string; initrd: string };
  cpus: number;
  /** Route A: pre-send the dirty RAM every this many ms during each epoch (QEMU patch 0003). */
  presendMs?: number;
  onStatus?: (line: string) => void;
}

export interface CaptureCheckResult {
  route: 'a' | 'b';
  /** With --presend-ms: pre-sends taken, and the median pages a checkpoint's pause still carried (its own pass). */
  presends?: number;
  pausePagesMedian?: number;
  /** Route A: how checkpoints and pre-sends were asked for (QEMU's trigger FIFO, or QMP). */
  triggers?: { fifo: number; qmp: number };
  accel: Accel;
  checkpoints: number;
  verified: number;
  identical: boolean;
  mismatchedPages: number;
  /** Route A only: at every sampled pause the pages a full diff found changed were all in A's dirty set. */
  routesAgree: boolean | null;
  restored: boolean;
  selfCheckOk: boolean;
  counterBefore: number;
  counterAfter: number;
  restoreMs: number;
  pauseMsMedian: number;
  pauseMsP99: number;
  dirtyPagesMedian: number;
  bytesPerCheckpointMedian: number;
  /** The verifier, shown one corrupted replica page on real data, found exactly that page. */
  negativeControl: boolean;
  tracking?: string;
  error?: string;
}

export async function runCaptureCheck(o: CaptureCheckOptions): Promise<CaptureCheckResult> {
  const dir = makeTempDir('rubato-check-');
  const status = o.onStatus ?? (() => {});
  const wssMb = Math.max(4, Math.min(32, Math.floor(o.memMb / 4)));
  const spec: VmSpec & { ramFile: string } = {
    name: `check-${o.route}`,
    accel: o.accel,
    cpus: o.cpus,
    memMb: o.memMb,
    ramFile: join(dir, 'guest.ram'),
    kernel: o.guest.kernel,
    initrd: o.guest.initrd,
    append: guestAppend(['dirtier', o.ratePagesPerMs, wssMb, 100]),
  };
  const result: CaptureCheckResult = {
    route: o.route,
    accel: o.accel,
    checkpoints: 0,
    verified: 0,
    identical: false,
    mismatchedPages: 0,
    routesAgree: o.route === 'a' ? true : null,
    restored: false,
    selfCheckOk: false,
    counterBefore: -1,
    counterAfter: -1,
    restoreMs: -1,
    pauseMsMedian: Number.NaN,
    pauseMsP99: Number.NaN,
    dirtyPagesMedian: Number.NaN,
    bytesPerCheckpointMedian: Number.NaN,
    negativeControl: false,
  };
  let vm: QemuVm | null = null;
  let restored: QemuVm | null = null;
  try {
    status(`booting a ${o.memMb} MB guest (${o.accel}), dirtier at ${o.ratePagesPerMs} pages/ms over ${wssMb} MB`);
    vm = await QemuVm.start(spec, { binary: o.binary, runDir: dir });
    await vm.waitSerial(/RUBATO dirtier t=/, 60_000);
    const meter = new PauseMeter(vm.qmp);
    status(`starting route ${o.route.toUpperCase()} capture`);
    const { capture, base } =
      o.route === 'a'
        ? await ColoCapture.start(vm, {
            runDir: dir,
            onProgress: (b) => status(`initial copy: ${(b / 1048576).toFixed(0)} MB`),
          })
        : await ExternalCapture.start(vm, { runDir: dir });
    meter.startNow();
    const store = await ReplicaStore.create(join(dir, 'replica'), spec.name, base, { fsync: false });
    const sampleEvery = Math.max(1, Math.floor(o.minCheckpoints / o.samples));
    const dirtyCounts: number[] = [];
    const bytes: number[] = [];
    let ramCopy: Buffer | undefined;
    // the replica's image, read into one buffer each time (no 256 MB allocation per sample)
    let image: Buffer | undefined;
    const verifyHeld = async (cp: Checkpoint) => {
      // The guest is paused at checkpoint cp. Route B's view: what changed since the replica's epoch.
      ramCopy = readRamFile(spec.ramFile, ramCopy);
      if (o.route === 'a') {
        const changed = diffPages(ramCopy, (image = await store.readImage(MAIN_RAM_ID, 0, undefined, image)));
        const reported = new Set(cp.pages.filter((p) => p.block === MAIN_RAM_ID).map((p) => p.offset));
        const missed = changed.filter((off) => !reported.has(off));
        if (missed.length) {
          result.routesAgree = false;
          log.error(`route A missed ${missed.length} changed pages at checkpoint ${cp.epoch}`);
        }
      }
      await store.commit(cp);
      const diff = diffPages(ramCopy, (image = await store.readImage(MAIN_RAM_ID, 0, undefined, image)));
      result.verified++;
      result.mismatchedPages += diff.length;
      if (result.verified === 1) {
        // Negative control: the same comparison must catch a single corrupted page.
        // (the shared buffer: each use reads it afresh)
        const corrupted = (image = await store.readImage(MAIN_RAM_ID, 0, undefined, image));
        const page = Math.floor(Math.random() * (corrupted.length / 4096));
        const at = page * 4096 + 1234;
        corrupted[at] = corrupted[at]! ^ 0x40;
        const found = diffPages(ramCopy, corrupted);
        result.negativeControl = found.length === diff.length + 1 && found.includes(page * 4096);
      }
      if (diff.length)
        log.error(`replica differs from the guest in ${diff.length} pages at checkpoint ${cp.epoch}`, {
          first: diff.slice(0, 4),
        });
    };
    const start = Date.now();
    let lastStatus = 0;
    let i = 0;
    let last: Checkpoint | null = null;
    let next = performance.now() + o.epochMs;
    let presends = 0;
    const pausePages: number[] = [];
    while (i < o.minCheckpoints || Date.now() - start < o.seconds * 1000) {
      // Pre-sends during the epoch, every interval until the last one before its end.
      while (o.presendMs && capture instanceof ColoCapture && next - performance.now() > 1.5 * o.presendMs) {
        await sleep(o.presendMs);
        await capture.presend();
        presends++;
      }
      const wait = next - performance.now();
      if (wait > 0) await sleep(wait);
      // A last pass right before the checkpoint: the pause carries only what is written meanwhile.
      if (o.presendMs && capture instanceof ColoCapture) {
        await capture.presend();
        presends++;
      }
      next = Math.max(performance.now(), next + o.epochMs);
      i++;
      const sample = i % sampleEvery === 0;
      const cp: Checkpoint = await capture.checkpoint(sample ? { hold: verifyHeld } : {});
      if (sample) meter.exclude(cp.pausedAtMs);
      else await store.commit(cp);
      dirtyCounts.push(cp.pages.length);
      pausePages.push(cp.pages.length - (cp.presentPages ?? 0));
      bytes.push(cp.ramBytes + cp.deviceState.length);
      last = cp;
      if (Date.now() - lastStatus > 1000) {
        lastStatus = Date.now();
        status(
          `epoch ${cp.epoch}: ${cp.pages.length} dirty pages, pause ${cp.timings.pauseMsLocal.toFixed(2)} ms, verified ${result.verified}, mismatched ${result.mismatchedPages}`,
        );
      }
    }
    // The last checkpoint: the primary dies while paused at it; the replica must carry on.
    let before = -1;
    const final = await capture.checkpoint({
      hold: async (cp) => {
        await verifyHeld(cp);
        meter.exclude(cp.pausedAtMs);
        await sleep(50); // let console output written before the pause drain
        before = lastWork(vm!);
        await vm!.kill();
      },
    });
    last = final;
    result.checkpoints = last.epoch;
    result.counterBefore = before;
    result.identical = result.verified >= 1 && result.mismatchedPages === 0;
    const pauses = meter.pausesMs();
    result.pauseMsMedian = round(median(pauses));
    result.pauseMsP99 = round(percentile(pauses, 99));
    result.dirtyPagesMedian = median(dirtyCounts);
    if (o.presendMs) {
      result.presends = presends;
      result.pausePagesMedian = median(pausePages);
    }
    result.bytesPerCheckpointMedian = median(bytes);
    if (capture instanceof ExternalCapture) result.tracking = capture.trackingMode;
    else result.triggers = { ...capture.triggers };
    await capture.close().catch(() => {});

    status(`restoring checkpoint ${store.epoch} on a fresh QEMU`);
    const ramCopyPath = join(dir, 'restored.ram');
    await store.settled();
    await store.close();
    copyFileSync(store.imagePath(MAIN_RAM_ID), ramCopyPath);
    const r = await restoreVm(
      {
        spec: { ...spec, name: `${spec.name}-r`, ramFile: ramCopyPath },
        machine: store.machine,
        deviceState: store.deviceState,
      },
      { binary: o.binary, runDir: dir },
    );
    restored = r.vm;
    result.restoreMs = round(r.restoreMs, 1);
    const m1 = parseDirtierLine((await restored.waitSerial(DIRTIER_LINE_RE, 20_000))[0]);
    await restored.waitSerial(DIRTIER_LINE_RE, 5_000, { fromNow: true });
    const m2 = parseDirtierLine((await restored.waitSerial(DIRTIER_LINE_RE, 5_000, { fromNow: true }))[0]);
    const rebooted = restored.serialLines.some((l) => /RUBATO (boot ok|dirtier start)/.test(l));
    result.counterAfter = m1?.work ?? -1;
    result.selfCheckOk = !!m1 && !!m2 && m1.ok && m2.ok;
    result.restored =
      !rebooted &&
      result.selfCheckOk &&
      result.counterAfter >= result.counterBefore &&
      (m2?.work ?? 0) > result.counterAfter;
    status(
      `restored guest continued: counter ${result.counterBefore} → ${result.counterAfter} → ${m2?.work}, self-check ${result.selfCheckOk ? 'ok' : 'FAILED'}`,
    );
  } catch (e) {
    result.error = e instanceof Error ? e.message : String(e);
    log.error(`capture check failed: ${result.error}`);
  } finally {
    await restored?.stop();
    await vm?.stop();
    removeTempDir(dir);
  }
  return result;
}

function lastWork(vm: QemuVm): number {
  for (let i = vm.serialLines.length - 1; i >= 0; i--) {
    const m = parseDirtierLine(vm.serialLines[i]!);
    if (m) return m.work;
  }
  return -1;
}
