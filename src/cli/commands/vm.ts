// `rubato vm add|list`: the VMs of a cluster, stored in the witness; the agents do the rest.
import { z } from 'zod';
import type { Command } from 'commander';
import { RubatoError } from '../../util/index.ts';
import { loadVmDefinition, type ResolvedVm, type VmDefinition } from '../../qemu/index.ts';
import { EtcdClient, KEYS, readCluster, vmRows } from '../../coord/index.ts';
import { WITNESS, parseOptions } from '../options.ts';

const EtcdOnly = z.object({ etcd: WITNESS.etcd.unwrap(), json: z.boolean().optional(), home: WITNESS.host.optional() });

/** The definition as stored: paths absolute (as resolved on the host that added it), MACs fixed. */
export function storedDefinition(d: ResolvedVm): VmDefinition {
  return {
    name: d.name,
    cpus: d.cpus,
    memoryMiB: d.memoryMiB,
    accelerator: d.accelerator,
    disks: d.disks.map((x) => ({ path: x.path, format: x.format, bus: x.bus })),
    nics: d.nics.map((n) => ({ bridge: n.bridge, mac: n.mac, ...(n.vlan ? { vlan: n.vlan } : {}) })),
    firmware: d.firmware,
    ...(d.uefiVars ? { uefiVars: d.uefiVars } : {}),
    ...(d.cloudInit ? { cloudInit: d.cloudInit } : {}),
    boot: d.boot,
  };
}

export function register(program: Command): void {
  const vm = program.command('vm').description('the VMs of a cluster of agents (stored in the witness)');
  vm.command('add')
    .description(
      'store a VM definition in the witness: the agents boot it (on --home, or the least-loaded host) and protect it',
    )
    .argument('<vm-file>', 'VM definition (JSON); its image paths must be valid on the host that boots it')
    .requiredOption('--etcd <urls>', 'the witness: etcd client URLs (comma-separated)')
    .option('--home <host>', 'the host holding its image, which boots it first')
    .action(async (file: string, raw: unknown) => {
      const o = parseOptions(EtcdOnly, raw);
      const def = loadVmDefinition(file);
      const etcd = new EtcdClient(o.etcd);
      const record = { definition: storedDefinition(def), home: o.home ?? null, added: Date.now() };
      const ok = await etcd.txn(
        [{ key: KEYS.vm(def.name), absent: true }],
        [{ put: KEYS.vm(def.name), value: JSON.stringify(record) }],
      );
      if (!ok) throw new RubatoError('RUBATO_CONFIG', `VM ${def.name} is already in the cluster (rubato vm list)`);
      process.stdout.write(`VM ${def.name} added; the agents will place and protect it\n`);
    });
  vm.command('list')
    .description('each VM: where it runs, its standby, its generation and whether it is protected')
    .requiredOption('--etcd <urls>', 'the witness: etcd client URLs (comma-separated)')
    .option('--json', 'one JSON array', false)
    .action(async (raw: unknown) => {
      const o = parseOptions(EtcdOnly, raw);
      const rows = vmRows(await readCluster(new EtcdClient(o.etcd)));
      if (o.json) {
        process.stdout.write(`${JSON.stringify(rows)}\n`);
        return;
      }
      const table = [
        ['VM', 'PRIMARY', 'STANDBY', 'GEN', 'STATE'],
        ...rows.map((r) => [r.vm, r.primary ?? '-', r.standby ?? '-', String(r.generation), r.state]),
      ];
      const w = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
      process.stdout.write(
        `${table.map((row) => row.map((c, i) => (i === row.length - 1 ? c : c.padEnd(w[i]!))).join('  ')).join('\n')}\n`,
      );
    });
}
