// `rubato chaos`: the Jepsen-style check — a KV service in the guest, a client writing, faults
// injected round after round (the primary host killed, the replication link cut, a host cut from
// the witness, corrupted frames); every acknowledged write must survive and two copies must never
// answer at once (counted on the LAN bridge's own port counters).
import { z } from 'zod';
import type { Command } from 'commander';
import { logger, RubatoError } from '../../util/index.ts';
import { CHAOS_SERVICES, FAULTS, runChaos, type Fault } from '../../chaos/index.ts';
import { ACCEL, MODE, int, oneOf, parseOptions, policy, withAccel, withModeOption } from '../options.ts';

const log = logger('rubato');

const Options = z.object({
  kills: int(1, 1000).optional(),
  rounds: int(1, 1000).optional(),
  faults: z.string(),
  seconds: int(1, 3600),
  timeoutMs: int(50, 600000),
  conns: int(1, 64),
  accel: ACCEL,
  json: z.boolean(),
  policy: policy(),
  leaseTtl: int(1, 60),
  witness: z.boolean(),
  service: oneOf(CHAOS_SERVICES),
  ...MODE,
});

export function register(program: Command): void {
  withModeOption(withAccel(program.command('chaos')))
    .description('Jepsen-style check: a KV service in the guest, a client writing, faults injected round after round')
    .option(
      '--faults <list>',
      `faults, taken in turn: ${FAULTS.join(', ')} (isolate alternates: the primary cut from etcd only, then from etcd and its standby; pause: the primary host frozen past its lease, SIGSTOP then SIGCONT)`,
      'kill',
    )
    .option('--rounds <n>', 'rounds, one fault each', '10')
    .option('--kills <n>', 'the same as --faults kill --rounds N')
    .option('--seconds <s>', 'mean protected run time before each fault', '3')
    .option('--timeout-ms <ms>', 'peer declared lost after this silence', '500')
    .option('--lease-ttl <s>', 'witness lease TTL, seconds', '1')
    .option('--conns <n>', 'client connections', '4')
    .option('--policy <spec>', 'checkpoint policy (see rubato primary --help)', 'model')
    .option(
      '--service <name>',
      `what the client writes to: ${CHAOS_SERVICES.join(' or ')} (PostgreSQL in the Debian guest, rows inserted by psql sessions)`,
      'kv',
    )
    .option(
      '--no-witness',
      'run without the witness: shows what a partition does then (the split-brain detector counts it)',
    )
    .option('--json', 'print the summary as one JSON line', false)
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      const faults = (o.kills ? 'kill' : o.faults)
        .split(',')
        .map((f) => f.trim())
        .filter(Boolean);
      const bad = faults.find((f) => !(FAULTS as readonly string[]).includes(f));
      if (bad || !faults.length)
        throw new RubatoError(
          'RUBATO_CONFIG',
          `--faults: must list faults from ${FAULTS.join(', ')} (got "${bad ?? ''}")`,
        );
      const rounds = o.kills ?? o.rounds ?? 10;
      const r = await runChaos({ ...o, rounds, faults: faults as Fault[], onStatus: (s) => log.info(s) });
      if (!o.json)
        process.stdout.write(
          `rounds ${r.rounds} (${Object.entries(r.byFault)
            .map(([f, n]) => `${f} ${n}`)
            .join(
              ', ',
            )}), failovers ${r.failovers}, split brain ${r.splitBrain}, acknowledged ${r.acknowledged}, lost ${r.lost}, re-protected ${r.reprotected}\n`,
        );
      process.stdout.write(`${JSON.stringify(r)}\n`);
      const exercised = faults.every((f) => r.byFault[f as Fault] > 0 || rounds < faults.length);
      process.exitCode = r.lost === 0 && r.splitBrain === 0 && r.rounds === rounds && exercised && !r.error ? 0 : 1;
    });
}
