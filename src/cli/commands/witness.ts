// `rubato witness --listen HOST:PORT`: the witness for a two-host pair, meant for a third small
// machine: one etcd member (Debian's etcd-server is the engine; Rubato only starts and checks it)
// with Rubato's timers (leases down to 1 s) and a private data folder kept across restarts.
// SIGTERM stops it by PID. Point both hosts at it: --etcd http://HOST:PORT.
import { z } from 'zod';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { logger, onShutdown } from '../../util/index.ts';
import { LocalEtcd } from '../../coord/index.ts';
import { hostPort, parseOptions } from '../options.ts';

const log = logger('rubato');
const Options = z.object({
  listen: hostPort(),
  peerPort: z.coerce.number().int().min(1).max(65535),
  dataDir: z.string(),
});

export function register(program: Command): void {
  program
    .command('witness')
    .description(
      "run the witness (one etcd member with Rubato's timers) for a pair of hosts: on a third machine both reach",
    )
    .requiredOption('--listen <host:port>', 'client address both hosts reach (their --etcd http://HOST:PORT)')
    .option('--peer-port <port>', "etcd's peer port (on the same address)", '2380')
    .option('--data-dir <dir>', "etcd's data, private, kept across restarts", '/var/lib/rubato/witness')
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      const etcd = await LocalEtcd.start(resolve(o.dataDir), {
        host: o.listen.host,
        clientPort: o.listen.port,
        peerPort: o.peerPort,
        keepData: true,
      });
      log.info(`witness up: --etcd ${etcd.url} on both hosts (etcd pid ${etcd.pid}, data in ${resolve(o.dataDir)})`);
      process.stdout.write(`${JSON.stringify({ event: 'witness', url: etcd.url, pid: etcd.pid })}\n`);
      let stopping = false;
      onShutdown(async () => {
        stopping = true;
        await etcd.stop();
      });
      await etcd.exited;
      if (!stopping) {
        log.error('etcd exited; the witness is down');
        process.exitCode = 1;
      }
    });
}
