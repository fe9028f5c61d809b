// `rubato failover` and `rubato status`: commands to a standby's control socket.
import type { Command } from 'commander';
import { controlCommand } from '../../replication/control-socket.ts';

export function register(program: Command): void {
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
}
