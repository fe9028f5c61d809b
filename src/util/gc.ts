// Prompt collection of transient buffers. The full synchronisation and large checkpoints allocate
// several times their size in short-lived buffers off V8's heap (socket chunks, runs, ciphertext);
// V8 collects them only when its own heap fills or its external-memory limit (which grows with
// use) is passed, so garbage piles up to hundreds of MB before it goes. Asking for a collection
// after every few tens of MB keeps a controller's resident memory near what it really uses. Not in
// steady replication: there each forced collection marks the whole heap, which cost the primary
// more per byte than the cipher, and resident memory stayed as low without it.

import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

type GcFn = () => void;
let gcFn: GcFn | null | undefined;

function fn(): GcFn | null {
  if (gcFn !== undefined) return gcFn;
  try {
    setFlagsFromString('--expose-gc');
    gcFn = runInNewContext('gc') as GcFn;
  } catch {
    gcFn = null;
  }
  return gcFn;
}

/** Counts transient bytes and collects garbage each time `everyBytes` more went through. */
export class GarbageMeter {
  private since = 0;
  constructor(private readonly everyBytes: number) {}
  add(bytes: number): void {
    this.since += bytes;
    if (this.since < this.everyBytes) return;
    this.since = 0;
    collectNow();
  }
}

/**
 * Collects now (a large transient set just became garbage, and more is about to be allocated).
 * A full collection: `gc()` without options (node 20's `gc({ type: 'major', execution: 'sync' })`
 * runs a minor one — seen in perf_hooks' GC entries; unit-tested).
 */
export function collectNow(): void {
  fn()?.();
}
