// `rubato setup`: Debian packages, the patched QEMU (TCG), the test guest, the TAP helper.
import type { Command } from 'commander';
import { z } from 'zod';
import {
  ensureAll,
  ensureBrowser,
  ensureDebianImage,
  ensureDebianUefiImage,
  ensureServiceClients,
} from '../../setup/index.ts';
import { oneOf, parseOptions } from '../options.ts';

const Options = z.object({ guest: oneOf(['test', 'debian'] as const) });

export function register(program: Command): void {
  program
    .command('setup')
    .description(
      'install the Debian packages (and headless Chromium for the dashboard test), build the patched QEMU (TCG) and the test guest; a no-op when done',
    )
    .option(
      '--guest <which>',
      'also build this guest: test (default) or debian (a Debian 12 disk image with nginx, redis, PostgreSQL, its UEFI variant, and the stock clients that measure them: redis-benchmark, wrk, pgbench)',
      'test',
    )
    .action(async (raw: unknown) => {
      const o = parseOptions(Options, raw);
      const r = await ensureAll();
      const debian = o.guest === 'debian' ? await ensureDebianImage() : undefined;
      // (its UEFI variant, made from it in seconds)
      const debianUefi = debian ? await ensureDebianUefiImage() : undefined;
      if (debian) await ensureServiceClients();
      const chromium = await ensureBrowser(); // the dashboard's browser test
      process.stdout.write(
        `${JSON.stringify({ qemu: r.qemu.path, kernel: r.guest.kernel, initrd: r.guest.initrd, ...(debian ? { debianImage: debian, debianUefiImage: debianUefi } : {}), chromium })}\n`,
      );
    });
}
