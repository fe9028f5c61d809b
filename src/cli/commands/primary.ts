// `rubato primary`: run the built-in test guest (or a kernel + initrd) and keep it protected by a
// standby, as a long-running daemon. SIGTERM/SIGINT stop it in order: the standby is told and does
// not fail over, the guest stops, nothing is left running.
import { z } from 'zod';
import { readdirSync, rmSync } from 'node:fs';
import { ensurePrivateDir } from '../../util/private-files.ts';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { RubatoError } from '../../util/errors.ts';
import { logger } from '../../util/log.ts';
import { onShutdown } from '../../util/procs.ts';
import { QemuVm } from '../../qemu/vm.ts';
import { guestAppend, VmSpecSchema } from '../../qemu/spec.ts';
import { PrimaryController } from '../../replication/primary.ts';
import { loadKeyFile } from '../../replication/keyfile.ts';
import { parsePolicy } from '../../scheduler/index.ts';
import { ACCEL, LINK, eventPrinter, hostPort, int, parseOptions, platform, policy, withAccel, withLinkOptions } from '../options.ts';

const log = logger('rubato');

const Options = z.object({
  standby: hostPort(), key: z.string(), name: z.string(), mem: int(64, 65536), cpus: int(1, 64), workload: z.string(), accel: ACCEL,
  kernel: z.string().optional(), initrd: z.string().optional(), append: z.string().optional(), policy: policy(),
  stateDir: z.string(), events: z.boolean(), ...LINK,
});

export function register(program: Command): void {
  withLinkOptions(withAccel(program.command('primary')))
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
    .option('--policy <spec>', 'checkpoint policy: model (default), adaptive, fixed:MS, dirty-bandwidth[:MS], net-io, disk-io, bounded-latency[:MS] (+ ,min=MS,max=MS)', 'model')
    .option('--state-dir <dir>', 'sockets and state', '/run/rubato/primary')
    .option('--events', 'print events as JSON lines on stdout', false)
    .action(async (raw: unknown) => runPrimary(parseOptions(Options, raw)));
}

async function runPrimary(o: z.infer<typeof Options>): Promise<void> {
  const psk = loadKeyFile(o.key);
  const { accel, binary, guest } = await platform(o.accel);
  const stateDir = resolve(o.stateDir);
  ensurePrivateDir(stateDir);
  const parsed = VmSpecSchema.safeParse({
    name: o.name, accel, cpus: o.cpus, memMb: o.mem, kernel: o.kernel ?? guest.kernel, initrd: o.initrd ?? guest.initrd,
    append: o.append ?? guestAppend(o.workload.split(',')),
  });
  if (!parsed.success) throw new RubatoError('RUBATO_CONFIG', `VM: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  const emit = eventPrinter(o.events);
  const vm = await QemuVm.start(parsed.data, { binary, runDir: stateDir });
  emit({ event: 'started', vm: o.name, qemuPid: vm.pid, controllerPid: process.pid, accel });
  const primary = new PrimaryController({
    vm, runDir: stateDir, standby: o.standby, psk, periodMs: 25, policy: parsePolicy(o.policy), heartbeatMs: o.heartbeatMs, timeoutMs: o.timeoutMs, retryMs: 1000,
    onEvent: (e) => {
      emit(e);
      if (!o.events && e.event === 'status') log.info(`${o.policy} | epoch ${e.epoch} acked ${e.ackedEpoch} | ${e.ckptPerSec} ckpt/s | ${e.dirtyPages} dirty pages | pause ${e.pauseMs} ms | ${e.mbPerSec} MB/s | lag ${e.lagMs} ms`);
    },
  });
  let stopping: Promise<void> | null = null;
  const stop = () => (stopping ??= (async () => {
    await primary.stop();
    await vm.stop();
    removeSockets(stateDir, o.name);
  })());
  onShutdown(async () => {
    await stop();
    log.info(`guest ${o.name} stopped; the standby keeps its replica and does not take over`);
  });
  primary.start();
  await new Promise<void>((r) => vm.once('exit', () => r()));
  if (!stopping) log.warn(`guest ${o.name} exited; primary controller stops`);
  await stop();
}

/** The VM's sockets in the state folder (QMP, console, migration) go with it. */
function removeSockets(dir: string, name: string): void {
  for (const f of readdirSync(dir)) if (f.startsWith(name) && /\.(qmp|serial|mig)$/.test(f)) rmSync(join(dir, f), { force: true });
}
