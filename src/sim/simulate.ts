// A deterministic discrete-time simulator of the epoch pipeline, driving the same scheduler code
// as the live engine: a workload model (dirty curve, output and disk events), the pause model,
// and a FIFO replication link with bandwidth and round trip. Used by the scheduler's tests now and
// by the trace-driven evaluation later. No clocks: time is a number that only this loop advances.

import { PAGE_BYTES, type EpochRecord, type Policy, type Telemetry } from '../scheduler/index.ts';

export interface SimWorkload {
  /** Pages the epoch [startMs, startMs + lengthMs) dirties (the real curve, which the scheduler must learn). */
  dirtyPages(lengthMs: number, startMs?: number): number;
  /** Output frames the guest produces in [t, t + step). */
  output(tMs: number, stepMs: number): number;
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

export interface SimClients { count: number; serviceMs: number; commitsPerRequest: number; framesPerAnswer?: number }

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

export function simulate(policy: Policy, w: SimWorkload, durationMs: number, stepMs = 0.25, maxInflight = 4): SimResult {
  const history: EpochRecord[] = [];
  const reasons: Record<string, number> = {};
  const acks: Array<{ at: number; frames: number[]; owners: number[]; index: number; sentAt: number }> = [];
  const latencies: number[] = [];
  const requestLatencyMs: number[] = [];
  const cl = w.clients;
  // Per client: when its current request began, its stage, and the stage's frames sent and released.
  const stageMs = cl ? cl.serviceMs / Math.max(1, cl.commitsPerRequest) : 0;
  const perStage = Math.max(1, Math.round(cl?.framesPerAnswer ?? 1));
  const clients = Array.from({ length: cl?.count ?? 0 }, (_, i) => ({ began: 0, stage: 0, sent: 0, released: 0, nextAt: stageMs / perStage + i * 0.01 }));
  let owners: number[] = [];
  let t = 0;
  let epochStart = 0;
  let linkFree = 0;
  let standbyFree = 0;
  let pausedMs = 0;
  let maxBacklog = 0;
  let waiting: number[] = []; // output frame times in the running epoch
  let flushes = 0;
  let wakeAt = 0;
  let engineBusyUntil = 0; // the primary's loop works on the last checkpoint: the relay waits
  const deliver = () => {
    while (acks.length && acks[0]!.at <= t) {
      const a = acks.shift()!;
      for (const ft of a.frames) latencies.push(a.at - ft);
      for (const o of a.owners) {
        const c = clients[o]!;
        if (++c.released < perStage) continue;
        const at = Math.max(a.at, engineBusyUntil);
        if (++c.stage >= cl!.commitsPerRequest) { requestLatencyMs.push(at - c.began); c.began = at; c.stage = 0; }
        // The client's reply (or next request) reaches the guest, which answers over the next stage.
        c.sent = 0;
        c.released = 0;
        c.nextAt = at + stageMs / perStage;
      }
      history[a.index]!.transferMs = a.at - a.sentAt;
    }
  };
  /** Clients' frames due by now; returns how many. */
  const answer = (): number => {
    let n = 0;
    for (const [i, c] of clients.entries()) {
      while (c.sent < perStage && c.nextAt <= t) { waiting.push(t); owners.push(i); c.sent++; n++; c.nextAt += stageMs / perStage; }
    }
    return n;
  };
  /** What happens in the step at t: acks arrive, the guest sends output and flushes its disk. */
  const step = (): { produced: number; fl: number } => {
    deliver();
    let produced = w.output(t, stepMs);
    for (let i = 0; i < produced; i++) waiting.push(t);
    produced += answer();
    const fl = w.flushes?.(t, stepMs) ?? 0;
    flushes += fl;
    return { produced, fl };
  };
  while (t < durationMs) {
    const { produced, fl } = step();
    const backlog = acks.length;
    maxBacklog = Math.max(maxBacklog, backlog);
    if (t >= wakeAt || produced > 0 || fl > 0) {
      const tel: Telemetry = {
        nowMs: t, epochStartMs: epochStart, history,
        output: { frames: waiting.length, bytes: waiting.length * 100, oldestMs: waiting.length ? t - waiting[0]! : null },
        disk: { writes: fl, flushes }, link: { bytesPerSec: null, rttMs: w.rttMs }, backlog,
      };
      const d = policy.decide(tel);
      reasons[d.reason] = (reasons[d.reason] ?? 0) + 1;
      if (d.checkpoint && backlog < maxInflight) {
        // The engine asks QEMU to stop the guest; it runs (and may send) until it has.
        for (let r = 0; r + stepMs <= (w.triggerMs ?? 0); r += stepMs) {
          t += stepMs;
          step();
        }
        const length = t - epochStart;
        const pages = Math.round(w.dirtyPages(length, epochStart));
        // A pause taken while the standby still works on an earlier checkpoint shares the host with it.
        const pause = w.pauseMs(pages) + (acks.length > 0 ? (w.pauseBusyMs ?? 0) : 0);
        const bytes = w.checkpointBytes ? w.checkpointBytes(pages) : pages * PAGE_BYTES + 32_000;
        history.push({ lengthMs: length, dirtyPages: pages, pauseMs: pause, bytes, transferMs: null, outputFrames: waiting.length });
        t += pause;
        pausedMs += pause;
        for (const c of clients) if (c.sent < perStage) c.nextAt += pause + (w.guestStallMs ?? 0);
        engineBusyUntil = t + (w.guestStallMs ?? 0);
        const sendStart = Math.max(linkFree, t);
        linkFree = sendStart + bytes / w.bandwidthBytesPerMs(sendStart);
        const sb = w.standby ?? { fixedMs: 0, perByteMs: 0 };
        standbyFree = Math.max(Math.max(standbyFree, sendStart) + bytes * sb.perByteMs, linkFree) + sb.fixedMs;
        acks.push({ at: standbyFree + w.rttMs, frames: waiting, owners, index: history.length - 1, sentAt: t });
        waiting = [];
        owners = [];
        flushes = 0;
        epochStart = t;
        wakeAt = t;
        continue;
      }
      wakeAt = d.checkpoint ? t + stepMs : d.wakeAtMs;
    }
    t += stepMs;
  }
  return { epochs: history, checkpoints: history.length, maxBacklog, outputLatencyMs: latencies, pausedMs, durationMs, reasons, requestLatencyMs };
}

/** A workload with a sub-linear dirty curve D(T) = rate·T^b and optional periodic output. */
export function syntheticWorkload(o: { pagesPerMs: number; exponent?: number; outputEveryMs?: number; flushEveryMs?: number; bandwidthBytesPerMs?: (t: number) => number; rttMs?: number }): SimWorkload {
  const b = o.exponent ?? 0.8;
  return {
    dirtyPages: (len) => o.pagesPerMs * len ** b,
    output: (t, step) => (o.outputEveryMs && Math.floor((t + step) / o.outputEveryMs) > Math.floor(t / o.outputEveryMs) ? 1 : 0),
    flushes: (t, step) => (o.flushEveryMs && Math.floor((t + step) / o.flushEveryMs) > Math.floor(t / o.flushEveryMs) ? 1 : 0),
    bandwidthBytesPerMs: o.bandwidthBytesPerMs ?? (() => 125_000), // 1 Gbit/s
    rttMs: o.rttMs ?? 0.2,
    pauseMs: (p) => 1.1 + 0.0025 * p,
  };
}
