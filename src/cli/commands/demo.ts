// `rubato demo`: the main job — protect the test guest on two namespace hosts, kill the primary,
// watch the standby take over.
import { z } from 'zod';
import type { Command } from 'commander';
import {
  runDemo,
  clusterDemoPassed,
  runClusterDemo,
  debianDemoPassed,
  runDebianDemo,
  adoptDemoPassed,
  runAdoptDemo,
} from '../../chaos/index.ts';
import { RubatoError } from '../../util/index.ts';
import { ACCEL, LINK, int, num, oneOf, parseOptions, policy, withAccel, withLinkOptions } from '../options.ts';

const Options = z.object({
  seconds: int(1, 3600),
  mem: int(64, 65536).optional(),
  rate: num(0, 10000),
  policy: policy(),
  cutLink: z.boolean(),
  json: z.boolean(),
  accel: ACCEL,
  guest: oneOf(['test', 'debian'] as const),
  diskGib: int(1, 65536).optional(),
  disks: int(1, 4).optional(),
  nics: int(1, 2).optional(),
  firmware: oneOf(['bios', 'uefi'] as const).optional(),
  adopt: z.boolean(),
  hosts: int(3, 8).optional(),
  vms: int(1, 8),
  leaseTtl: int(1, 60),
  drain: z.boolean(),
  ...LINK,
});

export function register(program: Command): void {
  withLinkOptions(withAccel(program.command('demo')))
    .description('protect a VM on two namespace hosts, kill the primary, watch the standby take over')
    .option('--seconds <n>', 'protected run time before the primary is killed', '8')
    .option(
      '--guest <which>',
      'test (the built-in test guest) or debian (a Debian 12 VM booted from its disk, serving nginx; ~5 min)',
      'test',
    )
    .option('--mem <mb>', 'guest memory in MB (default 128; debian 1024)')
    .option('--disk-gib <n>', 'debian: grow the disk image (sparse) to this size first')
    .option('--disks <n>', 'debian: disks of the VM (1-4; the second is written by the guest, checked after failover)')
    .option('--nics <n>', 'debian: NICs of the VM (1-2; the second on a LAN of its own, with its own client)')
    .option('--firmware <bios|uefi>', 'debian: boot through SeaBIOS (default) or UEFI (OVMF, a GPT image)')
    .option(
      '--adopt',
      'a VM already running in its own QEMU (a web server, one client connection open) is adopted live, then its host dies',
      false,
    )
    .option('--rate <pages_per_ms>', 'pages the guest dirties per ms', '10')
    .option('--policy <spec>', 'checkpoint policy (see rubato primary --help)', 'model')
    .option('--cut-link', 'cut the replication link before killing the primary (detection by timeout)', false)
    .option('--hosts <n>', 'a cluster instead of a pair: N hosts running rubato agent, one etcd, one host killed (3-8)')
    .option('--vms <n>', 'with --hosts: VMs in the cluster', '2')
    .option('--drain', 'with --hosts: first drain a host (rubato host drain) and let it back in', false)
    .option('--lease-ttl <s>', 'with --hosts: witness lease TTL, seconds', '1')
    .option('--json', 'non-interactive; print the summary as one JSON line', false)
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      const tty = process.stderr.isTTY && !o.json;
      const status = (line: string, final?: boolean) => {
        if (tty) process.stderr.write(`\r\x1b[K${line}${final ? '\n' : ''}`);
        else if (final || !o.json) process.stderr.write(`${line}\n`);
      };
      if (o.hosts) {
        const c = await runClusterDemo({ ...o, hosts: o.hosts }, status);
        process.stdout.write(`${JSON.stringify(c)}\n`);
        process.exitCode = clusterDemoPassed(c) ? 0 : 1;
        return;
      }
      if (o.adopt) {
        if (o.hosts || o.guest !== 'test')
          throw new RubatoError('RUBATO_CONFIG', '--adopt runs the test guest on a pair');
        const a = await runAdoptDemo(
          {
            seconds: o.seconds,
            memMb: o.mem ?? 128,
            heartbeatMs: o.heartbeatMs,
            timeoutMs: o.timeoutMs,
            accel: o.accel,
          },
          status,
        );
        process.stdout.write(`${JSON.stringify(a)}\n`);
        process.exitCode = adoptDemoPassed(a) ? 0 : 1;
        return;
      }
      if (o.guest !== 'debian' && (o.disks || o.nics || o.firmware))
        throw new RubatoError('RUBATO_CONFIG', '--disks, --nics and --firmware go with --guest debian');
      if (o.guest === 'debian') {
        const d = await runDebianDemo(
          {
            seconds: o.seconds,
            policy: o.policy,
            heartbeatMs: o.heartbeatMs,
            timeoutMs: o.timeoutMs,
            accel: o.accel,
            memMb: o.mem ?? 1024,
            ...(o.diskGib ? { diskGiB: o.diskGib } : {}),
            ...(o.disks ? { disks: o.disks } : {}),
            ...(o.nics ? { nics: o.nics } : {}),
            ...(o.firmware ? { firmware: o.firmware } : {}),
          },
          status,
        );
        process.stdout.write(`${JSON.stringify(d)}\n`);
        process.exitCode = debianDemoPassed(d) ? 0 : 1;
        return;
      }
      const r = await runDemo({ ...o, memMb: o.mem ?? 128 }, status);
      process.stdout.write(`${JSON.stringify(r)}\n`);
      process.exitCode = r.failover && r.selfCheckOk ? 0 : 1;
    });
}
