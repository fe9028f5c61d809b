// `npm run fuzz [-- SECONDS_PER_TARGET]`: the unit suite's fuzz targets as a soak, seeded from the clock.
import { fuzzAll } from '../test/fuzz/targets.ts';

const seconds = Number(process.argv[2] ?? process.env['FUZZ_SECONDS'] ?? 60);
const seed = Number(process.env['FUZZ_SEED'] ?? Date.now() % 2 ** 31);
process.stderr.write(`fuzzing each target for ${seconds} s, seed ${seed} (rerun with FUZZ_SEED=${seed})\n`);
const counts = await fuzzAll(seed, seconds * 1000);
process.stdout.write(`${JSON.stringify({ seed, seconds, inputs: counts })}\n`);
