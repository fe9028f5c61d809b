// `rubato primary`: run the built-in test guest (or a kernel + initrd) and keep it protected by a
// standby, as a long-running daemon: `rubato protect` with a built-in definition. SIGTERM/SIGINT
// stop it in order: the standby is told and does not fail over, the guest stops, nothing is left.
import { z } from 'zod';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { logger, onShutdown } from '../../util/index.ts';
import { VmName, guestAppend, type ResolvedVm } from '../../qemu/index.ts';
import { protectVm, claimBeforeStart } from '../../host/index.ts';
import { EtcdClient } from '../../coord/index.ts';
import { loadKeyFile } from '../../replication/index.ts';
import { parsePolicy } from '../../scheduler/index.ts';
import {
  ACCEL,
  LINK,
  MODE,
  withModeOption,
  NO_WITNESS_WARNING,
  WITNESS,
  eventPrinter,
  fencingOf,
  withWitnessOptions,
  hostPort,
  int,
  parseOptions,
  platform,
  policy,
  statusLine,
  withAccel,
  withLinkOptions,
} from '../options.ts';

const log = logger('rubato');

const Options = z.object({
  standby: hostPort(),
  key: z.string(),
  name: VmName,
  mem: int(64, 65536),
  cpus: int(1, 64),
  workload: z.string(),
  accel: ACCEL,
  kernel: z.string().optional(),
  initrd: z.string().optional(),
  append: z.string().optional(),
  policy: policy(),
  stateDir: z.string(),
  events: z.boolean(),
  ...LINK,
  ...MODE,
  ...WITNESS,
});

export function register(program: Command): void {
  withWitnessOptions(withModeOption(withLinkOptions(withAccel(program.command('primary')))))
    .description('run a VM and keep it protected by a standby')
    .requiredOption('--standby <host:port>', 'the standby controller')
    .requiredOption('--key <file>', 'pre-shared key file (rubato keygen)')
    .option('--name <name>', 'VM name', 'vm')
    .option('--mem <mb>', 'guest memory in MB', '128')
    .option('--cpus <n>', 'vCPUs', '1')
    .option('--workload <prog,args>', 'test-guest workload', 'dirtier,10,16')
    .option('--kernel <file>', 'guest kernel (default: the test guest)')
    .option('--initrd <file>', 'guest initramfs (default: the test guest)')
    .option('--append <cmdline>', 'guest kernel command line')
    .option(
      '--policy <spec>',
      'checkpoint policy: model (default; pre-sends dirty RAM where it pays, model,presend=off to disable), adaptive, fixed:MS, dirty-bandwidth[:MS], net-io, disk-io, bounded-latency[:MS] (+ ,min=MS,max=MS,presend=MS|last|auto|off)',
      'model',
    )
    .option('--state-dir <dir>', 'sockets and state', '/run/rubato/primary')
    .option('--events', 'print events as JSON lines on stdout', false)
    .action(async (raw: unknown) => runPrimary(parseOptions(Options, raw)));
}

async function runPrimary(o: z.infer<typeof Options>): Promise<void> {
  const psk = loadKeyFile(o.key);
  const fencing = fencingOf(o);
  const { accel, binary, guest, tapRelay } = await platform(o.accel);
  // The built-in definition: the test guest (or the given kernel), no disk, no NIC; the same path as `rubato protect`.
  const def: ResolvedVm = {
    file: '(rubato primary)',
    name: o.name,
    cpus: o.cpus,
    memoryMiB: o.mem,
    accelerator: accel,
    disks: [],
    nics: [],
    firmware: 'bios',
    boot: {
      kernel: o.kernel ?? guest.kernel,
      initrd: o.initrd ?? guest.initrd,
      append: o.append ?? guestAppend(o.workload.split(',')),
    },
  };
  const emit = eventPrinter(o.events);
  if (fencing === 'none') log.warn(NO_WITNESS_WARNING);
  emit({ event: 'fencing', fencing });
  const stateDir = resolve(o.stateDir);
  const claimed = o.etcd
    ? await claimBeforeStart({
        etcd: new EtcdClient(o.etcd),
        vm: o.name,
        host: o.host,
        leaseTtlSec: o.leaseTtl,
        stateDir,
      })
    : null;
  const ownership = claimed?.ownership ?? null;
  if (claimed) emit({ event: 'owner', host: o.host, generation: claimed.generation });
  const p = await protectVm({
    def,
    accel,
    tapRelay,
    binary,
    stateDir,
    standby: o.standby,
    psk,
    policy: parsePolicy(o.policy),
    heartbeatMs: o.heartbeatMs,
    timeoutMs: o.timeoutMs,
    ownership,
    primary: { holdOnLossMs: o.holdMs, mode: o.mode },
    onGuardEvent: emit,
    onEvent: (e) => {
      emit(e);
      if (e.event === 'fenced') void ownership?.release();
      if (!o.events && e.event === 'status') log.info(statusLine(o.policy, e));
    },
  });
  emit({ event: 'started', vm: o.name, qemuPid: p.vm.pid, controllerPid: process.pid, accel });
  onShutdown(async () => {
    p.guard?.close();
    await p.stop(0); // (synthetic workloads: powered off at once)
    await ownership?.release();
    log.info(`guest ${o.name} stopped; the standby keeps its replica and does not take over`);
  });
  await new Promise<void>((r) => p.vm.once('exit', () => r()));
  log.warn(`guest ${o.name} exited; primary controller stops`);
  p.guard?.close();
  await p.stop(0);
  await ownership?.release();
}
