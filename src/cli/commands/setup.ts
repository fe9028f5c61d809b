// `rubato setup`: Debian packages, the patched QEMU (TCG), the test guest, the TAP helper.
import type { Command } from 'commander';
import { ensureAll } from '../../setup/index.ts';

export function register(program: Command): void {
  program.command('setup')
    .description('install the Debian packages, build the patched QEMU (TCG) and the test guest; a no-op when done')
    .action(async () => {
      const r = await ensureAll();
      process.stdout.write(`${JSON.stringify({ qemu: r.qemu.path, kernel: r.guest.kernel, initrd: r.guest.initrd })}\n`);
    });
}
