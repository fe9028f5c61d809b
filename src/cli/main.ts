#!/usr/bin/env node
// The `rubato` command: one file per command in commands/. Results go to stdout (with --json, one
// JSON object as the last line); progress and logs go to stderr. Expected failures print one clear
// line and exit with their code (EXIT_CODES: 2 a config mistake, 3 a refused key, 4 an image in use, …).

import { Command, CommanderError } from 'commander';
import { EXIT_CODES, RubatoError, errorMessage, LOG_LEVELS, jsonLine } from '../util/index.ts';
import { takeLogOptions } from './log-options.ts';
import * as agent from './commands/agent.ts';
import * as bench from './commands/bench.ts';
import * as captureCheck from './commands/capture-check.ts';
import * as chaos from './commands/chaos.ts';
import * as consoleCmd from './commands/console.ts';
import * as demo from './commands/demo.ts';
import * as failover from './commands/failover.ts';
import * as host from './commands/host.ts';
import * as importCmd from './commands/import.ts';
import * as keygen from './commands/keygen.ts';
import * as primary from './commands/primary.ts';
import * as profile from './commands/profile.ts';
import * as protect from './commands/protect.ts';
import * as qemuArgsCmd from './commands/qemu-args.ts';
import * as setup from './commands/setup.ts';
import * as simulate from './commands/simulate.ts';
import * as standby from './commands/standby.ts';
import * as vm from './commands/vm.ts';
import * as witness from './commands/witness.ts';

const program = new Command('rubato')
  .description('High availability for QEMU VMs by checkpoint replication with a workload-adaptive scheduler')
  .option('--log-level <level>', `logging on stderr: ${LOG_LEVELS.join(', ')} (any command; also RUBATO_LOG)`, 'info')
  .option(
    '--log-format <format>',
    'text, or json: one object per line {time, level, component, message, fields…} (any command; also RUBATO_LOG_FORMAT)',
    'text',
  )
  .exitOverride()
  // Options after a subcommand belong to it (`bench scheduler --quick` is the scheduler's --quick).
  .enablePositionalOptions()
  .configureOutput({ writeErr: (s) => process.stderr.write(s) });

for (const c of [
  setup,
  captureCheck,
  keygen,
  protect,
  importCmd,
  qemuArgsCmd,
  primary,
  standby,
  failover,
  consoleCmd,
  agent,
  vm,
  host,
  demo,
  profile,
  simulate,
  chaos,
  bench,
  witness,
])
  c.register(program);

try {
  await program.parseAsync(takeLogOptions(process.argv));
} catch (e) {
  if (e instanceof CommanderError) {
    process.exitCode = e.exitCode === 0 ? 0 : 2;
  } else if (e instanceof RubatoError) {
    process.stderr.write(
      process.env['RUBATO_LOG_FORMAT'] === 'json'
        ? `${jsonLine('error', 'rubato', e.message, { code: e.code })}\n`
        : `rubato: ${e.message}\n`,
    );
    process.exitCode = EXIT_CODES[e.code] ?? 1;
  } else {
    process.stderr.write(`rubato: internal error: ${errorMessage(e)}\n${e instanceof Error ? (e.stack ?? '') : ''}\n`);
    process.exitCode = 70;
  }
}
