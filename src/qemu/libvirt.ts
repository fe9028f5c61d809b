// A libvirt domain (its XML, as `virsh dumpxml --inactive` prints it) turned into Rubato's VM
// definition: cpus, memory, disks, NICs with their MACs and VLANs, firmware, a direct kernel boot.
// Pure: what cannot be carried comes back as one line each (`notes`), never silently dropped; a
// domain that cannot run under Rubato at all is a typed error. Libvirt networks are named by their
// bridge through `networkBridge` (the caller asks libvirt).

import { XMLParser } from 'fast-xml-parser';
import { RubatoError } from '../util/index.ts';
import { VM_NAME_RE } from './spec.ts';
import type { VmDefinition } from './definition.ts';

/** A domain's XML is a few KiB; anything near this is not one. */
export const MAX_DOMAIN_XML_BYTES = 1024 * 1024;

/**
 * How long a virsh call may take. A libvirtd's first use of its QEMU driver probes the QEMU binary's capabilities
 * (a few QEMU runs) before it answers: on a fresh, loaded 2-core machine under TCG the first `virsh define` took
 * over 30 s.
 */
export const VIRSH_TIMEOUT_MS = 150_000;

export interface ImportResult {
  def: VmDefinition;
  /** One line per thing that was not carried, or carried differently, and why. */
  notes: string[];
}

type Node = Record<string, unknown>;
const asArray = (x: unknown): Node[] => (x === undefined ? [] : Array.isArray(x) ? (x as Node[]) : [x as Node]);
const text = (x: unknown): string | undefined => {
  if (x === undefined || x === null) return undefined;
  if (typeof x === 'object') {
    const t = (x as Node)['#text'];
    return t === undefined ? undefined : String(t).trim();
  }
  return String(x).trim();
};
const attr = (n: Node | undefined, name: string): string | undefined => {
  const v = n?.[`@${name}`];
  return v === undefined ? undefined : String(v);
};

const UNITS: Record<string, number> = {
  b: 1,
  bytes: 1,
  kb: 1000,
  k: 1024,
  kib: 1024,
  mb: 1000 ** 2,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  gb: 1000 ** 3,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  tb: 1000 ** 4,
  t: 1024 ** 4,
  tib: 1024 ** 4,
};

/** Devices that change what the guest sees, with why Rubato does not carry them. */
const NOT_CARRIED: Record<string, string> = {
  hostdev: 'a passthrough device is bound to this host: the standby cannot have it, and its state is not replicated',
  filesystem: "a shared host folder (virtiofs/9p) is outside the guest's disks: its writes are not replicated",
  tpm: "a TPM's state is not replicated",
  smartcard: 'a smartcard reader is bound to this host',
  redirdev: 'a redirected USB device is bound to this host',
  shmem: 'shared memory with the host is not replicated',
  sound: 'a protected VM has no sound device',
  graphics: 'a protected VM runs headless (rubato console reaches its serial console)',
  video: 'a protected VM runs headless',
  vsock: 'a vsock channel to the host does not move to the standby',
  iommu: 'no virtual IOMMU',
  crypto: 'no virtual crypto device',
};
/** Devices Rubato provides itself, or that change nothing the guest keeps (not said). */
const QUIETLY: ReadonlySet<string> = new Set([
  'emulator',
  'audio',
  'controller',
  'input',
  'memballoon',
  'serial',
  'console',
  'channel',
  'rng',
  'watchdog',
  'panic',
]);

export function parseDomainXml(
  xml: string,
  source: string,
  networkBridge: (network: string) => string | null = () => null,
): ImportResult {
  const bad = (why: string) => new RubatoError('RUBATO_CONFIG', `${source}: ${why}`, { file: source });
  if (Buffer.byteLength(xml) > MAX_DOMAIN_XML_BYTES) throw bad('too large to be a libvirt domain');
  let doc: Node;
  try {
    doc = new XMLParser({
      ignoreAttributes: false,
      attributeNamePrefix: '@',
      parseAttributeValue: false,
      parseTagValue: false,
      processEntities: false,
      htmlEntities: false,
    }).parse(xml, true) as Node;
  } catch (e) {
    throw bad(`not XML: ${(e as Error).message.split('\n')[0]}`);
  }
  const dom = doc['domain'] as Node | undefined;
  if (!dom || typeof dom !== 'object') throw bad('not a libvirt domain (no <domain> element)');
  const notes: string[] = [];
  const note = (s: string) => notes.push(s);

  const name = text(dom['name']);
  if (!name) throw bad('the domain has no <name>');
  if (!VM_NAME_RE.test(name)) throw bad(`the domain's name ${JSON.stringify(name)} is not a Rubato VM name`);

  const vcpuNode = dom['vcpu'];
  const cpus = vcpuNode === undefined ? 1 : Number(text(vcpuNode));
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 64) throw bad(`<vcpu> ${String(text(vcpuNode))}: 1-64 CPUs`);
  const memNode = (dom['currentMemory'] ?? dom['memory']) as Node | string | undefined;
  if (memNode === undefined) throw bad('the domain has no <memory>');
  const unit = (typeof memNode === 'object' ? attr(memNode, 'unit') : undefined)?.toLowerCase() ?? 'kib';
  const factor = UNITS[unit];
  const amount = Number(text(memNode));
  if (!factor || !Number.isFinite(amount) || amount <= 0) throw bad(`<memory> ${String(text(memNode))} ${unit}`);
  const memoryMiB = Math.ceil((amount * factor) / 2 ** 20);
  if (dom['memoryBacking'] !== undefined)
    note('memoryBacking (huge pages, shared memory): Rubato backs guest memory its own way');
  if (dom['numatune'] !== undefined || (dom['cpu'] as Node | undefined)?.['numa'] !== undefined)
    note('NUMA placement: not carried (one NUMA node)');

  const domType = attr(dom, 'type');
  const accelerator: VmDefinition['accelerator'] = domType === 'qemu' ? 'tcg' : 'auto';

  // Firmware and boot.
  const os = (dom['os'] ?? {}) as Node;
  const loader = os['loader'] as Node | string | undefined;
  const loaderNode = typeof loader === 'object' ? loader : undefined;
  const efi =
    attr(os, 'firmware') === 'efi' ||
    attr(loaderNode, 'type') === 'pflash' ||
    /ovmf|edk2|\.fd$/i.test(text(loader) ?? '');
  const firmware: VmDefinition['firmware'] = efi ? 'uefi' : 'bios';
  if (efi && (attr(loaderNode, 'secure') === 'yes' || /secboot|\.ms\.fd/i.test(text(loader) ?? '')))
    note("Secure Boot: not carried (Rubato boots Debian's OVMF without Secure Boot, on the pc machine)");
  const nvram = text(os['nvram']);
  const machine = attr((os['type'] ?? undefined) as Node | undefined, 'machine') ?? '';
  if (/q35/.test(machine)) note(`machine ${machine}: the VM runs on the pc (i440fx) machine under Rubato`);
  const kernel = text(os['kernel']);
  const boot: VmDefinition['boot'] = kernel
    ? {
        kernel,
        ...(text(os['initrd']) ? { initrd: text(os['initrd'])! } : {}),
        append: text(os['cmdline']) ?? '',
      }
    : { from: 'disk' };

  const devices = (dom['devices'] ?? {}) as Node;
  // Disks: image files only (Rubato serves each over NBD and replicates its writes).
  const disks: VmDefinition['disks'] = [];
  for (const d of asArray(devices['disk'])) {
    const dev = attr(d['target'] as Node | undefined, 'dev') ?? '?';
    const kind = attr(d, 'device') ?? 'disk';
    const type = attr(d, 'type') ?? 'file';
    if (kind !== 'disk') {
      note(
        `${kind} ${dev}: not carried (a ${kind} is not replicated; attach its image as a disk if the guest needs it)`,
      );
      continue;
    }
    if (type !== 'file') {
      note(`disk ${dev}: not carried (a ${type} disk; Rubato replicates image files only)`);
      continue;
    }
    const file = attr(d['source'] as Node | undefined, 'file');
    if (!file) {
      note(`disk ${dev}: not carried (no image file)`);
      continue;
    }
    if (d['readonly'] !== undefined || d['shareable'] !== undefined)
      note(`disk ${dev}: read-only/shareable is not carried (the disk is the guest's own, replicated)`);
    const fmt = attr(d['driver'] as Node | undefined, 'type');
    const bus = attr(d['target'] as Node | undefined, 'bus') ?? 'virtio';
    let rbus: 'virtio' | 'scsi' = 'virtio';
    if (bus === 'scsi') rbus = 'scsi';
    else if (bus !== 'virtio')
      note(`disk ${dev}: on bus ${bus}, carried as virtio-blk (the guest needs virtio drivers)`);
    if (fmt && fmt !== 'raw' && fmt !== 'qcow2') {
      note(`disk ${dev}: format ${fmt} is not carried (raw or qcow2)`);
      continue;
    }
    disks.push({ path: file, bus: rbus, ...(fmt === 'raw' || fmt === 'qcow2' ? { format: fmt } : {}) });
  }
  if (disks.length > 16) throw bad(`${disks.length} disks: Rubato protects up to 16 disks per VM`);

  // NICs: each on a host bridge (a libvirt network is its bridge), its MAC and VLAN kept.
  const nics: VmDefinition['nics'] = [];
  for (const [i, n] of asArray(devices['interface']).entries()) {
    const type = attr(n, 'type') ?? '?';
    const mac = attr(n['mac'] as Node | undefined, 'address')?.toLowerCase();
    const model = attr(n['model'] as Node | undefined, 'type');
    const what = `interface ${i}${mac ? ` (${mac})` : ''}`;
    let bridge: string | null = null;
    if (type === 'bridge') bridge = attr(n['source'] as Node | undefined, 'bridge') ?? null;
    else if (type === 'network') {
      const net = attr(n['source'] as Node | undefined, 'network') ?? '';
      bridge = networkBridge(net);
      if (!bridge) {
        note(
          `${what}: libvirt network ${net} has no bridge Rubato could find; not carried (name its bridge in the VM file)`,
        );
        continue;
      }
      note(`${what}: libvirt network ${net} carried as its bridge ${bridge}`);
    } else {
      note(`${what}: type ${type} is not carried (Rubato puts each NIC on a host bridge)`);
      continue;
    }
    if (!bridge) {
      note(`${what}: no bridge named; not carried`);
      continue;
    }
    if (model && model !== 'virtio') note(`${what}: model ${model} carried as virtio-net`);
    const tags = asArray((n['vlan'] as Node | undefined)?.['tag']);
    const vlan = tags.length === 1 ? Number(attr(tags[0], 'id')) : undefined;
    if (tags.length > 1) note(`${what}: a VLAN trunk is not carried (one untagged VLAN per NIC)`);
    nics.push({ bridge, ...(mac ? { mac } : {}), ...(vlan ? { vlan } : {}) });
  }
  if (nics.length > 16) throw bad(`${nics.length} NICs: Rubato protects up to 16 NICs per VM`);

  for (const key of Object.keys(devices)) {
    if (key === 'disk' || key === 'interface' || key.startsWith('@') || key === '#text') continue;
    const why = NOT_CARRIED[key];
    if (why) note(`${key}: not carried: ${why}`);
    else if (!QUIETLY.has(key)) note(`${key}: not carried: Rubato has no equivalent`);
  }
  if (!kernel && disks.length === 0) throw bad('nothing to boot: no disk image Rubato can carry and no kernel');

  const def: VmDefinition = {
    name,
    cpus,
    memoryMiB,
    accelerator,
    firmware,
    ...(efi && nvram ? { uefiVars: nvram } : {}),
    disks,
    nics,
    boot,
  };
  return { def, notes };
}

/** The bridge of a libvirt network, from its XML (`virsh net-dumpxml NAME`). */
export function networkBridgeOf(xml: string): string | null {
  try {
    const doc = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@', processEntities: false }).parse(
      xml,
    ) as Node;
    const net = doc['network'] as Node | undefined;
    return attr(net?.['bridge'] as Node | undefined, 'name') ?? null;
  } catch {
    return null;
  }
}
