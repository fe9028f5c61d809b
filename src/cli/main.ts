#!/usr/bin/env node
// The `rubato` command. Results go to stdout (with --json, one JSON object as the last line);
// progress and logs go to stderr. Config mistakes exit 2 with one clear line.

import { Command, CommanderError } from 'commander';
import { join } from 'node:path';
import { RubatoError, errorMessage } from '../util/errors.ts';
import { logger } from '../util/log.ts';
import { ensureAll, ensureGuestImage, ensurePatchedQemu, stockQemu } from '../setup/index.ts';
import { resolveAccel, type AccelChoice } from '../qemu/accel.ts';
import { runCaptureCheck } from '../capture/check.ts';
import { runCaptureBench } from '../bench/capture.ts';
import { runFailoverBench } from '../bench/failover.ts';
import { runKvBench } from '../bench/kv.ts';
import { SCHEDULER_WORKLOADS, runSchedulerBench } from '../bench/scheduler.ts';
import { runProfile } from '../bench/profile.ts';
import { runEvaluation } from '../bench/evaluate.ts';
import { revalidate } from '../bench/validate.ts';
import { simulateProfile, simulateTrace } from '../sim/cli.ts';
import { parsePolicy } from '../scheduler/index.ts';
import { choiceOpt, intOpt, numOpt } from './options.ts';
import { controlCommand, runPrimary, runStandby } from './ha.ts';
import { runDemo } from './demo.ts';
import { writeKeyFile } from './keyfile.ts';
import { runChaos } from '../chaos/chaos.ts';
import type { QemuBinary } from '../qemu/vm.ts';
import type { Accel } from '../qemu/spec.ts';

const log = logger('rubato');

async function platform(accelChoice: AccelChoice): Promise<{ accel: Accel; binary: QemuBinary; guest: { kernel: string; initrd: string } }> {
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(accelChoice, stockQemu(), guest);
  const binary = accel === 'tcg' ? await ensurePatchedQemu() : stockQemu();
  return { accel, binary, guest };
}

/** Validates a policy spec at the boundary; the controllers parse it again where they run. */
function policyOpt(v: string): string {
  parsePolicy(v);
  return v;
}

function policyList(v: string): string[] {
  return v.split(',').map((x) => policyOpt(x.trim()));
}

function workloadList(v: string): string[] {
  const l = v.split(',').map((x) => x.trim());
  const known: readonly string[] = SCHEDULER_WORKLOADS;
  const bad = l.filter((x) => !known.includes(x));
  if (bad.length) throw new RubatoError('RUBATO_CONFIG', `--workloads: unknown ${bad.join(', ')} (${SCHEDULER_WORKLOADS.join(', ')})`);
  return l;
}

/** The accelerator choice shared by every command that boots a guest. */
function withAccel(c: Command): Command {
  return c.option('--accel <accel>', 'auto, kvm or tcg', choiceOpt('accel', ['auto', 'kvm', 'tcg'] as const), 'auto');
}

/** Failure-detection options shared by the commands that run a replication link. */
function withLinkOptions(c: Command): Command {
  return c
    .option('--heartbeat-ms <ms>', 'heartbeat interval', intOpt('heartbeat-ms', 10, 60000), 100)
    .option('--timeout-ms <ms>', 'peer declared lost after this silence', intOpt('timeout-ms', 50, 600000), 1000);
}

const program = new Command('rubato')
  .description('High availability for QEMU VMs by checkpoint replication with a workload-adaptive scheduler')
  .exitOverride()
  .configureOutput({ writeErr: (s) => process.stderr.write(s) });

program.command('setup')
  .description('install the Debian packages, build the patched QEMU (TCG) and the test guest; a no-op when done')
  .action(async () => {
    const r = await ensureAll();
    process.stdout.write(`${JSON.stringify({ qemu: r.qemu.path, kernel: r.guest.kernel, initrd: r.guest.initrd })}\n`);
  });

withAccel(program.command('capture-check'))
  .description('checkpoint a dirtier guest locally, verify the replica byte for byte, restore the last checkpoint')
  .option('--route <route>', 'a (COLO checkpoint stream) or b (external)', choiceOpt('route', ['a', 'b'] as const), 'a')
  .option('--seconds <n>', 'minimum run time', intOpt('seconds', 1, 3600), 10)
  .option('--checkpoints <n>', 'minimum number of checkpoints', intOpt('checkpoints', 4, 1_000_000), 300)
  .option('--mem <mb>', 'guest memory in MB', intOpt('mem', 64, 65536), 128)
  .option('--rate <pages_per_ms>', 'pages the guest dirties per ms', numOpt('rate', 0, 10000), 10)
  .option('--epoch-ms <ms>', 'checkpoint period', intOpt('epoch-ms', 1, 60000), 25)
  .option('--samples <n>', 'checkpoints compared byte for byte with the paused guest', intOpt('samples', 1, 1000), 3)
  .option('--cpus <n>', 'vCPUs', intOpt('cpus', 1, 64), 1)
  .option('--json', 'print the summary as one JSON line', false)
  .action(async (o: { route: 'a' | 'b'; seconds: number; checkpoints: number; mem: number; rate: number; epochMs: number; samples: number; cpus: number; accel: AccelChoice; json: boolean }) => {
    const p = await platform(o.accel);
    const r = await runCaptureCheck({
      route: o.route, seconds: o.seconds, minCheckpoints: o.checkpoints, memMb: o.mem, ratePagesPerMs: o.rate, epochMs: o.epochMs,
      samples: o.samples, cpus: o.cpus, ...p, onStatus: (s) => log.info(s),
    });
    if (!o.json) {
      process.stdout.write(`route ${r.route.toUpperCase()}: ${r.checkpoints} checkpoints, ${r.verified} verified, identical=${r.identical}, restored=${r.restored}, pause median ${r.pauseMsMedian} ms p99 ${r.pauseMsP99} ms\n`);
    }
    process.stdout.write(`${JSON.stringify(r)}\n`);
    process.exitCode = r.identical && r.restored ? 0 : 1;
  });

program.command('keygen')
  .description('write a new pre-shared key file (32 random bytes, hex, mode 600)')
  .requiredOption('--out <file>', 'where to write it')
  .action((o: { out: string }) => { writeKeyFile(o.out); process.stdout.write(`${o.out}\n`); });

withLinkOptions(withAccel(program.command('primary')))
  .description('run a VM and keep it protected by a standby')
  .requiredOption('--standby <host:port>', 'the standby controller')
  .requiredOption('--key <file>', 'pre-shared key file (rubato keygen)')
  .option('--name <name>', 'VM name', 'vm')
  .option('--mem <mb>', 'guest memory in MB', intOpt('mem', 64, 65536), 128)
  .option('--cpus <n>', 'vCPUs', intOpt('cpus', 1, 64), 1)
  .option('--workload <prog,args>', 'test-guest workload', 'dirtier,10,16')
  .option('--kernel <file>', 'guest kernel (default: the test guest)')
  .option('--initrd <file>', 'guest initramfs (default: the test guest)')
  .option('--append <cmdline>', 'guest kernel command line')
  .option('--policy <spec>', 'checkpoint policy: model (default), adaptive, fixed:MS, dirty-bandwidth[:MS], net-io, disk-io, bounded-latency[:MS] (+ ,min=MS,max=MS)', policyOpt, 'model')
  .option('--state-dir <dir>', 'sockets and state', '/run/rubato/primary')
  .option('--events', 'print events as JSON lines on stdout', false)
  .action(runPrimary);

withLinkOptions(program.command('standby'))
  .description('hold the replica of a protected VM and take over when the primary is lost')
  .requiredOption('--listen <host:port>', 'address for the primary to connect to')
  .requiredOption('--key <file>', 'pre-shared key file (rubato keygen)')
  .option('--state-dir <dir>', 'replica and sockets', '/var/lib/rubato/standby')
  .option('--no-auto-failover', 'only fail over on `rubato failover`')
  .option('--no-fsync', 'do not fsync the replica (tmpfs, tests)')
  .option('--events', 'print events as JSON lines on stdout', false)
  .action(runStandby);

program.command('failover')
  .description('make the standby take over now (the primary, if alive, first stops its guest)')
  .option('--state-dir <dir>', "the standby's state folder", '/var/lib/rubato/standby')
  .action(async (o: { stateDir: string }) => {
    const r = await controlCommand(o.stateDir, 'failover');
    process.stdout.write(`${JSON.stringify(r)}\n`);
    if (r['ok'] !== true) process.exitCode = 1;
  });

program.command('status')
  .description("a standby's state")
  .option('--state-dir <dir>', "the standby's state folder", '/var/lib/rubato/standby')
  .action(async (o: { stateDir: string }) => { process.stdout.write(`${JSON.stringify(await controlCommand(o.stateDir, 'status'))}\n`); });

withLinkOptions(withAccel(program.command('demo')))
  .description('protect a VM on two namespace hosts, kill the primary, watch the standby take over')
  .option('--seconds <n>', 'protected run time before the primary is killed', intOpt('seconds', 1, 3600), 8)
  .option('--mem <mb>', 'guest memory in MB', intOpt('mem', 64, 65536), 128)
  .option('--rate <pages_per_ms>', 'pages the guest dirties per ms', numOpt('rate', 0, 10000), 10)
  .option('--policy <spec>', 'checkpoint policy (see rubato primary --help)', policyOpt, 'model')
  .option('--cut-link', 'cut the replication link before killing the primary (detection by timeout)', false)
  .option('--json', 'non-interactive; print the summary as one JSON line', false)
  .action(async (o: { seconds: number; mem: number; rate: number; policy: string; heartbeatMs: number; timeoutMs: number; accel: AccelChoice; json: boolean; cutLink: boolean }) => {
    const tty = process.stderr.isTTY && !o.json;
    const r = await runDemo({ ...o, memMb: o.mem }, (line, final) => {
      if (tty) process.stderr.write(`\r\x1b[K${line}${final ? '\n' : ''}`);
      else if (final || !o.json) process.stderr.write(`${line}\n`);
    });
    process.stdout.write(`${JSON.stringify(r)}\n`);
    process.exitCode = r.failover && r.selfCheckOk ? 0 : 1;
  });

withAccel(program.command('profile'))
  .description('characterise a workload: dirty pages vs epoch length, pause, network and disk operations, per vCPU count')
  .option('--workload <name>', 'cpuloop, dirtier:RATE, kv, web or disk (the services run on 1 vCPU)', 'dirtier:10')
  .option('--cpus <list>', 'vCPU counts, comma-separated', '1,2,4')
  .option('--epochs <list>', 'epoch lengths in ms, comma-separated', '5,10,25,50,100,250,500,1000')
  .option('--mem <mb>', 'guest memory in MB', intOpt('mem', 64, 65536), 256)
  .option('--quick', 'cpus 1,2 and epochs 10,50,250', false)
  .option('--out <dir>', 'results folder', 'results')
  .option('--json', 'print the summary as one JSON line', false)
  .action(async (o: { workload: string; cpus: string; epochs: string; mem: number; quick: boolean; out: string; accel: AccelChoice; json: boolean }) => {
    const list = (v: string, what: string, max: number) => v.split(',').map((x) => {
      const n = Number(x);
      if (!Number.isInteger(n) || n < 1 || n > max) throw new RubatoError('RUBATO_CONFIG', `--${what} must list whole numbers from 1 to ${max} (got "${v}")`);
      return n;
    });
    const cpus = o.quick ? [1, 2] : list(o.cpus, 'cpus', 64);
    const epochsMs = o.quick ? [10, 50, 250] : list(o.epochs, 'epochs', 60000);
    const p = await platform(o.accel);
    const r = await runProfile({ workload: o.workload, cpus, epochsMs, memMb: o.quick ? 128 : o.mem, outDir: o.out, ...p, onStatus: (s) => log.info(s) });
    process.stdout.write(`${JSON.stringify({ workload: o.workload, json: r.json, figures: [r.svg, r.png], runs: r.runs.map((x) => ({ cpus: x.cpus, curve: x.curve, netFramesPerSec: x.netFramesPerSec, diskWritesPerSec: x.diskWritesPerSec, diskFlushesPerSec: x.diskFlushesPerSec })) })}\n`);
  });

program.command('simulate')
  .description('replay a recorded trace or workload profile under any policy, link bandwidth and vCPU count (same scheduler code)')
  .option('--trace <file>', 'an event trace recorded by rubato bench (traces/*.json): replayed epoch by epoch')
  .option('--profile <file>', 'a profile JSON from rubato profile or rubato bench: its fitted dirty curve')
  .option('--policy <spec>', 'checkpoint policy', policyOpt, 'model')
  .option('--bandwidth <class>', '1GbE, 10GbE or IB-32G', '10GbE')
  .option('--cpus <n>', 'vCPUs (unmeasured counts are extrapolated; default: the profile\'s first, the trace\'s own)', intOpt('cpus', 1, 64))
  .option('--seconds <s>', 'simulated time for a profile (a trace replays its own length)', intOpt('seconds', 1, 3600), 20)
  .option('--output-every-ms <ms>', 'add one output frame every MS (an interactive workload)', intOpt('output-every-ms', 1, 600000))
  .option('--json', 'print the summary as one JSON line', false)
  .action((o: { profile?: string; trace?: string; policy: string; bandwidth: string; cpus?: number; seconds: number; outputEveryMs?: number; json: boolean }) => {
    if (!!o.profile === !!o.trace) throw new RubatoError('RUBATO_CONFIG', 'give exactly one of --trace FILE or --profile FILE');
    const r = o.trace ? simulateTrace(o.trace, o.policy, o.bandwidth, o.cpus !== undefined ? { cpus: o.cpus } : {}) : simulateProfile(o.profile!, o.policy, o.bandwidth, o.cpus ?? 1, o.seconds, o.outputEveryMs);
    process.stdout.write(`${JSON.stringify(r)}\n`);
  });

withAccel(program.command('chaos'))
  .description('Jepsen-style check: a KV service in the guest, a client writing, the primary killed again and again')
  .option('--kills <n>', 'primary kills (each followed by a failover)', intOpt('kills', 1, 1000), 10)
  .option('--seconds <s>', 'mean protected run time between kills', intOpt('seconds', 1, 3600), 3)
  .option('--timeout-ms <ms>', 'peer declared lost after this silence', intOpt('timeout-ms', 50, 600000), 500)
  .option('--conns <n>', 'client connections', intOpt('conns', 1, 64), 4)
  .option('--policy <spec>', 'checkpoint policy (see rubato primary --help)', policyOpt, 'model')
  .option('--json', 'print the summary as one JSON line', false)
  .action(async (o: { kills: number; seconds: number; timeoutMs: number; conns: number; accel: AccelChoice; json: boolean; policy: string }) => {
    const r = await runChaos({ ...o, onStatus: (s) => log.info(s) });
    if (!o.json) process.stdout.write(`kills ${r.kills}, failovers ${r.failovers}, acknowledged ${r.acknowledged}, lost ${r.lost}, connections survived ${r.connectionsSurvived}/${r.connectionsTotal}\n`);
    process.stdout.write(`${JSON.stringify(r)}\n`);
    process.exitCode = r.lost === 0 && r.failovers === r.kills && r.kills === o.kills && !r.error ? 0 : 1;
  });

withAccel(program.command('bench'))
  .description('benchmarks: capture (pause, bytes, progress vs unreplicated), failover (time to take over), kv (latency with output commit)')
  .argument('[which]', 'all (the evaluation report), capture, failover, kv, scheduler, or validate (re-run the simulator validation on --out\'s evaluation.json and traces)', 'all')
  .option('--quick', 'reduced settings (a few minutes)', false)
  .option('--seconds <n>', 'measurement time per phase (capture)', intOpt('seconds', 2, 600))
  .option('--runs <n>', 'runs per failure mode (failover)', intOpt('runs', 1, 1000))
  .option('--policies <list>', 'scheduler: policies to run, comma-separated (a policy may repeat: cells interleave)', policyList)
  .option('--workloads <list>', `scheduler: ${SCHEDULER_WORKLOADS.join(', ')} (comma-separated)`, workloadList)
  .option('--timeout-ms <ms>', 'failure detection timeout (failover)', intOpt('timeout-ms', 50, 600000), 500)
  .option('--out <dir>', 'results folder', 'results')
  .option('--json', 'print the summary as one JSON line', false)
  .action(async (which: string, o: { quick: boolean; seconds?: number; runs?: number; policies?: string[]; workloads?: string[]; timeoutMs: number; out: string; accel: AccelChoice; json: boolean }) => {
    if (which === 'failover') {
      const r = await runFailoverBench({ runs: o.runs ?? (o.quick ? 2 : 10), timeoutMs: o.timeoutMs, accel: o.accel, outDir: o.out, onStatus: (s) => log.info(s) });
      process.stdout.write(`${JSON.stringify(r.summary)}\n`);
      return;
    }
    if (which === 'validate') {
      process.stdout.write(`${JSON.stringify(revalidate(join(o.out, 'evaluation.json')))}\n`);
      return;
    }
    if (which === 'all') {
      const p = await platform(o.accel);
      const r = await runEvaluation({ ...p, quick: o.quick, outDir: o.out, onStatus: (s) => log.info(s) });
      process.stdout.write(`${JSON.stringify(r)}\n`);
      return;
    }
    if (which === 'scheduler') {
      const p = await platform(o.accel);
      const r = await runSchedulerBench({ ...p, quick: o.quick, outDir: o.out, ...(o.seconds ? { seconds: o.seconds } : {}), ...(o.policies ? { policies: o.policies } : {}), ...(o.workloads ? { workloads: o.workloads } : {}), onStatus: (s) => log.info(s) });
      process.stdout.write(`${JSON.stringify(r.summary)}\n`);
      return;
    }
    if (which === 'kv') {
      const r = await runKvBench({ seconds: o.seconds ?? (o.quick ? 4 : 10), conns: 4, accel: o.accel, outDir: o.out, onStatus: (s) => log.info(s) });
      process.stdout.write(`${JSON.stringify(r.summary)}\n`);
      return;
    }
    if (which !== 'capture') throw new RubatoError('RUBATO_CONFIG', `unknown benchmark "${which}" (available: all, capture, failover, kv, scheduler, validate)`);
    const p = await platform(o.accel);
    const r = await runCaptureBench({ ...p, quick: o.quick, outDir: o.out, ...(o.seconds ? { seconds: o.seconds } : {}), onStatus: (s) => log.info(s) });
    process.stdout.write(`${JSON.stringify(r.summary)}\n`);
  });

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof CommanderError) {
    process.exitCode = e.exitCode === 0 ? 0 : 2;
  } else if (e instanceof RubatoError) {
    process.stderr.write(`rubato: ${e.message}\n`);
    process.exitCode = e.code === 'RUBATO_CONFIG' ? 2 : 1;
  } else {
    process.stderr.write(`rubato: internal error: ${errorMessage(e)}\n${e instanceof Error ? e.stack ?? '' : ''}\n`);
    process.exitCode = 70;
  }
}
