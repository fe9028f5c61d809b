// `rubato capture-check`: checkpoint a dirtier guest locally and verify the replica byte for byte.
import { z } from 'zod';
import type { Command } from 'commander';
import { logger } from '../../util/index.ts';
import { runCaptureCheck } from '../../bench/index.ts';
import { ACCEL, int, num, oneOf, parseOptions, platform, withAccel } from '../options.ts';

const log = logger('rubato');

const Options = z.object({
  route: oneOf(['a', 'b'] as const),
  seconds: int(1, 3600),
  checkpoints: int(4, 1_000_000),
  mem: int(64, 65536),
  rate: num(0, 10000),
  epochMs: int(1, 60000),
  samples: int(1, 1000),
  cpus: int(1, 64),
  accel: ACCEL,
  json: z.boolean(),
  presendMs: int(1, 60000).optional(),
});

export function register(program: Command): void {
  withAccel(program.command('capture-check'))
    .description('checkpoint a dirtier guest locally, verify the replica byte for byte, restore the last checkpoint')
    .option('--route <route>', 'a (COLO checkpoint stream) or b (external)', 'a')
    .option('--seconds <n>', 'minimum run time', '10')
    .option('--checkpoints <n>', 'minimum number of checkpoints', '300')
    .option('--mem <mb>', 'guest memory in MB', '128')
    .option('--rate <pages_per_ms>', 'pages the guest dirties per ms', '10')
    .option('--epoch-ms <ms>', 'checkpoint period', '25')
    .option('--samples <n>', 'checkpoints compared byte for byte with the paused guest', '3')
    .option('--cpus <n>', 'vCPUs', '1')
    .option('--presend-ms <ms>', 'route A: pre-send the dirty RAM this often during each epoch (patched QEMU)')
    .option('--json', 'print the summary as one JSON line', false)
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      const p = await platform(o.accel);
      const r = await runCaptureCheck({
        route: o.route,
        seconds: o.seconds,
        minCheckpoints: o.checkpoints,
        memMb: o.mem,
        ratePagesPerMs: o.rate,
        epochMs: o.epochMs,
        samples: o.samples,
        cpus: o.cpus,
        ...(o.presendMs ? { presendMs: o.presendMs } : {}),
        ...p,
        onStatus: (s) => log.info(s),
      });
      if (!o.json) {
        process.stdout.write(
          `route ${r.route.toUpperCase()}: ${r.checkpoints} checkpoints, ${r.verified} verified, identical=${r.identical}, restored=${r.restored}, pause median ${r.pauseMsMedian} ms p99 ${r.pauseMsP99} ms\n`,
        );
      }
      process.stdout.write(`${JSON.stringify(r)}\n`);
      process.exitCode = r.identical && r.restored ? 0 : 1;
    });
}
