// `rubato agent`: run on each host of a cluster; the agents place, protect, fail over and
// re-protect every VM stored in the witness (`rubato vm add`) without an operator.
import { z } from 'zod';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { logger, onShutdown } from '../../util/index.ts';
import { loadKeyFile } from '../../replication/index.ts';
import { EtcdClient } from '../../coord/index.ts';
import { Agent } from '../../agent/index.ts';
import { RUBATO_COMMAND } from '../../setup/index.ts';
import { AgentMetrics, ObserveServer } from '../../observe/index.ts';
import {
  DURABILITY,
  LINK,
  OBSERVE,
  WITNESS,
  withDurabilityOption,
  withObserveOptions,
  eventPrinter,
  int,
  parseOptions,
  policy,
  MODE,
  withLinkOptions,
  withModeOption,
} from '../options.ts';

const log = logger('rubato');

const Options = z.object({
  etcd: WITNESS.etcd.unwrap(),
  name: WITNESS.host,
  address: z.string().regex(/^[0-9a-fA-F.:]+$/, "must be this host's IP address as the other hosts reach it"),
  key: z.string(),
  stateDir: z.string(),
  leaseTtl: int(1, 60),
  policy: policy(),
  ...MODE,
  fsync: z.boolean(),
  durability: DURABILITY,
  events: z.boolean(),
  metrics: OBSERVE.metrics,
  ...LINK,
});

export function register(program: Command): void {
  withObserveOptions(
    withDurabilityOption(
      withModeOption(withLinkOptions(program.command('agent'))),
      'for the standbys this host runs: ',
    ),
    false,
  )
    .description(
      "run this host's share of a cluster: VMs stored in the witness (rubato vm add) are placed, protected, failed over and re-protected by the agents",
    )
    .requiredOption('--etcd <urls>', 'the witness every host reaches: etcd client URLs (comma-separated)')
    .requiredOption('--address <ip>', "this host's address as the other hosts reach it (replication links)")
    .requiredOption('--key <file>', 'pre-shared key file (rubato keygen; the same on every host)')
    .option('--name <host>', "this host's name in the cluster", hostname())
    .option('--state-dir <dir>', 'replicas, converted disks and sockets, one folder per VM', '/var/lib/rubato/agent')
    .option('--lease-ttl <s>', 'witness lease TTL, seconds (see rubato protect --help)', '1')
    .option('--policy <spec>', 'checkpoint policy of the VMs this host runs', 'model')
    .option('--no-fsync', 'do not fsync replicas (tmpfs, tests)')
    .option('--events', 'print events as JSON lines on stdout', false)
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      loadKeyFile(o.key); // a bad key file is one line here, not in every VM process
      const printEvent = eventPrinter(o.events);
      // The VM processes' metrics, from the events they print (each labelled with its VM and role).
      const vmMetrics = o.metrics ? new AgentMetrics(o.name) : null;
      const server =
        vmMetrics && o.metrics
          ? await ObserveServer.start(o.metrics, {
              metrics: vmMetrics.metrics,
              status: () => agent.status(),
              title: `agent ${o.name}`,
              dashboard: false,
            })
          : null;
      if (server) log.info(`metrics on ${server.url}/metrics`);
      const agent: Agent = new Agent({
        etcd: new EtcdClient(o.etcd),
        etcdUrls: o.etcd,
        name: o.name,
        address: o.address,
        keyFile: resolve(o.key),
        stateDir: resolve(o.stateDir),
        leaseTtl: o.leaseTtl,
        heartbeatMs: o.heartbeatMs,
        timeoutMs: o.timeoutMs,
        policy: o.policy,
        mode: o.mode,
        fsync: o.fsync,
        durability: o.durability,
        rubato: RUBATO_COMMAND,
        onEvent: (e) => {
          printEvent(e);
          vmMetrics?.event(e);
        },
      });
      onShutdown(async () => {
        await agent.stop();
        await server?.close();
      });
      await agent.start();
      log.info(
        `agent ${o.name} running; stop it with SIGTERM (its VMs stop in order, their standbys keep the replicas)`,
      );
      await new Promise<void>(() => {
        /* until a signal */
      });
    });
}
