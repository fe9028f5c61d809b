// `rubato host drain|undrain|list`: planned maintenance of a cluster host. Draining moves every VM
// that runs there to its standby by switchover (no lost output) and every standby there elsewhere.
import { z } from 'zod';
import type { Command } from 'commander';
import { logger, RubatoError, sleep } from '../../util/index.ts';
import { EtcdClient, KEYS, readCluster } from '../../coord/index.ts';
import { WITNESS, int, parseOptions } from '../options.ts';

const log = logger('rubato');
const Options = z.object({ etcd: WITNESS.etcd.unwrap(), timeout: int(1, 86400).optional() });

export function register(program: Command): void {
  const host = program.command('host').description('hosts of a cluster of agents');
  host
    .command('drain')
    .description(
      'move every VM off HOST (switchover to its standby) and its standbys elsewhere; waits until it holds none',
    )
    .argument('<host>', "the host (its agent's --name)")
    .requiredOption('--etcd <urls>', 'the witness: etcd client URLs (comma-separated)')
    .option('--timeout <s>', 'give up waiting after this long (the drain stays requested)', '600')
    .action(async (name: string, raw: unknown) => {
      const o = parseOptions(Options, raw);
      const etcd = new EtcdClient(o.etcd);
      const v0 = await readCluster(etcd);
      if (!v0.hosts.has(name))
        throw new RubatoError(
          'RUBATO_CONFIG',
          `no agent named ${name} is up (hosts: ${[...v0.hosts.keys()].join(', ') || 'none'})`,
        );
      await etcd.put(KEYS.drain(name), JSON.stringify({ since: Date.now() }));
      const until = Date.now() + (o.timeout ?? 600) * 1000;
      let said = '';
      for (;;) {
        const v = await readCluster(etcd);
        const left = [...v.vms.keys()].filter(
          (vm) =>
            v.owners.get(vm)?.host === name ||
            v.placements.get(vm)?.primary === name ||
            v.placements.get(vm)?.standby === name,
        );
        if (!left.length) break;
        const line = `draining ${name}: ${left.length} VM role(s) left (${left.join(', ')})`;
        if (line !== said) log.info((said = line));
        if (Date.now() > until)
          throw new RubatoError(
            'RUBATO_STREAM_TIMEOUT',
            `${line} after ${o.timeout ?? 600} s; the drain stays requested (rubato host undrain ${name} to cancel)`,
          );
        await sleep(500);
      }
      process.stdout.write(`${name} is drained: it runs no VM and holds no standby\n`);
    });
  host
    .command('undrain')
    .description('let HOST hold VMs and standbys again')
    .argument('<host>', 'the host')
    .requiredOption('--etcd <urls>', 'the witness: etcd client URLs (comma-separated)')
    .action(async (name: string, raw: unknown) => {
      const o = parseOptions(Options, raw);
      await new EtcdClient(o.etcd).del(KEYS.drain(name));
      process.stdout.write(`${name} may hold VMs again\n`);
    });
}
