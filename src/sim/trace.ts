// Event traces of live runs, and their replay as a simulator workload.
//
// A trace records, per checkpoint of a live run, when its epoch ran, its pause, its bytes and the
// exact pages it dirtied; and, with timestamps, every output frame the guest produced and every
// disk write and flush. Replayed under another policy, an epoch [a, b) dirties the union of the
// recorded page sets it spans — pages written twice count once, as in the real guest — with a
// recorded epoch it covers in part contributing that fraction of its pages (a deterministic
// subset). Output and disk events come back at their recorded times. Pure: no clocks, no I/O
// except reading and writing the file.

import { readFileSync, writeFileSync } from 'node:fs';
import { RubatoError, median } from '../util/index.ts';
import { PAGE_BYTES } from '../scheduler/index.ts';
import { DEFAULT_FRAME_BYTES, type SimClients, type SimWorkload } from './simulate.ts';
import type { CheckpointObserver } from '../replication/index.ts';

export const TRACE_FORMAT = 'rubato-trace/1';

export interface TraceEpoch {
  /** Epoch start and checkpoint (pause) instant, ms from the trace's start. */
  startMs: number;
  endMs: number;
  pauseMs: number;
  bytes: number;
  /** Send → acknowledgement, ms (the link and the standby's commit), when the ack came. */
  ackMs?: number;
  /** When the policy decided on this checkpoint (the guest runs on until QEMU has stopped it). */
  decidedMs?: number;
  /** Dirtied pages as block-index << 24 | page number, base64 of a Uint32Array (compact JSON). */
  pages: string;
}

export interface Trace {
  format: typeof TRACE_FORMAT;
  workload: string;
  policy: string;
  link: string;
  cpus: number;
  accel: string;
  durationMs: number;
  epochs: TraceEpoch[];
  outputMs: number[];
  diskWritesMs: number[];
  diskFlushesMs: number[];
  /** Bytes of each output frame, parallel to outputMs (traces before it lack it). */
  outputBytes?: number[];
}

export function encodePages(ids: Uint32Array): string {
  return Buffer.from(ids.buffer, ids.byteOffset, ids.byteLength).toString('base64');
}
export function decodePages(s: string): Uint32Array {
  const b = Buffer.from(s, 'base64');
  const out = new Uint32Array(b.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = b.readUInt32LE(i * 4);
  return out;
}

/** Collects a trace while a live run goes on; times are taken relative to construction. */
export class TraceRecorder implements CheckpointObserver {
  private readonly t0: number;
  private readonly epochs: TraceEpoch[] = [];
  private readonly outputMs: number[] = [];
  private readonly outputBytes: number[] = [];
  private readonly writesMs: number[] = [];
  private readonly flushesMs: number[] = [];
  private static readonly MAX_EVENTS = 2_000_000;

  constructor(
    private readonly meta: Omit<
      Trace,
      'format' | 'durationMs' | 'epochs' | 'outputMs' | 'diskWritesMs' | 'diskFlushesMs'
    >,
    nowMs: number,
  ) {
    this.t0 = nowMs;
  }

  private rel(ms: number): number {
    return Math.round((ms - this.t0) * 1000) / 1000;
  }

  /** Records a checkpoint; returns a handle for `acked`. */
  epoch(
    startMs: number,
    endMs: number,
    pauseMs: number,
    bytes: number,
    pageIds: Uint32Array,
    decidedMs?: number,
  ): number {
    if (endMs < this.t0) return -1;
    return (
      -1 +
      this.epochs.push({
        startMs: Math.max(0, this.rel(startMs)),
        endMs: this.rel(endMs),
        pauseMs: Math.round(pauseMs * 1000) / 1000,
        bytes,
        pages: encodePages(pageIds),
        ...(decidedMs !== undefined ? { decidedMs: this.rel(decidedMs) } : {}),
      })
    );
  }

  acked(handle: number, ackMs: number): void {
    const e = this.epochs[handle];
    if (e) e.ackMs = Math.round(ackMs * 1000) / 1000;
  }

  output(atMs: number, bytes: number): void {
    if (atMs < this.t0 || this.outputMs.length >= TraceRecorder.MAX_EVENTS) return;
    this.outputMs.push(this.rel(atMs));
    this.outputBytes.push(bytes);
  }
  disk(kind: 'write' | 'flush', atMs: number): void {
    if (atMs < this.t0) return;
    const a = kind === 'write' ? this.writesMs : this.flushesMs;
    if (a.length < TraceRecorder.MAX_EVENTS) a.push(this.rel(atMs));
  }

  /**
   * The trace up to `nowMs`; with `fromMs`, only what began from then on, re-based to it. Flushes
   * during a checkpoint's pause are QEMU's own (it flushes its block devices when it stops the
   * guest), not the workload's: they are left out.
   */
  finish(nowMs: number, fromMs?: number): Trace {
    const from = fromMs === undefined ? 0 : this.rel(fromMs);
    const r3 = (x: number) => Math.round(x * 1000) / 1000;
    const keep = (a: number[]) => a.filter((x) => x >= from).map((x) => r3(x - from));
    const pauses = this.epochs.map((e) => [e.endMs - 0.5, e.endMs + e.pauseMs + 0.5] as const);
    let k = 0;
    const guestFlushes = this.flushesMs.filter((x) => {
      while (k < pauses.length && pauses[k]![1] < x) k++;
      return !(k < pauses.length && pauses[k]![0] <= x && x <= pauses[k]![1]);
    });
    const epochs = this.epochs
      .filter((e) => e.startMs >= from)
      .map((e) => ({
        ...e,
        startMs: r3(e.startMs - from),
        endMs: r3(e.endMs - from),
        ...(e.decidedMs !== undefined ? { decidedMs: r3(e.decidedMs - from) } : {}),
      }));
    const outIdx = this.outputMs.flatMap((x, i) => (x >= from ? [i] : []));
    return {
      format: TRACE_FORMAT,
      ...this.meta,
      durationMs: this.rel(nowMs) - from,
      epochs,
      outputMs: outIdx.map((i) => r3(this.outputMs[i]! - from)),
      outputBytes: outIdx.map((i) => this.outputBytes[i]!),
      diskWritesMs: keep(this.writesMs),
      diskFlushesMs: keep(guestFlushes),
    };
  }
}

export function writeTrace(path: string, t: Trace): void {
  writeFileSync(path, JSON.stringify(t));
}

export function loadTrace(path: string): Trace {
  let t: Trace;
  try {
    t = JSON.parse(readFileSync(path, 'utf8')) as Trace;
  } catch (e) {
    throw new RubatoError(
      'RUBATO_CONFIG',
      `cannot read trace ${path}: ${(e as Error).message} (traces are written by: rubato bench)`,
    );
  }
  if (t.format !== TRACE_FORMAT)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `${path} is not a rubato trace (format ${String(t.format)}, expected ${TRACE_FORMAT})`,
    );
  if (!Array.isArray(t.epochs) || t.epochs.length < 3)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `${path} holds ${t.epochs?.length ?? 0} checkpoints; a replay needs at least 3`,
    );
  return t;
}

/** Per recorded checkpoint: was the one before it still unacknowledged when its pause began? */
export function busyPauses(t: Trace): boolean[] {
  return t.epochs.map((e, i) => {
    const p = t.epochs[i - 1];
    return p?.ackMs !== undefined && p.endMs + p.pauseMs + p.ackMs > e.endMs;
  });
}

/**
 * How much longer (ms) pauses taken while the standby is busy are than the others at the same page
 * count, from recorded traces with enough of both (the median over them); 0 when none has.
 */
export function pauseBusyMsOf(traces: readonly Trace[], perPageMs: number, minEach = 5): number {
  const diffs: number[] = [];
  const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
  for (const t of traces) {
    const busy = busyPauses(t);
    const pages = t.epochs.map((e) => Buffer.from(e.pages, 'base64').length / 4);
    const b = t.epochs.flatMap((_, i) => (busy[i] ? [i] : []));
    const n = t.epochs.flatMap((_, i) => (i > 0 && !busy[i] ? [i] : []));
    if (b.length < minEach || n.length < minEach) continue;
    const at = (ix: number[]) => mean(ix.map((i) => t.epochs[i]!.pauseMs - perPageMs * pages[i]!));
    diffs.push(at(b) - at(n));
  }
  return diffs.length ? Math.max(0, median(diffs)) : 0;
}

/** A deterministic number in [0, 1) for a page (of recorded epoch `salt`). */
function unit(id: number, salt: number): number {
  let h = Math.imul(id ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(salt + 1, 0xc2b2ae35);
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  return ((h ^ (h >>> 13)) >>> 0) / 2 ** 32;
}

/** Deterministic "is this page in the first f" (pages within an epoch carry no order). */
function inFraction(id: number, f: number): boolean {
  return f >= 1 || unit(id, -1) < f;
}

/** The first index of `sorted` (from `lo`) whose value is not below x. */
function lowerBound(sorted: readonly number[], x: number, lo = 0): number {
  let hi = sorted.length;
  while (lo < hi) {
    const m = (lo + hi) >> 1;
    if (sorted[m]! < x) lo = m + 1;
    else hi = m;
  }
  return lo;
}

function countIn(sorted: readonly number[], from: number, to: number): number {
  return lowerBound(sorted, to) - lowerBound(sorted, from);
}

export interface TraceReplay {
  workload: SimWorkload;
  /** The span a replay covers: the trace's measured window. */
  durationMs: number;
  /** The pause model fitted from the trace: fixed ms + per page ms. */
  pause: { fixedMs: number; perPageMs: number };
  /** The standby's commit time fitted from the recorded acks: fixed ms + ms per MB. */
  commit: { fixedMs: number; perMbMs: number };
  /** Decision → pause, ms (the median recorded). */
  triggerMs: number;
  /** Bytes a checkpoint ships besides its pages (device state, framing): the trace's median. */
  overheadBytes: number;
}

/** y ≈ a + b·x by least squares over all points, b ≥ 0 (or b given), a ≥ 0. */
function line(pts: Array<[number, number]>, slope?: number): { a: number; b: number } {
  if (!pts.length) return { a: 0, b: slope ?? 0 };
  const mx = pts.reduce((s, p) => s + p[0], 0) / pts.length;
  const my = pts.reduce((s, p) => s + p[1], 0) / pts.length;
  let b = slope;
  if (b === undefined) {
    let sxx = 0,
      sxy = 0;
    for (const [x, y] of pts) {
      sxx += (x - mx) ** 2;
      sxy += (x - mx) * (y - my);
    }
    b = sxx > 1e-9 ? Math.max(0, sxy / sxx) : 0;
  }
  return { a: Math.max(0, my - b * mx), b };
}

export interface ReplayOptions {
  rttMs?: number;
  cpus?: number;
  /**
   * Fixes the pause's per-page slope (e.g. from a profile that saw a wide range of checkpoint sizes; a trace at one
   * period sees a narrow one).
   */
  pausePerPageMs?: number;
  /** See SimWorkload.pauseBusyMs; the pause model is fitted with it taken off the busy pauses. */
  pauseBusyMs?: number;
  /** Guest time a checkpoint costs beyond its pause (see SimWorkload.guestStallMs). */
  guestStallMs?: number;
  /** Multiplies the fitted commit time (calibrated so the recorded run's own replay keeps its pace). */
  commitScale?: number;
  /** Replace the recorded output by closed-loop clients (see SimWorkload.clients). */
  clients?: SimClients;
}

/**
 * A simulator workload replaying `t` over a link of `bandwidthBytesPerMs`, on the trace's own
 * clock (time 0 is its start; a replay must not run past `durationMs`).
 */
export function traceWorkload(t: Trace, bandwidthBytesPerMs: number, o: ReplayOptions = {}): TraceReplay {
  const rttMs = o.rttMs ?? 0.2;
  // More vCPUs than recorded: each recorded page set counts `scale` times over disjoint memory (the
  // same assumption as the curve extrapolation; shared working sets would scale less).
  const scale = Math.max(1, (o.cpus ?? t.cpus) / Math.max(1, t.cpus));
  const epochs = t.epochs.map((e) => ({ ...e, ids: decodePages(e.pages) }));
  // A recorded set holds what the guest dirtied from the end of the previous pause (it runs while
  // the engine finishes the capture) to this checkpoint's pause.
  const ep = epochs.map((e, i) => ({
    start: i === 0 ? 0 : epochs[i - 1]!.endMs + epochs[i - 1]!.pauseMs,
    end: e.endMs,
    ids: e.ids,
  }));
  // The guest runs on between the policy's decision and QEMU stopping it (the median over the trace).
  const triggers = epochs.filter((e) => e.decidedMs !== undefined).map((e) => Math.max(0, e.endMs - e.decidedMs!));
  const triggerMs = triggers.length ? median(triggers) : 0;
  const busy = busyPauses(t);
  const extra = o.pauseBusyMs ?? 0;
  const pl = line(
    epochs.map((e, i) => [e.ids.length, busy[i] ? Math.max(0, e.pauseMs - extra) : e.pauseMs]),
    o.pausePerPageMs,
  );
  const pm = { fixedMs: pl.a, perPageMs: pl.b };
  // The standby handles one checkpoint at a time, working on its bytes as they arrive: a recorded
  // ack also holds the wait behind the previous one. Service time = ack − max(sent, previous ack)
  // (the link at the recording's class is fast next to the standby's own work).
  const service: Array<[number, number]> = [];
  let prevAck = Number.NEGATIVE_INFINITY;
  for (const e of epochs) {
    if (e.ackMs === undefined) {
      prevAck = Number.NEGATIVE_INFINITY;
      continue;
    }
    const sent = e.endMs + e.pauseMs;
    const ack = sent + e.ackMs - rttMs;
    service.push([e.bytes / 1e6, Math.max(0, ack - Math.max(sent, prevAck))]);
    prevAck = ack;
  }
  const cl = line(service);
  const overheadBytes = Math.max(0, median(epochs.map((e) => e.bytes - e.ids.length * PAGE_BYTES)));
  // Output frames at their recorded times with their recorded sizes (older traces: the default size).
  const outPairs = t.outputMs
    .map((x, i) => [x, t.outputBytes?.[i] ?? DEFAULT_FRAME_BYTES] as const)
    .filter(([x]) => x >= 0)
    .sort((a, b) => a[0] - b[0]);
  const outs = outPairs.map(([x]) => x);
  const outBytes = outPairs.map(([, b]) => b);
  const flushes = t.diskFlushesMs.filter((x) => x >= 0).sort((a, b) => a - b);
  const diskWrites = t.diskWritesMs.filter((x) => x >= 0).sort((a, b) => a - b);
  const durationMs = Math.max(t.durationMs ?? 0, ep.at(-1)!.end);
  // When each recorded page was written within its epoch. A page dirtied in a fraction f of the
  // recorded epochs is taken as written at a steady rate λ with 1 − e^(−λ·L) = f (L the mean
  // epoch): a page the guest touches all the time (timers, the network stack) is written many
  // times in every epoch and so lands in every part of one; a page a sequential writer passes once
  // is written once. Each recorded epoch draws, per page, its number of writes (Poisson, at least
  // one) and their instants, deterministically from the page and epoch.
  const seen = new Map<number, number>();
  for (const e of ep) for (const id of e.ids) seen.set(id, (seen.get(id) ?? 0) + 1);
  const meanSpan = ep.reduce((x, e) => x + (e.end - e.start), 0) / ep.length;
  const writes = ep.map((e, i) => {
    const span = e.end - e.start;
    const offsets = new Uint32Array(e.ids.length + 1);
    const at: number[] = [];
    for (const [j, id] of e.ids.entries()) {
      offsets[j] = at.length;
      const f = Math.min((seen.get(id) ?? 1) / ep.length, 1 - 0.5 / ep.length);
      const mu = (-Math.log(1 - f) / Math.max(meanSpan, 1e-6)) * span;
      // N ~ Poisson(mu) given N ≥ 1, by inverse CDF
      const u = unit(id ^ 0x27d4eb2d, i) * (1 - Math.exp(-mu));
      let k = 1;
      let pk = Math.exp(-mu) * mu;
      let cdf = pk;
      while (cdf < u && k < 24) {
        k++;
        pk *= mu / k;
        cdf += pk;
      }
      at.push(unit(id, i));
      for (let m = 1; m < k; m++) at.push(unit(id ^ Math.imul(m, 0x165667b1), i));
    }
    offsets[e.ids.length] = at.length;
    return { offsets, at: Float32Array.from(at) };
  });
  let lastEnd = 0; // replay epochs are consecutive: the simulator asks for [previous end, now)
  const w: SimWorkload = {
    dirtyPages: (lengthMs: number, startMs?: number) => {
      const a = startMs ?? lastEnd;
      const b = a + lengthMs;
      lastEnd = b;
      const set = new Set<number>();
      for (const [i, e] of ep.entries()) {
        // A recorded epoch's pages were dirtied over its run time (the pause between epochs is
        // not run time): a replayed epoch covering part of it takes the pages written in that part.
        if (e.end <= a || e.start >= b) continue;
        const span = e.end - e.start;
        const x0 = span > 0 ? Math.max(0, (a - e.start) / span) : 0;
        const x1 = span > 0 ? Math.min(1, (b - e.start) / span) : 1;
        const whole = x0 <= 0 && x1 >= 1;
        const wr = writes[i]!;
        for (const [j, id] of e.ids.entries()) {
          if (!whole) {
            let hit = false;
            for (let m = wr.offsets[j]!; m < wr.offsets[j + 1]! && !hit; m++) hit = wr.at[m]! >= x0 && wr.at[m]! < x1;
            if (!hit) continue;
          }
          for (let k = 0; k < scale; k++) {
            const part = Math.min(1, scale - k);
            if (part >= 1 || inFraction(id ^ 0x5bd1e995, part)) set.add(id + k * 2 ** 32);
          }
        }
      }
      return set.size;
    },
    output: (tMs, step) => (o.clients ? 0 : countIn(outs, tMs, tMs + step)),
    outputBytes: (tMs, step) => {
      if (o.clients) return [];
      const i = lowerBound(outs, tMs);
      return outBytes.slice(i, lowerBound(outs, tMs + step, i));
    },
    writes: (tMs, step) => countIn(diskWrites, tMs, tMs + step),
    // Clients' answers are as large as the recorded frames (their median).
    ...(o.clients
      ? { clients: { frameBytes: outBytes.length ? median(outBytes) : DEFAULT_FRAME_BYTES, ...o.clients } }
      : {}),
    flushes: (tMs, step) => countIn(flushes, tMs, tMs + step),
    bandwidthBytesPerMs: () => bandwidthBytesPerMs,
    rttMs,
    pauseMs: (p) => pm.fixedMs + pm.perPageMs * p,
    checkpointBytes: (pages) => pages * PAGE_BYTES + overheadBytes,
    standby: { fixedMs: (o.commitScale ?? 1) * cl.a, perByteMs: ((o.commitScale ?? 1) * cl.b) / 1e6 },
    triggerMs,
    ...(o.pauseBusyMs !== undefined ? { pauseBusyMs: o.pauseBusyMs } : {}),
    ...(o.guestStallMs !== undefined ? { guestStallMs: o.guestStallMs } : {}),
  };
  return {
    workload: w,
    durationMs,
    pause: { fixedMs: pm.fixedMs, perPageMs: pm.perPageMs },
    commit: { fixedMs: cl.a, perMbMs: cl.b },
    triggerMs,
    overheadBytes,
  };
}
