// The Debian guest on a LAN for the chaos harness and the services benchmark: a copy of the built
// image (sparse), hosts on the guest's subnet (10.231.0.0/24, its address is static), the guest's
// NIC and disk on the first host, booted from its disk until its services are up.

import { constants, writeFileSync } from 'node:fs';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Lan, type LanHost } from '../io/index.ts';
import { parseVmDefinition, resolveAccel, type AccelChoice } from '../qemu/index.ts';
import { specOf } from '../host/index.ts';
import { ensureDebianImage, ensureGuestImage, ensurePatchedQemu, ensureTapRelay, stockQemu } from '../setup/index.ts';
import { bootRig, type KvRig, type RigPlan } from './kv-rig.ts';

/** The Debian guest's static address (guest/debian/files/etc/network/interfaces). */
export const DEBIAN_SUBNET = '10.231.0';

export interface DebianRigOptions {
  hosts?: number;
  cpus?: number;
  memMb?: number;
  nicEventIdx?: boolean;
}

export async function startDebianRig(
  dir: string,
  accelChoice: AccelChoice,
  tag: string,
  o: DebianRigOptions = {},
): Promise<KvRig> {
  return bootRig(await planDebianRig(dir, accelChoice, tag, o));
}

/** The Debian rig's LAN, hosts and guest (a sparse copy of the built image), not booted yet. */
export async function planDebianRig(
  dir: string,
  accelChoice: AccelChoice,
  tag: string,
  o: DebianRigOptions = {},
): Promise<RigPlan> {
  const image = await ensureDebianImage();
  const { accel } = await resolveAccel(accelChoice, stockQemu(), await ensureGuestImage());
  const binary = accel === 'tcg' ? await ensurePatchedQemu() : stockQemu();
  const tapRelay = await ensureTapRelay();
  const disk = join(dir, 'debian.img');
  await copyFile(image, disk, constants.COPYFILE_FICLONE); // (async: a signal is not kept waiting for 8 GiB)
  const lan = await Lan.create(tag, { subnet: DEBIAN_SUBNET });
  try {
    const hosts: LanHost[] = [];
    for (let i = 0; i < (o.hosts ?? 2); i++) hosts.push(await lan.addHost(`h${String.fromCharCode(97 + i)}`));
    const file = join(dir, 'debian.json');
    const text = JSON.stringify({
      name: 'debian',
      cpus: o.cpus ?? 1,
      memoryMiB: o.memMb ?? 1024,
      accelerator: accel,
      disks: [{ path: disk }],
      nics: [{ bridge: hosts[0]!.bridge }],
      // (Debian 12 on QEMU 7.2 under TCG: without it its transmit queue can stall for good)
      nicEventIdx: o.nicEventIdx ?? accel !== 'tcg',
      boot: { from: 'disk' },
    });
    writeFileSync(file, text);
    const spec = specOf(parseVmDefinition(text, file), accel);
    return {
      lan,
      hosts,
      dir,
      accel,
      guest: { spec, binary, disk, ready: /RUBATO debian ready/, readyMs: 300_000, tapRelay },
    };
  } catch (e) {
    await lan.destroy();
    throw e;
  }
}
