// `rubato simulate`: replay a trace or a profile under any policy, bandwidth and vCPU count.
import { z } from 'zod';
import type { Command } from 'commander';
import { RubatoError } from '../../util/index.ts';
import { simulateProfile, simulateTrace } from '../../sim/index.ts';
import { int, parseOptions, policy } from '../options.ts';

const Options = z.object({
  trace: z.string().optional(),
  profile: z.string().optional(),
  policy: policy(),
  bandwidth: z.string(),
  cpus: int(1, 64).optional(),
  seconds: int(1, 3600),
  outputEveryMs: int(1, 600000).optional(),
  json: z.boolean(),
});

export function register(program: Command): void {
  program
    .command('simulate')
    .description(
      'replay a recorded trace or workload profile under any policy, link bandwidth and vCPU count (same pipeline and scheduler code)',
    )
    .option('--trace <file>', 'an event trace recorded by rubato bench (traces/*.json): replayed epoch by epoch')
    .option('--profile <file>', 'a profile JSON from rubato profile or rubato bench: its fitted dirty curve')
    .option('--policy <spec>', 'checkpoint policy', 'model')
    .option('--bandwidth <class>', '1GbE, 10GbE or IB-32G', '10GbE')
    .option('--cpus <n>', "vCPUs (unmeasured counts are extrapolated; default: the profile's first, the trace's own)")
    .option('--seconds <s>', 'simulated time for a profile (a trace replays its own length)', '20')
    .option('--output-every-ms <ms>', 'add one output frame every MS (an interactive workload)')
    .option('--json', 'print the summary as one JSON line', false)
    .action((raw: unknown) => {
      const o = parseOptions(Options, raw);
      if (!!o.profile === !!o.trace)
        throw new RubatoError('RUBATO_CONFIG', 'give exactly one of --trace FILE or --profile FILE');
      const r = o.trace
        ? simulateTrace(o.trace, o.policy, o.bandwidth, o.cpus !== undefined ? { cpus: o.cpus } : {})
        : simulateProfile(o.profile!, o.policy, o.bandwidth, o.cpus ?? 1, o.seconds, o.outputEveryMs);
      process.stdout.write(`${JSON.stringify(r)}\n`);
    });
}
