// Checkpoint policies. Each is pure: decide(telemetry) → checkpoint now, or wake me at t, with a
// reason. `guarded` applies the rails every adaptive policy shares: minimum and maximum epoch,
// a bound on the data at risk, a bounded backlog, and epochs no shorter than the link needs to
// ship them (so a bandwidth drop lengthens epochs instead of growing the backlog).
//
// The seed paper's heuristics appear here as Rubato's reading of its abstract, not its exact rules.

import { RubatoError } from '../util/index.ts';
import {
  fitDirtyCurve,
  fitPause,
  linkBytesPerMs,
  outputRatePerMs,
  pausePagesWithPresend,
  presendEveryMs,
  transferMs,
  type DirtyCurve,
} from './estimate.ts';
import { PAGE_BYTES, type Decision, type Policy, type Telemetry } from './types.ts';

const now = (reason: string): Decision => ({ checkpoint: true, reason });
const wait = (wakeAtMs: number, reason: string): Decision => ({ checkpoint: false, wakeAtMs, reason });

export interface Rails {
  minEpochMs: number;
  maxEpochMs: number;
  maxBacklog: number;
  maxRiskBytes: number;
  linkUtilisation: number;
  presendMs?: number;
  presendTargetPauseMs?: number;
}
/** presend=auto's pause target. */
export const AUTO_PRESEND_PAUSE_MS = 2;
export const DEFAULT_RAILS: Rails = {
  minEpochMs: 2,
  maxEpochMs: 1000,
  maxBacklog: 3,
  maxRiskBytes: 256 << 20,
  linkUtilisation: 0.8,
};

/** Smallest epoch length whose dirty set the link ships within `util` of the epoch (bisection). */
export function linkBoundEpochMs(c: DirtyCurve, bytesPerMs: number, util: number, maxMs: number): number {
  const ok = (t: number) => transferMs(c.pages(t), bytesPerMs) <= util * t;
  if (ok(0.5)) return 0;
  if (!ok(maxMs)) return maxMs;
  let lo = 0.5;
  let hi = maxMs;
  for (let i = 0; i < 40; i++) {
    const mid = (lo + hi) / 2;
    if (ok(mid)) hi = mid;
    else lo = mid;
  }
  return hi;
}

/** Epoch length at which the predicted transfer of the dirty set reaches `targetMs`. */
function epochForTransfer(c: DirtyCurve, bytesPerMs: number, targetMs: number, maxMs: number): number {
  if (transferMs(c.pages(maxMs), bytesPerMs) <= targetMs) return maxMs;
  let lo = 0;
  let hi = maxMs;
  for (let i = 0; i < 40; i++) {
    const mid = (lo + hi) / 2;
    if (transferMs(c.pages(mid), bytesPerMs) <= targetMs) lo = mid;
    else hi = mid;
  }
  return lo;
}

type Inner = (t: Telemetry, ctx: { age: number; curve: DirtyCurve; bytesPerMs: number }) => Decision;

export function guarded(
  name: string,
  rails: Rails,
  inner: Inner,
  opts: { linkGuard: boolean } = { linkGuard: true },
): Policy {
  return {
    name,
    minEpochMs: rails.minEpochMs,
    maxEpochMs: rails.maxEpochMs,
    ...(rails.presendMs ? { presendMs: rails.presendMs } : {}),
    ...(rails.presendTargetPauseMs !== undefined ? { presendTargetPauseMs: rails.presendTargetPauseMs } : {}),
    decide(t) {
      const age = t.nowMs - t.epochStartMs;
      const start = t.epochStartMs;
      if (age >= rails.maxEpochMs) return now('max-epoch');
      if (age < rails.minEpochMs) return wait(start + rails.minEpochMs, 'min-epoch');
      const curve = fitDirtyCurve(t.history);
      const bytesPerMs = linkBytesPerMs(t);
      if (t.backlog >= rails.maxBacklog) return wait(Math.min(start + rails.maxEpochMs, t.nowMs + 1), 'backlog');
      if (curve.pages(age) * PAGE_BYTES >= rails.maxRiskBytes) return now('risk-bound');
      if (opts.linkGuard) {
        const tl = linkBoundEpochMs(curve, bytesPerMs, rails.linkUtilisation, rails.maxEpochMs);
        if (age < tl) return wait(start + tl, 'link-bound');
      }
      const d = inner(t, { age, curve, bytesPerMs });
      if (d.checkpoint) return d;
      return wait(Math.min(Math.max(d.wakeAtMs, start + rails.minEpochMs), start + rails.maxEpochMs), d.reason);
    },
  };
}

export function fixed(periodMs: number, presendMs?: number): Policy {
  return guarded(
    `fixed:${periodMs}ms`,
    {
      ...DEFAULT_RAILS,
      minEpochMs: periodMs,
      maxEpochMs: periodMs,
      maxBacklog: Number.POSITIVE_INFINITY,
      maxRiskBytes: Number.POSITIVE_INFINITY,
      ...(presendMs ? { presendMs } : {}),
    },
    (t) => wait(t.epochStartMs + periodMs, 'period'),
    { linkGuard: false },
  );
}

/** Seed heuristic 1: end the epoch when the predicted transfer time of its dirty set reaches a target. */
export function dirtyBandwidth(rails: Rails, targetMs = 10): Policy {
  return guarded(`dirty-bandwidth:${targetMs}ms`, rails, (t, c) => {
    const te = epochForTransfer(c.curve, c.bytesPerMs, targetMs, rails.maxEpochMs);
    return c.age >= te ? now('dirty-transfer-target') : wait(t.epochStartMs + te, 'dirty-below-target');
  });
}

/** Seed heuristic 2: output waiting → checkpoint as soon as the minimum epoch allows; none → stretch. */
export function netIo(rails: Rails): Policy {
  return guarded('net-io', rails, (t) =>
    t.output.frames > 0 ? now('output-waiting') : wait(t.epochStartMs + rails.maxEpochMs, 'no-output'),
  );
}

/** Seed heuristic 3: disk flushes (and heavy writes) count like waiting output. */
export function diskIo(rails: Rails, writesTrigger = 64): Policy {
  return guarded('disk-io', rails, (t) => {
    if (t.disk.flushes > 0) return now('disk-flush');
    if (t.disk.writes >= writesTrigger) return now('disk-writes');
    return wait(t.epochStartMs + rails.maxEpochMs, 'no-disk-io');
  });
}

/** The seed heuristics combined. */
export function adaptive(rails: Rails, targetMs = 10): Policy {
  return guarded('adaptive', rails, (t, c) => {
    if (t.output.frames > 0) return now('output-waiting');
    if (t.disk.flushes > 0) return now('disk-flush');
    const te = epochForTransfer(c.curve, c.bytesPerMs, targetMs, rails.maxEpochMs);
    return c.age >= te ? now('dirty-transfer-target') : wait(t.epochStartMs + te, 'quiet');
  });
}

/** Keeps the time an output waits below `latencyMs`, predicting the next pause and transfer. */
export function boundedLatency(rails: Rails, latencyMs = 20, targetMs = 10): Policy {
  return guarded(`bounded-latency:${latencyMs}ms`, rails, (t, c) => {
    const pause = fitPause(t.history);
    const predict = (age: number) => {
      const p = c.curve.pages(age);
      return pause.pauseMs(p) + transferMs(p, c.bytesPerMs) + (t.link.rttMs ?? 0.2);
    };
    const waiting = t.output.frames > 0 || t.disk.flushes > 0;
    if (waiting) {
      const oldest = t.output.oldestMs ?? 0;
      const slack = latencyMs - oldest - predict(c.age);
      if (slack <= 0.5) return now('latency-bound');
      return wait(t.nowMs + slack / 2, 'latency-slack');
    }
    const te = epochForTransfer(c.curve, c.bytesPerMs, targetMs, rails.maxEpochMs);
    return c.age >= te ? now('dirty-transfer-target') : wait(t.epochStartMs + te, 'quiet');
  });
}

/**
 * Rubato's cost model: choose the checkpoint time T minimising
 *   J(T) = pause(D(T)) / T  +  w · Σ over output frames of their wait until release at T
 * where the waiting frames are those already held plus the rate seen in recent epochs, and a
 * frame's release comes at T + pause + transfer + rtt. With no output it stretches the epoch
 * (overhead only falls with T) until a rail stops it.
 */
export function model(rails: Rails, weightPerFrameMs = 0.002): Policy {
  return guarded(`model`, rails, (t, c) => {
    const pause = fitPause(t.history);
    const rate = outputRatePerMs(t.history);
    const f0 = t.output.frames + t.disk.flushes;
    const oldest = t.output.oldestMs ?? (t.disk.flushes > 0 ? 0 : 0);
    if (f0 === 0 && rate === 0) return wait(t.epochStartMs + rails.maxEpochMs, 'no-output');
    let best = c.age;
    let bestJ = Number.POSITIVE_INFINITY;
    const horizon = Math.min(rails.maxEpochMs, c.age + 200);
    // With pre-sends, the pause carries only what the passes leave (a last pass when no output waits).
    const every = presendEveryMs(rails, t.history, t.hostIdleCores ?? null);
    for (let T = c.age; T <= horizon; T += Math.max(0.5, (horizon - c.age) / 200)) {
      const pages = c.curve.pages(T);
      const p = pause.pauseMs(pausePagesWithPresend(c.curve.pages, pause.perPageMs, T, every, f0 === 0, pages));
      const release = p + transferMs(pages, c.bytesPerMs) + (t.link.rttMs ?? 0.2);
      const extra = T - c.age;
      // frames waiting now wait (oldest + extra + release) on average-ish; new ones arrive uniformly
      const waitNow = f0 * (oldest / 2 + extra + release);
      const waitNew = rate * extra * (extra / 2 + release);
      const J = p / T + weightPerFrameMs * (waitNow + waitNew);
      if (J < bestJ) {
        bestJ = J;
        best = T;
      }
    }
    return best - c.age < 0.5 ? now('model-optimum') : wait(t.epochStartMs + best, 'model-wait');
  });
}

/**
 * The rails compare mode's late output does not override. The link's bound does not hold it: the
 * output waits for that checkpoint alone, which the backlog bound keeps from piling up (measured:
 * with the secondary busy on the standby's host the link looked slow, the bound reached the
 * maximum epoch, and every differing reply waited a second).
 */
const RAIL_WAITS = new Set(['min-epoch', 'backlog']);

/**
 * Compare mode: output the secondary sends the same of leaves without a checkpoint, so the inner
 * policy plans with no output at all (it stretches epochs to its rails: dirty pages, the link,
 * the maximum epoch). Output that is late or differed (the only output `t.output` then counts)
 * calls for a checkpoint now, rails permitting. Each checkpoint also costs compare mode a lag:
 * replies of the next epoch wait until the secondary loaded it, so none is taken for output that
 * the secondary will match. `active` false: plan as buffer mode (--mode auto's choice).
 */
export function comparing(inner: Policy, active: () => boolean = () => true): Policy {
  return {
    name: inner.name,
    minEpochMs: inner.minEpochMs,
    maxEpochMs: inner.maxEpochMs,
    ...(inner.presendMs !== undefined ? { presendMs: inner.presendMs } : {}),
    ...(inner.presendTargetPauseMs !== undefined ? { presendTargetPauseMs: inner.presendTargetPauseMs } : {}),
    decide(t) {
      if (!active()) return inner.decide(t); // (--mode auto planning as buffer mode)
      // (t.output already counts only late or differing frames: output commit's compare grace)
      const d = inner.decide({
        ...t,
        history: t.history.map((h) => (h.outputFrames ? { ...h, outputFrames: 0 } : h)),
      });
      if (d.checkpoint || t.output.frames === 0 || RAIL_WAITS.has(d.reason)) return d;
      return now('compare-late');
    },
  };
}

/** Parses `name[:arg][,key=value...]`, e.g. fixed:25ms, adaptive, bounded-latency:20ms,max=500, model:0.002. */
export function parsePolicy(spec: string): Policy {
  const [head, ...kv] = spec.split(',');
  const [name, argRaw] = (head ?? '').split(':');
  const num = (v: string | undefined, what: string): number | undefined => {
    if (v === undefined || v === '') return undefined;
    const n = Number(v.replace(/ms$/, ''));
    if (!Number.isFinite(n) || n <= 0)
      throw new RubatoError('RUBATO_CONFIG', `policy ${spec}: ${what} must be a positive number (got "${v}")`);
    return n;
  };
  const rails: Rails = { ...DEFAULT_RAILS };
  /** An explicit presend= setting, named in the policy's name (model's default auto is not). */
  let presend: string | null = null;
  for (const p of kv) {
    const [k, v] = p.split('=');
    if (k === 'presend') presend = v === 'last' || v === 'auto' || v === 'off' ? v : `${num(v, k) ?? '?'}ms`;
    // presend=last: one pass right before each pause, none during the epoch.
    if (k === 'presend' && v === 'last') {
      rails.presendMs = Number.POSITIVE_INFINITY;
      continue;
    }
    // presend=auto: passes as often as it takes to keep the pause within AUTO_PRESEND_PAUSE_MS.
    if (k === 'presend' && v === 'auto') {
      rails.presendTargetPauseMs = AUTO_PRESEND_PAUSE_MS;
      continue;
    }
    if (k === 'presend' && v === 'off') continue;
    const n = num(v, k ?? '?');
    if (n === undefined) throw new RubatoError('RUBATO_CONFIG', `policy ${spec}: ${k} needs a value`);
    if (k === 'min') rails.minEpochMs = n;
    else if (k === 'max') rails.maxEpochMs = n;
    else if (k === 'backlog') rails.maxBacklog = n;
    else if (k === 'risk-mb') rails.maxRiskBytes = n * 1048576;
    else if (k === 'presend') rails.presendMs = n;
    else
      throw new RubatoError(
        'RUBATO_CONFIG',
        `policy ${spec}: unknown setting ${k} (min, max, backlog, risk-mb, presend=MS|last|auto|off)`,
      );
  }
  if (rails.minEpochMs > rails.maxEpochMs)
    throw new RubatoError('RUBATO_CONFIG', `policy ${spec}: min epoch above max epoch`);
  const arg = num(argRaw, 'the parameter');
  const p = build(name, arg, rails, presend, spec, kv);
  return presend ? { ...p, name: `${p.name}+presend:${presend}` } : p;
}

function build(
  name: string | undefined,
  arg: number | undefined,
  rails: Rails,
  presend: string | null,
  spec: string,
  kv: string[],
): Policy {
  switch (name) {
    case 'fixed': {
      // A fixed period has no rails to set; pre-sending applies to it as to any policy.
      const other = kv.map((p) => p.split('=')[0]).filter((k) => k !== 'presend');
      if (other.length)
        throw new RubatoError(
          'RUBATO_CONFIG',
          `policy ${spec}: a fixed period takes no ${other.join(', ')} (only presend)`,
        );
      if (rails.presendTargetPauseMs !== undefined)
        throw new RubatoError(
          'RUBATO_CONFIG',
          `policy ${spec}: a fixed period takes presend=MS or presend=last, not auto`,
        );
      return fixed(arg ?? 25, rails.presendMs);
    }
    case 'dirty-bandwidth':
      return dirtyBandwidth(rails, arg);
    case 'net-io':
      return netIo(rails);
    case 'disk-io':
      return diskIo(rails, arg);
    case 'adaptive':
      return adaptive(rails, arg);
    case 'bounded-latency':
      return boundedLatency(rails, arg);
    // Rubato's default pre-sends as presend=auto unless told otherwise (presend=off, =MS, =last):
    // passes only where they pay (a quiet guest, idle host cores) and only with Rubato's QEMU.
    case 'model':
      return model(presend ? rails : { ...rails, presendTargetPauseMs: AUTO_PRESEND_PAUSE_MS }, arg);
    default:
      throw new RubatoError(
        'RUBATO_CONFIG',
        `unknown policy "${name}" (fixed:MS, dirty-bandwidth[:MS], net-io, disk-io, adaptive, bounded-latency[:MS], model[:WEIGHT])`,
      );
  }
}

export const POLICY_NAMES = [
  'fixed:25ms',
  'fixed:100ms',
  'dirty-bandwidth',
  'net-io',
  'disk-io',
  'adaptive',
  'bounded-latency',
  'model',
] as const;
