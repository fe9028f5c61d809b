// What the dashboard plots: one sample of a controller's status per second, derived rates, and the
// events worth a mark on the charts. Pure (times are passed in); the last minutes are kept so a
// page opened late still shows them.

const KEEP_SAMPLES = 600; // 10 minutes at one per second
const KEEP_EVENTS = 200;

/** Events shown on the dashboard (as marks on the charts and in its list). */
export const NOTABLE_EVENTS = new Set([
  'protecting',
  'reprotected',
  'unprotected',
  'primary-lost',
  'failover',
  'failover-refused',
  'fenced',
  'session',
  'synced',
  'output-released-unprotected',
]);

export interface Sample {
  t: number;
  role: string;
  protected: 0 | 1;
  /** Checkpoints per second since the last sample (taken on a primary, committed on a standby). */
  ckptPerSec: number | null;
  pauseMs: number | null;
  dirtyPages: number | null;
  heldFrames: number | null;
  heldBytes: number | null;
  lagMs: number | null;
  epoch: number | null;
  primary: string | null;
  standby: string | null;
  state: string | null;
  /** How held output is released: buffer, or compare (a secondary VM's matching frames). */
  mode: string | null;
  /** Compare mode: the secondary's frames that differed so far, and the primary's released by matching. */
  mismatches: number | null;
  matched: number | null;
  /** Compare and auto modes: checkpoints planned as in compare or in buffer mode. */
  planning: string | null;
}

export interface MarkedEvent {
  t: number;
  event: string;
  text: string;
}

const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);
const str = (v: unknown): string | null => (typeof v === 'string' ? v : null);

/** One line for an event, as an operator reads it. */
export function describe(e: { event: string } & Record<string, unknown>): string {
  switch (e.event) {
    case 'failover':
      return `failover: the guest runs here from checkpoint ${String(e['epoch'])} (${e['promoted'] ? 'the compared secondary, promoted' : `restore ${String(e['restoreMs'])} ms`}; ${String(e['why'])})`;
    case 'primary-lost':
      return `primary lost: ${String(e['reason'])}`;
    case 'protecting':
      return `protected by ${String(e['standby'] ?? 'the standby')}`;
    case 'reprotected':
      return `re-protected by ${String(e['standby'] ?? 'a new standby')}`;
    case 'unprotected':
      return `UNPROTECTED: ${String(e['reason'])}`;
    case 'failover-refused':
      return `failover refused: ${String(e['why'])}`;
    case 'fenced':
      return 'switchover: this copy stopped for its standby';
    case 'session':
      return `primary ${String(e['peer'])} connected`;
    case 'synced':
      return `full image received (${Math.round(Number(e['bytes']) / 1e6)} MB in ${String(e['ms'])} ms)`;
    case 'output-released-unprotected':
      return `held output released unprotected (${String(e['frames'])} frames): ${String(e['reason'])}`;
    default:
      return e.event;
  }
}

export class Sampler {
  private readonly samples: Sample[] = [];
  private readonly events: MarkedEvent[] = [];
  private last: { t: number; epoch: number } | null = null;

  sample(t: number, s: Record<string, unknown>): Sample {
    const role = str(s['role']) ?? 'unknown';
    const standbySide = role === 'standby';
    const epoch = standbySide ? num(s['replicaEpoch']) : num(s['epoch']);
    let rate: number | null = null;
    if (epoch !== null && this.last && epoch >= this.last.epoch && t > this.last.t)
      rate = Math.round(((epoch - this.last.epoch) / ((t - this.last.t) / 1000)) * 10) / 10;
    this.last = epoch === null ? null : { t, epoch };
    const prot = standbySide ? Boolean(s['primary']) : s['protected'] === true;
    const out: Sample = {
      t,
      role,
      protected: prot ? 1 : 0,
      ckptPerSec: rate,
      pauseMs: num(s['pauseMsP50']),
      dirtyPages: num(s['dirtyPages']),
      heldFrames: num(s['heldFrames']),
      heldBytes: num(s['heldBytes']),
      lagMs: num(s['lagMs']),
      epoch,
      primary: str(s['primary']),
      standby: str(s['standby']),
      state: str(s['state']) ?? str(s['phase']),
      mode: str(s['mode']),
      planning: str(s['planning']),
      mismatches: num((s['compare'] as Record<string, unknown> | undefined)?.['mismatches']),
      matched: num((s['compare'] as Record<string, unknown> | undefined)?.['matched']),
    };
    this.samples.push(out);
    if (this.samples.length > KEEP_SAMPLES) this.samples.shift();
    return out;
  }

  event(t: number, e: { event: string } & Record<string, unknown>): MarkedEvent {
    const m = { t, event: e.event, text: describe(e) };
    this.events.push(m);
    if (this.events.length > KEEP_EVENTS) this.events.shift();
    return m;
  }

  history(): { samples: readonly Sample[]; events: readonly MarkedEvent[] } {
    return { samples: this.samples, events: this.events };
  }
}
