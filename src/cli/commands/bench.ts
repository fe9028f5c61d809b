// `rubato bench`: the benchmarks as subcommands; with none, the whole evaluation (report + figures).
import { z } from 'zod';
import { join } from 'node:path';
import type { Command } from 'commander';
import { RubatoError, logger } from '../../util/index.ts';
import {
  runCaptureBench,
  runFailoverBench,
  runKvBench,
  SCHEDULER_WORKLOADS,
  runSchedulerBench,
  SERVICE_POLICIES,
  runServicesBench,
  PROBES,
  runEvaluation,
  revalidate,
  runNbdBench,
} from '../../bench/index.ts';
import { ACCEL, int, intList, parseOptions, platform, policy, withAccel } from '../options.ts';
import { LINK_CLASSES, ShapedLink, type LinkClass } from '../../io/index.ts';

const log = logger('rubato');
const SUBCOMMANDS = ['all', 'capture', 'failover', 'kv', 'scheduler', 'services', 'nbd', 'validate'] as const;
const onStatus = (s: string) => log.info(s);
const print = (v: unknown) => process.stdout.write(`${JSON.stringify(v)}\n`);

const Common = { quick: z.boolean(), out: z.string(), json: z.boolean() };
const WithAccel = { ...Common, accel: ACCEL };

function workloads() {
  return z
    .string()
    .optional()
    .transform((v, ctx) => {
      if (v === undefined) return undefined;
      const l = v.split(',').map((x) => x.trim());
      const bad = l.filter((x) => !(SCHEDULER_WORKLOADS as readonly string[]).includes(x));
      if (bad.length) {
        ctx.addIssue({ code: 'custom', message: `unknown ${bad.join(', ')} (${SCHEDULER_WORKLOADS.join(', ')})` });
        return z.NEVER;
      }
      return l;
    });
}

/**
 * A comma-separated list of policies; a `key=value` item is a setting of the policy before it
 * (model,presend=50,adaptive).
 */
export function splitPolicies(v: string): string[] {
  const out: string[] = [];
  for (const x of v.split(',').map((y) => y.trim())) {
    if (x.includes('=') && out.length) out[out.length - 1] += `,${x}`;
    else out.push(x);
  }
  return out;
}

function policies() {
  return z
    .string()
    .optional()
    .transform((v, ctx) => {
      if (v === undefined) return undefined;
      const l = splitPolicies(v);
      for (const p of l) {
        const r = policy().safeParse(p);
        if (!r.success) {
          ctx.addIssue({ code: 'custom', message: r.error.issues[0]!.message });
          return z.NEVER;
        }
      }
      return l;
    });
}

function durabilities() {
  return z.string().transform((v, ctx) => {
    const l = v.split(',').map((x) => x.trim());
    const bad = l.filter((x) => x !== 'memory' && x !== 'disk');
    if (bad.length || !l.length) {
      ctx.addIssue({ code: 'custom', message: `unknown ${bad.join(', ')} (memory, disk)` });
      return z.NEVER;
    }
    return l as Array<'memory' | 'disk'>;
  });
}

function common(c: Command): Command {
  return c
    .option('--quick', 'reduced settings (a few minutes)', false)
    .option('--out <dir>', 'results folder', 'results')
    .option('--json', 'print the summary as one JSON line', false);
}

export function register(program: Command): void {
  const bench = withAccel(common(program.command('bench')))
    .description('benchmarks; with no subcommand, the whole evaluation: results/report.md with figures and traces')
    .enablePositionalOptions()
    .argument('[which]', `one of ${SUBCOMMANDS.join(', ')}`)
    .action(async (which: string | undefined, raw: unknown) => {
      if (which !== undefined && which !== 'all')
        throw new RubatoError('RUBATO_CONFIG', `unknown benchmark "${which}" (available: ${SUBCOMMANDS.join(', ')})`);
      const o = parseOptions(z.object(WithAccel), raw);
      print(await runEvaluation({ ...(await platform(o.accel)), quick: o.quick, outDir: o.out, onStatus }));
    });

  withAccel(common(bench.command('capture')))
    .description('pause, bytes shipped and guest progress vs unreplicated, per route and dirty rate')
    .option('--seconds <n>', 'measurement time per phase')
    .action(async (raw: unknown) => {
      const o = parseOptions(z.object({ ...WithAccel, seconds: int(2, 600).optional() }), raw);
      const r = await runCaptureBench({
        ...(await platform(o.accel)),
        quick: o.quick,
        outDir: o.out,
        ...(o.seconds ? { seconds: o.seconds } : {}),
        onStatus,
      });
      print(r.summary);
    });

  withAccel(common(bench.command('failover')))
    .description('time to take over after a crash and after a partition')
    .option('--runs <n>', 'runs per failure mode')
    .option('--timeout-ms <ms>', 'failure detection timeout', '500')
    .action(async (raw: unknown) => {
      const o = parseOptions(
        z.object({ ...WithAccel, runs: int(1, 1000).optional(), timeoutMs: int(50, 600000) }),
        raw,
      );
      const r = await runFailoverBench({
        runs: o.runs ?? (o.quick ? 2 : 10),
        timeoutMs: o.timeoutMs,
        accel: o.accel,
        outDir: o.out,
        onStatus,
      });
      print(r.summary);
    });

  withAccel(common(bench.command('kv')))
    .description('request latency with output commit at fixed periods')
    .option('--seconds <n>', 'measurement time per phase')
    .action(async (raw: unknown) => {
      const o = parseOptions(z.object({ ...WithAccel, seconds: int(2, 600).optional() }), raw);
      const r = await runKvBench({
        seconds: o.seconds ?? (o.quick ? 4 : 10),
        conns: 4,
        accel: o.accel,
        outDir: o.out,
        onStatus,
      });
      print(r.summary);
    });

  withAccel(common(bench.command('scheduler')))
    .description('each policy vs unreplicated, interleaved, per workload')
    .option('--seconds <n>', 'measurement time per phase')
    .option('--policies <list>', 'policies to run, comma-separated (a policy may repeat: cells interleave)')
    .option('--workloads <list>', `${SCHEDULER_WORKLOADS.join(', ')} (comma-separated)`)
    .option(
      '--durability <list>',
      "the standby's durability per cell: memory, disk or both (memory,disk: A/B, interleaved)",
      'memory',
    )
    .option(
      '--link <class>',
      `the standby behind a link shaped by tbf: ${Object.keys(LINK_CLASSES).join(', ')} (default: loopback)`,
    )
    .action(async (raw: unknown) => {
      const o = parseOptions(
        z.object({
          ...WithAccel,
          seconds: int(2, 600).optional(),
          policies: policies(),
          workloads: workloads(),
          durability: durabilities(),
          link: z.enum(Object.keys(LINK_CLASSES) as [LinkClass, ...LinkClass[]]).optional(),
        }),
        raw,
      );
      const link = o.link ? await ShapedLink.create() : null;
      try {
        if (link && o.link) {
          await link.setClass(o.link);
          onStatus(`replication link: ${o.link} (TCP goodput ${(await link.goodputMBps()).toFixed(1)} MB/s)`);
        }
        const r = await runSchedulerBench({
          ...(await platform(o.accel)),
          quick: o.quick,
          outDir: o.out,
          ...(o.seconds ? { seconds: o.seconds } : {}),
          durabilities: o.durability,
          ...(o.policies ? { policies: o.policies } : {}),
          ...(o.workloads ? { workloads: o.workloads } : {}),
          ...(link && o.link ? { where: { ns: link.ns, host: link.remoteIp }, linkName: o.link } : {}),
          onStatus,
        });
        print(r.summary);
      } finally {
        await link?.destroy();
      }
    });

  withAccel(common(bench.command('services')))
    .description(
      'redis, nginx and PostgreSQL in the Debian guest, measured by redis-benchmark, wrk and pgbench: each policy vs unreplicated, interleaved',
    )
    .option('--seconds <n>', 'measurement time per client run')
    .option('--policies <list>', `policies, comma-separated (default ${SERVICE_POLICIES.join(',')}; quick: model)`)
    .option('--cpus <list>', 'guest vCPU counts, comma-separated (default 1,2; quick: 1)')
    .option('--modes <list>', 'output release modes measured side by side: buffer, compare, auto (default buffer)')
    .option('--probes <list>', `client runs to measure, comma-separated (default all: ${PROBES.join(',')})`)
    .action(async (raw: unknown) => {
      const o = parseOptions(
        z.object({
          ...WithAccel,
          seconds: int(2, 600).optional(),
          policies: policies(),
          cpus: intList(16).optional(),
          modes: z
            .string()
            .transform((v) => v.split(',').map((m) => m.trim()))
            .pipe(
              z.array(z.enum(['buffer', 'compare', 'auto'], { message: 'modes are buffer, compare and auto' })).min(1),
            )
            .optional(),
          probes: z
            .string()
            .transform((v) => v.split(',').map((m) => m.trim()))
            .pipe(z.array(z.enum(PROBES, { message: `probes are ${PROBES.join(', ')}` })).min(1))
            .optional(),
        }),
        raw,
      );
      const { accel, binary } = await platform(o.accel);
      const r = await runServicesBench({
        ...(o.probes ? { probes: o.probes } : {}),
        accel,
        binary,
        quick: o.quick,
        outDir: o.out,
        ...(o.seconds ? { seconds: o.seconds } : {}),
        ...(o.policies ? { policies: o.policies } : {}),
        ...(o.cpus ? { cpus: o.cpus } : {}),
        ...(o.modes ? { modes: o.modes } : {}),
        onStatus,
      });
      print(r.summary);
      // The modes side by side, per service: the last line.
      if (o.modes) print(r.summary.modes);
    });

  common(bench.command('nbd'))
    .description("the guest disk through Rubato's NBD server vs the raw file: qemu-img bench, 4 KiB at queue depth 16")
    .action(async (raw: unknown) => {
      const o = parseOptions(z.object(Common), raw);
      print((await runNbdBench({ quick: o.quick, outDir: o.out, onStatus })).summary);
    });

  common(bench.command('validate'))
    .description("re-run the simulator validation on --out's evaluation.json and traces")
    .action((raw: unknown) => {
      const o = parseOptions(z.object(Common), raw);
      print(revalidate(join(o.out, 'evaluation.json')));
    });
}
