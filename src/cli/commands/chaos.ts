// `rubato chaos`: the Jepsen-style check — a KV service in the guest, a client writing, the primary
// killed again and again; every acknowledged write must survive.
import { z } from 'zod';
import type { Command } from 'commander';
import { logger } from '../../util/log.ts';
import { runChaos } from '../../chaos/chaos.ts';
import { ACCEL, int, parseOptions, policy, withAccel } from '../options.ts';

const log = logger('rubato');

const Options = z.object({ kills: int(1, 1000), seconds: int(1, 3600), timeoutMs: int(50, 600000), conns: int(1, 64), accel: ACCEL, json: z.boolean(), policy: policy() });

export function register(program: Command): void {
  withAccel(program.command('chaos'))
    .description('Jepsen-style check: a KV service in the guest, a client writing, the primary killed again and again')
    .option('--kills <n>', 'primary kills (each followed by a failover)', '10')
    .option('--seconds <s>', 'mean protected run time between kills', '3')
    .option('--timeout-ms <ms>', 'peer declared lost after this silence', '500')
    .option('--conns <n>', 'client connections', '4')
    .option('--policy <spec>', 'checkpoint policy (see rubato primary --help)', 'model')
    .option('--json', 'print the summary as one JSON line', false)
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      const r = await runChaos({ ...o, onStatus: (s) => log.info(s) });
      if (!o.json) process.stdout.write(`kills ${r.kills}, failovers ${r.failovers}, acknowledged ${r.acknowledged}, lost ${r.lost}, connections survived ${r.connectionsSurvived}/${r.connectionsTotal}\n`);
      process.stdout.write(`${JSON.stringify(r)}\n`);
      process.exitCode = r.lost === 0 && r.failovers === r.kills && r.kills === o.kills && !r.error ? 0 : 1;
    });
}
