// The service workloads the evaluation runs on a LAN guest (NIC through the relay, disk through the
// NBD server): what the guest runs, when it is ready, and the load a client puts on it.

import { join } from 'node:path';
import { KV_WORKLOAD, clientProcess, type KvRig, type RigWorkload } from '../chaos/index.ts';

export const RIG_WORKLOADS = ['kv', 'web', 'disk'] as const;
export const RIG: Record<string, { workload: RigWorkload }> = {
  kv: { workload: KV_WORKLOAD },
  // busybox httpd serves the initramfs; a 60 kB kernel module is the page
  web: { workload: { wl: ['httpd', '-f', '-p', 80, '-h', '/'], ready: /RUBATO boot ok/ } },
  disk: { workload: { wl: ['fsyncer', '/data/fsync.log', 4, 8, 100], ready: /RUBATO fsyncer t=/ } },
};
/** Request/response services: judged on added latency rather than progress. */
export const served = (wl: string): boolean => wl === 'kv' || wl === 'web';

export const WEB_PAGE = '/lib/modules/virtio_pci.ko';

/** Starts the closed-loop client of a service workload (4 connections); null for the disk writer. */
export function loadClient(name: string, rig: KvRig, seconds: number): ReturnType<typeof clientProcess> | null {
  if (name === 'kv')
    return clientProcess(rig.lan, [
      '--target',
      `${rig.lan.guestIp}:7000`,
      '--conns',
      '4',
      '--seconds',
      String(seconds),
    ]);
  if (name === 'web')
    return clientProcess(
      rig.lan,
      ['--target', `${rig.lan.guestIp}:80`, '--path', WEB_PAGE, '--conns', '4', '--seconds', String(seconds)],
      join('src', 'bench', 'web-client.ts'),
    );
  return null;
}
