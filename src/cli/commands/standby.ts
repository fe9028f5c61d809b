// `rubato standby`: hold the replica of a protected VM and take over when the primary is lost.
// SIGTERM/SIGINT: the primary is told (it goes on unprotected); the replica is kept.
import { z } from 'zod';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { logger } from '../../util/log.ts';
import { onShutdown } from '../../util/procs.ts';
import { StandbyController } from '../../replication/standby.ts';
import { loadKeyFile } from '../../replication/keyfile.ts';
import { LINK, binaryFor, eventPrinter, hostPort, parseOptions, withLinkOptions } from '../options.ts';

const log = logger('rubato');

const Options = z.object({ listen: hostPort(), stateDir: z.string(), key: z.string(), autoFailover: z.boolean(), events: z.boolean(), fsync: z.boolean(), ...LINK });

export function register(program: Command): void {
  withLinkOptions(program.command('standby'))
    .description('hold the replica of a protected VM and take over when the primary is lost')
    .requiredOption('--listen <host:port>', 'address for the primary to connect to')
    .requiredOption('--key <file>', 'pre-shared key file (rubato keygen)')
    .option('--state-dir <dir>', 'replica and sockets', '/var/lib/rubato/standby')
    .option('--no-auto-failover', 'only fail over on `rubato failover`')
    .option('--no-fsync', 'do not fsync the replica (tmpfs, tests)')
    .option('--events', 'print events as JSON lines on stdout', false)
    .action(async (raw: unknown) => runStandby(parseOptions(Options, raw)));
}

async function runStandby(o: z.infer<typeof Options>): Promise<void> {
  const psk = loadKeyFile(o.key);
  const emit = eventPrinter(o.events);
  const standby = new StandbyController({
    ...o.listen, stateDir: resolve(o.stateDir), psk, heartbeatMs: o.heartbeatMs, timeoutMs: o.timeoutMs, binaryFor,
    autoFailover: o.autoFailover, fsync: o.fsync,
    onEvent: (e) => {
      emit(e);
      if (!o.events && e.event === 'failover') log.warn(`guest running here from checkpoint ${e.epoch}: restore ${e.restoreMs} ms (${e.why})`);
    },
  });
  onShutdown(() => standby.stop());
  await standby.start();
  emit({ event: 'started', controllerPid: process.pid });
  await new Promise<void>(() => { /* runs until a signal ends the process */ });
}
