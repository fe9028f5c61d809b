import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Liveness } from '../../src/replication/liveness.ts';

test('liveness: a silent peer is suspected after the timeout, and hearing it clears that', () => {
  const l = new Liveness(0, 50, 500);
  for (let t = 50; t <= 500; t += 50) assert.equal(l.tick(t), false, `t=${t}`);
  assert.equal(l.tick(550), true);
  assert.equal(l.confirm(551), true);
  l.heard(552);
  assert.equal(l.confirm(553), false);
  assert.equal(l.tick(600), false);
});

test('liveness: our own stall is not charged to the peer', () => {
  const l = new Liveness(0, 50, 500);
  l.tick(50);
  // The process is blocked for 2 s: the next tick fires at 2050, ~1950 ms late.
  assert.equal(l.tick(2050), false, 'a late tick alone is no evidence the peer went quiet');
  assert.ok(l.excusedMs >= 1900);
  // The peer stays silent while we run normally: suspected once the awake silence passes 500 ms.
  let t = 2050;
  let suspected = -1;
  while (t < 4000) {
    t += 50;
    if (l.tick(t)) {
      suspected = t;
      break;
    }
  }
  assert.ok(suspected >= 2050 + 400 && suspected <= 2050 + 600, `suspected at ${suspected}`);
});

test('liveness: a dead peer is still detected when every tick is a little late', () => {
  const l = new Liveness(0, 50, 500);
  let t = 0;
  let suspected = -1;
  // Ticks 90 ms apart (each 40 ms late, less than one interval): no excuse is taken.
  while (t < 5000) {
    t += 90;
    if (l.tick(t)) {
      suspected = t;
      break;
    }
  }
  assert.equal(l.excusedMs, 0);
  assert.ok(suspected > 500 && suspected <= 600, `suspected at ${suspected}`);
});
