// A deterministic discrete-time simulator around the live engine's own epoch pipeline and output
// commit (replication/pipeline.ts, commit/output-commit.ts): a workload model (dirty curve, output
// and disk events), the pause model, and a FIFO replication link with bandwidth and round trip
// play the adapters. No clocks: time is a number that only this loop advances.

import { PAGE_BYTES, pausePagesWithPresend, type EpochRecord, type Policy } from '../scheduler/index.ts';
import { EpochPipeline, dispatch } from '../replication/index.ts';
import { assert } from '../util/index.ts';
import { OutputCommit, type DiskEpochCut, type DiskEpochSource } from '../commit/index.ts';

export interface SimWorkload {
  /** Pages the epoch [startMs, startMs + lengthMs) dirties (the real curve, which the scheduler must learn). */
  dirtyPages(lengthMs: number, startMs?: number): number;
  /** Output frames the guest produces in [t, t + step). */
  output(tMs: number, stepMs: number): number;
  /** Their sizes in bytes, when known (recorded traces); otherwise each is DEFAULT_FRAME_BYTES. */
  outputBytes?(tMs: number, stepMs: number): number[];
  /** Disk writes in [t, t + step). */
  writes?(tMs: number, stepMs: number): number;
  /** Disk flushes in [t, t + step). */
  flushes?(tMs: number, stepMs: number): number;
  bandwidthBytesPerMs(tMs: number): number;
  rttMs: number;
  pauseMs(pages: number): number;
  /** How much longer (ms) a pause is while an earlier checkpoint is still unacknowledged (default 0). */
  pauseBusyMs?: number;
  /** Bytes a checkpoint of `pages` ships (default: the pages plus 32 kB of device state). */
  checkpointBytes?(pages: number): number;
  /**
   * The standby's work on a checkpoint: `perByteMs` for each byte (verifying, decoding, applying:
   * it runs as the bytes arrive, so it overlaps the link), then `fixedMs` once the last byte is in
   * and that work is done (the commit point). One checkpoint at a time. Default: none.
   */
  standby?: { fixedMs: number; perByteMs: number };
  /**
   * Guest time each checkpoint costs beyond its pause (the host's cores busy capturing, shipping and
   * committing it): a client's answer in progress is delayed by it, and by the pause; and released
   * output reaches clients no sooner than that long after the pause (the relay runs in the
   * primary's loop, busy with the checkpoint). Default 0.
   */
  guestStallMs?: number;
  /** The guest runs on this long between a checkpoint decision and its pause (default 0). */
  triggerMs?: number;
  /**
   * Closed-loop clients (request/response services): each sends a request, and the guest answers
   * in `commitsPerRequest` stages in turn (a TCP handshake, a response in several congestion
   * windows), each taking serviceMs / commitsPerRequest and sending `framesPerAnswer` frames
   * (default 1) spread over it; a stage is done when all its frames are released, and after the
   * last the client sends its next request at once. Their frames come on top of `output`.
   */
  clients?: SimClients;
}

export interface SimClients {
  count: number;
  serviceMs: number;
  commitsPerRequest: number;
  framesPerAnswer?: number;
  frameBytes?: number;
}

export interface SimResult {
  epochs: EpochRecord[];
  checkpoints: number;
  maxBacklog: number;
  outputLatencyMs: number[];
  pausedMs: number;
  durationMs: number;
  reasons: Record<string, number>;
  /** Closed-loop requests: start → last answer released, ms. */
  requestLatencyMs: number[];
}

/** A simulated output frame: its size, and the client whose answer it is part of (-1: none). */
interface SimFrame {
  readonly length: number;
  readonly owner: number;
}

/** Frame size where a workload gives none (synthetic workloads; traces recorded before sizes were). */
export const DEFAULT_FRAME_BYTES = 100;

/** The simulated guest disk: counts writes and flushes per epoch; output commit cuts them at the pause. */
class SimDisk implements DiskEpochSource {
  writes = 0;
  flushes = 0;
  cutEpoch(): DiskEpochCut {
    const c = { disks: [], writes: this.writes, flushes: this.flushes };
    this.writes = 0;
    this.flushes = 0;
    return { collect: () => Promise.resolve(c) };
  }
}

/**
 * Runs `policy` on workload `w` for `durationMs` in steps of `stepMs`. The epoch's life — what the
 * scheduler sees, when a checkpoint is taken, the backlog bound, what each ack releases — is the
 * live engine's own EpochPipeline and OutputCommit; this loop only plays the guest, the link and
 * the standby around them.
 */
export function simulate(
  policy: Policy,
  w: SimWorkload,
  durationMs: number,
  stepMs = 0.25,
  maxInflight = 4,
): SimResult {
  const disk = new SimDisk();
  const commit = new OutputCommit<SimFrame>(Number.MAX_SAFE_INTEGER, disk);
  const pipe = new EpochPipeline<SimFrame>({ policy, commit, maxInflight });
  // Protection starts at time 0 with the full image acknowledged at once.
  pipe.startSync();
  pipe.paused(0, 0);
  dispatch(
    pipe.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 0, bytes: 0, resumedMs: 0 }),
    { send: (c) => pipe.sent(c.epoch, 0) },
    'simulate',
  );
  dispatch(pipe.ack(0, 0), { release: () => {}, protected: () => {} }, 'simulate');
  const epochs: EpochRecord[] = [];
  const acks: Array<{ at: number; epoch: number }> = [];
  const latencies: number[] = [];
  const requestLatencyMs: number[] = [];
  const cl = w.clients;
  // Per client: when its current request began, its stage, and the stage's frames sent and released.
  const stageMs = cl ? cl.serviceMs / Math.max(1, cl.commitsPerRequest) : 0;
  const perStage = Math.max(1, Math.round(cl?.framesPerAnswer ?? 1));
  const answerBytes = cl?.frameBytes ?? DEFAULT_FRAME_BYTES;
  const clients = Array.from({ length: cl?.count ?? 0 }, (_, i) => ({
    began: 0,
    stage: 0,
    sent: 0,
    released: 0,
    nextAt: stageMs / perStage + i * 0.01,
  }));
  let t = 0;
  let linkFree = 0;
  let standbyFree = 0;
  let pausedMs = 0;
  let maxBacklog = 0;
  let wakeAt = 0;
  let engineBusyUntil = 0; // the primary's loop works on the last checkpoint: the relay waits
  const deliver = () => {
    while (acks.length && acks[0]!.at <= t) {
      const a = acks.shift()!;
      for (const c of pipe.ack(a.epoch, a.at)) {
        assert(c.cmd === 'release', `simulate: the pipeline asked for '${c.cmd}' on an ack while protecting`);
        for (const f of c.frames) {
          latencies.push(a.at - f.atMs);
          if (f.frame.owner < 0) continue;
          const cs = clients[f.frame.owner]!;
          if (++cs.released < perStage) continue;
          const at = Math.max(a.at, engineBusyUntil);
          if (++cs.stage >= cl!.commitsPerRequest) {
            requestLatencyMs.push(at - cs.began);
            cs.began = at;
            cs.stage = 0;
          }
          // The client's reply (or next request) reaches the guest, which answers over the next stage.
          cs.sent = 0;
          cs.released = 0;
          cs.nextAt = at + stageMs / perStage;
        }
      }
    }
  };
  const push = (length: number, owner: number) => {
    commit.push({ length, owner }, t);
  };
  /** Clients' frames due by now; returns how many. */
  const answer = (): number => {
    let n = 0;
    for (const [i, c] of clients.entries()) {
      while (c.sent < perStage && c.nextAt <= t) {
        push(answerBytes, i);
        c.sent++;
        n++;
        c.nextAt += stageMs / perStage;
      }
    }
    return n;
  };
  /** What happens in the step at t: acks arrive, the guest sends output and uses its disk. */
  const step = (): { produced: number; fl: number } => {
    deliver();
    const sizes = w.outputBytes
      ? w.outputBytes(t, stepMs)
      : Array.from({ length: w.output(t, stepMs) }, () => DEFAULT_FRAME_BYTES);
    for (const b of sizes) push(b, -1);
    const produced = sizes.length + answer();
    const fl = w.flushes?.(t, stepMs) ?? 0;
    disk.flushes += fl;
    disk.writes += w.writes?.(t, stepMs) ?? 0;
    return { produced, fl };
  };
  const seen = () => ({
    disk: { writes: disk.writes, flushes: disk.flushes },
    link: { bytesPerSec: null, rttMs: w.rttMs },
  });
  while (t < durationMs) {
    const { produced, fl } = step();
    maxBacklog = Math.max(maxBacklog, pipe.inflightCount);
    if (t >= wakeAt || produced > 0 || fl > 0) {
      const d = pipe.decide(t, seen());
      if (d.cmd === 'capture') {
        // The engine asks QEMU to stop the guest; it runs (and may send) until it has.
        for (let r = 0; r + stepMs <= (w.triggerMs ?? 0); r += stepMs) {
          t += stepMs;
          step();
        }
        const age = t - pipe.epochStartedMs;
        const pages = Math.round(w.dirtyPages(age, pipe.epochStartedMs));
        // With pre-sends the pause carries only what the passes leave (estimate.ts; the passes' own
        // cost on the guest is not modelled): the last interval's pages, or with no output waiting
        // what is dirtied during a last pass right before the pause.
        const lastPass = commit.openStats(t).frames === 0;
        const pausePages = Math.round(
          pausePagesWithPresend(
            (ms) => w.dirtyPages(ms, t - ms),
            (w.pauseMs(1000) - w.pauseMs(0)) / 1000,
            age,
            pipe.presendIntervalMs(null) || undefined, // (the pipeline's plan, the one the live primary follows)
            lastPass,
          ),
        );
        // A pause taken while the standby still works on an earlier checkpoint shares the host with it.
        const pause = w.pauseMs(pausePages) + (acks.length > 0 ? (w.pauseBusyMs ?? 0) : 0);
        const bytes = w.checkpointBytes ? w.checkpointBytes(pages) : pages * PAGE_BYTES + 32_000;
        pipe.paused(d.epoch, t);
        t += pause;
        pausedMs += pause;
        for (const c of clients) if (c.sent < perStage) c.nextAt += pause + (w.guestStallMs ?? 0);
        engineBusyUntil = t + (w.guestStallMs ?? 0);
        const sends = pipe.capturedCheckpoint(d.epoch, {
          dirtyPages: pages,
          pausePages,
          pauseMs: pause,
          bytes,
          resumedMs: t,
        });
        epochs.push(pipe.history.at(-1)!);
        dispatch(sends, { send: (c) => pipe.sent(c.epoch, t) }, 'simulate');
        const sendStart = Math.max(linkFree, t);
        linkFree = sendStart + bytes / w.bandwidthBytesPerMs(sendStart);
        const sb = w.standby ?? { fixedMs: 0, perByteMs: 0 };
        standbyFree = Math.max(Math.max(standbyFree, sendStart) + bytes * sb.perByteMs, linkFree) + sb.fixedMs;
        acks.push({ at: standbyFree + w.rttMs, epoch: d.epoch });
        wakeAt = t;
        continue;
      }
      wakeAt = d.cmd === 'wait' ? d.untilMs : t + stepMs;
    }
    t += stepMs;
  }
  return {
    epochs,
    checkpoints: epochs.length,
    maxBacklog,
    outputLatencyMs: latencies,
    pausedMs,
    durationMs,
    reasons: pipe.stats().reasons,
    requestLatencyMs,
  };
}

/** A workload with a sub-linear dirty curve D(T) = rate·T^b and optional periodic output. */
export function syntheticWorkload(o: {
  pagesPerMs: number;
  exponent?: number;
  outputEveryMs?: number;
  flushEveryMs?: number;
  bandwidthBytesPerMs?: (t: number) => number;
  rttMs?: number;
}): SimWorkload {
  const b = o.exponent ?? 0.8;
  return {
    dirtyPages: (len) => o.pagesPerMs * len ** b,
    output: (t, step) =>
      o.outputEveryMs && Math.floor((t + step) / o.outputEveryMs) > Math.floor(t / o.outputEveryMs) ? 1 : 0,
    flushes: (t, step) =>
      o.flushEveryMs && Math.floor((t + step) / o.flushEveryMs) > Math.floor(t / o.flushEveryMs) ? 1 : 0,
    bandwidthBytesPerMs: o.bandwidthBytesPerMs ?? (() => 125_000), // 1 Gbit/s
    rttMs: o.rttMs ?? 0.2,
    pauseMs: (p) => 1.1 + 0.0025 * p,
  };
}
