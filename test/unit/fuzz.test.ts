// Seeded fuzzing of every decoder that reads outside bytes, bounded in time (a longer soak:
// `npm run fuzz`). A failure prints its seed; rerun with FUZZ_SEED=<seed>.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fuzzAll } from '../fuzz/targets.ts';

test('fuzz: frames, records, the migration stream and NBD requests only ever decode correctly or fail typed', async () => {
  const seed = Number(process.env['FUZZ_SEED'] ?? 20261129);
  const counts = await fuzzAll(seed, 1500, 5000);
  for (const [name, n] of Object.entries(counts)) assert.ok(n >= 50, `${name}: only ${n} inputs (seed ${seed})`);
});
