// A typed VM description and its QEMU command line. Pure: the same spec always gives the same
// argv, so a restored VM gets exactly the machine its checkpoint came from.

import { z } from 'zod';

export const Accel = z.enum(['kvm', 'tcg']);
export type Accel = z.infer<typeof Accel>;

/**
 * A VM's name: it names folders, sockets, TAP tags and witness keys, so it is one safe path
 * component — a letter or digit first (never `.` or `..`), then letters, digits, `.`, `-`, `_`.
 */
export const VM_NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,39}$/;
export const VM_NAME_RULE = '1-40 letters, digits, dots, dashes or underscores, starting with a letter or digit';
export const VmName = z.string().regex(VM_NAME_RE, `must be ${VM_NAME_RULE}`);

export const VmSpecSchema = z
  .object({
    name: VmName,
    accel: Accel,
    cpus: z.number().int().min(1).max(64),
    memMb: z
      .number()
      .int()
      .min(32)
      .max(1 << 20),
    /** Guest RAM in a shared file (memory-backend-file, share=on); required for route B and restore. */
    ramFile: z.string().optional(),
    /** Direct kernel boot; without a kernel the VM boots from its disk through the firmware. */
    kernel: z.string().optional(),
    initrd: z.string().optional(),
    append: z.string().optional(),
    /** A virtio NIC (MAC address), wired to Rubato's relay at launch. */
    mac: z
      .string()
      .regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, 'MAC address like 52:54:00:12:34:56')
      .optional(),
    /** The host bridge the NIC's TAP joins (on the primary, and on the standby at failover). */
    bridge: z
      .string()
      .regex(/^[a-zA-Z0-9_.-]{1,15}$/)
      .optional(),
    /**
     * Several NICs, each on its own relay and TAP (the first may also be given as mac/bridge, a
     * one-NIC VM's form); absent: the one NIC of mac/bridge, if any.
     */
    nics: z
      .array(
        z
          .object({
            mac: z.string().regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/),
            bridge: z.string().regex(/^[a-zA-Z0-9_.-]{1,15}$/),
            vlan: z.number().int().min(1).max(4094).optional(),
          })
          .strict(),
      )
      .max(16)
      .optional(),
    /** A virtio disk served by Rubato's NBD server at launch. */
    disk: z.boolean().optional(),
    /** false: the virtio NICs offer no event index (the definition's nicEventIdx). */
    nicEventIdx: z.boolean().optional(),
    /**
     * Several disks, each served by its own NBD server (replica blocks disk0, disk1, …) on its bus;
     * absent: one virtio disk when `disk`.
     */
    disks: z
      .array(z.object({ bus: z.enum(['virtio', 'scsi', 'pflash']) }).strict())
      .max(18)
      .optional(),
    /**
     * UEFI: the firmware's code (OVMF, read-only flash 0). The VM's variable store is its last disk,
     * on bus `pflash` (flash 1): replicated with the checkpoints like any disk.
     */
    uefiCode: z.string().startsWith('/').optional(),
  })
  .refine((s) => s.kernel !== undefined || diskBuses(s).some((b) => b !== 'pflash'), {
    message: 'a VM without a kernel boots from its disk, and needs one',
  })
  .refine(
    (s) => {
      const buses = diskBuses(s);
      const flash = buses.filter((b) => b === 'pflash').length;
      return s.uefiCode ? flash === 1 && buses.at(-1) === 'pflash' : flash === 0;
    },
    { message: 'a UEFI VM has one variable store, its last disk (bus pflash); a BIOS VM has none' },
  );
export type VmSpec = z.infer<typeof VmSpecSchema>;

export interface SpecNic {
  mac: string;
  bridge: string;
  vlan?: number | undefined;
}

/** The spec's NICs, in the guest's order. */
export function nicsOf(s: {
  mac?: string | undefined;
  bridge?: string | undefined;
  nics?: SpecNic[] | undefined;
}): SpecNic[] {
  return s.nics ? s.nics : s.mac && s.bridge ? [{ mac: s.mac, bridge: s.bridge }] : [];
}

/** The bus of each of the spec's disks, in its order. */
export type DiskBus = 'virtio' | 'scsi' | 'pflash';
export function diskBuses(s: { disk?: boolean | undefined; disks?: Array<{ bus: DiskBus }> | undefined }): DiskBus[] {
  return s.disks ? s.disks.map((d) => d.bus) : s.disk ? ['virtio'] : [];
}

/** The RAM block that holds guest memory, as QEMU names it in the migration stream. */
export const MAIN_RAM_ID = 'mem0';

export interface LaunchPaths {
  qmpSocket: string;
  serialSocket: string;
  /** Extra firmware search folders (a patched binary built outside Debian's tree needs them). */
  firmwareDirs: readonly string[];
  /** Rubato's network relay (unix socket), when the spec has a NIC. */
  netSocket?: string;
  /** One relay socket per NIC, in the spec's order (netSocket: a one-NIC VM's). */
  netSockets?: readonly string[];
  /** Rubato's NBD servers (unix sockets), one per disk of the spec, in its order. */
  nbdSockets?: readonly string[];
  /**
   * The VM as its owner runs it without Rubato (a QEMU Rubato can adopt): its disks' image files
   * instead of NBD servers, and TAP devices (by name) instead of relays.
   */
  own?: { diskFiles: readonly string[]; taps: readonly string[] };
}

export interface LaunchMode {
  /** Start paused (-S). */
  paused: boolean;
  /** Wait for an incoming migration (`-incoming defer`). */
  incoming: boolean;
}

export function qemuArgs(spec: VmSpec, paths: LaunchPaths, mode: LaunchMode): string[] {
  const mem = spec.ramFile
    ? `memory-backend-file,id=${MAIN_RAM_ID},size=${spec.memMb}M,mem-path=${spec.ramFile},share=on`
    : `memory-backend-ram,id=${MAIN_RAM_ID},size=${spec.memMb}M`;
  const buses = diskBuses(spec);
  // UEFI: the firmware's code is flash 0 (read-only, from the host), the VM's variable store flash 1.
  const flash = spec.uefiCode ? `,pflash0=fw-code,pflash1=disk${buses.indexOf('pflash')}` : '';
  const args = [
    '-name',
    `rubato-${spec.name},debug-threads=on`, // (its threads named: "CPU 0/TCG", "COLO incoming", in ps and perf)
    '-machine',
    `pc,accel=${spec.accel},memory-backend=${MAIN_RAM_ID}${flash}`,
    '-cpu',
    spec.accel === 'kvm' ? 'host' : 'max',
    '-smp',
    String(spec.cpus),
    '-m',
    `${spec.memMb}M`,
    '-object',
    mem,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-vga',
    'none',
    '-chardev',
    `socket,id=ser0,path=${paths.serialSocket},server=on,wait=off`,
    '-serial',
    'chardev:ser0',
    '-qmp',
    `unix:${paths.qmpSocket},server=on,wait=off`,
  ];
  if (spec.kernel) {
    args.push('-kernel', spec.kernel);
    if (spec.initrd) args.push('-initrd', spec.initrd);
    if (spec.append) args.push('-append', spec.append);
  }
  const nics = spec.nics ?? (spec.mac ? [{ mac: spec.mac }] : []);
  const netSockets = paths.own
    ? paths.own.taps
    : paths.netSockets?.length
      ? paths.netSockets
      : paths.netSocket
        ? [paths.netSocket]
        : [];
  if (netSockets.length !== nics.length)
    throw new Error(`VM ${spec.name} has ${nics.length} NICs but ${netSockets.length} relay sockets were given`);
  for (const [i, nic] of nics.entries()) {
    args.push(
      '-netdev',
      paths.own
        ? `tap,id=n${i},ifname=${netSockets[i]},script=no,downscript=no,vnet_hdr=off` // (no offloads: as behind Rubato's relay)
        : `stream,id=n${i},server=off,addr.type=unix,addr.path=${netSockets[i]}`,
      '-device',
      `virtio-net-pci,netdev=n${i},mac=${nic.mac},romfile=${spec.nicEventIdx === false ? ',event_idx=off' : ''}`,
    );
  }
  const nbdSockets = paths.own?.diskFiles ?? paths.nbdSockets ?? [];
  if (nbdSockets.length !== buses.length)
    throw new Error(`VM ${spec.name} has ${buses.length} disks but ${nbdSockets.length} NBD sockets were given`);
  if (spec.uefiCode) args.push('-blockdev', `driver=file,node-name=fw-code,filename=${spec.uefiCode},read-only=on`);
  if (buses.includes('scsi')) args.push('-device', 'virtio-scsi-pci,id=scsi0');
  for (const [i, bus] of buses.entries()) {
    args.push(
      '-blockdev',
      paths.own
        ? `driver=file,node-name=disk${i},filename=${nbdSockets[i]}`
        : `driver=nbd,node-name=disk${i},server.type=unix,server.path=${nbdSockets[i]},export=disk`,
    );
    if (bus === 'pflash') continue; // the machine's flash 1 (above)
    const boot = i === 0 && !spec.kernel ? ',bootindex=1' : '';
    args.push(
      '-device',
      bus === 'scsi' ? `scsi-hd,drive=disk${i},bus=scsi0.0${boot}` : `virtio-blk-pci,drive=disk${i}${boot}`,
    );
  }
  for (const d of paths.firmwareDirs) args.push('-L', d);
  if (mode.paused) args.push('-S');
  if (mode.incoming) args.push('-incoming', 'defer');
  return args;
}

/** The kernel command line for the test guest running one workload program. */
export function guestAppend(
  workload: readonly (string | number)[],
  opts: { ip?: string; disk?: string; ip2?: string; rawDisk?: string; efivar?: string } = {},
): string {
  const wl = workload.map(String).join(',');
  const more = [
    opts.ip ? `rubato.ip=${opts.ip}` : '',
    opts.efivar ? `rubato.efivar=${opts.efivar}` : '',
    opts.disk ? `rubato.disk=${opts.disk}` : '',
    opts.ip2 ? `rubato.ip2=${opts.ip2}` : '',
    opts.rawDisk ? `rubato.rawdisk=${opts.rawDisk}` : '',
  ].filter(Boolean);
  return `console=ttyS0 quiet panic=-1 rubato.wl=${wl}${more.map((m) => ` ${m}`).join('')}`;
}

/** The test guest's dirtier progress line on its console: its counter and its own memory check. */
export const DIRTIER_LINE_RE =
  /RUBATO dirtier t=(\d+) work=(\d+) pages=(\d+) checks=\d+ bad=(\d+) failures=(\d+) check=(\w+)/;

export function parseDirtierLine(
  line: string,
): { tMs: number; work: number; pages: number; bad: number; ok: boolean } | null {
  const m = line.match(DIRTIER_LINE_RE);
  if (!m) return null;
  return {
    tMs: Number(m[1]),
    work: Number(m[2]),
    pages: Number(m[3]),
    bad: Number(m[4]),
    ok: m[6] === 'ok' && m[5] === '0',
  };
}
