// `rubato keygen`: a new pre-shared key file.
import type { Command } from 'commander';
import { writeKeyFile } from '../../replication/index.ts';

export function register(program: Command): void {
  program
    .command('keygen')
    .description('write a new pre-shared key file (32 random bytes, hex, mode 600)')
    .requiredOption('--out <file>', 'where to write it')
    .option('--force', 'replace an existing key file', false)
    .action((o: { out: string; force: boolean }) => {
      writeKeyFile(o.out, { force: o.force });
      process.stdout.write(`${o.out}\n`);
    });
}
