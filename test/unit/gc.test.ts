import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PerformanceObserver, constants } from 'node:perf_hooks';
import { GarbageMeter, collectNow } from '../../src/util/gc.ts';

/** The GC kinds perf_hooks reports while `f` runs (and a little after, for asynchronous ones). */
async function kindsDuring(f: () => void, settleMs: number): Promise<number[]> {
  const kinds: number[] = [];
  const obs = new PerformanceObserver((l) => {
    for (const e of l.getEntries()) kinds.push((e as unknown as { detail: { kind: number } }).detail.kind);
  });
  obs.observe({ entryTypes: ['gc'] });
  f();
  await new Promise((r) => setTimeout(r, settleMs));
  obs.disconnect();
  return kinds;
}

test('collectNow and a synchronous meter run a full (major) collection, not a minor one', async () => {
  assert.ok((await kindsDuring(() => collectNow(), 50)).includes(constants.NODE_PERFORMANCE_GC_MAJOR));
  const m = new GarbageMeter(1 << 20);
  m.add(1 << 19); // below its threshold
  assert.ok((await kindsDuring(() => m.add(1 << 20), 50)).includes(constants.NODE_PERFORMANCE_GC_MAJOR));
});
