// A user's VM definition file (JSON): what `rubato protect` will run and protect. Parsed at the
// boundary: every mistake is one line naming the file and the field, never a stack trace; images
// and kernels are checked to exist and be readable, the disk's format is read from its header.
// Today's limits are said where they bite.

import { z } from 'zod';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, statSync, type Stats } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { RubatoError } from '../util/index.ts';
import { VmName } from './spec.ts';

const MAC = z
  .string()
  .regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, 'must be a MAC address like 52:54:00:12:34:56 (lower case)')
  .refine((m) => (parseInt(m.slice(0, 2), 16) & 1) === 0, 'must be a unicast address (the first byte even)');

export const VmDefinitionSchema = z
  .object({
    name: VmName,
    cpus: z.number().int().min(1).max(64).default(1),
    memoryMiB: z
      .number()
      .int()
      .min(64)
      .max(1 << 20),
    accelerator: z.enum(['auto', 'kvm', 'tcg']).default('auto'),
    disks: z
      .array(
        z
          .object({
            path: z.string().min(1, 'must name the image file'),
            /** Checked against the image's header; detected when left out. */
            format: z.enum(['raw', 'qcow2']).optional(),
            /** virtio (virtio-blk, the default) or scsi (a disk on a virtio-scsi controller). */
            bus: z.enum(['virtio', 'scsi']).default('virtio'),
          })
          .strict(),
      )
      .max(16, 'Rubato protects up to 16 disks per VM')
      .default([]),
    nics: z
      .array(
        z
          .object({
            /** A Linux bridge on the host; the standby attaches to the bridge of the same name at failover. */
            bridge: z
              .string()
              .regex(
                /^[a-zA-Z0-9_.-]{1,15}$/,
                'must be a bridge name (1-15 letters, digits, dots, dashes or underscores)',
              ),
            mac: MAC.optional(),
            /** A VLAN the NIC's port on the bridge carries untagged (the bridge filters VLANs: vlan_filtering 1). */
            vlan: z.number().int().min(1).max(4094).optional(),
          })
          .strict(),
      )
      .max(16, 'Rubato protects up to 16 NICs per VM')
      .default([]),
    /** bios (SeaBIOS, the default) or uefi (OVMF from Debian's ovmf package). */
    firmware: z.enum(['bios', 'uefi']).default('bios'),
    /**
     * false: the NICs offer no event index (virtio's VIRTIO_RING_F_EVENT_IDX), so the guest asks
     * for every interrupt. A Debian 12 guest on QEMU 7.2 under TCG can lose its transmit queue for
     * good with it (NETDEV WATCHDOG) after bulk inbound traffic; without it, not seen (docs/protect.md).
     */
    nicEventIdx: z.boolean().optional(),
    /**
     * UEFI: the VM's own variable store (an OVMF_VARS file, written by the guest's firmware);
     * without it Rubato keeps one per VM in its state folder, made from OVMF's template.
     */
    uefiVars: z.string().min(1).optional(),
    /** A cloud-init NoCloud seed Rubato builds and attaches as a small extra disk (label cidata). */
    cloudInit: z
      .object({ userData: z.string().min(1), metaData: z.string().min(1).optional() })
      .strict()
      .optional(),
    boot: z.union(
      [
        z.object({ from: z.literal('disk') }).strict(),
        z
          .object({ kernel: z.string().min(1), initrd: z.string().min(1).optional(), append: z.string().default('') })
          .strict(),
      ],
      { error: 'must be {"from": "disk"} or {"kernel": FILE, "initrd": FILE, "append": CMDLINE}' },
    ),
  })
  .strict();

export type VmDefinition = z.infer<typeof VmDefinitionSchema>;

/** A definition with its files resolved (relative to the definition's folder) and checked. */
export interface ResolvedVm extends VmDefinition {
  file: string;
  /** Resolved and checked; absent for a BIOS VM or when Rubato keeps the store. */
  uefiVars?: string | undefined;
  cloudInit?: { userData: string; metaData?: string | undefined } | undefined;
  disks: Array<{ path: string; format: 'raw' | 'qcow2'; sizeBytes: number; bus: 'virtio' | 'scsi' }>;
  nics: Array<{ bridge: string; mac: string; vlan?: number | undefined }>;
}

const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
/** cloud-init's user data and meta data go on a 4 MiB seed disk. */
const MAX_CLOUD_INIT_BYTES = 1024 * 1024;

const fail = (file: string, field: string, msg: string) =>
  new RubatoError('RUBATO_CONFIG', `${file}: ${field}: ${msg}`, { file, field });

/** A stable, locally administered MAC address for a VM that gives none (same name, same MAC). */
export function defaultMac(name: string, index = 0): string {
  const h = createHash('sha256').update(`rubato/${name}/${index}`).digest();
  return ['52', '54', '00', ...[h[0]!, h[1]!, h[2]!].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

/** The image's format from its first bytes. */
export function detectFormat(path: string): 'raw' | 'qcow2' {
  const fd = openSync(path, 'r');
  try {
    const head = Buffer.alloc(4);
    const n = readSync(fd, head, 0, 4, 0);
    return n === 4 && head.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } finally {
    closeSync(fd);
  }
}

/** Parses an already read definition; `file` names it in every error. Pure but for the checks of files. */
export function parseVmDefinition(text: string, file: string): ResolvedVm {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw fail(file, '(file)', `not JSON: ${(e as Error).message}`);
  }
  const r = VmDefinitionSchema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    const field = issue.path.length
      ? issue.path
          .map((p) => (typeof p === 'number' ? `[${p}]` : `.${String(p)}`))
          .join('')
          .replace(/^\./, '')
      : '(top level)';
    throw fail(file, field, issue.message);
  }
  const def = r.data;
  const base = dirname(resolve(file));
  const readable = (p: string, field: string): string => {
    const abs = resolve(base, p);
    let st: Stats;
    try {
      st = statSync(abs);
    } catch (e) {
      throw fail(
        file,
        field,
        `cannot use ${abs}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`,
      );
    }
    if (!st.isFile()) throw fail(file, field, `${abs} is not a regular file`);
    try {
      closeSync(openSync(abs, 'r'));
    } catch (e) {
      throw fail(file, field, `cannot read ${abs}: ${(e as Error).message}`);
    }
    return abs;
  };
  const disks = def.disks.map((d, i) => {
    const path = readable(d.path, `disks[${i}].path`);
    const format = detectFormat(path);
    if (d.format && d.format !== format)
      throw fail(file, `disks[${i}].format`, `says ${d.format}, but ${path} is ${format}`);
    const sizeBytes = statSync(path).size;
    if (format === 'raw' && sizeBytes % 4096 !== 0)
      throw fail(file, `disks[${i}].path`, `${path} is ${sizeBytes} bytes; a raw image must be a multiple of 4096`);
    return { path, format, sizeBytes, bus: d.bus };
  });
  const nics = def.nics.map((n, i) => ({
    bridge: n.bridge,
    mac: n.mac ?? defaultMac(def.name, i),
    ...(n.vlan ? { vlan: n.vlan } : {}),
  }));
  const macs = new Set(nics.map((n) => n.mac));
  if (macs.size !== nics.length) throw fail(file, 'nics', 'two NICs have the same MAC address');
  if (def.uefiVars !== undefined && def.firmware !== 'uefi')
    throw fail(
      file,
      'uefiVars',
      'is a UEFI variable store, but the VM boots through the BIOS (set "firmware": "uefi")',
    );
  const uefiVars = def.uefiVars === undefined ? undefined : readable(def.uefiVars, 'uefiVars');
  if (uefiVars && statSync(uefiVars).size % 4096 !== 0)
    throw fail(file, 'uefiVars', `${uefiVars} is not an OVMF variable store (its size is not a multiple of 4096)`);
  let cloudInit: ResolvedVm['cloudInit'];
  if (def.cloudInit) {
    const small = (p: string, field: string) => {
      const abs = readable(p, field);
      if (statSync(abs).size > MAX_CLOUD_INIT_BYTES)
        throw fail(file, field, `${abs} is larger than ${MAX_CLOUD_INIT_BYTES / 1024} KiB`);
      return abs;
    };
    cloudInit = {
      userData: small(def.cloudInit.userData, 'cloudInit.userData'),
      ...(def.cloudInit.metaData ? { metaData: small(def.cloudInit.metaData, 'cloudInit.metaData') } : {}),
    };
  }
  let boot = def.boot;
  if ('from' in boot) {
    if (!disks.length) throw fail(file, 'boot', 'boots from the disk, but the VM has no disk');
  } else {
    boot = {
      ...boot,
      kernel: readable(boot.kernel, 'boot.kernel'),
      ...(boot.initrd ? { initrd: readable(boot.initrd, 'boot.initrd') } : {}),
    };
  }
  return {
    ...def,
    file,
    disks,
    nics,
    boot,
    ...(uefiVars ? { uefiVars } : {}),
    ...(cloudInit ? { cloudInit } : {}),
  };
}

/** Reads and checks a VM definition file. */
export function loadVmDefinition(file: string): ResolvedVm {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw fail(file, '(file)', `cannot read it: ${(e as Error).message}`);
  }
  return parseVmDefinition(text, file);
}
