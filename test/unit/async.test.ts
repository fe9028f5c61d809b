import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { onceWithin } from '../../src/util/async.ts';

test('onceWithin: true when the event comes in time, false when it does not; its listener goes either way', async () => {
  const e = new EventEmitter();
  const early = onceWithin(e, 'exit', 1000);
  e.emit('exit');
  assert.equal(await early, true);
  assert.equal(e.listenerCount('exit'), 0);
  // A wait that times out, repeated as a retried session does: nothing piles up on the emitter.
  for (let i = 0; i < 12; i++) assert.equal(await onceWithin(e, 'exit', 1), false);
  assert.equal(e.listenerCount('exit'), 0);
});
