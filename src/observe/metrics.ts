// Prometheus metrics of one controller process (protect, standby, agent). Everything comes from
// two sources the controllers already have: their event stream (checkpoints, acks, commits,
// failovers, protection changes, scheduler decisions) and their status snapshot (read at scrape
// time: held output, lag, replica epoch, link round trip). Names and units follow Prometheus
// conventions: rubato_…_seconds, _bytes, _total; process_* come from prom-client's defaults.

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Seconds buckets for pauses and acknowledgements: 0.25 ms to 2.5 s. */
const SECONDS_BUCKETS = [0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.5, 1, 2.5];
const PAGES_BUCKETS = [0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144];

type Snapshot = Record<string, unknown>;
type AnyEvent = { event: string } & Record<string, unknown>;

const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);

/** Which controller a series belongs to. */
export interface SourceLabels {
  vm: string;
  role: string;
}
const LABELS = ['vm', 'role'] as const;

interface SourceState {
  protectedNow: number;
  seenReasons: Record<string, number>;
  reason: string | null;
}

/** One controller's share of the metrics: its events go to observe(). */
export interface MetricsSource {
  observe(e: AnyEvent): void;
}

interface Source {
  labels: SourceLabels;
  snapshot: () => Snapshot;
  state: SourceState;
}

export class ControllerMetrics {
  readonly registry = new Registry();
  private readonly sources: Source[] = [];
  private readonly pause: Histogram<'vm' | 'role'>;
  private readonly ack: Histogram<'vm' | 'role'>;
  private readonly dirty: Histogram<'vm' | 'role'>;
  private readonly checkpoints: Counter<'vm' | 'role'>;
  private readonly shipped: Counter<'vm' | 'role'>;
  private readonly committed: Counter<'vm' | 'role'>;
  private readonly committedBytes: Counter<'vm' | 'role'>;
  private readonly failovers: Counter<'vm' | 'role'>;
  private readonly decisions: Counter<'vm' | 'role' | 'reason'>;
  private readonly unprotected: Gauge<'vm' | 'role' | 'reason'>;

  constructor(defaultLabels: Record<string, string> = {}) {
    const r = this.registry;
    r.setDefaultLabels(defaultLabels);
    collectDefaultMetrics({ register: r }); // process_resident_memory_bytes among them
    const labelNames = [...LABELS];
    this.pause = new Histogram({
      name: 'rubato_checkpoint_pause_seconds',
      help: 'How long the guest was paused for each checkpoint',
      buckets: SECONDS_BUCKETS,
      labelNames,
      registers: [r],
    });
    this.ack = new Histogram({
      name: 'rubato_checkpoint_ack_seconds',
      help: 'From a checkpoint handed to the link to its acknowledgement by the standby',
      buckets: SECONDS_BUCKETS,
      labelNames,
      registers: [r],
    });
    this.dirty = new Histogram({
      name: 'rubato_checkpoint_dirty_pages',
      help: 'Pages (RAM and disk) in each checkpoint',
      buckets: PAGES_BUCKETS,
      labelNames,
      registers: [r],
    });
    this.checkpoints = new Counter({
      name: 'rubato_checkpoints_total',
      help: 'Checkpoints taken',
      labelNames,
      registers: [r],
    });
    this.shipped = new Counter({
      name: 'rubato_checkpoint_shipped_bytes_total',
      help: 'Checkpoint records shipped to the standby',
      labelNames,
      registers: [r],
    });
    this.committed = new Counter({
      name: 'rubato_replica_commits_total',
      help: "Checkpoints committed into this standby's replica",
      labelNames,
      registers: [r],
    });
    this.committedBytes = new Counter({
      name: 'rubato_replica_received_bytes_total',
      help: 'Checkpoint records received by this standby',
      labelNames,
      registers: [r],
    });
    this.failovers = new Counter({
      name: 'rubato_failovers_total',
      help: 'Failovers: the guest resumed here from the replica',
      labelNames,
      registers: [r],
    });
    this.decisions = new Counter({
      name: 'rubato_scheduler_decisions_total',
      help: 'Checkpoint scheduler decisions, by reason',
      labelNames: [...labelNames, 'reason'],
      registers: [r],
    });
    this.unprotected = new Gauge({
      name: 'rubato_unprotected_reason',
      help: 'Why the guest is unprotected: 1 for the current reason, absent while protected',
      labelNames: [...labelNames, 'reason'],
      registers: [r],
    });
    const sources = this.sources;
    // Each source with its status read now (a source whose read fails is left out of this scrape).
    const read = function* (): Generator<[Source, Snapshot]> {
      for (const src of sources) {
        try {
          yield [src, src.snapshot()];
        } catch {
          /* not this scrape */
        }
      }
    };
    const gauge = (name: string, help: string, value: (s: Snapshot, st: { protectedNow: number }) => number | null) =>
      new Gauge({
        name,
        help,
        labelNames,
        registers: [r],
        collect() {
          this.reset();
          for (const [src, s] of read()) {
            const v = value(s, src.state);
            if (v !== null) this.set({ ...src.labels }, v);
          }
        },
      });
    gauge(
      'rubato_protected',
      'The guest runs under protection by a standby (1) or not (0); a standby reports 1 while a live primary relies on its replica',
      (s, st) =>
        s['role'] === 'standby'
          ? s['primary']
            ? 1
            : 0
          : typeof s['protected'] === 'boolean'
            ? s['protected']
              ? 1
              : 0
            : st.protectedNow,
    );
    gauge('rubato_output_held_frames', 'Guest output frames held until their checkpoint is acknowledged', (s) =>
      num(s['heldFrames']),
    );
    gauge('rubato_output_held_bytes', 'Bytes of guest output held', (s) => num(s['heldBytes']));
    // Every frame the guest sent, by the way it went (output commit counts each in exactly one).
    new Counter({
      name: 'rubato_output_frames_total',
      help: 'Guest output frames by the way they went: released (after the ack), passed-through (nothing protected the guest), released-unprotected (held, let go without an ack), dropped (at the bound), compared (released when the secondary sent the same, compare mode), blocked-no-lease (refused by the release gate)',
      labelNames: [...labelNames, 'way'],
      registers: [r],
      collect() {
        this.reset();
        for (const [src, s] of read()) {
          const o = (s['output'] ?? {}) as Record<string, unknown>;
          const ways: Array<[string, unknown]> = [
            ['released', o['released']],
            ['passed-through', o['passedThrough']],
            ['released-unprotected', o['releasedUnprotected']],
            ['dropped', o['dropped']],
            ['compared', o['compared']],
            ['blocked-no-lease', s['outputBlockedNoLease']],
          ];
          for (const [way, v] of ways) {
            const n = num(v);
            if (n !== null && n > 0) this.inc({ ...src.labels, way }, n);
          }
        }
      },
    });
    gauge(
      'rubato_compare_mismatches',
      'Compare mode: frames the secondary sent differently from the primary (each asks for a checkpoint)',
      (s) => num((s['compare'] as Record<string, unknown> | undefined)?.['mismatches']),
    );
    gauge(
      'rubato_release_planning_compare',
      'Compare and auto modes: 1 while checkpoints are planned as in compare mode (matched output needs none), 0 as in buffer mode',
      (s) => (s['planning'] === 'compare' ? 1 : s['planning'] === 'buffer' ? 0 : null),
    );
    gauge('rubato_output_oldest_held_seconds', 'Age of the oldest held output frame (0: none held)', (s) => {
      const v = num(s['oldestHeldMs']);
      return v === null ? (s['heldFrames'] === 0 ? 0 : null) : v / 1000;
    });
    gauge(
      'rubato_replica_epoch',
      "The replica's last committed checkpoint (standby) or the last acknowledged one (primary)",
      (s) => num(s['replicaEpoch']) ?? num(s['ackedEpoch']),
    );
    gauge(
      'rubato_replica_lag_seconds',
      'Since the oldest unacknowledged checkpoint was sent (0: the replica is current)',
      (s) => {
        const v = num(s['lagMs']);
        return v === null ? null : v / 1000;
      },
    );
    gauge('rubato_checkpoint_epoch', 'The last checkpoint taken', (s) => num(s['epoch']));
    gauge('rubato_link_rtt_seconds', 'Round trip of the replication link (heartbeats)', (s) => {
      const v = num(s['rttMs']);
      return v === null ? null : v / 1000;
    });
  }

  /** A controller whose status is read at each scrape and whose events are observed. */
  addSource(labels: SourceLabels, snapshot: () => Snapshot): MetricsSource {
    const state: SourceState = { protectedNow: 0, seenReasons: {}, reason: null };
    this.sources.push({ labels, snapshot, state });
    return { observe: (e) => this.observe(labels, state, e) };
  }

  private observe(labels: SourceLabels, st: SourceState, e: AnyEvent): void {
    const l = { ...labels };
    switch (e.event) {
      case 'checkpoint': {
        this.checkpoints.inc(l);
        const pauseMs = num(e['pauseMs']);
        if (pauseMs !== null) this.pause.observe(l, pauseMs / 1000);
        const pages = num(e['pages']);
        if (pages !== null) this.dirty.observe(l, pages);
        const bytes = num(e['bytes']);
        if (bytes !== null) this.shipped.inc(l, bytes);
        break;
      }
      case 'acked': {
        const lag = num(e['lagMs']);
        if (lag !== null && num(e['epoch']) !== 0) this.ack.observe(l, lag / 1000);
        break;
      }
      case 'committed':
        this.committed.inc(l);
        this.committedBytes.inc(l, num(e['bytes']) ?? 0);
        break;
      case 'failover':
        this.failovers.inc(l);
        break;
      case 'protecting':
      case 'reprotected':
        st.protectedNow = 1;
        this.clearReason(l, st);
        break;
      case 'unprotected':
        st.protectedNow = 0;
        this.clearReason(l, st);
        st.reason = String(e['reason'] ?? 'unknown').slice(0, 200);
        this.unprotected.set({ ...l, reason: st.reason }, 1);
        break;
      case 'decisions': {
        // Cumulative counts per reason since the controller started: counted as increments.
        const reasons = (e['reasons'] ?? {}) as Record<string, number>;
        for (const [reason, n] of Object.entries(reasons)) {
          const d = n - (st.seenReasons[reason] ?? 0);
          if (d > 0) this.decisions.inc({ ...l, reason }, d);
          st.seenReasons[reason] = n;
        }
        break;
      }
      default:
        break;
    }
  }

  private clearReason(l: SourceLabels, st: SourceState): void {
    if (st.reason !== null) this.unprotected.remove({ ...l, reason: st.reason });
    st.reason = null;
  }

  /** The Prometheus text exposition. */
  text(): Promise<string> {
    return this.registry.metrics();
  }
  get contentType(): string {
    return this.registry.contentType;
  }
}
