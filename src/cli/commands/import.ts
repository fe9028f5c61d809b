// `rubato import --libvirt DOMAIN|FILE`: a VM file for `rubato protect` from a libvirt domain
// (`virsh dumpxml --inactive`, or a domain XML file): cpus, memory, disks, NICs with their MACs
// and VLANs, firmware. What cannot be carried is said in one line each, on stderr.
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { RubatoError, runCommand } from '../../util/index.ts';
import {
  MAX_DOMAIN_XML_BYTES,
  networkBridgeOf,
  parseDomainXml,
  parseVmDefinition,
  VIRSH_TIMEOUT_MS,
} from '../../qemu/index.ts';

interface ImportOptions {
  libvirt: string;
  out?: string;
  connect: string;
  force: boolean;
}

export function register(program: Command): void {
  program
    .command('import')
    .description(
      'write a VM file for rubato protect from a libvirt domain (what cannot be carried is said, one line each)',
    )
    .requiredOption('--libvirt <domain|file>', 'a libvirt domain name (asked through virsh) or a domain XML file')
    .option('--out <file>', 'the VM file to write (default: NAME.json here)')
    .option('--connect <uri>', "libvirt's connection URI", 'qemu:///system')
    .option('--force', 'overwrite the VM file if it exists', false)
    .action(async (o: ImportOptions) => runImport(o));
}

async function virsh(uri: string, args: string[]): Promise<string> {
  const r = await runCommand('virsh', ['-c', uri, ...args], { timeoutMs: VIRSH_TIMEOUT_MS });
  if (r.code === -1 && /ENOENT/.test(r.stderr))
    throw new RubatoError('RUBATO_CONFIG', "virsh is not installed (Debian's libvirt-clients)");
  if (r.code !== 0)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `virsh ${args.join(' ')}: ${r.stderr.trim().split('\n').filter(Boolean).at(-1) ?? `exit ${r.code}`}`,
    );
  return r.stdout;
}

async function runImport(o: ImportOptions): Promise<void> {
  const asFile = existsSync(o.libvirt) && statSync(o.libvirt).isFile();
  let xml: string;
  if (asFile) {
    if (statSync(o.libvirt).size > MAX_DOMAIN_XML_BYTES)
      throw new RubatoError('RUBATO_CONFIG', `${o.libvirt}: too large to be a libvirt domain`);
    xml = readFileSync(o.libvirt, 'utf8');
  } else {
    if (!/^[\w.+:-]{1,128}$/.test(o.libvirt))
      throw new RubatoError('RUBATO_CONFIG', `--libvirt ${o.libvirt}: no such file, and not a domain name`);
    xml = await virsh(o.connect, ['dumpxml', '--inactive', '--', o.libvirt]);
  }
  // A libvirt network is carried as its bridge (asked from libvirt; from a file alone, when libvirt answers).
  const bridges = new Map<string, string | null>();
  for (const m of xml.matchAll(/<source\s[^>]*network=['"]([^'"]+)['"]/g)) {
    const net = m[1]!;
    if (bridges.has(net)) continue;
    bridges.set(net, networkBridgeOf(await virsh(o.connect, ['net-dumpxml', '--', net]).catch(() => '')));
  }
  const source = asFile ? o.libvirt : `libvirt domain ${o.libvirt}`;
  const { def, notes } = parseDomainXml(xml, source, (net) => bridges.get(net) ?? null);
  if (def.uefiVars && !existsSync(def.uefiVars)) {
    notes.push(`nvram ${def.uefiVars}: does not exist yet (never started under libvirt); Rubato keeps a new store`);
    delete def.uefiVars;
  }
  const out = resolve(o.out ?? `${def.name}.json`);
  if (existsSync(out) && !o.force) throw new RubatoError('RUBATO_CONFIG', `${out} exists (--force to overwrite it)`);
  const text = `${JSON.stringify(def, null, 2)}\n`;
  // What protect will say about it, before it is written (its images must be readable here).
  parseVmDefinition(text, out);
  writeFileSync(out, text);
  for (const n of notes) process.stderr.write(`rubato import: ${def.name}: ${n}\n`);
  process.stdout.write(
    `${out}: VM ${def.name} (${def.cpus} CPUs, ${def.memoryMiB} MiB, ${def.disks.length} disks, ${def.nics.length} NICs, ${def.firmware})\n`,
  );
}
