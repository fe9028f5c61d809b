// A deterministic fault simulator (after TigerBeetle's VOPR and FoundationDB's simulator): one
// seeded world with a virtual clock, a replication link that drops, delays, duplicates and
// reorders, an etcd model (leases, revisions, compare-and-swap, outages), a standby disk whose
// writes fail, processes that crash or stall. The product's own state machines run inside it:
// the epoch pipeline (through the shared driver), output commit, the release gate, the lease clock,
// the guard's decision and the standby's state table. Invariants are checked at every step:
//  - no output released after its ack is lost by a failover;
//  - at most one copy releases output at any instant (an older copy never releases after a newer one did);
//  - a standby never goes live older than what it acknowledged;
//  - a guest never stays paused.
// `legacy` switches back single rules to the behaviour they had before they were fixed: each named
// regression scenario shows the simulator finds that defect, and that the fix holds.

import {
  EpochPipeline,
  dispatch,
  type OutsideHandlers,
  nextStandbyState,
  acceptsPrimary,
  type StandbyInput,
  type StandbyState,
} from '../replication/index.ts';
import { OutputCommit, ReleaseGate } from '../commit/index.ts';
import { LeaseClock, type Fencing, afterReclaim, type Reclaim, type Loss, takeoverWaitMs } from '../coord/index.ts';
import { fixed } from '../scheduler/index.ts';

/** Rules as they were before their fix (each off by default). */
export interface Legacy {
  /** The lease counted from when the grant or renewal returned, not from when it was asked for. */
  leaseFromReceive: boolean;
  /** Frames leave without the lease being checked (safety rested on the watchdog alone). */
  noReleaseGate: boolean;
  /** A loss of the lease before the guard exists (disk preparation, a restore) is dropped. */
  lossBeforeGuardDropped: boolean;
  /** A fenced holder claims the VM again whatever the witness's generation (another copy may have run since). */
  reclaimAnyGeneration: boolean;
  /** A link that drops mid-fence counts as a completed fence. */
  fenceOnClose: boolean;
  /** Memory durability: a failed write-behind discards the merged batch. */
  discardOnWriteFailure: boolean;
  /** A host whose VM failed over starts a copy from its own disk when it comes back. */
  noGenerationCheck: boolean;
  /** A standby restarted under memory durability goes live from its recovered replica (older than its acks). */
  recoveredGoesLive: boolean;
  /** A standby claims over an unrenewed owner key after a third of the TTL (shorter than the holder may act). */
  shortTakeoverWait: boolean;
}

export type FaultKind =
  | 'crash-primary'
  | 'crash-standby'
  | 'link-partition'
  | 'link-dup'
  | 'link-reorder'
  | 'etcd-cut-primary'
  | 'etcd-cut-standby'
  | 'etcd-outage'
  | 'isolate-primary'
  | 'pause-primary'
  | 'pause-standby'
  | 'disk-fail'
  | 'failover'
  | 'switchover';
export const FAULT_KINDS: readonly FaultKind[] = [
  'crash-primary',
  'crash-standby',
  'link-partition',
  'link-dup',
  'link-reorder',
  'etcd-cut-primary',
  'etcd-cut-standby',
  'etcd-outage',
  'isolate-primary',
  'pause-primary',
  'pause-standby',
  'disk-fail',
  'failover',
  'switchover',
];

export interface ScriptedFault {
  atMs: number;
  kind: FaultKind;
  forMs?: number;
}

export interface FaultSimOptions {
  seed: number;
  durationMs?: number;
  fencing?: Fencing;
  ttlMs?: number;
  timeoutMs?: number;
  holdMs?: number;
  heartbeatMs?: number;
  legacy?: Partial<Legacy>;
  /** Faults at given times instead of a random schedule. */
  script?: ScriptedFault[];
  /** Disk preparation before a primary's guard exists, ms (default: random 0–300). */
  prepareMs?: number;
  /** Primaries pre-send the dirty RAM every this many ms as their pipeline plans it (default: no pre-sends). */
  presendMs?: number;
}

export type ViolationKind = 'acked-output-lost' | 'two-releasers' | 'live-older-than-acked' | 'guest-stays-paused';
export interface Violation {
  atMs: number;
  kind: ViolationKind;
  detail: string;
}

export interface FaultSimResult {
  seed: number;
  violations: Violation[];
  faults: FaultKind[];
  events: number;
  failovers: number;
  releasedAcked: number;
  releasedOther: number;
  checkpointsAcked: number;
  /** Pre-send passes that ended into their checkpoint (with presendMs). */
  presends: number;
}

/** A frame the simulated guest sent: its copy, and the checkpoint lineage it belongs to. */
interface SimFrame {
  readonly length: number;
  readonly copy: number;
}

type HostName = 'A' | 'B';
/** An epoch's place in the replica lineage: (pipeline generation, epoch) in order. */
type Key = readonly [number, number];
const before = (a: Key, b: Key) => a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);

/** mulberry32: small, fast, good enough for schedules. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The witness: leases and the VM's owner key and generation, compare-and-swap; reachable or not per host. */
class SimEtcd {
  up = true;
  readonly cut = new Set<HostName>();
  private leases = new Map<number, number>();
  private next = 1;
  owner: { host: HostName; lease: number; rev: number } | null = null;
  generation = 0;
  /** etcd's revision: every write of the owner key advances it. */
  private rev = 0;
  reachable(h: HostName): boolean {
    return this.up && !this.cut.has(h);
  }
  private alive(id: number, now: number): boolean {
    return (this.leases.get(id) ?? -1) > now;
  }
  grant(now: number, ttlMs: number): number {
    const id = this.next++;
    this.leases.set(id, now + ttlMs);
    return id;
  }
  /** A renewal: the keep-alive, then the owner key written again while it is still `h`'s on this lease. */
  renew(h: HostName, id: number, now: number, ttlMs: number): boolean {
    if (!this.alive(id, now)) return false;
    this.leases.set(id, now + ttlMs);
    const o = this.ownerAt(now);
    if (!o || o.host !== h || o.lease !== id) return false;
    o.rev = ++this.rev;
    return true;
  }
  revoke(id: number): void {
    this.leases.delete(id);
    if (this.owner?.lease === id) this.owner = null;
  }
  ownerAt(now: number): { host: HostName; lease: number; rev: number } | null {
    if (this.owner && !this.alive(this.owner.lease, now)) this.owner = null;
    return this.owner;
  }
  /** The claim transaction: the owner key absent (or ours with this lease) → ours, generation + 1. */
  claim(h: HostName, lease: number, now: number): number | null {
    const o = this.ownerAt(now);
    if (o && !(o.host === h && o.lease === lease)) return null;
    if (!this.alive(lease, now)) return null;
    this.owner = { host: h, lease, rev: ++this.rev };
    return ++this.generation;
  }
  /** The claim over another host's owner key, conditioned on its revision still being `rev`. */
  claimOver(h: HostName, lease: number, now: number, rev: number): number | null {
    const o = this.ownerAt(now);
    if (o && o.rev !== rev) return null;
    if (!this.alive(lease, now)) return null;
    this.owner = { host: h, lease, rev: ++this.rev };
    return ++this.generation;
  }
  /**
   * Claiming again as the copy that held generation `expect` (its own old key replaced): 'superseded' once another copy
   * claimed since.
   */
  reclaim(h: HostName, lease: number, now: number, expect: number): Reclaim {
    const o = this.ownerAt(now);
    if (this.generation !== expect || (o && o.host !== h)) return 'superseded';
    if (!this.alive(lease, now)) return null;
    this.owner = { host: h, lease, rev: ++this.rev };
    return ++this.generation;
  }
}

interface Copy {
  id: number;
  host: HostName;
  startedAt: number;
  running: boolean;
  paused: boolean;
  pausedSince: number;
  reported: boolean;
}

interface Msg {
  session: number;
  seq: number;
  body: Body;
}
type Body =
  | { t: 'hello'; gen: number }
  | { t: 'welcome' }
  | { t: 'refuse' }
  | { t: 'base'; pipeGen: number }
  | { t: 'ckpt'; epoch: number }
  | { t: 'ack'; epoch: number }
  | { t: 'hb' }
  | { t: 'fence' }
  | { t: 'fenced' }
  | { t: 'close'; why: string };

/** A witness-holding side: lease clock, renewals, watchdog, guard. */
interface Holder {
  clock: LeaseClock;
  leaseId: number | null;
  gen: number;
  loss: Loss | null;
  guardAt: number;
  reclaiming: boolean;
  released: boolean;
}

interface PrimarySide {
  kind: 'primary';
  host: HostName;
  incarnation: number;
  copy: Copy;
  holder: Holder | null;
  pipe: EpochPipeline<SimFrame>;
  commit: OutputCommit<SimFrame>;
  gate: ReleaseGate;
  session: number | null;
  peerHeardAt: number;
  seqOut: number;
  seqIn: number;
  capturing: boolean;
  /** A pre-send pass is under way (the guest runs; no other decision until it ends). */
  presending: boolean;
  holdTimerAt: number | null;
  fenced: boolean;
  stopped: boolean;
  /** The one pending decision (a newer one replaces it). */
  decideToken: number;
  /** This replica generation's place in the world's lineage (pipeline generations restart per controller). */
  lineage: number;
}

interface StandbySide {
  kind: 'standby';
  host: HostName;
  incarnation: number;
  st: StandbyState;
  holder: Holder | null;
  /**
   * `recovered`: read back after a restart under memory durability: it may be older than what this side acknowledged.
   */
  replica: { written: Key; accepted: Key; kept: boolean; recovered?: boolean } | null;
  acked: Key | null;
  highestGen: number;
  session: number | null;
  peerHeardAt: number;
  seqOut: number;
  seqIn: number;
  guarding: boolean;
  activating: boolean;
  fenceWait: { session: number } | null;
  diskFails: boolean;
  /** The primary's owner key as this standby last read it, and since when (its answer's arrival). */
  seen: { rev: number; host: HostName; since: number } | null;
}

type Side = PrimarySide | StandbySide;

export function runFaultSim(o: FaultSimOptions): FaultSimResult {
  const R = rng(o.seed);
  const legacy: Legacy = {
    leaseFromReceive: false,
    noReleaseGate: false,
    lossBeforeGuardDropped: false,
    reclaimAnyGeneration: false,
    fenceOnClose: false,
    discardOnWriteFailure: false,
    noGenerationCheck: false,
    recoveredGoesLive: false,
    shortTakeoverWait: false,
    ...o.legacy,
  };
  const witness = (o.fencing ?? 'witness') === 'witness';
  const ttlMs = o.ttlMs ?? 1000,
    timeoutMs = o.timeoutMs ?? 1000,
    holdMs = o.holdMs ?? 2000,
    hbMs = o.heartbeatMs ?? 100;
  const duration = o.durationMs ?? 6000;
  const res: FaultSimResult = {
    seed: o.seed,
    violations: [],
    faults: [],
    events: 0,
    failovers: 0,
    releasedAcked: 0,
    releasedOther: 0,
    checkpointsAcked: 0,
    presends: 0,
  };
  const violate = (kind: ViolationKind, detail: string) => {
    if (res.violations.length < 20) res.violations.push({ atMs: Math.round(now * 100) / 100, kind, detail });
  };

  // ---- the world: clock, event queue, hosts -------------------------------------------------
  let now = 0;
  let seq = 0;
  const queue: Array<{ at: number; n: number; host: HostName | null; inc: number; fn: () => void }> = [];
  const sides: Record<HostName, Side | null> = { A: null, B: null };
  const stalledUntil: Record<HostName, number> = { A: 0, B: 0 };
  const incarnation: Record<HostName, number> = { A: 0, B: 0 };
  /** Generation each host last held (kept in its state folder: survives crashes). */
  const heldGen: Record<HostName, number> = { A: 0, B: 0 };
  const etcd = new SimEtcd();
  let linkCut = false;
  let linkDup = false;
  let linkReorder = false;
  let sessions = 0;
  let copies = 0;
  /** The newest copy that released output, and the newest acknowledged output released (per lineage). */
  let newestReleaser: Copy | null = null;
  let releasedAckedMax: Key | null = null;
  let pipeGens = 0;

  /**
   * Schedules `fn` on `host`'s process (null: the world itself); a stalled process runs it when it resumes, a dead one
   * never.
   */
  type Ev = (typeof queue)[number];
  const at = (t: number, host: HostName | null, fn: () => void) =>
    enqueue({ at: Math.max(t, now), n: seq++, host, inc: host ? incarnation[host] : 0, fn });
  const enqueue = (ev: Ev) => {
    let i = queue.length;
    while (i > 0 && (queue[i - 1]!.at > ev.at || (queue[i - 1]!.at === ev.at && queue[i - 1]!.n > ev.n))) i--;
    queue.splice(i, 0, ev);
  };
  const rand = (a: number, b: number) => a + (b - a) * R();

  // ---- copies of the guest and what they release ---------------------------------------------
  const newCopy = (host: HostName): Copy => ({
    id: ++copies,
    host,
    startedAt: now,
    running: true,
    paused: false,
    pausedSince: 0,
    reported: false,
  });
  const released = (c: Copy, key: Key | null) => {
    if (newestReleaser && newestReleaser.id !== c.id && c.startedAt < newestReleaser.startedAt) {
      violate(
        'two-releasers',
        `copy ${c.id} on ${c.host} released output after copy ${newestReleaser.id} on ${newestReleaser.host} (newer) had`,
      );
    }
    if (!newestReleaser || c.startedAt >= newestReleaser.startedAt) newestReleaser = c;
    if (key) {
      res.releasedAcked++;
      if (!releasedAckedMax || before(releasedAckedMax, key)) releasedAckedMax = key;
    } else res.releasedOther++;
  };
  const stopCopy = (c: Copy) => {
    c.running = false;
    c.paused = false;
  };
  const pause = (c: Copy) => {
    if (!c.paused) {
      c.paused = true;
      c.pausedSince = now;
    }
  };
  const resume = (c: Copy) => {
    c.paused = false;
  };

  // ---- the witness, as each side's lease keeper and watchdog see it ---------------------------
  /** An etcd request from `h`: answered (or not) after a round trip; `ok` false when unreachable. */
  const etcdCall = <T>(h: HostName, op: (t: number) => T, done: (r: T | null) => void) => {
    const sent = now;
    if (!etcd.reachable(h)) {
      at(sent + ttlMs * 0.6, h, () => done(null));
      return;
    }
    const d1 = rand(0.2, 3),
      d2 = rand(0.2, 3);
    at(sent + d1, null, () => {
      if (!etcd.reachable(h)) return at(sent + ttlMs * 0.6, h, () => done(null));
      const r = op(now);
      at(now + d2, h, () => done(etcd.reachable(h) ? r : null));
    });
  };
  const newHolder = (): Holder => ({
    clock: new LeaseClock(ttlMs),
    leaseId: null,
    gen: 0,
    loss: null,
    guardAt: Number.POSITIVE_INFINITY,
    reclaiming: false,
    released: false,
  });
  /** Claims the VM for side `s`: grant + compare-and-swap (`expect`: claiming again as the copy of that generation). */
  const claimAs = (s: Side, holder: Holder, expect: number | null, cb: (r: Reclaim) => void, over?: number) => {
    const sent = now;
    etcdCall(
      s.host,
      (t) => {
        const lease = holder.leaseId ?? etcd.grant(t, ttlMs);
        let r = expect === null ? etcd.claim(s.host, lease, t) : etcd.reclaim(s.host, lease, t, expect);
        // Refused: over the holder's key at the revision seen unrenewed for the takeover wait (the transaction's condition).
        if (r === null && over !== undefined) r = etcd.claimOver(s.host, lease, t, over);
        if (typeof r !== 'number' && holder.leaseId === null) etcd.revoke(lease);
        return typeof r === 'number' ? { gen: r, lease } : r;
      },
      (r) => {
        if (!alive(s)) return;
        if (r === null || r === 'superseded') return cb(r);
        if (holder.leaseId !== r.lease) holder.clock.reset();
        holder.leaseId = r.lease;
        holder.gen = r.gen;
        holder.loss = null;
        holder.released = false;
        holder.clock.confirmed(legacy.leaseFromReceive ? now : sent);
        heldGen[s.host] = r.gen;
        cb(r.gen);
      },
    );
  };
  const claim = (s: Side, holder: Holder, cb: (gen: number | null) => void, over?: number) =>
    claimAs(s, holder, null, (r) => cb(typeof r === 'number' ? r : null), over);
  const takeoverWait = legacy.shortTakeoverWait ? ttlMs / 3 : takeoverWaitMs(ttlMs);
  /** A guarding standby reads its primary's owner key every 100 ms; a revision counts from its answer's arrival. */
  const observeLoop = (s: StandbySide) => {
    at(now + 100, s.host, () => {
      if (!alive(s)) return;
      if (s.guarding)
        etcdCall(
          s.host,
          (t) => {
            const o = etcd.ownerAt(t);
            return o ? { rev: o.rev, host: o.host } : ('none' as const);
          },
          (r) => {
            if (!alive(s) || r === null) return;
            if (r === 'none') s.seen = null;
            else if (s.seen?.rev !== r.rev) s.seen = { rev: r.rev, host: r.host, since: now };
          },
        );
      observeLoop(s);
    });
  };
  /** The revision a standby may claim over now (seen unrenewed for the takeover wait), or ms until it may. */
  const takeover = (s: StandbySide): { over?: number; inMs: number } => {
    const seen = s.seen;
    if (!seen || seen.host === s.host) return { inMs: 500 };
    const left = takeoverWait - (now - seen.since);
    return left <= 0 ? { over: seen.rev, inMs: 500 } : { inMs: Math.min(500, Math.max(10, left + 1)) };
  };
  const renewLoop = (s: Side, holder: Holder) => {
    at(now + ttlMs / 6, s.host, () => {
      if (!alive(s) || holder.loss || holder.released || holder.leaseId === null) return;
      const sent = now,
        id = holder.leaseId;
      etcdCall(
        s.host,
        (t) => etcd.renew(s.host, id, t, ttlMs),
        (ok) => {
          if (ok === null || holder.leaseId !== id) return;
          if (ok) holder.clock.confirmed(legacy.leaseFromReceive ? now : sent);
          else holder.clock.expired();
        },
      );
      renewLoop(s, holder);
    });
  };
  const watchdog = (s: Side, holder: Holder) => {
    at(now + 50, s.host, () => {
      if (!alive(s) || holder.released) return;
      if (!holder.loss && holder.leaseId !== null && !holder.clock.valid(now)) {
        holder.loss = { why: 'no renewal', stale: holder.clock.mayHaveExpired(now) };
        holder.leaseId = null;
        if (now >= holder.guardAt)
          onLoss(s, holder); // (a guard attached later hears it then)
        else if (legacy.lossBeforeGuardDropped) holder.loss = null;
      }
      watchdog(s, holder);
    });
  };
  const attachGuard = (s: Side, holder: Holder) => {
    holder.guardAt = now;
    if (holder.loss) onLoss(s, holder);
  };
  /** The guard: fenced by the release gate, it claims the VM again as the same copy, or stops once superseded. */
  const onLoss = (s: Side, holder: Holder) => {
    if (holder.reclaiming) return;
    holder.reclaiming = true;
    const ask = (delayMs: number) =>
      at(now + delayMs, s.host, () => {
        if (!alive(s) || !holder.loss) {
          holder.reclaiming = false;
          return;
        }
        claimAs(s, holder, legacy.reclaimAnyGeneration || holder.gen === 0 ? null : holder.gen, (r) => {
          const d = afterReclaim(r);
          if (d === 'stop') return stopSide(s);
          if (d === 'holds') {
            holder.reclaiming = false;
            return;
          }
          ask(1000);
        });
      });
    ask(0);
  };
  const leaseCheck =
    (holder: Holder | null) =>
    (t: number): string | null => {
      if (!witness || legacy.noReleaseGate) return null;
      if (!holder || holder.loss || holder.released || holder.leaseId === null) return 'no lease';
      return holder.clock.valid(t) ? null : 'lease not known valid';
    };

  const alive = (s: Side) => sides[s.host] === s && s.incarnation === incarnation[s.host];
  const stopSide = (s: Side) => {
    if (s.kind === 'primary') {
      s.stopped = true;
      stopCopy(s.copy);
      closeSession(s, 'stopped');
    } else closeSession(s, 'stopped');
    sides[s.host] = null;
    incarnation[s.host]++;
  };

  // ---- the replication link -----------------------------------------------------------------
  const peerOf = (h: HostName): HostName => (h === 'A' ? 'B' : 'A');
  const send = (from: Side, body: Body) => {
    if (from.session === null) return;
    const m: Msg = { session: from.session, seq: ++from.seqOut, body };
    if (linkCut) return;
    let d = rand(0.1, 1.5);
    if (linkReorder && R() < 0.3) {
      d += 5;
      linkReorder = false;
    }
    at(now + d, peerOf(from.host), () => receive(peerOf(from.host), m));
    if (linkDup && R() < 0.3) {
      linkDup = false;
      at(now + d + 0.05, peerOf(from.host), () => receive(peerOf(from.host), m));
    }
  };
  const closeSession = (s: Side, why: string) => {
    if (s.session === null) return;
    const sess = s.session;
    if (!linkCut)
      at(now + rand(0.1, 1.5), peerOf(s.host), () => {
        const p = sides[peerOf(s.host)];
        if (p && p.session === sess) lost(p, `peer: ${why}`);
      });
    s.session = null;
  };
  const receive = (h: HostName, m: Msg) => {
    const s = sides[h];
    if (!s || (s.session !== m.session && m.body.t !== 'hello')) return;
    if (m.body.t !== 'hello') {
      if (m.seq !== s.seqIn + 1) {
        closeSession(s, 'protocol error');
        return lost(s, 'a frame out of sequence');
      }
      s.seqIn = m.seq;
      s.peerHeardAt = now;
    }
    if (s.kind === 'primary') primaryReceives(s, m.body);
    else standbyReceives(s, m);
  };
  const lost = (s: Side, why: string) => {
    s.session = null;
    if (s.kind === 'primary') primaryLinkLost(s, why);
    else standbyLinkLost(s);
  };
  const heartbeat = (s: Side) => {
    at(now + hbMs, s.host, () => {
      if (!alive(s)) return;
      if (s.session !== null) {
        if (now - s.peerHeardAt > timeoutMs) {
          const sess = s.session;
          closeSession(s, 'silent');
          if (s.session === null && sess !== null) lost(s, 'peer silent');
        } else send(s, { t: 'hb' });
      }
      heartbeat(s);
    });
  };

  // ---- the primary --------------------------------------------------------------------------
  const startPrimary = (h: HostName, copy: Copy | null, holder: Holder | null) => {
    const commit = new OutputCommit<SimFrame>(1 << 20);
    const pipe = new EpochPipeline<SimFrame>({ policy: fixed(50, o.presendMs), commit, maxInflight: 4 });
    const s: PrimarySide = {
      kind: 'primary',
      host: h,
      incarnation: incarnation[h],
      copy: copy ?? newCopy(h),
      holder,
      pipe,
      commit,
      gate: new ReleaseGate(leaseCheck(holder)),
      session: null,
      peerHeardAt: now,
      seqOut: 0,
      seqIn: 0,
      capturing: false,
      presending: false,
      holdTimerAt: null,
      fenced: false,
      stopped: false,
      decideToken: 0,
      lineage: 0,
    };
    sides[h] = s;
    guestOutput(s);
    heartbeat(s);
    connect(s);
    return s;
  };
  const leave = (s: PrimarySide, key: Key | null) => {
    if (s.gate.allow(now)) released(s.copy, key);
  };
  /** The commands from outside the checkpoint loop, as the live primary carries them out. */
  const outsideOf = (s: PrimarySide): OutsideHandlers<SimFrame> => ({
    release: (c) => {
      for (let i = 0; i < c.frames.length; i++) leave(s, [s.lineage, c.epoch]);
      res.checkpointsAcked++;
    },
    protected: () => {
      s.holdTimerAt = null;
    },
    unprotected: () => {
      s.holdTimerAt ??= now + holdMs;
      at(now + holdMs, s.host, () => holdTimer(s));
    },
    'release-unprotected': (c) => {
      for (let i = 0; i < c.frames.length; i++) leave(s, null);
    },
    'stop-guest': () => {
      stopCopy(s.copy);
      s.fenced = true;
      send(s, { t: 'fenced' });
      if (s.holder) {
        const id = s.holder.leaseId;
        s.holder.released = true;
        if (id !== null)
          etcdCall(
            s.host,
            () => etcd.revoke(id),
            () => {},
          );
      }
    },
  });
  const perform = (s: PrimarySide, cmds: ReturnType<EpochPipeline<SimFrame>['ack']>) =>
    dispatch(cmds, outsideOf(s), 'fault simulator');
  const holdTimer = (s: PrimarySide) => {
    if (!alive(s) || s.holdTimerAt === null || now < s.holdTimerAt) return;
    s.holdTimerAt = null;
    perform(s, s.pipe.holdExpired('no standby'));
  };
  const guestOutput = (s: PrimarySide) => {
    at(now + rand(5, 25), s.host, () => {
      if (!alive(s) || !s.copy.running) return;
      if (!s.copy.paused) {
        const f = s.commit.push({ length: 100, copy: s.copy.id }, now);
        if (f) leave(s, null);
      }
      guestOutput(s);
    });
  };
  const connect = (s: PrimarySide) => {
    at(now + (s.session === null ? rand(1, 30) : 1000), s.host, () => {
      if (!alive(s) || s.stopped || s.fenced) return;
      if (s.session === null && !linkCut) {
        s.session = ++sessions;
        s.seqOut = 0;
        s.seqIn = 0;
        s.peerHeardAt = now;
        send(s, { t: 'hello', gen: s.holder?.gen ?? 0 });
      }
      connect(s);
    });
  };
  const primaryReceives = (s: PrimarySide, b: Body) => {
    switch (b.t) {
      case 'welcome':
        return sync(s);
      case 'refuse':
        s.session = null;
        return;
      case 'ack': {
        if (!s.pipe.expectsAck(b.epoch)) {
          closeSession(s, 'protocol');
          return lost(s, 'unexpected ack');
        }
        perform(s, s.pipe.ack(b.epoch, now));
        if (s.pipe.phase === 'protecting' && !s.capturing) decide(s);
        return;
      }
      case 'fence':
        s.pipe.fenceRequested();
        return;
      default:
        return;
    }
  };
  const sync = (s: PrimarySide) => {
    if (s.pipe.phase !== 'unprotected' || s.capturing) return;
    s.pipe.startSync();
    s.lineage = ++pipeGens;
    s.capturing = true;
    pause(s.copy);
    const sess = s.session;
    at(now + rand(1, 4), s.host, () => {
      if (!alive(s) || s.session !== sess) {
        resume(s.copy);
        s.capturing = false;
        return;
      }
      s.pipe.paused(0, now);
      resume(s.copy);
      s.capturing = false;
      const pg = s.lineage;
      dispatch(
        s.pipe.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 1, bytes: 0, resumedMs: now }),
        {
          send: (c) => {
            s.pipe.sent(c.epoch, now);
            send(s, { t: 'base', pipeGen: pg });
          },
        },
        'fault simulator sync',
      );
    });
  };
  const decide = (s: PrimarySide) => {
    if (!alive(s) || s.capturing || s.presending || s.pipe.phase !== 'protecting') return;
    const token = ++s.decideToken;
    const c = s.pipe.decide(now, {
      disk: { writes: 0, flushes: 0 },
      link: { bytesPerSec: null, rttMs: 1 },
      canPresend: o.presendMs !== undefined,
    });
    if (c.cmd === 'presend') {
      // A pass while the guest runs; its pages join the coming checkpoint (a lost session drops it).
      const sess = s.session;
      s.presending = true;
      at(now + rand(1, 5), s.host, () => {
        s.presending = false;
        if (!alive(s)) return;
        if (s.session === sess && s.pipe.phase === 'protecting') {
          s.pipe.presented(8, now);
          res.presends++;
        }
        if (s.pipe.phase === 'protecting' && !s.capturing) decide(s);
      });
      return;
    }
    if (c.cmd === 'wait') {
      at(
        Math.max(c.untilMs, now + 0.5),
        s.host,
        /* a timer fires no sooner */ () => {
          if (s.decideToken === token) decide(s);
        },
      );
      return;
    }
    if (c.cmd === 'wait-ack') return;
    if (c.cmd !== 'capture' && c.cmd !== 'fence') throw new Error(`fault simulator: decide gave ${c.cmd}`);
    const epoch = c.epoch,
      sess = s.session;
    s.capturing = true;
    pause(s.copy);
    at(now + rand(1, 3), s.host, () => {
      if (!alive(s) || s.session !== sess || s.pipe.phase === 'unprotected') {
        s.capturing = false;
        if (!s.fenced) resume(s.copy);
        return;
      }
      s.pipe.paused(epoch, now);
      if (c.cmd === 'capture') resume(s.copy); // a fence keeps the guest stopped until its ack (or a lost link)
      s.capturing = false;
      dispatch(
        s.pipe.capturedCheckpoint(epoch, { dirtyPages: 10, pauseMs: 2, bytes: 40960, resumedMs: now }),
        {
          send: (x) => {
            s.pipe.sent(x.epoch, now);
            send(s, { t: 'ckpt', epoch: x.epoch });
          },
        },
        'fault simulator',
      );
      decide(s);
    });
  };
  const primaryLinkLost = (s: PrimarySide, why: string) => {
    if (s.stopped) return;
    if (!s.fenced) resume(s.copy); // the capture's close resumes the guest
    perform(s, s.pipe.linkLost(why));
  };

  // ---- the standby --------------------------------------------------------------------------
  const startStandby = (h: HostName, replica: StandbySide['replica'], highestGen: number): StandbySide => {
    const s: StandbySide = {
      kind: 'standby',
      host: h,
      incarnation: incarnation[h],
      st: replica ? nextStandbyState('waiting', 'replica-recovered', { hasReplica: true }) : 'waiting',
      holder: null,
      replica,
      acked: replica ? replica.accepted : null,
      highestGen,
      session: null,
      peerHeardAt: now,
      seqOut: 0,
      seqIn: 0,
      guarding: false,
      activating: false,
      fenceWait: null,
      diskFails: false,
      seen: null,
    };
    sides[h] = s;
    heartbeat(s);
    if (witness) observeLoop(s);
    return s;
  };
  const go = (s: StandbySide, input: StandbyInput) => {
    s.st = nextStandbyState(s.st, input, { hasReplica: s.replica !== null });
  };
  const standbyReceives = (s: StandbySide, m: Msg) => {
    const b = m.body;
    switch (b.t) {
      case 'hello': {
        if (!acceptsPrimary(s.st) || (s.highestGen > 0 && b.gen < s.highestGen)) return;
        s.session = m.session;
        s.seqIn = m.seq;
        s.seqOut = 0;
        s.peerHeardAt = now;
        s.highestGen = Math.max(s.highestGen, b.gen);
        send(s, { t: 'welcome' });
        return;
      }
      case 'base': {
        if (!acceptsPrimary(s.st)) {
          closeSession(s, 'not accepting');
          return;
        }
        go(s, 'base-begin');
        go(s, 'base-installed');
        s.replica = { written: [b.pipeGen, 0], accepted: [b.pipeGen, 0], kept: false };
        s.acked = [b.pipeGen, 0];
        s.guarding = true;
        send(s, { t: 'ack', epoch: 0 });
        return;
      }
      case 'ckpt': {
        const r = s.replica;
        if (!r || s.st !== 'protecting') {
          closeSession(s, 'no replica');
          return;
        }
        if (r.kept) {
          closeSession(s, 'replica write failed');
          return lostStandby(s);
        } // stops acknowledging
        const key: Key = [r.accepted[0], b.epoch];
        r.accepted = key;
        at(now + rand(2, 15), s.host, () => writeBehind(s, key));
        s.acked = key;
        send(s, { t: 'ack', epoch: b.epoch });
        return;
      }
      case 'fenced':
        if (s.fenceWait) {
          s.fenceWait = null;
          activate(s);
        }
        return;
      case 'close':
        return;
      default:
        return;
    }
  };
  const writeBehind = (s: StandbySide, key: Key) => {
    const r = s.replica;
    if (!alive(s) || !r || before(key, r.written) || r.written === key) return;
    if (s.diskFails) {
      if (legacy.discardOnWriteFailure)
        r.accepted = r.written; // the merged batch is gone
      else r.kept = true;
      return;
    }
    if (!r.kept) r.written = key;
  };
  const lostStandby = (s: StandbySide) => {
    s.session = null;
    standbyLinkLost(s);
  };
  const standbyLinkLost = (s: StandbySide) => {
    if (s.fenceWait) {
      s.fenceWait = null;
      if (legacy.fenceOnClose) {
        activate(s);
        return;
      }
      go(s, 'failover-failed');
    }
    if (!s.guarding || s.st !== 'protecting') return;
    at(now + timeoutMs, s.host, () => tryFailover(s));
  };
  const tryFailover = (s: StandbySide) => {
    if (!alive(s) || s.session !== null || s.st !== 'protecting' || !s.guarding || s.activating) return;
    activate(s);
  };
  const activate = (s: StandbySide) => {
    if (!s.replica || s.activating || !(s.st === 'protecting' || s.st === 'activating')) return;
    // A replica recovered after a restart under memory durability may be older than its acks: it never goes live.
    if (s.replica.recovered && !legacy.recoveredGoesLive) {
      if (s.st === 'activating') go(s, 'failover-failed');
      return;
    }
    s.activating = true;
    if (s.st === 'protecting') go(s, 'failover-begin');
    const holder = newHolder();
    const proceed = () => {
      const r = s.replica!;
      // The files must hold what was acknowledged: a kept batch is written again first.
      if (r.kept) {
        if (s.diskFails) {
          go(s, 'failover-failed');
          s.activating = false;
          at(now + 500, s.host, () => tryFailover(s));
          return;
        }
        r.written = r.accepted;
        r.kept = false;
      }
      const from = legacy.discardOnWriteFailure ? r.written : r.accepted;
      if (s.acked && before(from, s.acked))
        violate(
          'live-older-than-acked',
          `${s.host} went live from ${from.join('/')} after acknowledging ${s.acked.join('/')}`,
        );
      if (releasedAckedMax && before(from, releasedAckedMax))
        violate(
          'acked-output-lost',
          `${s.host} went live from ${from.join('/')}; output of ${releasedAckedMax.join('/')} had been released`,
        );
      res.failovers++;
      go(s, 'failover-done');
      const copy = newCopy(s.host);
      sides[s.host] = null;
      const p = startPrimary(s.host, copy, witness ? holder : null);
      if (witness) {
        const restoreMs = rand(20, 300);
        at(now + restoreMs, s.host, () => {
          if (alive(p)) attachGuard(p, holder);
        });
      }
    };
    if (!witness) return proceed();
    const t = takeover(s);
    claim(
      s,
      holder,
      (gen) => {
        if (!alive(s)) return;
        if (gen === null) {
          go(s, 'failover-failed');
          s.activating = false;
          if (s.guarding && s.session === null) at(now + takeover(s).inMs, s.host, () => tryFailover(s));
          return;
        }
        s.highestGen = gen;
        renewLoop(s, holder);
        watchdog(s, holder);
        proceed();
      },
      t.over,
    );
  };

  // ---- a host's controller (re)starting -----------------------------------------------------
  const bootPrimary = (h: HostName) => {
    const holder = witness ? newHolder() : null;
    const begin = () => {
      const s = startPrimary(h, null, holder);
      if (holder) {
        renewLoop(s, holder);
        watchdog(s, holder);
        at(now + (o.prepareMs ?? rand(0, 300)), h, () => {
          if (alive(s)) attachGuard(s, holder);
        });
      }
    };
    if (!holder) return begin();
    // The generation check before QEMU starts: a host that lost the VM to another never runs a stale copy.
    etcdCall(
      h,
      (t) => {
        etcd.ownerAt(t);
        return etcd.generation;
      },
      (gen) => {
        if (gen === null) return at(now + 1000, h, () => bootPrimary(h));
        if (gen > heldGen[h] && !legacy.noGenerationCheck) return restartAsStandby(h);
        const probe: Side = { kind: 'standby', host: h, incarnation: incarnation[h] } as StandbySide;
        sides[h] = probe;
        claim(probe, holder, (g) => {
          sides[h] = null;
          if (g === null) return restartAsStandby(h);
          begin();
        });
      },
    );
  };
  const restartAsStandby = (h: HostName) => {
    startStandby(h, null, etcd.generation);
  };
  const crash = (h: HostName, downMs: number) => {
    const s = sides[h];
    if (s?.kind === 'primary') stopCopy(s.copy);
    const replica =
      s?.kind === 'standby' && s.replica
        ? { written: s.replica.written, accepted: s.replica.written, kept: false, recovered: true }
        : null;
    const wasPrimary = s?.kind === 'primary';
    if (s) s.session = null;
    sides[h] = null;
    incarnation[h]++;
    at(now + downMs, null, () => {
      if (sides[h]) return;
      if (wasPrimary || !replica) bootPrimary(h);
      else startStandby(h, replica, heldGen[h]);
    });
  };

  // ---- faults --------------------------------------------------------------------------------
  const fault = (kind: FaultKind, forMs: number) => {
    res.faults.push(kind);
    const p = (['A', 'B'] as const).find((h) => sides[h]?.kind === 'primary') ?? 'A';
    const q = peerOf(p);
    switch (kind) {
      case 'crash-primary':
        return crash(p, forMs);
      case 'crash-standby':
        return crash(q, forMs);
      case 'link-partition':
        linkCut = true;
        return at(now + forMs, null, () => {
          linkCut = false;
        });
      case 'link-dup':
        linkDup = true;
        return;
      case 'link-reorder':
        linkReorder = true;
        return;
      case 'etcd-cut-primary':
        etcd.cut.add(p);
        return at(now + forMs, null, () => etcd.cut.delete(p));
      case 'etcd-cut-standby':
        etcd.cut.add(q);
        return at(now + forMs, null, () => etcd.cut.delete(q));
      case 'etcd-outage':
        etcd.up = false;
        return at(now + forMs, null, () => {
          etcd.up = true;
        });
      case 'isolate-primary':
        linkCut = true;
        etcd.cut.add(p);
        return at(now + forMs, null, () => {
          linkCut = false;
          etcd.cut.delete(p);
        });
      case 'pause-primary':
      case 'pause-standby': {
        const h = kind === 'pause-primary' ? p : q;
        stalledUntil[h] = Math.max(stalledUntil[h], now + forMs);
        return;
      }
      case 'disk-fail': {
        const s = sides[q];
        if (s?.kind !== 'standby') return;
        s.diskFails = true;
        return at(now + forMs, null, () => {
          if (sides[q] === s) s.diskFails = false;
        });
      }
      case 'failover':
      case 'switchover': {
        const s = sides[q];
        if (s?.kind !== 'standby' || !s.replica || s.st !== 'protecting') return;
        if (s.session === null) {
          if (kind === 'failover') activate(s);
          return;
        }
        s.fenceWait = { session: s.session };
        go(s, 'failover-begin');
        send(s, { t: 'fence' });
        const sess = s.session;
        at(now + timeoutMs, q, () => {
          if (s.fenceWait?.session === sess) {
            s.fenceWait = null;
            go(s, 'failover-failed');
          }
        });
        return;
      }
    }
  };

  // ---- the run --------------------------------------------------------------------------------
  bootPrimary('A');
  startStandby('B', null, 0);
  if (o.script) for (const f of o.script) at(f.atMs, null, () => fault(f.kind, f.forMs ?? 1500));
  else {
    let t = rand(800, 1500);
    while (t < duration - 1500) {
      const kind = FAULT_KINDS[Math.floor(R() * FAULT_KINDS.length)]!;
      const forMs = rand(100, 3500);
      at(t, null, () => fault(kind, forMs));
      t += rand(300, 1800);
    }
  }
  while (queue.length && res.events < 200_000) {
    const ev = queue.shift()!;
    if (ev.at > duration) break;
    now = ev.at;
    if (ev.host) {
      if (ev.inc !== incarnation[ev.host]) continue; // its process died
      if (stalledUntil[ev.host] > now) {
        enqueue({ ...ev, at: stalledUntil[ev.host], n: seq++ });
        continue;
      }
    }
    res.events++;
    ev.fn();
    // A guest never stays paused (a fence's stop ends in a stopped guest, or a resumed one).
    for (const h of ['A', 'B'] as const) {
      const s = sides[h];
      const c = s?.kind === 'primary' ? s.copy : null;
      // (a stalled host's events all run when the stall ends: counted from then)
      if (c?.running && c.paused && !c.reported && now - Math.max(c.pausedSince, stalledUntil[h]) > 3 * timeoutMs) {
        c.reported = true;
        violate('guest-stays-paused', `copy ${c.id} on ${h} paused since ${Math.round(c.pausedSince)} ms`);
      }
    }
  }
  return res;
}
