// The outside check of output commit (chaos/reply-check.ts): it must fire on a reply that reached
// the client before the acknowledgement of a checkpoint covering it, and stay quiet otherwise.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkReplies, type PrimaryEventLine } from '../../src/chaos/reply-check.ts';

/** A primary protected from t=1000: checkpoint k's pause ends at 1000 + 50k, its ack 20 ms later. */
function primary(n: number, ackDelayMs = 20): PrimaryEventLine[] {
  const ev: PrimaryEventLine[] = [{ event: 'protecting', t: 1000 }];
  for (let k = 1; k <= n; k++) {
    ev.push({ event: 'checkpoint', epoch: k, t: 1000 + 50 * k });
    ev.push({ event: 'acked', epoch: k, t: 1000 + 50 * k + ackDelayMs + 1, atMs: 1000 + 50 * k + ackDelayMs });
  }
  return ev;
}

test('reply check: replies held until a covering ack pass; one that arrived before it is caught', () => {
  // Sent at 1110 (epoch 3 runs 1100–1150): covered by checkpoint 3, acknowledged at 1170.
  const held = checkReplies([{ sentAt: 1110, at: 1175 }], [{ events: primary(10) }]);
  assert.deepEqual(held, { checked: 1, early: 0, examples: [] });
  // The same reply at 1130: it left before checkpoint 3 was acknowledged (a release path that did not wait).
  const early = checkReplies([{ sentAt: 1110, at: 1130 }], [{ events: primary(10) }]);
  assert.equal(early.early, 1);
  assert.deepEqual(early.examples[0], { sentAt: 1110, at: 1130, epoch: 3, ackedAt: 1170 });
  // Released one epoch early (at checkpoint 2's ack, 1120): caught as well.
  assert.equal(checkReplies([{ sentAt: 1110, at: 1121 }], [{ events: primary(10) }]).early, 1);
  // No checkpoint after the request was acknowledged at all, yet a reply came: caught.
  assert.equal(checkReplies([{ sentAt: 1490, at: 1495 }], [{ events: primary(10) }]).early, 1);
});

test('reply check: only requests inside a window of protection are judged', () => {
  const ev = primary(10);
  ev.push({ event: 'unprotected', t: 1300, reason: 'link lost' });
  const r = checkReplies(
    [
      { sentAt: 900, at: 905 }, // before protection: passes through
      { sentAt: 1290, at: 1310 }, // answered after protection ended
      { sentAt: 1320, at: 1322 }, // unprotected
      { sentAt: 1160, at: 1230 }, // judged: checkpoint 4 (1200) acked at 1220
    ],
    [{ events: ev }],
  );
  assert.deepEqual(r, { checked: 1, early: 0, examples: [] });
  // A standby that took over says 'reprotected' when its guest is protected again.
  const b: PrimaryEventLine[] = primary(4).map((e) => (e.event === 'protecting' ? { ...e, event: 'reprotected' } : e));
  assert.equal(checkReplies([{ sentAt: 1060, at: 1070 }], [{ events: b }]).early, 1);
  // A primary whose host was killed at 1250 (no event): a request before, answered by the next copy after.
  assert.equal(checkReplies([{ sentAt: 1240, at: 1400 }], [{ events: primary(10), endAt: 1250 }]).checked, 0);
});
