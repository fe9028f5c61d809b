// `rubato profile`: characterise a workload (dirty curve, pause, I/O) per vCPU count.
import { z } from 'zod';
import type { Command } from 'commander';
import { logger } from '../../util/index.ts';
import { runProfile } from '../../bench/index.ts';
import { ACCEL, int, intList, parseOptions, platform, withAccel } from '../options.ts';

const log = logger('rubato');

const Options = z.object({
  workload: z.string(),
  cpus: intList(64),
  epochs: intList(60000),
  mem: int(64, 65536),
  quick: z.boolean(),
  out: z.string(),
  accel: ACCEL,
  json: z.boolean(),
});

export function register(program: Command): void {
  withAccel(program.command('profile'))
    .description(
      'characterise a workload: dirty pages vs epoch length, pause, network and disk operations, per vCPU count',
    )
    .option('--workload <name>', 'cpuloop, dirtier:RATE, kv, web or disk (the services run on 1 vCPU)', 'dirtier:10')
    .option('--cpus <list>', 'vCPU counts, comma-separated', '1,2,4')
    .option('--epochs <list>', 'epoch lengths in ms, comma-separated', '5,10,25,50,100,250,500,1000')
    .option('--mem <mb>', 'guest memory in MB', '256')
    .option('--quick', 'cpus 1,2 and epochs 10,50,250', false)
    .option('--out <dir>', 'results folder', 'results')
    .option('--json', 'print the summary as one JSON line', false)
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      const cpus = o.quick ? [1, 2] : o.cpus;
      const epochsMs = o.quick ? [10, 50, 250] : o.epochs;
      const p = await platform(o.accel);
      const r = await runProfile({
        workload: o.workload,
        cpus,
        epochsMs,
        memMb: o.quick ? 128 : o.mem,
        outDir: o.out,
        ...p,
        onStatus: (s) => log.info(s),
      });
      process.stdout.write(
        `${JSON.stringify({ workload: o.workload, json: r.json, figures: [r.svg, r.png], runs: r.runs.map((x) => ({ cpus: x.cpus, curve: x.curve, netFramesPerSec: x.netFramesPerSec, diskWritesPerSec: x.diskWritesPerSec, diskFlushesPerSec: x.diskFlushesPerSec })) })}\n`,
      );
    });
}
