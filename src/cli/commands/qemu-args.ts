// `rubato qemu-args VM-FILE`: the QEMU command line that runs a VM without Rubato the way `rubato
// protect --adopt` can take it over later (the same machine and devices as Rubato's QEMU; its
// disks' image files; TAPs by name, without offloads), with the commands that make its TAPs.
import type { Command } from 'commander';
import { loadVmDefinition } from '../../qemu/index.ts';
import { checkAdoptable, ownQemuArgs, ownTapName, specOf } from '../../host/index.ts';
import { platform } from '../options.ts';

export function register(program: Command): void {
  program
    .command('qemu-args')
    .description(
      'print the QEMU command line that runs a VM without Rubato so that rubato protect --adopt can take it over later',
    )
    .argument('<vm-file>', 'VM definition (JSON)')
    .option('--run-dir <dir>', "where the VM's QMP and serial sockets go", '/run/rubato')
    .action(async (file: string, o: { runDir: string }) => {
      const def = loadVmDefinition(file);
      checkAdoptable(def);
      const { accel } = await platform(def.accelerator);
      const taps = def.nics.map((_, i) => ownTapName(def.name, i));
      const args = ownQemuArgs(specOf(def, accel), {
        qmpSocket: `${o.runDir}/${def.name}.qmp`,
        serialSocket: `${o.runDir}/${def.name}.serial`,
        diskFiles: def.disks.map((d) => d.path),
        taps,
      });
      const q = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`);
      for (const [i, n] of def.nics.entries())
        process.stdout.write(
          `# ip tuntap add dev ${taps[i]} mode tap && ip link set ${taps[i]} master ${n.bridge} up\n`,
        );
      process.stdout.write(`qemu-system-x86_64 ${args.map(q).join(' ')}\n`);
    });
}
