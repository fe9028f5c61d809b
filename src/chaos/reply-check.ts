// Output commit seen from outside: no reply reaches a client before the standby acknowledged a
// checkpoint that covers it. The check uses only what the client and the primary's event stream
// say, not output commit's own records, so a release path that lets a frame out early is caught.
//
// A reply is sent after its request (causality), so the guest produced it in the epoch open at or
// after the request; the checkpoint that covers it is at or after the first checkpoint whose pause
// began after the request. The primary stamps a checkpoint's event after its pause, so "the first
// checkpoint event after the request" is that checkpoint or an earlier one, and acknowledgements
// come in order: that checkpoint's acknowledgement (stamped before its frames leave) must precede
// the reply. Only requests inside one window of protection are judged (output passes through
// while unprotected, by design), and only in buffer mode (compare mode releases matched replies
// before the acknowledgement).

/** One answered request, on the client's clock (ms since the epoch): sent at `sentAt`, answered at `at`. */
export interface Reply {
  sentAt: number;
  at: number;
}

/** A primary's events, stamped by its own process (`t`, ms since the epoch). */
export type PrimaryEventLine = Record<string, unknown> & { event: string; t: number };

export interface ReplyCheck {
  /** Replies judged (request and reply inside one window of protection). */
  checked: number;
  /** Replies that arrived before the acknowledgement of a checkpoint that covers them. */
  early: number;
  /** The first few early replies, with the checkpoint they waited for. */
  examples: Array<{ sentAt: number; at: number; epoch: number | null; ackedAt: number | null }>;
}

/** Events that begin a window of protection (a standby that took over says `reprotected`). */
const STARTS = new Set(['protecting', 'reprotected']);
/** Events that end a window of protection. */
const ENDS = new Set(['unprotected', 'guest-lost', 'fenced', 'vm-exited']);
/** Clock slack between processes (Date.now() resolution): requests are taken this much earlier. */
const SLACK_MS = 2;

/**
 * Judges `replies` against each primary's events; `endAt`: when that primary stopped being one
 * without saying so (its host was killed), else its last window runs on.
 */
export function checkReplies(
  replies: readonly Reply[],
  primaries: ReadonlyArray<{ events: readonly PrimaryEventLine[]; endAt?: number }>,
): ReplyCheck {
  const out: ReplyCheck = { checked: 0, early: 0, examples: [] };
  for (const p of primaries) {
    for (const w of windows(p.events, p.endAt ?? Number.POSITIVE_INFINITY)) {
      for (const r of replies) {
        if (r.sentAt - SLACK_MS < w.from || r.at >= w.to) continue;
        out.checked++;
        const cp = w.checkpoints.find((c) => c.t >= r.sentAt - SLACK_MS);
        const acked = cp ? w.acks.get(cp.epoch) : undefined;
        if (acked !== undefined && acked <= r.at) continue;
        out.early++;
        if (out.examples.length < 5)
          out.examples.push({ sentAt: r.sentAt, at: r.at, epoch: cp?.epoch ?? null, ackedAt: acked ?? null });
      }
    }
  }
  return out;
}

interface Window {
  from: number;
  to: number;
  checkpoints: Array<{ epoch: number; t: number }>;
  /** Epoch → when its acknowledgement came (before its frames left). */
  acks: Map<number, number>;
}

/** The windows of protection in one primary's events (epochs restart with each synchronisation). */
function windows(events: readonly PrimaryEventLine[], endAt: number): Window[] {
  const ws: Window[] = [];
  let cur: Window | null = null;
  for (const e of events) {
    if (e.t >= endAt) break;
    if (STARTS.has(e.event)) {
      if (cur) cur.to = e.t;
      cur = { from: e.t, to: endAt, checkpoints: [], acks: new Map() };
      ws.push(cur);
    } else if (cur && ENDS.has(e.event)) {
      cur.to = e.t;
      cur = null;
    } else if (cur && e.event === 'checkpoint') {
      cur.checkpoints.push({ epoch: Number(e['epoch']), t: e.t });
    } else if (cur && e.event === 'acked') {
      cur.acks.set(Number(e['epoch']), Number(e['atMs'] ?? e.t));
    }
  }
  return ws;
}
